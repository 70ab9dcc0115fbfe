"""What if we used a parameter server instead of all-reduce, or let updates go stale?

ResNet-50 data parallel (batch 64 per worker, bf16 compute, fp32 gradients)
on 1 to 64 single-A100 nodes, on 10 Gb/s and on 100 Gb/s Ethernet, with:

* ring all-reduce (DDP buckets, overlap);
* a parameter server of 4 dedicated CPU servers (the model sliced in 4 equal
  shards, SGD with momentum on the servers): synchronous, synchronous with
  backup workers (waiting for 90 % of the workers), asynchronous, and
  stale-synchronous with a bound of 2 clocks.

Worker iteration times vary (lognormal, coefficient of variation 0.2, drawn
per iteration), which is what backup workers and asynchrony exploit. Writes
into the output folder:

* ``ps_vs_allreduce.csv``: one row per configuration, appended as each finishes
* ``ps_throughput.png``: samples/s against workers, one panel per network
* ``ps_staleness.png``: staleness distributions of the asynchronous and
  stale-synchronous servers at 16 and 64 workers

Run it with ``python -m experiments.ps_vs_allreduce [--quick]``; copy it and
change the grid to ask your own question.
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
from simulator.compute import ComputeModel  # noqa: E402
from simulator.executor import simulate  # noqa: E402
from simulator.experiment import Experiment  # noqa: E402
from simulator.results import plot_staleness  # noqa: E402
from simulator.workload import Workload  # noqa: E402
from strategies import AllReduceSGD, ParameterServer  # noqa: E402

NETWORKS = {"10 Gb/s Ethernet": "10GbE", "100 Gb/s Ethernet": "100GbE"}
SERVERS = 4
COLUMNS = ["network", "strategy", "workers", "throughput", "applied_samples_per_second", "iteration_time",
           "exposed_comm", "staleness_mean", "staleness_p99", "updates_dropped", "bytes_on_wire"]


def strategies_for(workers: int) -> dict:
    backup = max(1, workers - max(1, workers // 10)) if workers > 1 else None
    ps = {"servers": SERVERS, "partition": "slice"}
    return {
        "ring all-reduce": AllReduceSGD(),
        "PS sync": ParameterServer(mode="sync", **ps),
        "PS sync, backup workers": ParameterServer(mode="sync", wait_for=backup, **ps),
        "PS async": ParameterServer(mode="async", **ps),
        "PS SSP (s=2)": ParameterServer(mode="ssp", staleness_bound=2, **ps),
    }


def experiment(workers: int, inter: str, strategy, iterations: int) -> Experiment:
    return Experiment(
        workload=Workload.from_zoo("resnet50"),
        cluster=Cluster.homogeneous(nodes=workers, gpus_per_node=1, gpu="A100-80GB", inter=inter),
        strategy=strategy, batch_size=64, iterations=iterations, precision="bf16", optimizer="momentum",
        compute=ComputeModel(distribution="lognormal", noise_cv=0.2, scope="iteration"), seed=1,
    )


def _row(exp: Experiment, labels: dict) -> tuple[dict, object]:
    result = simulate(exp)
    s = result.summary()
    row = {
        **labels,
        "throughput": s["throughput"],
        "applied_samples_per_second": s.get("applied_samples_per_second", s["throughput"]),
        "iteration_time": s["iteration_time_mean"],
        "exposed_comm": s["exposed_comm_mean"],
        "staleness_mean": s.get("staleness_mean", float("nan")),
        "staleness_p99": s.get("staleness_p99", float("nan")),
        "updates_dropped": s.get("updates_dropped", 0.0),
        "bytes_on_wire": s["bytes_on_wire"],
    }
    keep = labels["workers"] in (16, 64) and labels["network"] == "100 Gb/s Ethernet" and (
        "async" in labels["strategy"] or "SSP" in labels["strategy"])
    return row, (result.updates if keep else None)


def run_grid(out: Path, worker_counts, iterations: int, *, processes: int | None = None):
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ps_vs_allreduce.csv"
    rows, staleness = [], {}
    jobs = [
        (experiment(n, inter, strategy, iterations), {"network": net, "strategy": name, "workers": n})
        for net, inter in NETWORKS.items() for n in worker_counts for name, strategy in strategies_for(n).items()
    ]
    with path.open("w", newline="") as f, ProcessPoolExecutor(processes or os.cpu_count()) as pool:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        futures = [pool.submit(_row, exp, labels) for exp, labels in jobs]
        for done, future in enumerate(as_completed(futures), 1):
            row, updates = future.result()
            writer.writerow(row)
            f.flush()  # results are kept as they are produced
            rows.append(row)
            if updates is not None:
                staleness[(row["strategy"], row["workers"])] = updates
            print(f"[{done}/{len(futures)}] {row['network']}, {row['strategy']}, {row['workers']} workers: "
                  f"{row['throughput']:.0f} samples/s", flush=True)
    return rows, staleness


def plot_throughput(rows: list[dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(NETWORKS), figsize=(6 * len(NETWORKS), 4.5), sharey=True)
    for ax, net in zip(axes, NETWORKS, strict=True):
        for name in strategies_for(2):
            pts = sorted((r["workers"], r["applied_samples_per_second"]) for r in rows
                         if r["network"] == net and r["strategy"] == name)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(net)
        ax.set_xlabel("workers (one A100 each)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("samples/s in applied updates")
    axes[0].legend(fontsize="small")
    fig.suptitle(f"ResNet-50: parameter server ({SERVERS} CPU servers) vs ring all-reduce")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_staleness_grid(staleness: dict, path: Path) -> Path:
    from types import SimpleNamespace

    fig, ax = plt.subplots(figsize=(7, 4.5))
    runs, labels = [], []
    for (name, workers), updates in sorted(staleness.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        runs.append(SimpleNamespace(updates=updates, experiment={}))
        labels.append(f"{name}, {workers} workers")
    if runs:
        plot_staleness(runs, ax, labels=labels)
    ax.set_title("Staleness of applied gradients (100 Gb/s Ethernet)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(out: Path = Path("ps-out"), *, quick: bool = False) -> list[dict]:
    t0 = time.perf_counter()
    counts = (1, 4, 16) if quick else (1, 2, 4, 8, 16, 32, 64)
    rows, staleness = run_grid(out, counts, iterations=8 if quick else 20)
    plot_throughput(rows, out / "ps_throughput.png")
    plot_staleness_grid(staleness, out / "ps_staleness.png")
    print(f"wrote {out}/ps_vs_allreduce.csv, ps_throughput.png, ps_staleness.png "
          f"in {time.perf_counter() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="ps-out")
    parser.add_argument("--quick", action="store_true", help="a small grid, for a quick look")
    args = parser.parse_args()
    main(Path(args.out), quick=args.quick)
