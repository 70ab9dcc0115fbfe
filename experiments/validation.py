"""The validation matrix: every family of strategy, run for real on an emulated cluster
and simulated, before and after calibration.

Each case trains the same MLP (256 -> 512 -> 512 -> 10, 0.4 M parameters, 1.6 MB
of fp32 gradients) at 256 samples per worker for 20 iterations (24 for the
asynchronous servers): on this kind of machine one iteration's compute takes
about 10 ms and moving the gradients over 100 or 400 Mbit/s takes 30 to 130 ms,
so both matter. The cases:

* all-reduce data parallel, ring and tree, at 100 and 400 Mbit/s;
* parameter server, synchronous with 1 and with 2 servers, asynchronous, and
  stale-synchronous (bound 1);
* local SGD (averaging every 2 iterations);
* compression of each kind on ring all-reduce: QSGD (quantisation), top-k 1 %
  (sparsification), PowerSGD rank 4 (low rank);
* a 2-stage pipeline, GPipe and 1F1B, 4 micro-batches.

Every case has two busy ranks (two workers, or two stages), one per core of
this 2-core machine; parameter servers are a third and fourth process that
mostly wait. The calibrated model also shares the machine's cores among all the
ranks' compute explicitly (``ComputeModel.shared_cores``, processor sharing), so
the servers' updates compete with the workers' compute as they do here. The
catalogue model gives each rank a ``cpu-core`` device of its own.

Run it with ``python -m experiments.validation --out validation-out`` (as root:
the emulated cluster needs network namespaces), or ``clustersim validate``;
``--quick`` runs four cases. It writes ``validation.csv`` (appended as each
case finishes), ``predicted_vs_measured.png``, ``error_by_strategy.png`` and
prints the error summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simulator import Cluster, Experiment, Workload
from strategies import AllReduceSGD, LocalSGD, ParameterServer, PipelineParallel

BATCH = 256
ITERATIONS = 20


def _workload() -> Workload:
    return Workload.from_zoo("mlp", in_features=256, hidden=[512, 512], out_features=10)


def _cluster(nodes: int, bandwidth: str) -> Cluster:
    return Cluster.homogeneous(nodes=nodes, gpus_per_node=1, gpu="cpu-core", inter="10GbE",
                               inter_bandwidth=bandwidth)


def cases(quick: bool = False) -> list[Experiment]:
    """The matrix's experiments (``quick``: one of each family)."""
    w = _workload()

    def exp(name, strategy, nodes=2, bandwidth="400Mbps", **kw):
        return Experiment(workload=w, cluster=_cluster(nodes, bandwidth), strategy=strategy, batch_size=BATCH,
                          iterations=kw.pop("iterations", ITERATIONS), seed=1, name=name, **kw)

    ps = {"placement": "dedicated", "partition": "slice"}
    all_cases = [
        exp("dp-ring-100M", AllReduceSGD(algorithm="ring", bucket_mb=0.5), bandwidth="100Mbps"),
        exp("dp-ring-400M", AllReduceSGD(algorithm="ring", bucket_mb=0.5)),
        exp("dp-tree-100M", AllReduceSGD(algorithm="tree", bucket_mb=0.5), bandwidth="100Mbps"),
        exp("dp-tree-400M", AllReduceSGD(algorithm="tree", bucket_mb=0.5)),
        exp("ps-sync-1", ParameterServer(mode="sync", servers=1, **ps)),
        exp("ps-sync-2", ParameterServer(mode="sync", servers=2, **ps)),
        exp("ps-async", ParameterServer(mode="async", servers=1, **ps), iterations=24),
        exp("ps-ssp-1", ParameterServer(mode="ssp", staleness_bound=1, servers=1, **ps), iterations=24),
        exp("local-sgd-2", LocalSGD(period=2, bucket_mb=0.5)),
        exp("dp-qsgd", AllReduceSGD(bucket_mb=0.5, compression={"name": "qsgd", "levels": 15})),
        exp("dp-topk", AllReduceSGD(bucket_mb=0.5, compression={"name": "topk", "ratio": 0.01})),
        exp("dp-powersgd", AllReduceSGD(bucket_mb=0.5, compression={"name": "powersgd", "rank": 4})),
        exp("pp-gpipe", PipelineParallel(pp=2, micro_batches=4, schedule="gpipe")),
        exp("pp-1f1b", PipelineParallel(pp=2, micro_batches=4, schedule="1f1b")),
    ]
    if quick:
        keep = {"dp-ring-400M", "ps-async", "dp-topk", "pp-1f1b"}
        return [c for c in all_cases if c.name in keep]
    return all_cases


def main(argv=None) -> int:
    from realrun import EmulatedCluster
    from realrun.validate import error_summary, validate, write_report

    parser = argparse.ArgumentParser(prog="python -m experiments.validation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="validation-out")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    table = validate(cases(args.quick), launcher=EmulatedCluster(), out=out / "validation.csv")
    print(error_summary(table).to_string(index=False))
    write_report(table, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
