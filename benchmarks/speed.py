"""Simulator speed at scale: CPU seconds and peak memory of ``simulate()``, and how they grow.

Cases (each in a fresh process, so one case's heap does not slow the next):

* GPT-3 175B, tp 8, pp 8, interleaved v = 2, micro-batches of 4 (m = 24), ZeRO-1, full
  recomputation, bf16 with Adam, one iteration, on DGX A100-80GB nodes (8 HDR NICs each):
  dp = 16 (1024 GPUs, the README's configuration) and dp = 1, 2, 4, 64, 256;
* ResNet-50, synchronous data parallel, ring all-reduce, 25 MiB buckets with overlap,
  batch 64 per GPU, 10 iterations, on A100 nodes of 8 GPUs (NVLink 3, a 100 GbE NIC per
  GPU): 1024, 4096 and 16384 GPUs.

Each runs with ``fidelity="auto"`` (representative ranks) and ``fidelity="full"`` (every
rank; GPT-3 up to dp = 16). The figure is the median over ``--repeats`` runs
of the CPU seconds of ``simulate()`` alone (``time.process_time``; loading the workload
is not counted), and the peak resident memory of the process. Growth exponents are
least-squares slopes of log CPU seconds against log GPUs. Targets (issue "simulate at the
speed of an analytic model"): GPT-3 and ResNet-50 at 16384 GPUs within 1 s and 500 MB with
representatives, growth at most GPUs^0.2 with representatives and GPUs^1.02 in full.

    python benchmarks/speed.py [--repeats 3] [--out benchmarks/results.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np

GPT_DP = (1, 2, 4, 16, 64, 256)
GPT_FULL_DP = (1, 2, 4, 16)  # every rank of dp = 256 would take half an hour
RESNET_GPUS = (1024, 4096, 16384)


def _gpt3(dp: int, fidelity: str):
    from simulator.cluster import Cluster
    from simulator.experiment import Experiment
    from simulator.workload import Workload
    from strategies import Hybrid

    batch = 1536 // 16  # the README's replica batch: 24 micro-batches of 4
    cluster = Cluster.homogeneous(nodes=8 * dp, gpus_per_node=8, gpu="A100-80GB", intra="nvlink3", inter="HDR",
                                  nics_per_node=8)
    return Experiment(workload=Workload.from_zoo("gpt3-175b"), cluster=cluster, batch_size=batch, precision="bf16",
                      optimizer="adam", iterations=1, out_of_memory="report", fidelity=fidelity,
                      strategy=Hybrid(tp=8, pp=8, micro_batches=batch // 4, schedule="interleaved", chunks=2,
                                      zero=1, recompute=True))


def _resnet(gpus: int, fidelity: str):
    from simulator.cluster import Cluster
    from simulator.experiment import Experiment
    from simulator.workload import Workload
    from strategies import AllReduceSGD

    cluster = Cluster.homogeneous(nodes=gpus // 8, gpus_per_node=8, gpu="A100-80GB", intra="nvlink3",
                                  inter="100GbE", nics_per_node=8)
    return Experiment(workload=Workload.from_zoo("resnet50"), cluster=cluster, strategy=AllReduceSGD(algorithm="ring"),
                      batch_size=64, iterations=10, fidelity=fidelity)


def child(model: str, size: int, fidelity: str) -> None:
    """One measurement, printed as JSON (run in a fresh process)."""
    from simulator.executor import simulate

    exp = (_gpt3 if model == "gpt3" else _resnet)(size, fidelity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        start = time.process_time()
        result = simulate(exp)
        cpu = time.process_time() - start
    s = result.summary()
    print(json.dumps({
        "cpu": cpu, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gpus": exp.cluster.num_gpus, "ops": result.stats["ops"], "fidelity": result.stats["fidelity"],
        "iteration_time": s["iteration_time_mean"], "throughput": s["throughput"],
        "bytes_on_wire": s["bytes_on_wire"],
    }))


def measure(model: str, size: int, fidelity: str, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--child", model, str(size), fidelity], check=True,
                             capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    row = dict(runs[-1])
    row["cpu"] = statistics.median(r["cpu"] for r in runs)
    row["rss_mb"] = max(r["rss_mb"] for r in runs)
    return row


def exponent(rows: list[dict]) -> float:
    """Slope of log CPU seconds against log GPUs."""
    if len(rows) < 2:
        return float("nan")
    x = np.log([r["gpus"] for r in rows])
    y = np.log([r["cpu"] for r in rows])
    return float(np.polyfit(x, y, 1)[0])


def baseline_rss() -> float:
    """Peak memory of a process that only imports the simulator and loads both workloads."""
    code = ("import resource; from simulator.workload import Workload; Workload.from_zoo('gpt3-175b'); "
            "Workload.from_zoo('resnet50'); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.md")))
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "SIZE", "FIDELITY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, size, fidelity = args.child
        child(model, int(size), fidelity)
        return
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    cases = [("gpt3", dp, "auto") for dp in GPT_DP] + [("gpt3", dp, "full") for dp in GPT_FULL_DP]
    cases += [("resnet", g, f) for f in ("auto", "full") for g in RESNET_GPUS]
    rows = []
    for model, size, fidelity in cases:
        gpus = 64 * size if model == "gpt3" else size
        row = measure(model, size, fidelity, args.repeats)
        row.update(model=model, asked=fidelity)
        rows.append(row)
        print(f"{model:<7}{gpus:>6} GPUs  {fidelity:<5} ({row['fidelity']}): {row['cpu']:8.3f} s CPU  "
              f"{row['rss_mb']:7.0f} MB  {row['ops']:>10,} ops  iteration {row['iteration_time']:.6g} s", flush=True)
    write(rows, args, baseline_rss())


def write(rows: list[dict], args, base_mb: float) -> None:
    def pick(model, fidelity, lo=0):
        return [r for r in rows if r["model"] == model and r["asked"] == fidelity and r["gpus"] >= lo]

    lines = [
        "# Simulator speed",
        "",
        f"Measured {date.today().isoformat()} on {platform.machine()} ({platform.processor() or 'unknown CPU'}), "
        f"Python {platform.python_version()}: CPU seconds of `simulate()` alone, median of {args.repeats} runs, "
        "each in a fresh process; peak memory is the process's (imports included: a process that only "
        f"loads the workloads peaks at {base_mb:.0f} MB). `python benchmarks/speed.py` (`make bench`) writes this file.",
        "",
        "* GPT-3 175B: tp 8, pp 8, interleaved v = 2, m = 24 micro-batches of 4, ZeRO-1, recomputation, bf16 "
        "Adam, one iteration, DGX A100-80GB nodes with 8 HDR NICs; dp = GPUs / 64.",
        "* ResNet-50: data parallel, ring all-reduce, 25 MiB buckets with overlap, batch 64 per GPU, "
        "10 iterations, A100 nodes of 8 GPUs with a 100 GbE NIC per GPU.",
        "* `auto` simulates one representative per class of interchangeable ranks (`simulator/symmetry.py`); "
        "`full` simulates every rank. Both give the same iteration time and bytes (the last two columns).",
        "",
        "| model | GPUs | fidelity | CPU s | peak MB | role-program ops | iteration (s) | bytes on the wire |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['gpus']:,} | {r['asked']} ({r['fidelity']}) | {r['cpu']:.3f} | "
                     f"{r['rss_mb']:.0f} | {r['ops']:,} | {r['iteration_time']:.9g} | {r['bytes_on_wire']:.6g} |")
    lines += ["", "Growth of CPU seconds with GPUs (least-squares slope of log CPU against log GPUs):", "",
              "| model | fidelity | over | exponent | target |", "| --- | --- | --- | ---: | ---: |"]
    for model in ("gpt3", "resnet"):
        for fidelity, target in (("auto", 0.2), ("full", 1.02)):
            sel = pick(model, fidelity, 1024 if fidelity == "auto" else 0)
            if len(sel) >= 2:
                span = f"{sel[0]['gpus']:,}-{sel[-1]['gpus']:,} GPUs"
                lines.append(f"| {model} | {fidelity} | {span} | {exponent(sel):.2f} | {target} |")
    lines += ["", "With representatives the simulated events do not grow with the cluster (the ops column); what "
              "grows is linear set-up and output: the cluster's links (four per GPU), the symmetry's orbits, "
              "a collective's pairs and the per-rank tables."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
