"""Local SGD: every worker steps on its own, and models are averaged every H steps.

Each worker runs forward, backward and its optimizer step locally; after
every ``period`` iterations (and after the last) the workers average their
parameters with an all-reduce (in DDP-sized buckets, like gradients), so
communication falls by ``period`` against synchronous all-reduce SGD
(Stich, ICLR 2019; Lin et al., "Don't use large mini-batches, use local SGD",
ICLR 2020). With ``weighted`` each worker scales its parameters by its share of
the samples before the sum (shares are known to every worker from the data
sharding, so no extra message is needed); otherwise the average is plain.
``period=1`` is synchronous all-reduce of parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from strategies.bucketing import MIB, Bucket, assign_buckets
from strategies.context import Job, RankContext
from strategies.data_parallel import DTYPE_BYTES, _check_algorithm, _check_bucket_caps, idle
from strategies.ops import TensorRef


@dataclass(frozen=True, kw_only=True)
class LocalSGD:
    """Periodic model averaging by all-reduce."""

    name: ClassVar[str] = "local_sgd"

    period: int = 8
    """H: local steps between averages."""
    algorithm: str = "ring"
    """All-reduce algorithm for the averaging."""
    weighted: bool = False
    """Average weighted by each worker's samples per iteration."""
    bucket_mb: float = 25.0
    first_bucket_mb: float = 1.0
    param_dtype: str = "fp32"
    """Element type the parameters travel in."""

    def __post_init__(self) -> None:
        p = self.period
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"LocalSGD.period must be an integer >= 1, got {p!r}")
        _check_algorithm("all_reduce", self.algorithm, "LocalSGD.algorithm")
        if not isinstance(self.weighted, bool):
            raise ValueError(f"LocalSGD.weighted must be true or false, got {self.weighted!r}")
        _check_bucket_caps(self)
        if self.param_dtype not in DTYPE_BYTES:
            raise ValueError(f"LocalSGD.param_dtype must be one of {tuple(DTYPE_BYTES)}, got {self.param_dtype!r}")

    def buckets(self, job: Job) -> tuple[Bucket, ...]:
        return assign_buckets(
            job.layer_params,
            bytes_per_param=DTYPE_BYTES[self.param_dtype],
            bucket_bytes=self.bucket_mb * MIB,
            first_bucket_bytes=self.first_bucket_mb * MIB,
        )

    def weight(self, job: Job, rank: int) -> float:
        """The factor a worker scales its parameters by before the all-reduce sum."""
        if self.weighted:
            return job.samples(rank) / sum(job.batch_sizes)
        return 1.0 / job.accelerators

    def programs(self, job: Job) -> list:
        buckets = self.buckets(job)
        tensors = [TensorRef(f"params[{b.index}]", b.nbytes, "params", b.layers) for b in buckets]
        group = None if not job.hosts else tuple(range(job.accelerators))
        period, algorithm = self.period, self.algorithm

        def worker(ctx: RankContext):
            n = ctx.job.num_layers
            last = ctx.job.iterations - 1
            for i in ctx.iterations():
                yield ctx.forward((0, n))
                yield ctx.backward((0, n))
                yield ctx.optimizer_step((0, n))
                if (i + 1) % period == 0 or i == last:
                    for tensor in tensors:
                        yield ctx.all_reduce(tensor, algorithm=algorithm, group=group)

        return [worker] * job.accelerators + [idle] * len(job.hosts)

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}
