"""Simulator speed: ResNet-50 synchronous data parallel on 64, 256 and 1024 GPUs.

10 iterations each, ring all-reduce, DDP buckets with overlap, A100 nodes of 8
GPUs (NVLink 3, a 100 Gb/s NIC per GPU). Reports the median wall time of
``repeats`` runs, simulated ops per second (ops the role programs yielded) and
flows per second, and writes the table to ``benchmarks/results.md``.
Target: the 1024-GPU case in at most 5 s on a 2-core machine.

    python benchmarks/speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date
from pathlib import Path

from simulator.cluster import Cluster
from simulator.executor import simulate
from simulator.experiment import Experiment
from simulator.workload import Workload
from strategies import AllReduceSGD


def experiment(gpus: int, workload: Workload, collective_model: str = "auto") -> Experiment:
    cluster = Cluster.homogeneous(nodes=gpus // 8, gpus_per_node=8, gpu="A100-80GB", intra="nvlink3",
                                  inter="100GbE", nics_per_node=8)
    return Experiment(workload=workload, cluster=cluster, strategy=AllReduceSGD(algorithm="ring"),
                      batch_size=64, iterations=10, collective_model=collective_model)


def measure(exp: Experiment, repeats: int) -> dict:
    walls, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = simulate(exp)
        walls.append(time.perf_counter() - start)
    wall = statistics.median(walls)
    return {"wall": wall, "ops": result.stats["ops"], "flows": result.stats["flows"],
            "iteration_time": result.summary()["iteration_time_mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.md")))
    args = parser.parse_args()
    workload = Workload.from_zoo("resnet50")
    cases = [(64, "auto"), (256, "auto"), (1024, "auto"), (64, "stepped")]
    rows = []
    for gpus, model in cases:
        m = measure(experiment(gpus, workload, model), args.repeats)
        rows.append((gpus, model, m))
        print(f"{gpus:>5} GPUs  collectives={model:<8} wall {m['wall']:7.3f} s   "
              f"{m['ops'] / m['wall']:>10,.0f} ops/s   {m['flows'] / m['wall']:>10,.0f} flows/s   "
              f"simulated iteration {m['iteration_time'] * 1e3:.2f} ms")
    lines = [
        "# Simulator speed",
        "",
        f"Measured {date.today().isoformat()} on {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}; median of {args.repeats} runs "
        "(`python benchmarks/speed.py`).",
        "ResNet-50, synchronous data parallel, ring all-reduce, 25 MiB buckets with overlap,",
        "batch 64 per GPU, 10 iterations, A100 nodes of 8 GPUs (NVLink 3, one 100 GbE NIC per GPU).",
        "`auto` takes the exact closed-form path for collectives where it applies; `stepped`",
        "runs every step of every collective as flows.",
        "",
        "| GPUs | collectives | wall time (s) | role-program ops | ops/s | network flows | simulated iteration (ms) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for gpus, model, m in rows:
        lines.append(f"| {gpus} | {model} | {m['wall']:.3f} | {m['ops']:,} | {m['ops'] / m['wall']:,.0f} | "
                     f"{m['flows']:,} | {m['iteration_time'] * 1e3:.2f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
