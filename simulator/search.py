"""Strategy search: the best way to train this model on this cluster.

::

    table = search(Workload.from_zoo("gpt3-175b"), cluster, global_batch=1536, precision="bf16")
    table.head()           # ranked, best first; table.attrs["counts"] says what was pruned

The candidates are the family's space (:mod:`simulator.search_space`: Megatron's knobs
for a transformer, all-reduce / parameter server / local SGD and compression for other
models), narrowed or widened by ``space``. Each is first sized analytically: one that
cannot fit in memory is not simulated, and neither is one whose lower bound (the busiest
GPU's compute, and the bandwidth bound of its all-reduce) cannot beat the best candidate
simulated so far (branch and bound, best bound first). The rest are simulated (``fidelity
"auto"``) on any ``concurrent.futures`` executor, their rows appended to ``out`` as they
finish; a search handed the same ``out`` again runs only what it lacks.

Ranking: by ``objective`` (``throughput``, ``iteration_time``, ``mfu`` or ``cost``, GPU
seconds per sample). A lossy candidate (compression, asynchronous or stale-synchronous
servers, local SGD: each sample moves the model less than synchronous SGD's) counts at its
objective worsened by ``lossy_margin`` (default 5 %): it must beat exact training by more
than that to rank above it. ``constraints`` (``max_memory_fraction``, ``max_staleness``,
``exact``) rank what breaks them last.
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from simulator import search_space as sp
from simulator.memory import OutOfMemoryError
from simulator.search_space import build, candidate_key, check_space, family

__all__ = ["search", "candidate_experiment"]

OBJECTIVES = {"throughput": -1, "iteration_time": 1, "mfu": -1, "cost": 1}
"""Objective -> 1 to minimise, -1 to maximise."""
WAVE = 8
"""Candidates simulated between two pruning decisions."""
CONSTRAINTS = ("max_memory_fraction", "max_staleness", "exact")
METRIC_COLUMNS = ["iteration_time", "throughput", "tflops_per_gpu", "mfu", "cost", "peak_memory_gb",
                  "memory_fraction", "fits", "staleness_mean", "lower_bound", "bound_ratio", "lossy", "fidelity",
                  "status"]


def _settings(precision, optimizer, iterations, seed, fam) -> dict:
    if iterations is None:
        iterations = 1 if fam == "llm" else 4
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"search: iterations must be an integer >= 1, got {iterations!r}")
    return {"precision": precision, "optimizer": optimizer, "iterations": iterations, "seed": seed}


def candidate_experiment(workload, cluster, knobs: dict, *, global_batch: int, precision: str = "fp32",
                         optimizer: str = "sgd", iterations: int | None = None, seed: int = 0):
    """The Experiment a search simulates for ``knobs`` (a row's knob columns), to run or change
    the winner: ``simulate(candidate_experiment(...))`` gives the row's numbers."""
    knobs = {k: v.item() if hasattr(v, "item") else v for k, v in knobs.items() if not _missing(v)}
    return build(knobs, workload, cluster, global_batch,
                 _settings(precision, optimizer, iterations, seed, family(workload)))


def _missing(v) -> bool:
    return v is None or v is pd.NA or isinstance(v, float) and math.isnan(v)


def search(workload, cluster, *, global_batch: int, precision: str = "fp32", optimizer: str = "sgd",
           space: dict | None = None, objective: str = "throughput", constraints: dict | None = None,
           iterations: int | None = None, seed: int = 0, lossy_margin: float = 0.05, prune: bool = True,
           executor=None, out=None, progress=None) -> pd.DataFrame:
    """Rank the candidates of ``space`` for training ``workload`` on ``cluster`` at ``global_batch``
    samples per iteration; one row per candidate, best first (see the module docstring).

    Columns: the knobs, then ``iteration_time`` (s per global batch), ``throughput`` (samples/s),
    ``tflops_per_gpu`` (model FLOPs), ``mfu``, ``cost`` (GPU-seconds per sample),
    ``peak_memory_gb``, ``memory_fraction``, ``fits``, ``staleness_mean``, ``lower_bound`` (s),
    ``bound_ratio`` (iteration time over it), ``lossy``, ``fidelity`` and ``status``
    (``simulated``, ``pruned: memory``, ``pruned: bound`` or ``error: ...``).
    ``table.attrs["counts"]``: candidates generated, pruned by memory, pruned by bound, simulated.
    Raises :class:`~simulator.memory.OutOfMemoryError` when nothing in the space fits, naming
    the smallest shortfall.
    """
    from simulator.sweep import _cores, _reporter, _RowLog, _run

    fam = family(workload)
    if objective not in OBJECTIVES:
        raise ValueError(f"search: objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    constraints = dict(constraints or {})
    bad = sorted(set(constraints) - set(CONSTRAINTS))
    if bad:
        raise ValueError(f"search: unknown constraints {bad}; allowed: {list(CONSTRAINTS)}")
    for key, value in constraints.items():
        if key == "exact" and not isinstance(value, bool) or key != "exact" and (
                isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0):
            raise ValueError(f"search: constraint {key!r} must be "
                             f"{'True or False' if key == 'exact' else 'a number >= 0'}, got {value!r}")
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"search: global_batch must be an integer >= 1, got {global_batch!r}")
    if isinstance(lossy_margin, bool) or not isinstance(lossy_margin, int | float) or not lossy_margin >= 0:
        raise ValueError(f"search: lossy_margin must be a number >= 0, got {lossy_margin!r}")
    if executor is not None and not callable(getattr(executor, "submit", None)):
        raise ValueError(f"search: executor must be a concurrent.futures.Executor, got {executor!r}")
    settings = _settings(precision, optimizer, iterations, seed, fam)
    full = check_space(space, fam)
    cands = sp.candidates(fam, full, cluster, global_batch, workload)
    if not cands:
        raise ValueError(f"search: no valid candidate in the space for {cluster.num_gpus} GPUs and global batch "
                         f"{global_batch} (the degrees must divide the GPUs and the batch); space: {full}")
    rows, specs = _size(cands, workload, cluster, global_batch, settings, constraints, prune)
    sized = [r for r in rows if "memory_fraction" in r]
    if sized and not any(r["fits"] for r in sized):
        raise OutOfMemoryError(f"search: nothing in the space fits in memory ({len(sized)} candidates); "
                               + sp.shortfall(sized))
    header = {"clustersim_sweep": 1, "experiment": f"search:{workload.name}", "grid_keys": ["candidate"],
              "fingerprint": _fingerprint(workload, cluster, global_batch, settings, full, objective),
              "runner": "simulator.search"}
    log = _RowLog(Path(out), header) if out is not None else None
    pending = sorted((r for r in rows if r["status"] == "pending"),
                     key=lambda r: _bound_score(r, objective, global_batch, lossy_margin))
    total = len(pending)
    report, own = None, executor is None
    try:
        records = dict(log.rows) if log is not None else {}
        best = math.inf
        report = _reporter(progress, total, 0)
        while pending:
            if prune:  # best bound first: once one cannot beat the best, none after it can
                cut = next((i for i, r in enumerate(pending)
                            if _bound_score(r, objective, global_batch, lossy_margin) > best), len(pending))
                for r in pending[cut:]:
                    r["status"] = "pruned: bound"
                pending = pending[:cut]
            # Waves of a fixed size, pruned only by the waves before them: the table does not depend
            # on the executor, and a resumed search replays the same decisions.
            wave, pending = pending[:WAVE], pending[WAVE:]
            todo = [r for r in wave if r["candidate"] not in records]
            if todo:
                if executor is None:
                    executor = ProcessPoolExecutor(max_workers=_cores())
                new: dict[int, dict] = {}
                _run(list(range(len(todo))), [specs[r["candidate"]] for r in todo], None, executor, new,
                     [r["candidate"] for r in todo], [{"candidate": r["candidate"]} for r in todo], log, None)
                for i, r in enumerate(todo):
                    records[r["candidate"]] = new[i]
            for r in wave:  # the best so far among what the constraints allow: what ranks first
                _fill(r, records[r["candidate"]], global_batch)
                if not _breaks(r, constraints):
                    best = min(best, _score(r, objective, lossy_margin))
            if report is not None:
                report.update(total - len(pending))
    finally:
        if report is not None:
            report.close()
        if log is not None:
            log.close()
        if own and executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    for r in rows:
        if r["status"] == "pending":
            r["status"] = "pruned: bound"
    table = _rank(rows, objective, lossy_margin, constraints)
    counts = {"generated": len(rows), "invalid": sum(r["status"].startswith("error") for r in rows),
              "pruned_memory": sum(r["status"] == "pruned: memory" for r in rows),
              "pruned_bound": sum(r["status"] == "pruned: bound" for r in rows),
              "simulated": sum(r["status"] == "simulated" for r in rows)}
    table.attrs["counts"] = counts
    table.attrs["family"] = fam
    return table


def _size(cands, workload, cluster, global_batch, settings, constraints, prune) -> tuple[list[dict], dict]:
    """Each candidate's row with its peak memory, lower bound and status (``pending``, ``pruned:
    memory`` or the error the strategy raised), and the experiments to simulate by candidate."""
    rows, specs = [], {}
    for knobs in cands:
        row = {**knobs, "candidate": candidate_key(knobs), "lossy": sp.lossy(knobs)}
        try:
            exp = build(knobs, workload, cluster, global_batch, settings)
            peak, row["memory_fraction"] = sp.peak_memory(exp)
            row["peak_memory_gb"] = peak / 1e9
            row["lower_bound"] = sp.lower_bound(knobs, exp)
            row["gpus"] = exp.cluster.num_gpus
        except ValueError as exc:  # a combination the strategy refuses
            row["status"] = "error: " + " ".join(str(exc).split())
            rows.append(row)
            continue
        row["fits"] = row["memory_fraction"] <= constraints.get("max_memory_fraction", 1.0)
        row["status"] = "pending" if row["fits"] or not prune else "pruned: memory"
        specs[row["candidate"]] = exp.to_dict()
        rows.append(row)
    return rows, specs


def _fill(row: dict, record: dict, global_batch: int) -> dict:
    """The row with the simulated metrics of its record. ``iteration_time`` is the time per
    global batch, ``global_batch / throughput`` (the makespan per iteration): what a lower
    bound bounds, where a rank's mean iteration would not (a pipeline's last stage ends early)."""
    if "error" in record:
        row["status"] = "error: " + record["error"]
        return row
    s = record["summary"]
    row["throughput"] = s["throughput"]
    row["iteration_time"] = global_batch / s["throughput"] if s["throughput"] else math.inf
    row["tflops_per_gpu"] = (s.get("achieved_flops_per_device") or math.nan) / 1e12
    row["mfu"] = s.get("model_flops_utilisation")
    row["cost"] = row["gpus"] / s["throughput"] if s["throughput"] else math.inf
    row["staleness_mean"] = s.get("staleness_mean")
    row["fidelity"] = s.get("fidelity")
    row["bound_ratio"] = row["iteration_time"] / row["lower_bound"] if row["lower_bound"] else math.nan
    row["status"] = "simulated"
    return row


def _score(row: dict, objective: str, margin: float) -> float:
    """What ranking minimises: the objective signed, a lossy candidate's worsened by ``margin``."""
    if row.get("status") != "simulated":
        return math.inf
    value = row[objective]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.inf
    sign = OBJECTIVES[objective]
    penalty = (1 + margin) if row["lossy"] else 1.0
    return value * penalty if sign > 0 else -value / penalty


def _bound_score(row: dict, objective: str, global_batch: int, margin: float) -> float:
    """The best score the candidate could reach: its objective at its lower bound."""
    t = row["lower_bound"]
    optimistic = {"iteration_time": t, "throughput": global_batch / t if t > 0 else math.inf,
                  "cost": row["gpus"] * t / global_batch, "mfu": 1.0}
    best = {**row, "status": "simulated", objective: optimistic[objective]}
    return _score(best, objective, margin)


def _breaks(r: dict, constraints: dict) -> bool:
    """Whether a row is not simulated or breaks a constraint (it then ranks after the rest)."""
    if r.get("status") != "simulated":
        return True
    if constraints.get("exact") and r["lossy"]:
        return True
    stale = r.get("staleness_mean")
    return "max_staleness" in constraints and stale is not None and not (
        isinstance(stale, float) and math.isnan(stale)) and stale > constraints["max_staleness"]


def _rank(rows: list[dict], objective: str, margin: float, constraints: dict) -> pd.DataFrame:
    order = sorted(range(len(rows)), key=lambda i: (_breaks(rows[i], constraints), _score(rows[i], objective, margin),
                                                    i))
    knobs = list(dict.fromkeys(k for r in rows for k in r if k not in METRIC_COLUMNS
                               and k not in ("candidate", "gpus")))
    columns = knobs + ["gpus"] + METRIC_COLUMNS + ["candidate"]
    table = pd.DataFrame([rows[i] for i in order], columns=columns)
    for k in knobs + ["gpus"]:  # whole numbers stay whole where a knob does not apply to every row
        values = table[k].dropna()
        if len(values) and all(isinstance(v, int | float) and not isinstance(v, bool) and float(v).is_integer()
                               for v in values):
            table[k] = table[k].astype("Int64")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


def _fingerprint(workload, cluster, global_batch, settings, space, objective) -> str:
    text = json.dumps({"workload": workload.to_dict(), "cluster": cluster.to_dict(), "batch": global_batch,
                       "settings": settings, "space": space, "objective": objective}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pareto(table: pd.DataFrame) -> pd.Series:
    """Which simulated rows no other beats on both throughput (higher) and peak memory (lower)."""
    sim = table[table["status"] == "simulated"]
    front = pd.Series(False, index=table.index)
    best = -math.inf
    for i, r in sim.sort_values(["peak_memory_gb", "throughput"], ascending=[True, False]).iterrows():
        if r["throughput"] > best:
            front[i] = True
            best = r["throughput"]
    return front


def plot_search(table: pd.DataFrame, folder) -> list[Path]:
    """``search_pareto.png`` (throughput against peak memory, the Pareto front marked) and, when
    the candidates span cluster sizes, ``search_gpus.png`` (best throughput and cost per GPU count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sim = table[table["status"] == "simulated"]
    front = pareto(table)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(sim["peak_memory_gb"], sim["throughput"], s=14, color="0.6", label="simulated")
    f = table[front].sort_values("peak_memory_gb")
    ax.plot(f["peak_memory_gb"], f["throughput"], "o-", color="C3", label="Pareto front")
    if len(sim):
        top = sim.iloc[0]
        ax.scatter([top["peak_memory_gb"]], [top["throughput"]], marker="*", s=180, color="C0", zorder=5,
                   label="best")
    ax.set_xlabel("peak memory per GPU (GB)")
    ax.set_ylabel("throughput (samples/s)")
    ax.set_ylim(bottom=0, top=max(1e-9, float(sim["throughput"].max()) * 1.15 if len(sim) else 1.0))
    ax.legend(loc="best")  # away from the points, the best one's star included
    ax.set_title("throughput against memory (star: rank 1 by the objective)")
    fig.tight_layout()
    paths.append(folder / "search_pareto.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    if sim["gpus"].nunique() > 1:
        by = sim.groupby("gpus").agg(throughput=("throughput", "max"), cost=("cost", "min")).reset_index()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(by["gpus"], by["throughput"], "o-", color="C0", label="best throughput")
        ax.set_xlabel("GPUs")
        ax.set_ylabel("throughput (samples/s)")
        ax2 = ax.twinx()
        ax2.plot(by["gpus"], by["cost"], "s--", color="C1", label="lowest cost")
        ax2.set_ylabel("cost (GPU-seconds per sample)")
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], loc="upper left")
        ax.set_title("strategy search: throughput and cost against GPUs")
        fig.tight_layout()
        paths.append(folder / "search_gpus.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
