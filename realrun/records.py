"""What a rank measures, appended to its own file as it goes (JSON lines), so a run that
fails or is killed keeps everything measured before; and the tables built from them."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from simulator.records import SPAN_COLUMNS
from simulator.results import ITERATION_COLUMNS, LINK_COLUMNS, UPDATE_COLUMNS, RunResult


class Recorder:
    """One rank's rows: iterations, timeline spans, updates; flushed at every iteration's end."""

    def __init__(self, path: Path, rank: int):
        self.path = Path(path)
        self.rank = rank
        self._file = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._start = 0.0
        self._compute = 0.0
        self._comm = 0.0
        self._samples = 0

    def _add(self, row: dict) -> None:
        self._pending.append(json.dumps(row))

    def iteration_start(self, i: int, now: float) -> None:
        with self._lock:
            self._start, self._compute, self._comm, self._samples = now, 0.0, 0.0, 0

    def iteration_end(self, i: int, now: float) -> None:
        with self._lock:
            d = now - self._start
            self._add({"k": "it", "row": [self.rank, i, self._start, now, d, self._compute, self._comm,
                                          d - self._compute, self._samples]})
        self.flush()

    def compute(self, seconds: float) -> None:
        with self._lock:
            self._compute += seconds

    def comm(self, seconds: float) -> None:
        with self._lock:
            self._comm += seconds

    def samples(self, n: int) -> None:
        with self._lock:
            self._samples += n

    def span(self, stream: str, name: str, start: float, end: float, iteration: int) -> None:
        with self._lock:
            self._add({"k": "span", "row": [self.rank, stream, name, start, end, iteration]})

    def update(self, row: tuple) -> None:
        with self._lock:
            self._add({"k": "up", "row": list(row)})

    def final(self, **facts) -> None:
        with self._lock:
            self._add({"k": "final", **facts})
        self.flush()

    def flush(self) -> None:
        with self._lock:
            lines, self._pending = self._pending, []
        if lines:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()


def read_rows(folder: Path, world: int) -> dict:
    """Every rank's rows from ``folder``; a line cut short by a kill is skipped."""
    out = {"it": [], "span": [], "up": [], "final": {}}
    for rank in range(world):
        path = Path(folder) / f"rank{rank}.jsonl"
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row["k"] == "final":
                out["final"][rank] = row
            else:
                out[row["k"]].append(row["row"])
    return out


def build_result(experiment, rows: dict, stats: dict, links: pd.DataFrame | None = None) -> RunResult:
    """A :class:`simulator.RunResult` of a real run, in the simulator's schema."""
    cluster = experiment.run_cluster
    world = cluster.world_size
    it = pd.DataFrame(rows["it"], columns=ITERATION_COLUMNS)
    it = it.sort_values(["iteration", "rank"], kind="stable").reset_index(drop=True)
    spans = pd.DataFrame(rows["span"], columns=SPAN_COLUMNS)
    spans.insert(0, "resource", "rank" + spans["rank"].astype(str) + "/" + spans["stream"])
    updates = pd.DataFrame(rows["up"], columns=UPDATE_COLUMNS).astype({"applied": bool})
    finals = rows["final"]
    ranks = pd.DataFrame({
        "rank": np.arange(world),
        "node": [cluster.node_of(r) for r in range(world)],
        "device": [stats.get("device", "cpu")] * world,
        "kind": ["host" if cluster.is_host(r) else "gpu" for r in range(world)],
        "peak_flops": [math.nan] * world,
        "bytes_sent": [float(finals.get(r, {}).get("bytes_sent", math.nan)) for r in range(world)],
    })
    ends = [float(f.get("end", 0.0)) for f in finals.values()]
    if len(it):
        ends.append(float(it["end"].max()))
    makespan = max(ends) if ends else 0.0
    losses = [f.get("losses", {}) for f in finals.values()]
    per_it: dict[int, list[float]] = {}
    for d in losses:
        for k, v in d.items():
            per_it.setdefault(int(k), []).append(float(v))
    loss = [float(np.mean(per_it[k])) for k in sorted(per_it)]
    workload = experiment.workload
    stats = dict(stats)
    stats.update(
        makespan=makespan,
        world_size=world,
        gpus=cluster.num_gpus,
        batch_size=experiment.batch_size if isinstance(experiment.batch_size, int) else list(experiment.batch_size),
        flops_per_sample=float(workload.fwd_flops + workload.bwd_flops),
        executor="realrun",
        loss=loss,
        final_loss=loss[-1] if loss else math.nan,
        single_device_iteration_time=math.nan,
        ideal_throughput=math.nan,
    )
    return RunResult(
        experiment=experiment.to_dict(),
        iterations=it,
        timeline=spans,
        links=links if links is not None else pd.DataFrame(columns=LINK_COLUMNS),
        ranks=ranks,
        updates=updates,
        stats=stats,
    )
