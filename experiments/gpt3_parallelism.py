"""GPT-3 175B on 1024 A100s: which (tp, pp, dp, micro-batches, schedule) trains fastest?

The setting of Narayanan et al., "Efficient Large-Scale Language Model Training
on GPU Clusters Using Megatron-LM" (SC 2021): GPT-3 175B (96 layers, hidden
12288, sequence 2048), global batch 1536, bf16 mixed precision with Adam,
full activation recomputation, the optimizer state partitioned across the
data-parallel ranks (ZeRO-1, Megatron's distributed optimizer), on 128 DGX
A100-80GB nodes: NVLink 3 inside a node, 8 × 200 Gbit/s HDR InfiniBand per
node (one per GPU) on a non-blocking fabric. They report 153 TFLOP/s per GPU
(49 % of the 312 TFLOP/s bf16 peak) for tp = 8, pp = 8 with the interleaved
schedule, counting the recomputation's FLOPs.

For every configuration of the grid the simulator gives the iteration time,
throughput, TFLOP/s per GPU (model FLOPs, and hardware FLOPs with the
recomputed forward), model FLOPs utilisation and the peak memory per GPU.
Writes into the output folder:

* ``gpt3_grid.csv``: one row per configuration, appended as each finishes;
* ``gpt3_best.csv``: the configurations that fit in memory, fastest first;
* ``gpt3_grid.png``: TFLOP/s per GPU and peak memory of every configuration;
* ``gpt3_bubble.csv`` / ``pipeline_bubble.png``: the pipeline bubble of one
  replica (tp = 8, pp = 8, 64 GPUs) against the number of micro-batches for
  GPipe, 1F1B and interleaved 1F1B, simulated and by formula.

Run it with ``python -m experiments.gpt3_parallelism [--quick]``. The full grid
simulates about 60 million role-program ops and takes tens of minutes on two
cores; ``--quick`` runs a third of it.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from simulator.cluster import Cluster  # noqa: E402
from simulator.executor import simulate  # noqa: E402
from simulator.experiment import Experiment  # noqa: E402
from simulator.workload import Workload  # noqa: E402
from strategies import Hybrid  # noqa: E402

GLOBAL_BATCH = 1536
SETTINGS = dict(precision="bf16", optimizer="adam", iterations=1, out_of_memory="report")
COLUMNS = ["tp", "pp", "dp", "micro_batch_size", "micro_batches", "schedule", "chunks", "iteration_time",
           "throughput", "tokens_per_second", "model_tflops_per_gpu", "hardware_tflops_per_gpu", "mfu",
           "peak_memory_gb", "fits", "wall_seconds"]


def cluster(nodes: int = 128) -> Cluster:
    return Cluster.homogeneous(nodes=nodes, gpus_per_node=8, gpu="A100-80GB", intra="nvlink3", inter="HDR",
                               nics_per_node=8)


def strategy(tp: int, pp: int, micro_batches: int, sched: str, chunks: int, **extra) -> Hybrid:
    return Hybrid(tp=tp, pp=pp, micro_batches=micro_batches, schedule=sched, chunks=chunks, zero=1,
                  recompute=True, **extra)


def _row(exp: Experiment, labels: dict) -> dict:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # out-of-memory is reported in the row
        r = simulate(exp)
    s = r.summary()
    wl = exp.workload
    # Recomputation runs each forward twice: hardware FLOPs = (2 fwd + bwd) / (fwd + bwd) x model FLOPs.
    hw = (2 * wl.fwd_flops + wl.bwd_flops) / (wl.fwd_flops + wl.bwd_flops)
    seq = wl.sample_shape[0] if wl.sample_shape else 1
    return {**labels, "iteration_time": s["makespan"] / s["iterations"], "throughput": s["throughput"],
            "tokens_per_second": s["throughput"] * seq,
            "model_tflops_per_gpu": s["achieved_flops_per_device"] / 1e12,
            "hardware_tflops_per_gpu": s["achieved_flops_per_device"] * hw / 1e12,
            "mfu": s["model_flops_utilisation"], "peak_memory_gb": s["peak_memory"] / 1e9,
            "fits": s["memory_fits"], "wall_seconds": time.perf_counter() - t0}


def grid(quick: bool) -> list[dict]:
    """(tp, pp) pairs with 8-GPU tensor groups or 4, micro-batch sizes, schedules."""
    shapes = [(8, 8), (8, 16)] if quick else [(8, 8), (8, 16), (4, 16), (8, 4)]
    sizes = [4] if quick else [2, 4]
    points = []
    for tp, pp in shapes:
        for b in sizes:
            for sched, v in (("1f1b", 1), ("interleaved", 2)):
                points.append({"tp": tp, "pp": pp, "micro_batch_size": b, "schedule": sched, "chunks": v})
    return points


def run_grid(out: Path, workload: Workload, points: list[dict], *, gpus: int = 1024,
             global_batch: int = GLOBAL_BATCH, processes: int | None = None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for pt in points:
        dp = gpus // (pt["tp"] * pt["pp"])
        batch = global_batch // dp
        m = batch // pt["micro_batch_size"]
        try:
            exp = Experiment(workload=workload, cluster=cluster(gpus // 8), batch_size=batch,
                             strategy=strategy(pt["tp"], pt["pp"], m, pt["schedule"], pt["chunks"]), **SETTINGS)
        except ValueError as exc:  # e.g. interleaving needs the micro-batches to be a multiple of pp
            print(f"skipped tp={pt['tp']} pp={pt['pp']} dp={dp} m={m} {pt['schedule']}: {exc}", flush=True)
            continue
        jobs.append((exp, {**pt, "dp": dp, "micro_batches": m}))
    rows = []
    with (out / "gpt3_grid.csv").open("w", newline="") as f, ProcessPoolExecutor(processes or os.cpu_count()) as pool:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        futures = [pool.submit(_row, exp, labels) for exp, labels in jobs]
        for done, future in enumerate(as_completed(futures), 1):
            row = future.result()
            writer.writerow({k: row[k] for k in COLUMNS})
            f.flush()  # results are kept as they are produced
            rows.append(row)
            print(f"[{done}/{len(futures)}] tp={row['tp']} pp={row['pp']} dp={row['dp']} m={row['micro_batches']} "
                  f"{row['schedule']}: {row['iteration_time']:.2f} s/iteration, "
                  f"{row['hardware_tflops_per_gpu']:.0f} TFLOP/s per GPU, {row['peak_memory_gb']:.0f} GB"
                  f"{'' if row['fits'] else ' (does not fit)'} [{row['wall_seconds']:.0f} s]", flush=True)
    return rows


def best(rows: list[dict]) -> list[dict]:
    """Configurations that fit in memory, fastest first."""
    return sorted((r for r in rows if r["fits"]), key=lambda r: -r["throughput"])


def _label(r: dict) -> str:
    sched = "int" if r["schedule"] == "interleaved" else r["schedule"]
    return f"t{r['tp']} p{r['pp']} d{r['dp']}\nm{r['micro_batches']} {sched}"


def plot_grid(rows: list[dict], path: Path, capacity_gb: float) -> Path:
    rows = sorted(rows, key=lambda r: (r["tp"], r["pp"], r["micro_batch_size"], r["schedule"]))
    x = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(rows)), 7), sharex=True)
    colours = ["tab:blue" if r["fits"] else "tab:gray" for r in rows]
    ax1.bar(x, [r["hardware_tflops_per_gpu"] for r in rows], color=colours)
    ax1.scatter(x, [r["model_tflops_per_gpu"] for r in rows], color="black", marker="_", s=200,
                label="model FLOPs (without recomputation)")
    ax1.axhline(153, color="tab:red", ls="--", lw=1, label="Narayanan et al. 2021: 153 TFLOP/s")
    top = max([153.0] + [r["hardware_tflops_per_gpu"] for r in rows])
    ax1.set_ylim(0, top * 1.15)  # room above the published line for the legend
    ax1.set_ylabel("TFLOP/s per GPU")
    ax1.legend(fontsize="small", loc="upper right", ncols=2)
    ax1.set_title("GPT-3 175B on 1024 A100-80GB, global batch 1536 (grey: does not fit in memory)")
    ax2.bar(x, [r["peak_memory_gb"] for r in rows], color=colours)
    ax2.axhline(capacity_gb, color="tab:red", ls="--", lw=1, label="device memory")
    ax2.set_ylim(0, max([capacity_gb] + [r["peak_memory_gb"] for r in rows]) * 1.15)
    ax2.set_ylabel("peak memory per GPU (GB)")
    ax2.legend(fontsize="small", loc="upper right")
    ax2.set_xticks(list(x), [_label(r) for r in rows], fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def bubble(out: Path, workload: Workload, counts=(8, 16, 32, 64), tp: int = 8, pp: int = 8) -> list[dict]:
    """One replica's pipeline bubble against micro-batches: the first stage's idle share of the
    iteration (its compute and blocking tensor-parallel communication are the busy part)."""
    rows = []
    for sched, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        for m in counts:
            exp = Experiment(workload=workload, cluster=cluster(tp * pp // 8), batch_size=m,
                             strategy=strategy(tp, pp, m, sched, v), **SETTINGS)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                r = simulate(exp)
            tl = r.timeline
            mine = tl[(tl["rank"] == 0) & ((tl["stream"] == "compute") | tl["name"].str.contains(r":(?:act|grad)\["))]
            busy = float((mine["end"] - mine["start"]).sum())
            period = r.stats["makespan"]
            rows.append({"schedule": sched, "chunks": v, "micro_batches": m, "iteration_time": period,
                         "bubble": 1 - busy / period, "formula": (pp - 1) / v / (m + (pp - 1) / v)})
            print(f"bubble {sched} m={m}: {rows[-1]['bubble']:.3f} (formula {rows[-1]['formula']:.3f})", flush=True)
    with (out / "gpt3_bubble.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (sched, v), colour in zip((("gpipe", 1), ("1f1b", 1), ("interleaved", 2)),
                                  ("tab:blue", "tab:orange", "tab:green"), strict=True):
        pts = [r for r in rows if r["schedule"] == sched]
        ax.plot([r["micro_batches"] for r in pts], [r["bubble"] for r in pts], marker="o", color=colour,
                ls="-" if sched != "1f1b" else ":", label=f"{sched} (simulated)")
        if sched != "1f1b":  # 1F1B's formula is GPipe's
            label = "(p-1)/(m+p-1)" if v == 1 else f"(p-1)/v / (m+(p-1)/v), v={v}"
            ax.plot([r["micro_batches"] for r in pts], [r["formula"] for r in pts], color=colour, ls="--",
                    lw=1, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batches per iteration (m)")
    ax.set_ylabel("pipeline bubble (idle share of stage 0)")
    ax.set_title(f"GPT-3 175B, one replica: tp={tp}, pp={pp}, micro-batch 1")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "pipeline_bubble.png", dpi=120)
    plt.close(fig)
    return rows


def main(out: Path = Path("gpt3-out"), *, quick: bool = False) -> list[dict]:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    workload = Workload.from_zoo("gpt3-175b")
    bubble(out, workload, counts=(8, 16, 32) if quick else (8, 16, 32, 64))
    rows = run_grid(out, workload, grid(quick))
    ranked = best(rows)
    if ranked:
        with (out / "gpt3_best.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows({k: r[k] for k in COLUMNS} for r in ranked)
    plot_grid(rows, out / "gpt3_grid.png", cluster(1).device_of(0).mem_capacity / 1e9)
    for r in ranked[:5]:
        print(f"best: tp={r['tp']} pp={r['pp']} dp={r['dp']} m={r['micro_batches']} {r['schedule']}: "
              f"{r['tokens_per_second']:.0f} tokens/s, {r['hardware_tflops_per_gpu']:.0f} TFLOP/s per GPU "
              f"({r['mfu']:.0%} MFU), {r['peak_memory_gb']:.0f} GB")
    print(f"wrote {out}/gpt3_grid.csv, gpt3_best.csv, gpt3_grid.png, gpt3_bubble.csv, pipeline_bubble.png "
          f"in {time.perf_counter() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpt3-out")
    parser.add_argument("--quick", action="store_true", help="a third of the grid, for a quick look")
    args = parser.parse_args()
    main(Path(args.out), quick=args.quick)
