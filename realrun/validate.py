"""Validation: run experiments in both executors and measure the simulator's error.

:func:`validate` runs each experiment for real (:func:`realrun.run`) and in the
simulator twice: on the catalogue's hardware as the experiment names it
("catalogue": roofline compute, catalogue links) and on this machine's
measurements (:func:`realrun.calibrate`: per-layer times, the measured device,
the measured links, the cores the ranks share). Both executors' results are
reduced to the same steady-state metrics (the first ``warmup`` iterations left
out), and each metric becomes a row: experiment, strategy, metric, model,
predicted, measured, rel_error = (predicted - measured) / measured.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd

VALIDATION_COLUMNS = ["experiment", "strategy", "metric", "model", "predicted", "measured", "rel_error"]
METRICS = ("iteration_time_mean", "iteration_time_p90", "throughput", "staleness_mean", "staleness_p90",
           "bytes_per_rank")
MODELS = ("catalogue", "calibrated")


def steady_metrics(result, warmup: int = 2) -> dict:
    """Steady-state metrics of a run, simulated or real, from its tables: iteration time mean
    and p90 and throughput over the GPU ranks' iterations from ``warmup`` on; staleness mean
    and p90 of the updates applied from workers' clock ``warmup`` on; payload bytes sent per
    GPU rank over the whole run."""
    ranks = result.ranks
    gpus = set(ranks.loc[ranks["kind"] == "gpu", "rank"]) if "kind" in ranks else set(ranks["rank"])
    it = result.iterations
    it = it[it["rank"].isin(gpus) & (it["iteration"] >= warmup)]
    out = {}
    if len(it):
        d = it["duration"].to_numpy(dtype=float)
        out["iteration_time_mean"] = float(d.mean())
        out["iteration_time_p90"] = float(np.quantile(d, 0.9))
        span = float(it["end"].max() - it["start"].min())
        out["throughput"] = float(it["samples"].sum()) / span if span > 0 else float("nan")
    up = result.updates
    if len(up):
        up = up[up["applied"].astype(bool) & (up["clock"] >= warmup)]
        if len(up):
            s = up["staleness"].to_numpy(dtype=float)
            out["staleness_mean"] = float(s.mean())
            out["staleness_p90"] = float(np.quantile(s, 0.9))
    sent = ranks.loc[ranks["rank"].isin(gpus), "bytes_sent"]
    out["bytes_per_rank"] = float(sent.mean()) if len(sent) else float("nan")
    return out


def strategy_label(strategy) -> str:
    """A short name for a strategy's kind: its registered name and mode or algorithm."""
    spec = strategy.to_dict()
    name = spec.get("name", type(strategy).__name__)
    label = str(name)
    for key in ("mode", "schedule", "algorithm"):
        if isinstance(spec.get(key), str):
            label = f"{name} {spec[key]}"
            break
    comp = spec.get("compression")
    if isinstance(comp, dict) and comp.get("name"):
        label += f" + {comp['name']}"
    return label


def compare(name: str, strategy: str, predicted: dict, measured: dict, model: str) -> list[dict]:
    rows = []
    for metric in METRICS:
        if metric not in predicted or metric not in measured:
            continue
        p, m = predicted[metric], measured[metric]
        if m == 0:
            err = 0.0 if p == 0 else float("nan")  # no relative error of a zero (sync staleness)
        else:
            err = (p - m) / m
        rows.append({"experiment": name, "strategy": strategy, "metric": metric, "model": model,
                     "predicted": p, "measured": m, "rel_error": err})
    return rows


class _Calibrations:
    """Calibrations made on demand: compute for each experiment just before its real run (so
    a machine whose speed drifts, as shared machines' does, is measured as it is), links
    once per inter-node bandwidth."""

    def __init__(self, launcher, threads: int, device: str, repeats: int):
        self.launcher, self.threads, self.device, self.repeats = launcher, threads, device, repeats
        self._links: dict = {}

    def __call__(self, experiment):
        from realrun.calibrate import calibrate, compute_batch
        from realrun.launch import Local
        from realrun.linkcal import calibrate_link

        cal = calibrate(experiment, launcher=self.launcher, links=False, threads=self.threads, device=self.device,
                        repeats=self.repeats, batch=compute_batch(experiment))
        if isinstance(self.launcher, Local):  # loopback: the catalogue's link stays
            return cal
        rate = float(getattr(self.launcher, "rate", lambda e: e.cluster.inter.bandwidth)(experiment))
        link = self._links.get(rate)
        if link is None:
            link = self._links[rate] = calibrate_link(experiment, self.launcher)[0]
        return dataclasses.replace(cal, link=link)


