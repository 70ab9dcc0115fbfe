"""What if we changed the all-reduce algorithm, the cluster size or the network?

Synchronous data parallel (DDP buckets, overlap on, bf16 compute, fp32
gradients) of ResNet-50 and GPT-2 small on nodes of 8 A100s joined by NVLink 3
with one NIC per node, from 1 to 256 GPUs, on 25 Gb/s Ethernet and on 200 Gb/s
InfiniBand HDR, with ring, double-binary-tree, halving-doubling and
hierarchical all-reduce. The ring is a single ring (one NCCL channel). Writes into the output folder:

* ``allreduce_algorithms.csv``: one row per configuration, appended as each
  finishes
* ``throughput.png``: samples/s against GPUs, one panel per model and network
* ``scaling_efficiency.png``: throughput over GPUs x single-GPU throughput
* ``allreduce_busbw.png``: bus bandwidth of one all-reduce against message
  size on 64 GPUs, as nccl-tests reports it

Run it with ``clustersim demo`` or ``python -m experiments.allreduce_algorithms``;
copy it and change the grid to ask your own question.
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
from simulator.collectives import simulate_collective  # noqa: E402
from simulator.executor import simulate  # noqa: E402
from simulator.experiment import Experiment  # noqa: E402
from simulator.workload import Workload  # noqa: E402
from strategies import AllReduceSGD  # noqa: E402

ALGORITHMS = ("ring", "tree", "halving_doubling", "hierarchical")
NETWORKS = {"25 Gb/s Ethernet": "25GbE", "200 Gb/s InfiniBand": "ib-hdr"}
MODELS = {  # name -> (zoo spec, batch per GPU)
    "ResNet-50": ({"name": "resnet50"}, 64),
    "GPT-2 small": ({"name": "gpt", "size": "gpt2-small", "seq_len": 1024}, 8),
}
GPUS_PER_NODE = 8
COLUMNS = ["model", "network", "algorithm", "gpus", "throughput", "iteration_time",
           "scaling_efficiency", "exposed_comm", "bytes_on_wire"]


def cluster_for(gpus: int, inter: str) -> Cluster:
    nodes = max(1, gpus // GPUS_PER_NODE)
    per_node = min(gpus, GPUS_PER_NODE)
    return Cluster.homogeneous(nodes=nodes, gpus_per_node=per_node, gpu="A100-80GB",
                               intra="nvlink3", inter=inter, nics_per_node=1)


def _simulate_row(exp: Experiment, labels: dict) -> dict:
    s = simulate(exp).summary()
    return {
        **labels,
        "throughput": s["throughput"], "iteration_time": s["iteration_time_mean"],
        "scaling_efficiency": s["scaling_efficiency"],
        "exposed_comm": s["exposed_comm_mean"], "bytes_on_wire": s["bytes_on_wire"],
    }


def run_grid(out: Path, gpu_counts, iterations: int, *, workers: int | None = None) -> list[dict]:
    """Simulate every configuration on a process pool; rows are written as each finishes."""
    jobs = []
    for model, (spec, batch) in MODELS.items():
        spec = dict(spec)
        workload = Workload.from_zoo(spec.pop("name"), **spec)
        for network, inter in NETWORKS.items():
            for algorithm in ALGORITHMS:
                for gpus in gpu_counts:
                    exp = Experiment(
                        workload=workload, cluster=cluster_for(gpus, inter),
                        strategy=AllReduceSGD(algorithm=algorithm), batch_size=batch,
                        iterations=iterations, precision="bf16",
                        name=f"{model}/{network}/{algorithm}/{gpus}",
                    )
                    labels = {"model": model, "network": network, "algorithm": algorithm, "gpus": gpus}
                    jobs.append((gpus, exp, labels))
    jobs.sort(key=lambda job: -job[0])  # largest first, so the pool ends evenly
    rows = []
    with (out / "allreduce_algorithms.csv").open("w", newline="") as fh, \
            ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        futures = [pool.submit(_simulate_row, exp, labels) for _, exp, labels in jobs]
        for done, future in enumerate(as_completed(futures), 1):
            row = future.result()
            writer.writerow(row)
            fh.flush()  # rows survive an interrupted run
            rows.append(row)
            print(f"\r  {done}/{len(futures)} simulations", end="", flush=True)
    print()
    return rows


def plot_grid(rows: list[dict], metric: str, ylabel: str, path: Path, *, ideal: bool) -> None:
    fig, axes = plt.subplots(len(MODELS), len(NETWORKS), figsize=(11, 8), squeeze=False)
    for i, model in enumerate(MODELS):
        for j, network in enumerate(NETWORKS):
            ax = axes[i][j]
            for algorithm in ALGORITHMS:
                sel = [r for r in rows if (r["model"], r["network"], r["algorithm"]) == (model, network, algorithm)]
                sel.sort(key=lambda r: r["gpus"])
                ax.plot([r["gpus"] for r in sel], [r[metric] for r in sel], marker="o", ms=4, label=algorithm)
            if ideal:
                base = [r for r in rows if r["model"] == model and r["network"] == network and r["gpus"] == 1]
                if base:
                    gpus = sorted({r["gpus"] for r in rows})
                    ax.plot(gpus, [base[0]["throughput"] * g for g in gpus], "k--", lw=1, label="linear")
                ax.set_yscale("log")
            else:
                ax.set_ylim(0, 1.05)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{model}, {network}", fontsize=11)
            ax.set_xlabel("GPUs")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=9)
    fig.suptitle("Synchronous data parallel on A100 nodes (8 GPUs and one NIC per node, NVLink 3)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_busbw(out: Path, sizes_mb, gpus: int = 64) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = dict(zip(ALGORITHMS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for (network, inter), style in zip(NETWORKS.items(), ("--", "-"), strict=True):
        cluster = cluster_for(gpus, inter)
        for algorithm in ALGORITHMS:
            busbw = []
            for mb in sizes_mb:
                n = mb * 1e6
                t = simulate_collective(cluster, "all_reduce", n, algorithm=algorithm)
                busbw.append(n / t * 2 * (gpus - 1) / gpus / 1e9)
            ax.plot(sizes_mb, busbw, style, color=colours[algorithm], marker="o", ms=3,
                    label=f"{algorithm}, {network}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("message size (MB)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(f"All-reduce bus bandwidth on {gpus} A100 GPUs ({gpus // GPUS_PER_NODE} nodes)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "allreduce_busbw.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(rows: list[dict]) -> None:
    top = max(r["gpus"] for r in rows)
    print(f"\nAt {top} GPUs (throughput in samples/s, scaling efficiency vs one GPU):")
    print(f"  {'model':<12} {'network':<20} " + "  ".join(f"{a:>18}" for a in ALGORITHMS))
    for model in MODELS:
        for network in NETWORKS:
            cells = []
            for algorithm in ALGORITHMS:
                r = next(r for r in rows if (r["model"], r["network"], r["algorithm"], r["gpus"])
                         == (model, network, algorithm, top))
                cells.append(f"{r['throughput']:>9.0f} ({r['scaling_efficiency']:>4.0%})")
            print(f"  {model:<12} {network:<20} " + "  ".join(f"{c:>18}" for c in cells))


def main(out: Path = Path("demo-out"), *, quick: bool = False) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    gpu_counts = (1, 8, 64) if quick else (1, 2, 4, 8, 16, 32, 64, 128, 256)
    start = time.perf_counter()
    rows = run_grid(out, gpu_counts, iterations=2)
    plot_grid(rows, "throughput", "samples/s", out / "throughput.png", ideal=True)
    plot_grid(rows, "scaling_efficiency", "scaling efficiency", out / "scaling_efficiency.png", ideal=False)
    plot_busbw(out, (1, 4, 16, 64, 256) if quick else (0.25, 1, 4, 16, 64, 256, 1024))
    print_table(rows)
    print(f"\n{len(rows)} simulations in {time.perf_counter() - start:.1f} s; "
          f"CSV and plots in {out}/")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    main(Path(args.out), quick=args.quick)
