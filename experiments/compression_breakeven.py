"""When does gradient compression stop paying off?

Synchronous data parallel (DDP buckets, ring all-reduce, backward overlapped
with communication) of ResNet-50 (fp32, batch 64 per GPU, SGD with momentum)
and BERT-large (sequence 128, mixed precision fp16, batch 32 per GPU, Adam) on
16, 32 and 64 single-V100 nodes, with Ethernet from 1 to 100 Gbit/s, for each
compressor against none:

* fp16 cast (DDP's ``fp16_compress_hook``; for BERT's fp16 gradients it is a no-op);
* top-k 1 % with error feedback (all-gather), random-k 1 % (all-reduce);
* QSGD with 7 levels, 4 bits per element (all-gather);
* scaled signSGD with error feedback (all-gather);
* PowerSGD rank 4 (three all-reduces per bucket).

The model charges every encode and decode on the GPU's compute stream, where it
delays backward, and runs the all-gather of sparse or quantised payloads, whose
traffic and decode grow with the number of GPUs. So, as Agarwal et al. ("On the
utility of gradient compression in distributed training systems", MLSys 2022)
measured, compression helps on slow networks and stops helping, or hurts, at
datacenter bandwidth, where uncompressed all-reduce is already hidden behind
backward. Writes into the output folder:

* ``compression.csv``: one row per run, appended as each finishes;
* ``compression_breakeven.csv``: per model, GPU count and compressor, the fastest
  network (of the grid) on which it still beats no compression;
* ``compression_speedup.png``: speed-up over no compression against bandwidth.

Run it with ``python -m experiments.compression_breakeven [--quick]``.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from simulator.cluster import Cluster  # noqa: E402
from simulator.executor import simulate  # noqa: E402
from simulator.experiment import Experiment  # noqa: E402
from simulator.workload import Workload  # noqa: E402
from strategies import AllReduceSGD  # noqa: E402
from strategies.compression import QSGD, Cast, PowerSGD, RandomK, SignSGD, TopK  # noqa: E402

COMPRESSORS = {
    "none": None,
    "fp16": Cast("fp16"),
    "top-k 1%": TopK(ratio=0.01),
    "random-k 1%": RandomK(ratio=0.01),
    "QSGD 4-bit": QSGD(levels=7),
    "signSGD+EF": SignSGD(vote="scaled"),
    "PowerSGD r=4": PowerSGD(rank=4),
}
MODELS = {
    "ResNet-50": ({"zoo": "resnet50"}, {"precision": "fp32", "batch_size": 64, "optimizer": "momentum"}),
    "BERT-large": ({"zoo": "bert", "size": "bert-large", "seq_len": 128},
                   {"precision": "fp16", "batch_size": 32, "optimizer": "adam"}),
}
COLUMNS = ["model", "gpus", "gbps", "compressor", "throughput", "iteration_time", "compute_time",
           "exposed_comm", "bytes_on_wire", "speedup"]


def experiment(workload: Workload, settings: dict, gpus: int, gbps: float, compressor, iterations: int):
    cluster = Cluster.homogeneous(nodes=gpus, gpus_per_node=1, gpu="V100-32GB", inter="100GbE",
                                  inter_bandwidth=f"{gbps}Gbps")
    return Experiment(workload=workload, cluster=cluster, strategy=AllReduceSGD(compression=compressor),
                      iterations=iterations, seed=1, **settings)


def _row(exp: Experiment, labels: dict) -> dict:
    s = simulate(exp).summary()
    return {**labels, "throughput": s["throughput"], "iteration_time": s["iteration_time_p50"],
            "compute_time": s["compute_time_mean"], "exposed_comm": s["exposed_comm_mean"],
            "bytes_on_wire": s["bytes_on_wire"]}


def run_grid(out: Path, gpu_counts, bandwidths, iterations: int, *, processes: int | None = None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    workloads = {}
    for name, (spec, _) in MODELS.items():
        spec = dict(spec)
        workloads[name] = Workload.from_zoo(spec.pop("zoo"), **spec)
    jobs = [
        (experiment(workloads[model], settings, p, bw, comp, iterations),
         {"model": model, "gpus": p, "gbps": bw, "compressor": name})
        for model, (_, settings) in MODELS.items() for p in gpu_counts for bw in bandwidths
        for name, comp in COMPRESSORS.items()
    ]
    rows = []
    with (out / "compression.csv").open("w", newline="") as f, ProcessPoolExecutor(processes or os.cpu_count()) as pool:
        writer = csv.DictWriter(f, fieldnames=COLUMNS[:-1])
        writer.writeheader()
        futures = [pool.submit(_row, exp, labels) for exp, labels in jobs]
        for done, future in enumerate(as_completed(futures), 1):
            row = future.result()
            writer.writerow(row)
            f.flush()  # results are kept as they are produced
            rows.append(row)
            print(f"[{done}/{len(futures)}] {row['model']}, {row['gpus']} GPUs, {row['gbps']} Gb/s, "
                  f"{row['compressor']}: {row['throughput']:.0f} samples/s", flush=True)
    base = {(r["model"], r["gpus"], r["gbps"]): r["throughput"] for r in rows if r["compressor"] == "none"}
    for r in rows:
        r["speedup"] = r["throughput"] / base[(r["model"], r["gpus"], r["gbps"])]
    return rows


PAYS = 1.01
"""A compressor pays where it is at least 1 % faster than none."""


def breakeven(rows: list[dict]) -> list[dict]:
    """Per model, GPU count and compressor: the fastest network where it still beats none by
    1 % (``None``: nowhere in the grid) and the slowest where it no longer does."""
    out = []
    keys = sorted({(r["model"], r["gpus"], r["compressor"]) for r in rows if r["compressor"] != "none"})
    for model, gpus, comp in keys:
        pts = sorted((r["gbps"], r["speedup"]) for r in rows
                     if (r["model"], r["gpus"], r["compressor"]) == (model, gpus, comp))
        wins = [bw for bw, s in pts if s >= PAYS]
        losses = [bw for bw, s in pts if s < PAYS]
        out.append({"model": model, "gpus": gpus, "compressor": comp,
                    "pays_up_to_gbps": max(wins) if wins else None,
                    "first_loss_gbps": min(losses) if losses else None,
                    "speedup_at_slowest": pts[0][1], "speedup_at_fastest": pts[-1][1]})
    return out


def plot(rows: list[dict], path: Path) -> Path:
    models = list(MODELS)
    counts = sorted({r["gpus"] for r in rows})
    fig, axes = plt.subplots(len(models), len(counts), figsize=(4.6 * len(counts), 3.8 * len(models)),
                             sharex=True, squeeze=False)
    for i, model in enumerate(models):
        for j, p in enumerate(counts):
            ax = axes[i][j]
            for name in COMPRESSORS:
                if name == "none":
                    continue
                pts = sorted((r["gbps"], r["speedup"]) for r in rows
                             if (r["model"], r["gpus"], r["compressor"]) == (model, p, name))
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=name)
            ax.axhline(1.0, color="black", lw=1)
            ax.set_xscale("log")
            ax.set_yscale("log", base=2)
            ax.set_title(f"{model}, {p} GPUs")
            ax.grid(True, which="both", alpha=0.3)
            if i == len(models) - 1:
                ax.set_xlabel("network bandwidth (Gbit/s)")
            if j == 0:
                ax.set_ylabel("speed-up over no compression")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Gradient compression with DDP overlap:\nabove 1 it pays, below it costs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(out: Path = Path("compression-out"), *, quick: bool = False) -> list[dict]:
    t0 = time.perf_counter()
    counts = (16,) if quick else (16, 32, 64)
    bandwidths = (1, 10, 100) if quick else (1, 2.5, 5, 10, 25, 40, 100)
    rows = run_grid(out, counts, bandwidths, iterations=3 if quick else 5)
    table = breakeven(rows)
    with (out / "compression_breakeven.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    plot(rows, out / "compression_speedup.png")
    for t in table:
        pays = "never" if t["pays_up_to_gbps"] is None else f"up to {t['pays_up_to_gbps']} Gb/s"
        print(f"{t['model']:>10}, {t['gpus']:>2} GPUs, {t['compressor']:<13} pays {pays}; "
              f"speed-up {t['speedup_at_slowest']:.2f} at the slowest network, {t['speedup_at_fastest']:.2f} "
              "at the fastest")
    print(f"wrote {out}/compression.csv, compression_breakeven.csv, compression_speedup.png "
          f"in {time.perf_counter() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="compression-out")
    parser.add_argument("--quick", action="store_true", help="a small grid, for a quick look")
    args = parser.parse_args()
    main(Path(args.out), quick=args.quick)