def validate(experiments, *, launcher=None, calibration="auto", warmup: int = 2, threads: int = 1,
             device: str = "cpu", backend: str = "gloo", repeats: int = 10, out: str | Path | None = None,
             timeout: float | None = 600, progress=None) -> pd.DataFrame:
    """Run each experiment for real and simulated; a table of predicted against measured.

    ``experiments``: Experiments (a name each, or they are numbered). ``launcher``: where
    the real runs go (default ``realrun.Local()``; ``realrun.EmulatedCluster()`` shapes the
    links to each experiment's inter-node bandwidth). ``calibration``: ``"auto"`` calibrates
    on this machine (and the launcher's links) as needed; a :class:`~realrun.Calibration`
    (or a dict of experiment name -> Calibration) to use; ``None``: catalogue only.
    ``out``: a CSV file the rows are appended to as each experiment finishes, and beside it
    a folder ``<stem>-runs/<experiment>/`` with the real run's tables and, where there is a
    calibration, ``predicted/`` (the calibrated model's run) and ``calibration/`` (what it
    was given, loadable with :meth:`~realrun.Calibration.load`). Returns the rows (:data:`VALIDATION_COLUMNS`).
    """
    from realrun.calibrate import Calibration
    from realrun.launch import Local
    from realrun.run import run
    from simulator.executor import simulate
    from simulator.experiment import Experiment
    from simulator.progress import ProgressBar

    experiments = list(experiments)
    if not experiments:
        raise ValueError("validate: experiments is empty; give at least one Experiment")
    for i, exp in enumerate(experiments):
        if not isinstance(exp, Experiment):
            raise ValueError(f"validate: experiments[{i}] must be an Experiment, got {type(exp).__name__}")
    names = [exp.name or f"experiment{i}" for i, exp in enumerate(experiments)]
    if len(set(names)) != len(names):
        raise ValueError(f"validate: experiment names must be unique, got {names}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"validate: warmup must be an integer >= 0, got {warmup!r}")
    for exp, name in zip(experiments, names):
        if exp.iterations <= warmup:
            raise ValueError(f"validate: experiment {name!r} has {exp.iterations} iterations, not more than "
                             f"warmup={warmup}")
    if not (calibration is None or calibration == "auto" or isinstance(calibration, Calibration | dict)):
        raise ValueError(f"validate: calibration must be 'auto', None, a Calibration or a dict of them, "
                         f"got {calibration!r}")
    if isinstance(calibration, dict):
        bad = {k: type(v).__name__ for k, v in calibration.items() if not isinstance(v, Calibration)}
        if bad:
            raise ValueError(f"validate: calibration values must be Calibrations, got {bad}")
    launcher = launcher if launcher is not None else Local()
    make = _Calibrations(launcher, threads, device, repeats) if calibration == "auto" else None
    path = Path(out) if out is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(columns=VALIDATION_COLUMNS).to_csv(path, index=False)
        runs = path.parent / (path.stem + "-runs")
    rows: list[dict] = []
    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = ProgressBar(len(experiments), unit="experiments") if show else None
    for k, (exp, name) in enumerate(zip(experiments, names)):
        label = strategy_label(exp.strategy)
        cal = make(exp) if calibration == "auto" else None  # measured just before the run it predicts
        real = run(exp, launcher=launcher, backend=backend, device=device, threads=threads, timeout=timeout)
        measured = steady_metrics(real, warmup)
        new = compare(name, label, steady_metrics(simulate(exp), warmup), measured, "catalogue")
        if isinstance(calibration, dict):
            cal = calibration.get(name)
        elif isinstance(calibration, Calibration):
            cal = calibration
        predicted = simulate(cal.apply(exp)) if cal is not None else None
        if predicted is not None:
            new += compare(name, label, steady_metrics(predicted, warmup), measured, "calibrated")
        rows += new
        if path is not None:
            pd.DataFrame(new, columns=VALIDATION_COLUMNS).to_csv(path, mode="a", header=False, index=False)
            real.save(runs / name)
            if predicted is not None:  # what a miss is dissected with: the model's run and its inputs
                predicted.save(runs / name / "predicted")
                cal.save(runs / name / "calibration")
        if bar is not None:
            bar.update(k + 1)
    if bar is not None:
        bar.close()
    return pd.DataFrame(rows, columns=VALIDATION_COLUMNS)


def error_summary(table: pd.DataFrame, metric: str = "iteration_time_mean") -> pd.DataFrame:
    """Median, mean and maximum |relative error| of ``metric`` per model (catalogue, calibrated)."""
    sel = table[(table["metric"] == metric)].dropna(subset=["rel_error"])
    rows = []
    for model, group in sel.groupby("model", sort=False):
        e = group["rel_error"].abs()
        rows.append({"model": model, "metric": metric, "experiments": len(group),
                     "median_abs_error": float(e.median()), "mean_abs_error": float(e.mean()),
                     "max_abs_error": float(e.max()),
                     "worst": str(group.loc[e.idxmax(), "experiment"]) if len(group) else ""})
    return pd.DataFrame(rows)


def write_report(table: pd.DataFrame, folder: str | Path, metric: str = "iteration_time_mean") -> list[Path]:
    """Plots of a validation table into ``folder``: ``predicted_vs_measured.png`` (log axes,
    y = x, a marker per strategy; one panel per model) and ``error_by_strategy.png``
    (|relative error| per strategy, one panel per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simulator.plots import error_by_strategy, predicted_vs_measured

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    models = [m for m in MODELS if (table["model"] == m).any()]
    paths = []
    for fn, name in ((predicted_vs_measured, "predicted_vs_measured.png"), (error_by_strategy, "error_by_strategy.png")):
        fig, axes = plt.subplots(1, len(models), figsize=(8.5 * len(models), 5), squeeze=False)
        for ax, model in zip(axes[0], models):
            fn(table[table["model"] == model], metric=metric, ax=ax)
            ax.set_title(f"{model} model: {metric.replace('_', ' ')}")
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110, bbox_inches="tight")  # the legends sit beside the axes
        plt.close(fig)
        paths.append(folder / name)
    return paths
