"""Plots over result tables: scaling, staleness, one iteration's timeline, where the time goes,
and how far predictions are from measurements.

Each function draws on ``ax`` (a new 6 x 4 in figure when ``None``) and returns the Axes;
titles are the caller's. Inputs are the project's own tables: a sweep table with one row per
configuration (``throughput_vs_workers``, ``scaling_efficiency``), :class:`RunResult`\\ s
(``staleness``, ``timeline``, ``breakdown``), or a validation table with columns
``experiment, strategy, metric, predicted, measured, rel_error`` (``predicted_vs_measured``,
``error_by_strategy``). A missing column or a bad argument raises ``ValueError`` naming it.

Matplotlib is imported here only; ``import simulator`` does not load it.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
import pandas as pd
from matplotlib.ticker import (
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    NullLocator,
    PercentFormatter,
)

__all__ = [
    "breakdown",
    "error_by_strategy",
    "iteration_breakdown",
    "predicted_vs_measured",
    "scaling_efficiency",
    "staleness",
    "throughput_vs_workers",
    "timeline",
]

AXIS_LABELS = {
    "workers": "workers",
    "gpus": "GPUs",
    "nodes": "nodes",
    "throughput": "throughput (samples/s)",
    "applied_samples_per_second": "samples/s in applied updates",
}
METRIC_UNITS = {
    "throughput": "samples/s",
    "applied_samples_per_second": "samples/s",
    "updates_per_second": "updates/s",
    "iteration_time": "s",
    "iteration_time_mean": "s",
    "iteration_time_p50": "s",
    "iteration_time_p99": "s",
    "compute_time_mean": "s",
    "exposed_comm_mean": "s",
    "makespan": "s",
    "bytes_on_wire": "bytes",
    "peak_memory": "bytes",
}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")

# Op kind (the name's leading word, as the executors write it) -> legend label, colour.
KINDS = {
    "forward": ("forward", "tab:blue"),
    "recompute": ("recompute", "lightskyblue"),
    "backward": ("backward", "tab:green"),
    "optimizer_step": ("optimizer step", "tab:purple"),
    "encode": ("encode/decode", "tab:brown"),
    "decode": ("encode/decode", "tab:brown"),
    "apply": ("apply (server)", "tab:pink"),
    "all_reduce": ("all-reduce", "tab:red"),
    "reduce_scatter": ("reduce-scatter", "salmon"),
    "all_gather": ("all-gather", "tab:olive"),
    "broadcast": ("broadcast", "goldenrod"),
    "all_to_all": ("all-to-all", "maroon"),
    "send": ("send", "tab:orange"),
    "recv": ("recv", "navajowhite"),
    "link": ("link busy", "tab:gray"),
    "other": ("other", "black"),
}
PARTS = {  # breakdown column -> legend label, colour
    "compute": ("compute", "tab:blue"),
    "exposed_comm": ("exposed comm", "tab:red"),
    "idle": ("idle (bubble/wait)", "lightgray"),
}


# -- sweep tables --------------------------------------------------------------------------------


def throughput_vs_workers(table: pd.DataFrame, *, x: str = "workers", y: str = "throughput",
                          by: str | list[str] | None = "strategy", ax=None, ideal=None,
                          scale: Literal["auto", "linear", "log"] = "auto"):
    """``y`` against ``x``, one line with markers per ``by`` group (one row per group and x).

    ``ideal`` adds linear scaling from the smallest x: ``True`` from the best y there, a group
    label from that group's point, a number as the y at the smallest x. ``scale="auto"`` draws
    log-log (x in powers of two) when x spans a factor of 8 or more.
    """
    groups = _sweep_groups(table, x, y, by, "throughput_vs_workers")
    ax = _axes(ax)
    for label, xs, ys in groups:
        ax.plot(xs, ys, marker="o", ms=4, label=label)
    if ideal is not None and ideal is not False:
        x0, y0 = _ideal_base(table, x, y, groups, ideal)
        xs = np.unique(np.concatenate([g[1] for g in groups]))
        ax.plot(xs, y0 * xs / x0, "k--", lw=1, label="linear scaling")
    log = _log_x(ax, table[x].to_numpy(float), scale, "throughput_vs_workers")
    if log:
        ax.set_yscale("log")
        _log_ticks(ax.yaxis, *ax.get_ylim())
    ax.set_xlabel(AXIS_LABELS.get(x, x))
    ax.set_ylabel(AXIS_LABELS.get(y, y))
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax)
    return ax


def scaling_efficiency(table: pd.DataFrame, *, x: str = "workers", y: str = "throughput",
                       by: str | list[str] | None = "strategy", ax=None,
                       scale: Literal["auto", "linear", "log"] = "auto"):
    """Scaling efficiency y / (x / x0 * y(x0)) in percent per group, x0 the group's smallest x,
    with a 100 % line (linear scaling)."""
    groups = _sweep_groups(table, x, y, by, "scaling_efficiency")
    ax = _axes(ax)
    top = 100.0
    for label, xs, ys in groups:
        if ys[0] <= 0:
            raise ValueError(f"scaling_efficiency: {y} at the smallest {x} ({xs[0]:g}) of {label or 'the table'} "
                             f"is {ys[0]!r}; the baseline must be positive")
        eff = 100.0 * ys / (xs / xs[0] * ys[0])
        ax.plot(xs, eff, marker="o", ms=4, label=label)
        top = max(top, float(np.nanmax(eff)))
    ax.axhline(100.0, color="black", ls="--", lw=1, label="linear scaling")
    _log_x(ax, table[x].to_numpy(float), scale, "scaling_efficiency")
    ax.set_ylim(0, top * 1.08)
    ax.yaxis.set_major_formatter(PercentFormatter(100.0))
    ax.set_xlabel(AXIS_LABELS.get(x, x))
    ax.set_ylabel(f"scaling efficiency ({y} vs linear)" if y != "throughput" else "scaling efficiency")
    ax.grid(True, alpha=0.3)
    _legend(ax)
    return ax


# -- runs ----------------------------------------------------------------------------------------


def staleness(results, *, kind: Literal["hist", "cdf"] = "hist", labels=None, ax=None):
    """Staleness of the applied gradients (``updates`` table) of one or more runs.

    ``hist``: fraction of applied gradients per staleness as a step histogram (a ``StepPatch``
    per run), one bin per integer from 0 to the run's largest staleness, empty ones at 0;
    ``cdf``: the empirical CDF P(staleness <= k) as a step line.
    """
    if kind not in ("hist", "cdf"):
        raise ValueError(f"staleness: kind must be 'hist' or 'cdf', got {kind!r}")
    runs = _runs(results, "staleness")
    labels = _labels(runs, labels, "staleness")
    values = []
    for run, label in zip(runs, labels):
        up = getattr(run, "updates", None)
        _require(up, ["staleness", "applied"], f"staleness: run {label!r} updates", allow_empty=True)
        s = up.loc[up["applied"].astype(bool), "staleness"].to_numpy()
        if not len(s):
            raise ValueError(f"staleness: run {label!r} applied no gradients with a staleness (its updates "
                             "table is empty; strategies that apply gradients, e.g. ParameterServer, fill it)")
        s = s.astype(int)
        if s.min() < 0:
            raise ValueError(f"staleness: run {label!r} has a negative staleness ({s.min()})")
        values.append(s)
    bins = max(int(s.max()) for s in values) + 1
    ax = _axes(ax)
    for i, (s, label) in enumerate(zip(values, labels)):
        if kind == "hist":  # each run's own bins 0..its max: no flat tail drawn along the axis
            frac = np.bincount(s) / len(s)
            colour = _colour(i)
            ax.stairs(frac, np.arange(len(frac) + 1) - 0.5, label=label, lw=1.5, edgecolor=colour,
                      fill=len(values) == 1, facecolor=(colour, 0.3))
        else:  # F(k) = P(staleness <= k), from 0 before the smallest value to 1 at the largest of all
            frac = np.bincount(s, minlength=bins) / len(s)
            ax.step(np.arange(-1, bins), np.concatenate([[0.0], np.cumsum(frac)]), where="post",
                    label=label)
    ax.set_xlim(-0.5 if kind == "hist" else -1, bins - 0.5)
    ax.set_ylim(0, 1.02 if kind == "cdf" else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("staleness (updates between read and apply)")
    ax.set_ylabel("fraction of applied gradients" if kind == "hist"
                  else "cumulative fraction of applied gradients")
    ax.grid(True, alpha=0.3)
    _legend(ax)
    return ax


def timeline(result, *, iteration: int | None = None, ranks=None, links: bool = True, ax=None):
    """Gantt chart of one iteration: a row per (rank, stream) and per busy link, bars by op kind.

    ``iteration`` defaults to a middle one (steady state). Ranks that record iterations show
    their spans of that iteration; ranks that do not (parameter servers) and links show what
    overlaps the iteration's window (first start to last end over the shown ranks), clipped;
    links busy for less than 1 % of the window are left out. Time is relative to the window's
    start.
    """
    tl, it = _run_tables(result, "timeline")
    iters = np.sort(it["iteration"].unique())
    if iteration is None:
        iteration = int(iters[len(iters) // 2])
    elif iteration not in set(iters.tolist()):
        raise ValueError(f"timeline: iteration {iteration!r} is not in the run (iterations "
                         f"{int(iters[0])}..{int(iters[-1])})")
    have = sorted(int(r) for r in tl.loc[tl["rank"] >= 0, "rank"].unique())
    if ranks is None:
        ranks = have
    else:
        ranks = sorted({int(r) for r in ranks})
        missing = [r for r in ranks if r not in have]
        if missing or not ranks:
            raise ValueError(f"timeline: ranks {missing or ranks} have no spans (ranks in the timeline: {have})")
    rows_it = it[it["iteration"] == iteration]
    shown = rows_it[rows_it["rank"].isin(ranks)]
    window = shown if len(shown) else rows_it
    t0, t1 = float(window["start"].min()), float(window["end"].max())
    counted = set(it["rank"].unique().tolist())
    sel = tl[tl["rank"].isin(ranks)]
    own = sel[sel["rank"].isin(counted) & (sel["iteration"] == iteration)]
    parts = [own, _clip(sel[~sel["rank"].isin(counted)], t0, t1)]
    if links:
        parts.append(_clip(tl[tl["rank"] < 0], t0, t1))
    spans = pd.concat(parts, ignore_index=True)

    streams = set(zip(tl["rank"].tolist(), tl["stream"].tolist()))
    rows = [(r, s) for r in ranks for s in ("compute", "comm") if (r, s) in streams]
    ranks_table = getattr(result, "ranks", None)
    hosts = set()
    if isinstance(ranks_table, pd.DataFrame) and {"rank", "kind"} <= set(ranks_table.columns):
        hosts = set(ranks_table.loc[ranks_table["kind"] == "host", "rank"].tolist())
    labels = [f"rank {r}{' (host)' if r in hosts else ''} {s}" for r, s in rows]
    index = {row: i for i, row in enumerate(rows)}
    if links:  # links idle for 99 % of the window would only add empty rows
        on_links = spans[spans["rank"] < 0]
        busy_time = (on_links["end"] - on_links["start"]).groupby(on_links["name"]).sum()
        spans = spans[(spans["rank"] >= 0) | spans["name"].map(busy_time >= 0.01 * (t1 - t0))]
        busy = sorted(busy_time.index[busy_time >= 0.01 * (t1 - t0)], key=_natural)
        for name in busy:
            index[(-1, name)] = len(labels)
            labels.append(name)
    row = [index[(r, n if r < 0 else s)] for r, s, n in zip(spans["rank"], spans["stream"], spans["name"])]
    spans = spans.assign(row=row, kind=[_kind(n) if r >= 0 else "link"
                                        for r, n in zip(spans["rank"], spans["name"])])

    scale, unit = _time_unit(max(t1, float(spans["end"].max()) if len(spans) else t1) - t0)
    ax = _axes(ax, figsize=(6, min(12, max(4, 1.2 + 0.3 * len(labels)))))
    drawn = set()
    edge = 0.3 if len(spans) <= 300 else 0.0  # separates neighbours; on dense rows it only pales them
    for kind, (label, colour) in KINDS.items():
        sub = spans[spans["kind"] == kind]
        if sub.empty:
            continue
        ax.barh(sub["row"], (sub["end"] - sub["start"]) * scale, left=(sub["start"] - t0) * scale,
                height=0.8, color=colour, edgecolor="white", linewidth=edge,
                label=None if label in drawn else label)
        drawn.add(label)
    ax.set_yticks(range(len(labels)), labels, fontsize="small")
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlim(0, None)
    ax.set_xlabel(f"time since iteration {iteration} began ({unit})")
    ax.grid(True, axis="x", alpha=0.3)
    if drawn:
        per_line = 4 if len(drawn) <= 4 else 3  # four long labels overrun an axes narrowed by row labels
        lines = -(-len(drawn) // per_line)
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.01), ncol=-(-len(drawn) // lines), fontsize="small",
                  frameon=False, borderaxespad=0)
    return ax


def iteration_breakdown(result, *, warmup: int = 0) -> pd.DataFrame:
    """Each (rank, iteration) of ``result.iterations`` split by the rank's timeline spans.

    Columns: rank, iteration, start, end, duration, compute (compute stream busy),
    exposed_comm (compute stream idle while at least one of the rank's comm spans is in
    flight), idle (neither: pipeline bubbles, waiting on a server or peer); the three sum to
    duration. Spans are clipped to the iteration's window whatever iteration they are labelled
    with. Iterations below ``warmup`` are left out.

    Not the ``iterations`` table's ``exposed_comm``, which is all of duration - compute.
    """
    tl, it = _run_tables(result, "iteration_breakdown")
    if not isinstance(warmup, int | np.integer) or warmup < 0:
        raise ValueError(f"iteration_breakdown: warmup must be an integer >= 0, got {warmup!r}")
    out = it.loc[it["iteration"] >= warmup, ["rank", "iteration", "start", "end", "duration"]]
    if out.empty:
        raise ValueError(f"iteration_breakdown: no iterations left after warmup={warmup} "
                         f"(the run has {it['iteration'].nunique()})")
    out = out.reset_index(drop=True)
    compute = np.zeros(len(out))
    covered = np.zeros(len(out))
    starts, ends = out["start"].to_numpy(float), out["end"].to_numpy(float)
    spans = {r: g for r, g in tl[tl["stream"].isin(("compute", "comm"))].groupby("rank")}
    for rank, idx in out.groupby("rank").indices.items():
        g = spans.get(rank)
        if g is None:
            continue
        busy = (g["stream"] == "compute").to_numpy()
        s, e = g["start"].to_numpy(float), g["end"].to_numpy(float)
        compute[idx] = _measure(*_union(s[busy], e[busy]), starts[idx], ends[idx])
        covered[idx] = _measure(*_union(s, e), starts[idx], ends[idx])
    out["compute"] = compute
    out["exposed_comm"] = covered - compute
    out["idle"] = out["duration"] - covered
    return out


def breakdown(results, *, labels=None, ax=None, orientation: Literal["horizontal", "vertical"] = "horizontal",
              warmup: int = 0):
    """Mean iteration time of each run as stacked bars: compute, exposed communication, idle
    (:func:`iteration_breakdown` averaged over ranks and iterations)."""
    if orientation not in ("horizontal", "vertical"):
        raise ValueError(f"breakdown: orientation must be 'horizontal' or 'vertical', got {orientation!r}")
    runs = _runs(results, "breakdown")
    labels = _labels(runs, labels, "breakdown")
    means = pd.DataFrame([iteration_breakdown(r, warmup=warmup)[list(PARTS)].mean() for r in runs])
    totals = means.sum(axis=1).to_numpy()
    scale, unit = _time_unit(float(totals.max()))
    pos = np.arange(len(runs))
    ax = _axes(ax, figsize=(6, max(2.5, 1.5 + 0.5 * len(runs))) if orientation == "horizontal" else (6, 4))
    base = np.zeros(len(runs))
    for part, (label, colour) in PARTS.items():
        values = means[part].to_numpy() * scale
        if orientation == "horizontal":
            ax.barh(pos, values, left=base, height=0.6, color=colour, label=label)
        else:
            ax.bar(pos, values, bottom=base, width=0.6, color=colour, label=label)
        base = base + values
    axis_label = f"mean iteration time ({unit})"
    for p, total in zip(pos, base):
        xy = (total, p) if orientation == "horizontal" else (p, total)
        ax.annotate(f" {_number(total) if total >= 1000 else f'{total:.3g}'}", xy, fontsize="small", va="center" if orientation == "horizontal" else "bottom",
                    ha="left" if orientation == "horizontal" else "center")
    if orientation == "horizontal":
        ax.set_yticks(pos, labels)
        ax.set_ylim(len(runs) - 0.5, -0.5)
        ax.set_xlim(0, base.max() * 1.15)
        ax.set_xlabel(axis_label)
        ax.grid(True, axis="x", alpha=0.3)
    else:
        _category_ticks(ax, labels)
        ax.set_ylim(0, base.max() * 1.12)
        ax.set_ylabel(axis_label)
        ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.01), ncol=3, fontsize="small", frameon=False,
              borderaxespad=0)
    return ax


# -- validation ----------------------------------------------------------------------------------


def predicted_vs_measured(table: pd.DataFrame, *, metric: str | None = None, ax=None):
    """Predicted against measured on log-log axes, a marker per strategy, with the y = x line and
    +-10 % lines. ``metric`` keeps that metric's rows (of a ``validation_table``)."""
    table = _validation_rows(table, ["strategy", "predicted", "measured"], metric, "predicted_vs_measured")
    values = table[["predicted", "measured"]].to_numpy(float)
    if not np.all(np.isfinite(values)) or (values <= 0).any():
        bad = table[~(np.isfinite(values).all(axis=1) & (values > 0).all(axis=1))].iloc[0]
        raise ValueError("predicted_vs_measured: log axes need positive predicted and measured values; row "
                         f"{bad.to_dict()} has not")
    ax = _axes(ax)
    for i, (name, sub) in enumerate(table.groupby("strategy", sort=True)):
        # the marker shifts by one each time the colours come round, so no two strategies look alike
        marker = MARKERS[(i + i // len(_colours())) % len(MARKERS)]
        ax.scatter(sub["measured"], sub["predicted"], marker=marker, color=_colour(i),
                   s=36, label=str(name), zorder=3, edgecolors="black", linewidths=0.4)
    lo, hi = values.min() / 1.5, values.max() * 1.5
    ends = np.array([lo, hi])
    ax.plot(ends, ends, color="black", lw=1, label="predicted = measured", zorder=2)
    ax.plot(ends, 1.1 * ends, color="gray", ls=":", lw=1, label="±10 %", zorder=2)
    ax.plot(ends, 0.9 * ends, color="gray", ls=":", lw=1, zorder=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    _log_ticks(ax.xaxis, lo, hi)
    _log_ticks(ax.yaxis, lo, hi)
    ax.set_aspect("equal", adjustable="box")
    what = _metric_label(metric)
    ax.set_xlabel(f"measured{what}")
    ax.set_ylabel(f"predicted{what}")
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # beside the axes: inside, it hid the points under it
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return ax


def error_by_strategy(table: pd.DataFrame, *, metric: str | None = None, ax=None):
    """|relative error| in percent per strategy: a bar at the median, whiskers from min to max,
    a dot per row. ``metric`` keeps that metric's rows."""
    table = _validation_rows(table, ["strategy", "rel_error"], metric, "error_by_strategy")
    table = table.assign(err=100.0 * pd.to_numeric(table["rel_error"], errors="coerce").abs()).dropna(
        subset=["err"])
    if table.empty:
        raise ValueError("error_by_strategy: every rel_error is missing")
    ax = _axes(ax)
    names = []
    for i, (name, sub) in enumerate(table.groupby("strategy", sort=True)):
        err = sub["err"].to_numpy()
        med = float(np.median(err))
        ax.bar(i, med, width=0.6, color=_colour(i), alpha=0.8)
        ax.errorbar(i, med, yerr=[[med - err.min()], [err.max() - med]], fmt="none", ecolor="black",
                    capsize=4, lw=1, label="min–max" if i == 0 else None)
        offsets = np.linspace(-0.15, 0.15, len(err)) if len(err) > 1 else np.zeros(1)
        ax.scatter(i + offsets, err, s=10, color="black", zorder=3, label="experiments" if i == 0 else None)
        names.append(str(name))
    ax.axhline(10.0, color="gray", ls=":", lw=1, label="10 %")
    _category_ticks(ax, names)
    ax.set_ylim(0, max(12.0, float(table["err"].max()) * 1.12))
    ax.yaxis.set_major_formatter(PercentFormatter(100.0, decimals=0))
    ax.set_ylabel(f"|relative error|{_metric_label(metric, units=False)}")
    ax.grid(True, axis="y", alpha=0.3)
    from matplotlib.patches import Patch

    handles, texts = ax.get_legend_handles_labels()  # the bars' colours are the strategies': a grey key
    ax.legend([Patch(facecolor="darkgray"), *handles], ["median", *texts], fontsize="small")
    return ax


# -- helpers -------------------------------------------------------------------------------------


def _axes(ax, figsize=(6, 4)):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _colours() -> list[str]:
    import matplotlib as mpl

    return mpl.rcParams["axes.prop_cycle"].by_key()["color"]


def _colour(i: int) -> str:
    cycle = _colours()
    return cycle[i % len(cycle)]


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _require(table, columns, what: str, *, allow_empty: bool = False) -> None:
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"{what} must be a pandas DataFrame, got {type(table).__name__}")
    for column in columns:
        if column not in table.columns:
            raise ValueError(f"{what} has no column {column!r} (columns: {list(table.columns)})")
    if table.empty and not allow_empty:
        raise ValueError(f"{what} has no rows")


def _sweep_groups(table, x, y, by, func):
    keys = [] if by is None else [by] if isinstance(by, str) else list(by)
    _require(table, [x, y, *keys], f"{func}: table")
    for column in (x, y):
        if not pd.api.types.is_numeric_dtype(table[column]):
            raise ValueError(f"{func}: column {column!r} must be numeric, got {table[column].dtype}")
    grouped = [(None, table)] if not keys else table.groupby(keys, sort=True, observed=True)
    groups = []
    for key, sub in grouped:
        label = None if key is None else ", ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
        sub = sub.dropna(subset=[x, y]).sort_values(x, kind="stable")
        if sub.empty:
            continue
        dup = sub[x].duplicated()
        if dup.any():
            raise ValueError(f"{func}: several rows with {x}={sub[x][dup].iloc[0]}"
                             f"{f' for {label}' if label else ''}; filter the table or pass by= columns "
                             "that tell them apart")
        groups.append((label, sub[x].to_numpy(float), sub[y].to_numpy(float)))
    if not groups:
        raise ValueError(f"{func}: no rows with both {x} and {y}")
    return groups


def _ideal_base(table, x, y, groups, ideal) -> tuple[float, float]:
    x0 = min(float(xs[0]) for _, xs, _ in groups)
    if ideal is True:
        return x0, max(float(ys[0]) for _, xs, ys in groups if xs[0] == x0)
    if isinstance(ideal, str):
        for label, xs, ys in groups:
            if label == ideal:
                return float(xs[0]), float(ys[0])
        raise ValueError(f"throughput_vs_workers: ideal={ideal!r} is not a group; groups: "
                         f"{[g[0] for g in groups]}")
    if isinstance(ideal, int | float) and not isinstance(ideal, bool) and ideal > 0:
        return x0, float(ideal)
    raise ValueError(f"throughput_vs_workers: ideal must be True, a group label or a positive {y} at "
                     f"{x}={x0:g}, got {ideal!r}")


def _log_x(ax, xs: np.ndarray, scale: str, func: str) -> bool:
    if scale not in ("auto", "linear", "log"):
        raise ValueError(f"{func}: scale must be 'auto', 'linear' or 'log', got {scale!r}")
    xs = xs[np.isfinite(xs)]
    positive = len(xs) and xs.min() > 0
    log = scale == "log" or (scale == "auto" and positive and xs.max() / xs.min() >= 8)
    if log:
        if not positive:
            raise ValueError(f"{func}: scale='log' needs positive x values")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(_number))  # 64, not 2^6
        ax.xaxis.set_minor_formatter(NullFormatter())
        ticks = np.unique(xs)
        if len(ticks) <= 12:  # a tick at each count in the table
            ax.set_xticks(ticks, [_number(t) for t in ticks])
            ax.xaxis.set_minor_locator(NullLocator())
    return bool(log)


def _log_ticks(axis, lo: float, hi: float) -> None:
    """Plain numbers at 1, 2, 5 x 10^k (at 10^k over wide ranges) instead of mathtext powers."""
    subs = (1.0, 2.0, 5.0) if hi / lo <= 10**2.5 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(_number))
    axis.set_minor_formatter(NullFormatter())


