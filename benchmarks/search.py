"""Strategy-search benchmark: how long a search takes and what it picks. Writes search_results.md.

* GPT-3 175B, global batch 1536, 128 DGX A100-80GB nodes (8 HDR NICs each), bf16 Adam: the
  default transformer space. Wall and CPU seconds (this process and its workers), the
  candidates generated, pruned by memory, pruned by bound and simulated, the ranking's top,
  and how far the best of Megatron-LM's published configurations (tp 8, pp 8 or 16,
  interleaved; Narayanan et al., SC 2021) is from the winner.
* ResNet-50 on 64 V100 (8 nodes of 8, NVLink 2) at 32 images per GPU, over 10 GbE and over
  100 Gb/s InfiniBand EDR: the default data-parallel space, and what wins on each.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings
from datetime import date
from pathlib import Path


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args):
    wall, cpu = time.perf_counter(), _cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        table = fn(*args)
    return table, time.perf_counter() - wall, _cpu() - cpu


def gpt3():
    from simulator import Cluster, Workload
    from simulator.search import search

    cluster = Cluster.homogeneous(nodes=128, gpus_per_node=8, gpu="A100-80GB", intra="nvlink3", inter="HDR",
                                  nics_per_node=8)
    return search(Workload.from_zoo("gpt3-175b"), cluster, global_batch=1536, precision="bf16", optimizer="adam",
                  progress=False)


def resnet(inter: str):
    from simulator import Cluster, Workload
    from simulator.search import search

    cluster = Cluster.homogeneous(nodes=8, gpus_per_node=8, gpu="V100", intra="nvlink2", inter=inter)
    return search(Workload.from_zoo("resnet50"), cluster, global_batch=2048, progress=False)


LLM_COLS = ["rank", "tp", "pp", "dp", "micro_batch_size", "schedule", "chunks", "zero", "recompute",
            "sequence_parallel", "iteration_time", "tflops_per_gpu", "mfu", "peak_memory_gb", "bound_ratio"]
DP_COLS = ["rank", "strategy", "algorithm", "compression", "mode", "servers", "placement", "period", "iteration_time",
           "throughput", "lossy", "bound_ratio"]


def md(table, cols) -> list[str]:
    def cell(v):
        if isinstance(v, float) and v == v:
            return f"{v:.4g}"
        return "" if v is None or str(v) in ("nan", "<NA>", "None") else str(v)

    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for _, r in table[cols].iterrows():
        lines.append("| " + " | ".join(cell(r[c]) for c in cols) + " |")
    return lines


def counts(table) -> str:
    c = table.attrs["counts"]
    return (f"{c['generated']} candidates generated: {c['pruned_memory']} pruned by memory, {c['pruned_bound']} "
            f"by bound, {c['invalid']} refused by the strategy, {c['simulated']} simulated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("search_results.md")))
    args = parser.parse_args()
    lines = ["# Strategy search", "", f"Measured {date.today().isoformat()} by `python benchmarks/search.py` "
             "(`make bench`): wall seconds, and CPU seconds of this process and its worker processes (one per "
             "core), on this machine.", ""]
    table, wall, cpu = timed(gpt3)
    sim = table[table["status"] == "simulated"]
    published = sim[(sim["tp"] == 8) & sim["pp"].isin([8, 16]) & (sim["schedule"] == "interleaved")]
    gap = 1 - published["throughput"].max() / sim["throughput"].max()
    print(f"gpt3: {wall:.0f} s wall, {cpu:.0f} s CPU; {counts(table)}", flush=True)
    lines += ["## GPT-3 175B, 1024 A100-80GB, global batch 1536", "",
              f"{wall:.0f} s wall, {cpu:.0f} s CPU. {counts(table)}.", "",
              *md(sim.head(8), LLM_COLS), "",
              f"The best of the published configurations (tp 8, pp 8 or 16, interleaved) is "
              f"{gap:.1%} below the winner in throughput (rank {int(published.iloc[0]['rank'])}).", ""]
    for inter, label in (("10GbE", "10 GbE"), ("IB-EDR", "100 Gb/s InfiniBand EDR")):
        table, wall, cpu = timed(resnet, inter)
        sim = table[table["status"] == "simulated"]
        exact = sim[~sim["lossy"]]
        bound = table[~table["lossy"] & (table["status"] == "pruned: bound")]
        print(f"resnet {inter}: {wall:.0f} s wall; winner {sim.iloc[0]['candidate']}", flush=True)
        lines += [f"## ResNet-50, 64 V100, 32 images per GPU, {label}", "",
                  f"{wall:.0f} s wall, {cpu:.0f} s CPU. {counts(table)}.", "", *md(sim.head(5), DP_COLS), "",
                  f"Best exact (synchronous, uncompressed) candidate simulated: {exact.iloc[0]['candidate']}, "
                  f"{exact.iloc[0]['throughput']:.0f} samples/s." if len(exact) else "No exact candidate simulated.",
                  "" if bound.empty else f"Exact candidates pruned by their bound: {len(bound)}, the best of them "
                  f"bounded at {bound['lower_bound'].min() * 1e3:.1f} ms per iteration against the winner's "
                  f"{sim.iloc[0]['iteration_time'] * 1e3:.1f} ms.", ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
