"""Run results: flat tables, headline metrics, exports.

Executors record flat rows; everything here is a function of those rows (and
of the experiment that made them), so simulated and real runs share one
schema:

* ``iterations``: rank, iteration, start, end, duration, compute, comm,
  exposed_comm (= duration - compute: time the compute stream was not busy),
  samples
* ``timeline``: resource, rank, stream, name, start, end, iteration — one span
  per compute op, per collective member, per send, and per busy interval of a
  link (rank -1)
* ``links``: link, name, bandwidth, bytes, busy_time (time carrying at least one
  flow), utilisation (bytes / (bandwidth x makespan))
* ``updates``: one row per gradient a parameter-shard owner received (filled
  by strategies with ``Apply``, e.g. a parameter server): worker, server,
  shard, clock (the worker's iteration), samples, version_read (the shard
  version the gradient was computed from), version_applied (the version it was
  applied to), staleness (= version_applied - version_read: updates applied
  to the shard between the read and this application), read_time, time (of
  application), applied (False: dropped, e.g. a late backup worker's)
* ``ranks``: rank, node, device, kind (gpu/host), peak_flops, bytes_sent
* ``memory``: bytes each rank needs at its peak by component (params, grads,
  optimizer_state, master_weights, activations, buffers), total, capacity,
  fits (see :mod:`simulator.memory`)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from simulator.memory import MEMORY_COLUMNS
from simulator.records import SPAN_COLUMNS

ITERATION_COLUMNS = ["rank", "iteration", "start", "end", "duration", "compute", "comm", "exposed_comm", "samples"]
TIMELINE_COLUMNS = ["resource", *SPAN_COLUMNS]
LINK_COLUMNS = ["link", "name", "bandwidth", "bytes", "busy_time", "utilisation"]
UPDATE_COLUMNS = ["worker", "server", "shard", "clock", "samples", "version_read", "version_applied",
                  "staleness", "read_time", "time", "applied"]


@dataclass
class RunResult:
    """What a run produced, simulated or real, and the experiment that made it."""

    experiment: dict
    """The experiment as a dict (``Experiment.from_dict`` rebuilds it)."""
    iterations: pd.DataFrame
    timeline: pd.DataFrame
    links: pd.DataFrame
    ranks: pd.DataFrame
    updates: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=UPDATE_COLUMNS))
    memory: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=MEMORY_COLUMNS))
    stats: dict = field(default_factory=dict)
    """Run facts: makespan, wall_seconds, ops, flows, single_device_iteration_time, peak FLOP/s..."""

    def summary(self) -> dict:
        """Headline metrics as a flat dict (SI units)."""
        return summarise(self)

    def summary_frame(self) -> pd.DataFrame:
        return pd.DataFrame([self.summary()])

    def to_chrome_trace(self, path: str | Path) -> Path:
        """Write the timeline as Chrome trace JSON (opens in Perfetto or chrome://tracing)."""
        path = Path(path)
        path.write_text(json.dumps(chrome_trace(self)))
        return path

    def save(self, folder: str | Path) -> Path:
        """Write every table as CSV, the summary and the experiment as JSON."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("iterations", "timeline", "links", "ranks", "updates", "memory"):
            getattr(self, name).to_csv(folder / f"{name}.csv", index=False)
        (folder / "summary.json").write_text(json.dumps(self.summary(), indent=1))
        (folder / "experiment.json").write_text(json.dumps(self.experiment, indent=1))
        return folder


def build_result(sim, stats: dict) -> RunResult:
    """Tables from a finished simulation's records."""
    exp = sim.exp
    it = pd.DataFrame(sim.iteration_rows, columns=ITERATION_COLUMNS)
    it = it.sort_values(["iteration", "rank"], kind="stable").reset_index(drop=True)
    cluster = sim.cluster
    net = sim.network
    names = [link.name for link in cluster.links]
    spans = sim.spans.frame()
    spans.insert(0, "resource", "rank" + spans["rank"].astype(str) + "/" + spans["stream"])
    stands_for = getattr(sim, "stands_for", None)
    if stands_for:  # representatives: say how many ranks each span stands for
        spans["resource"] += " (stands for " + spans["rank"].map(stands_for).astype(str) + " ranks)"
    if net.busy_intervals:
        lk = np.array(net.busy_intervals)
        idx = lk[:, 0].astype(int)
        link_spans = pd.DataFrame({
            "resource": ["link/" + names[i] for i in idx],
            "rank": -1,
            "stream": "link",
            "name": [names[i] for i in idx],
            "start": lk[:, 1],
            "end": lk[:, 2],
            "iteration": -1,
        })
        spans = pd.concat([spans, link_spans], ignore_index=True)
    makespan = float(sim.env.now)
    links = pd.DataFrame({
        "link": np.arange(len(names)),
        "name": names,
        "bandwidth": [link.bandwidth for link in cluster.links],
        "bytes": net.bytes,
        "busy_time": net.busy_time,
    })
    # Carried bytes over capacity: the same whichever way collectives were simulated.
    links["utilisation"] = links["bytes"] / (links["bandwidth"] * makespan) if makespan > 0 else 0.0
    gpus = cluster.num_gpus
    peaks: dict = {}  # per (device, host): a few devices serve thousands of ranks
    for r, d in enumerate(sim.devices):
        # Host processes (servers) compute in fp32 whatever the training precision.
        if (id(d), r >= gpus) not in peaks:
            peaks[(id(d), r >= gpus)] = d.flops("fp32" if r >= gpus else exp.precision)
    ranks = pd.DataFrame({
        "rank": np.arange(sim.world),
        "node": list(sim.job.node_of),
        "device": [d.name for d in sim.devices],
        "kind": np.where(np.arange(sim.world) >= gpus, "host", "gpu"),
        "peak_flops": [peaks[(id(d), r >= gpus)] for r, d in enumerate(sim.devices)],
        "bytes_sent": sim.bytes_sent,
    })
    workload = exp.workload
    stats = dict(stats)
    stats.update(
        makespan=makespan,
        world_size=sim.world,
        gpus=cluster.num_gpus,
        batch_size=exp.batch_size if isinstance(exp.batch_size, int) else list(exp.batch_size),
        flops_per_sample=float(workload.fwd_flops + workload.bwd_flops),
        executor="simulator",
        bundles_contended=net.bundles_contended,
    )
    updates = pd.DataFrame(sim.update_rows, columns=UPDATE_COLUMNS)
    updates = updates.astype({"applied": bool})
    return RunResult(
        experiment=exp.to_dict(),
        iterations=it,
        timeline=spans,
        links=links,
        ranks=ranks,
        updates=updates,
        memory=sim.memory,
        stats=stats,
    )


def _quantile(values: pd.Series, q: float) -> float:
    return float(np.quantile(values.to_numpy(), q)) if len(values) else float("nan")


SUMMARY_KEYS = (
    "executor", "world_size", "iterations", "makespan", "throughput", "iteration_time_mean",
    "iteration_time_p50", "iteration_time_p99", "compute_time_mean", "exposed_comm_mean",
    "scaling_efficiency", "compute_utilisation", "model_flops_utilisation", "achieved_flops_per_device",
    "network_utilisation", "bytes_on_wire",
    # with a memory table
    "peak_memory", "peak_memory_fraction", "memory_fits",
    # with updates (parameter servers)
    "updates_applied", "updates_dropped", "updates_per_second", "applied_samples_per_second",
    "staleness_mean", "staleness_p50", "staleness_p99", "staleness_max",
    # simulated runs: representatives or every rank, and why (Experiment.fidelity)
    "fidelity", "fidelity_reason",
)
"""Every key :func:`summarise` may give, in its order (a run has the groups after the first
only when it has a memory table, updates, or was simulated)."""


def summarise(result: RunResult) -> dict:
    """Throughput, iteration time statistics, efficiency and utilisation."""
    st = result.stats
    it = result.iterations
    makespan = st["makespan"]
    samples = float(it["samples"].sum()) if len(it) else 0.0
    throughput = samples / makespan if makespan > 0 else float("nan")
    durations = it["duration"]
    world = st["world_size"]
    gpus = st.get("gpus", world)
    ideal = st.get("ideal_throughput")
    compute_busy = it["compute"].sum() / (gpus * makespan) if makespan > 0 else float("nan")
    ranks = result.ranks
    on_gpus = ranks[ranks["kind"] == "gpu"] if "kind" in ranks else ranks
    peak = float(on_gpus["peak_flops"].sum())
    achieved = samples * st["flops_per_sample"] / makespan if makespan > 0 else float("nan")
    links = result.links
    used = links[links["bytes"] > 0]
    summary = {
        "executor": st.get("executor", ""),
        "world_size": world,
        "iterations": int(it["iteration"].nunique()) if len(it) else 0,
        "makespan": makespan,
        "throughput": throughput,
        "iteration_time_mean": float(durations.mean()) if len(it) else float("nan"),
        "iteration_time_p50": _quantile(durations, 0.5),
        "iteration_time_p99": _quantile(durations, 0.99),
        "compute_time_mean": float(it["compute"].mean()) if len(it) else float("nan"),
        "exposed_comm_mean": float(it["exposed_comm"].mean()) if len(it) else float("nan"),
        "scaling_efficiency": throughput / ideal if ideal else float("nan"),
        "compute_utilisation": float(compute_busy),
        "model_flops_utilisation": achieved / peak if peak > 0 else float("nan"),
        "achieved_flops_per_device": achieved / gpus if gpus else float("nan"),
        "network_utilisation": float(used["utilisation"].mean()) if len(used) else 0.0,
        "bytes_on_wire": float(result.ranks["bytes_sent"].sum()),
    }
    mem = result.memory
    if len(mem):
        gpus_mem = mem[mem["kind"] == "gpu"]
        summary.update(
            peak_memory=float(gpus_mem["total"].max()),
            peak_memory_fraction=float((gpus_mem["total"] / gpus_mem["capacity"]).max()),
            memory_fits=bool(mem["fits"].all()),
        )
    up = result.updates
    if len(up):
        applied = up[up["applied"]]
        s = applied["staleness"]
        shards = max(int(up["shard"].nunique()), 1)
        summary.update(
            updates_applied=len(applied) / shards,
            updates_dropped=int((~up["applied"]).sum()) / shards,
            updates_per_second=len(applied) / shards / makespan if makespan > 0 else float("nan"),
            applied_samples_per_second=float(applied["samples"].sum()) / shards / makespan
            if makespan > 0 else float("nan"),
            staleness_mean=float(s.mean()) if len(s) else float("nan"),
            staleness_p50=_quantile(s, 0.5),
            staleness_p99=_quantile(s, 0.99),
            staleness_max=float(s.max()) if len(s) else float("nan"),
        )
    if "fidelity" in st:
        summary.update(fidelity=st["fidelity"], fidelity_reason=st.get("fidelity_reason", ""))
    return summary


def staleness_histogram(result: RunResult) -> pd.DataFrame:
    """Applied gradients per staleness value: columns staleness, count, fraction."""
    up = result.updates
    s = up.loc[up["applied"], "staleness"].astype(int)
    counts = s.value_counts().sort_index()
    frame = pd.DataFrame({"staleness": counts.index.to_numpy(), "count": counts.to_numpy()})
    frame["fraction"] = frame["count"] / max(len(s), 1)
    return frame


def plot_staleness(results, ax=None, *, labels=None):
    """Staleness distributions (fraction of applied gradients per staleness) of one or more runs;
    see :func:`simulator.plots.staleness`."""
    from simulator.plots import staleness

    return staleness(results, kind="hist", labels=labels, ax=ax)


def chrome_trace(result: RunResult) -> dict:
    """Trace-event JSON: one process per rank (threads compute, comm) and one for links."""
    events = []
    tl = result.timeline
    ranks = sorted(int(r) for r in tl.loc[tl["rank"] >= 0, "rank"].unique())
    link_pid = (max(ranks) + 1) if ranks else 0
    for r in ranks:
        events.append({"ph": "M", "name": "process_name", "pid": r, "args": {"name": f"rank {r}"}})
        for tid, stream in enumerate(("compute", "comm")):
            events.append({"ph": "M", "name": "thread_name", "pid": r, "tid": tid, "args": {"name": stream}})
    events.append({"ph": "M", "name": "process_name", "pid": link_pid, "args": {"name": "links"}})
    link_tids: dict[str, int] = {}
    for row in tl.itertuples(index=False):
        if row.rank >= 0:
            pid, tid = int(row.rank), 0 if row.stream == "compute" else 1
        else:
            tid = link_tids.setdefault(row.name, len(link_tids))
            pid = link_pid
        events.append({
            "ph": "X", "name": row.name, "cat": row.stream, "pid": pid, "tid": tid,
            "ts": row.start * 1e6, "dur": max(row.end - row.start, 0.0) * 1e6,
            "args": {"iteration": int(row.iteration)},
        })
    for name, tid in link_tids.items():
        events.append({"ph": "M", "name": "thread_name", "pid": link_pid, "tid": tid, "args": {"name": name}})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"experiment": result.experiment}}
