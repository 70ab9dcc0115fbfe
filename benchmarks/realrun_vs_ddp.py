"""realrun's all-reduce data parallel against plain DistributedDataParallel.

The same model, batch, world size, bucket size and learning rate; both on
local processes over gloo, one thread each. Prints the median iteration time
and throughput of each (first iterations left out) and their ratio, for
realrun's scheduled ring (the project's step schedule over isend/irecv) and
for its native mode (gloo's own all-reduce).

    python benchmarks/realrun_vs_ddp.py [--iterations 40] [--world 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WARMUP = 5


def _ddp_rank(rank: int, world: int, port: int, spec: dict, queue) -> None:
    import os

    from realrun.model import Data, build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    exp = spec["experiment"]
    model = build_model(exp.workload, exp.seed)
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=spec["bucket_mb"])
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    data = Data(model, exp.seed, torch.device("cpu"))
    b = exp.batch_size
    times = []
    dist.barrier()
    for it in range(exp.iterations):
        t0 = time.monotonic()
        x = data.inputs(rank, it, b, 0, b)
        loss = data.loss(ddp(x), rank, it, b, 0, b)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        times.append(time.monotonic() - t0)
    dist.barrier()
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def ddp_times(exp, bucket_mb: float) -> list[float]:
    from realrun.launch import _free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    world = exp.world_size
    port = _free_port()
    spec = {"experiment": exp, "bucket_mb": bucket_mb}
    procs = [ctx.Process(target=_ddp_rank, args=(r, world, port, spec, queue)) for r in range(world)]
    for p in procs:
        p.start()
    times = queue.get(timeout=600)
    for p in procs:
        p.join()
    return times


def realrun_times(exp, collectives: str) -> list[float]:
    import realrun

    result = realrun.run(exp, threads=1, collectives=collectives)
    it = result.iterations
    return it[it["rank"] == 0].sort_values("iteration")["duration"].tolist()


def main(argv=None) -> None:
    from simulator import Cluster, Experiment, Workload
    from strategies import AllReduceSGD

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    bucket_mb = 25.0
    workload = Workload.from_zoo("mlp", in_features=1024, hidden=[2048, 2048], out_features=10)
    exp = Experiment(workload=workload, cluster=Cluster.homogeneous(nodes=args.world, gpus_per_node=1),
                     strategy=AllReduceSGD(bucket_mb=bucket_mb), batch_size=args.batch, iterations=args.iterations)
    print(f"MLP 1024-2048-2048-10 ({workload.params / 1e6:.1f} M parameters), batch {args.batch} per rank, "
          f"{args.world} ranks, gloo on CPU, buckets of {bucket_mb:g} MiB, {args.iterations} iterations "
          f"(first {WARMUP} left out)")
    rows = {"DDP": ddp_times(exp, bucket_mb), "realrun (ring schedule)": realrun_times(exp, "schedule"),
            "realrun (native)": realrun_times(exp, "native")}
    base = statistics.median(rows["DDP"][WARMUP:])
    for name, times in rows.items():
        med = statistics.median(times[WARMUP:])
        print(f"  {name:<24} median iteration {1e3 * med:7.1f} ms   {args.batch * args.world / med:8.1f} samples/s"
              f"   throughput vs DDP {base / med:5.2f}x")


if __name__ == "__main__":
    main()