def _number(value: float, _pos=None) -> str:
    if 1e3 <= abs(value) < 1e7:
        return f"{value:,.0f}"
    return f"{value:g}"


def _category_ticks(ax, names: list[str]) -> None:
    """Names under bars, slanted when they would not fit side by side."""
    slant = sum(len(n) + 3 for n in names) > 60 or max(map(len, names)) > 20
    ax.set_xticks(range(len(names)), names, rotation=20 if slant else 0, ha="right" if slant else "center")


def _runs(results, func: str) -> list:
    if isinstance(results, pd.DataFrame):
        raise ValueError(f"{func}: results must be a RunResult or a list of them, got a DataFrame")
    if hasattr(results, "updates") or hasattr(results, "timeline"):
        return [results]
    try:
        runs = list(results)
    except TypeError:
        raise ValueError(f"{func}: results must be a RunResult or a list of them, got "
                         f"{type(results).__name__}") from None
    if not runs:
        raise ValueError(f"{func}: results is empty")
    return runs


def _labels(runs: list, labels, func: str) -> list[str]:
    if labels is None:
        return [_run_label(run, i) for i, run in enumerate(runs)]
    labels = [labels] if isinstance(labels, str) else list(labels)
    if len(labels) != len(runs):
        raise ValueError(f"{func}: labels has {len(labels)} entries for {len(runs)} runs")
    return [str(label) for label in labels]


