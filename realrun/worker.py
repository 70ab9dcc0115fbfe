"""One rank of a real run: ``python -m realrun.worker FOLDER RANK``.

Reads the run's spec from ``FOLDER/spec.pt``, joins the process group named by
the environment (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``), runs its
role program with :class:`realrun.executor.TorchExecutor` and appends what it
measures to ``FOLDER/rank<RANK>.jsonl``. A failure writes the traceback to
``FOLDER/rank<RANK>.err`` and exits with status 1.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

SPEC = "spec.pt"


def load_spec(folder: Path) -> dict:
    import torch

    return torch.load(Path(folder) / SPEC, weights_only=False)


def run_rank(spec: dict, rank: int, world: int, folder: Path, *, local_rank: int = 0, init: bool = True,
             gather: bool = False):
    """Run ``rank``'s program; returns every rank's rows on rank 0 when ``gather`` (torchrun)."""
    import torch
    import torch.distributed as dist

    from realrun.comm import Comm
    from realrun.executor import TorchExecutor
    from realrun.model import Data, ModelState, build_model, derived_seed
    from realrun.optim import FlatOptimizer
    from realrun.records import Recorder
    from strategies.context import RankContext

    opts = spec["options"]
    if opts.get("threads"):
        torch.set_num_threads(int(opts["threads"]))
    exp = spec["experiment"]
    if exp.world_size != world:
        raise ValueError(f"the experiment has {exp.world_size} ranks but the launcher started {world}")
    backend = opts["backend"]
    if opts["device"] == "cuda":
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    wire = device if backend == "nccl" else torch.device("cpu")
    if init:
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=opts["collective_timeout"]), **kwargs)
    job = exp.job()
    group_of = getattr(exp.strategy, "tensor_group", None)
    tp_group = tuple(group_of(job, rank)) if callable(group_of) else (rank,)
    # dropout: a stream per rank, the same over a tensor-parallel group (its replicated layers agree)
    torch.manual_seed(derived_seed(exp.seed, tp_group[0], 7))
    module = spec.get("model")
    module = copy.deepcopy(module).to(device) if module is not None else build_model(exp.workload, exp.seed, device)
    module.train()
    owned = None
    if len(tp_group) > 1:
        from realrun.tensor_parallel import shard_module

        names = [layer.name for layer in exp.workload.layers]
        owned = shard_module(module, names, job.layer_tp, len(tp_group), tp_group.index(rank),
                             sequence_parallel=bool(getattr(exp.strategy, "sequence_parallel", False)))
    state = ModelState(module, exp.workload, device, owned)
    data = Data(module, exp.seed, device, spec.get("data"), spec.get("loss"))
    programs = exp.strategy.programs(job)
    shard_of = getattr(exp.strategy, "data_shard", None)
    shard = shard_of(job, rank) if callable(shard_of) else rank
    comm = Comm(rank, world, native=opts["collectives"] == "native", wire=wire)
    recorder = Recorder(Path(folder) / f"rank{rank}.jsonl", rank)
    dist.barrier()
    clock0 = time.monotonic()
    executor = TorchExecutor(rank, job, exp.strategy, None, state, data, comm, recorder,
                             optimizer=FlatOptimizer(exp.optimizer, opts["lr"]), shard=shard, clock0=clock0)
    ctx = RankContext(rank, job, on_iteration=executor.on_iteration)
    executor.program = programs[rank](ctx)
    executor.run()
    comm.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    recorder.final(bytes_sent=comm.bytes_sent, end=executor.now(), losses=executor.losses)
    recorder.close()
    if opts.get("save_params"):
        torch.save(state.params.cpu(), Path(folder) / f"params{rank}.pt")
    rows = None
    if gather:  # torchrun: rank 0 collects every rank's lines (nodes need not share a folder)
        lines = (Path(folder) / f"rank{rank}.jsonl").read_text(encoding="utf-8")
        rows = [None] * world if rank == 0 else None
        dist.gather_object(lines, rows, dst=0)
    dist.barrier()
    if init:
        dist.destroy_process_group()
    return rows


def main(argv: list[str]) -> int:
    folder, rank = Path(argv[0]), int(argv[1])
    world = int(os.environ["WORLD_SIZE"])
    try:
        spec = load_spec(folder)
        run_rank(spec, rank, world, folder, local_rank=int(os.environ.get("LOCAL_RANK", rank)))
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the launcher
        from realrun.executor import format_exception

        (folder / f"rank{rank}.err").write_text(format_exception(exc), encoding="utf-8")
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