def _run_label(run, i: int) -> str:
    exp = getattr(run, "experiment", None) or {}
    if exp.get("name"):
        return str(exp["name"])
    strategy = exp.get("strategy") or {}
    if strategy.get("name"):
        if strategy.get("mode"):
            detail = strategy["mode"]
        elif (strategy.get("pp") or 1) > 1:
            detail = strategy.get("schedule")
        elif strategy.get("zero"):
            detail = f"stage {strategy['zero']}"
        else:
            detail = strategy.get("algorithm")
        return f"{strategy['name']} ({detail})" if detail else str(strategy["name"])
    return f"run {i}"


def _run_tables(result, func: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    tl = getattr(result, "timeline", None)
    it = getattr(result, "iterations", None)
    _require(tl, ["rank", "stream", "name", "start", "end", "iteration"], f"{func}: result.timeline")
    _require(it, ["rank", "iteration", "start", "end", "duration"], f"{func}: result.iterations")
    return tl, it


def _clip(spans: pd.DataFrame, t0: float, t1: float) -> pd.DataFrame:
    spans = spans[(spans["end"] > t0) & (spans["start"] < t1)]
    return spans.assign(start=spans["start"].clip(lower=t0), end=spans["end"].clip(upper=t1))


def _kind(name: str) -> str:
    match = re.match(r"[a-z_]+", name)
    word = match.group() if match else ""
    return word if word in KINDS else "other"


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds < 1e-3:
        return 1e6, "µs"
    if seconds < 10:
        return 1e3, "ms"
    return 1.0, "s"


def _union(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted intervals covering the same points as [starts, ends]."""
    if not len(starts):
        return starts, ends
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], np.maximum.accumulate(ends[order])
    new = np.ones(len(s), bool)
    new[1:] = s[1:] > e[:-1]
    last = np.append(np.flatnonzero(new)[1:] - 1, len(s) - 1)
    return s[new], e[last]


def _measure(us: np.ndarray, ue: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Length of the union (disjoint sorted us, ue) inside each window [a, b]."""
    if not len(us):
        return np.zeros(len(a))
    cum = np.concatenate([[0.0], np.cumsum(ue - us)])

    def until(t):  # covered length in (-inf, t]
        i = np.searchsorted(us, t, side="right")
        over = np.where(i > 0, np.maximum(ue[np.maximum(i - 1, 0)] - t, 0.0), 0.0)
        return cum[i] - over

    return until(b) - until(a)


def _validation_rows(table, columns, metric, func) -> pd.DataFrame:
    _require(table, columns + (["metric"] if metric is not None else []), f"{func}: table")
    if metric is not None:
        known = sorted(map(str, table["metric"].unique()))
        table = table[table["metric"] == metric]
        if table.empty:
            raise ValueError(f"{func}: no rows with metric {metric!r} (metrics: {known})")
    return table


def _metric_label(metric: str | None, *, units: bool = True) -> str:
    if metric is None:
        return ""
    unit = METRIC_UNITS.get(metric)
    if not units:
        return f" of {metric}"
    return f" {metric} ({unit})" if unit else f" {metric}"
