"""Synchronous data parallel with all-reduce, as DistributedDataParallel runs it.

Every rank holds the whole model, runs forward and backward on its own
samples, and the gradients are summed by all-reduce, bucket by bucket. With
``overlap`` a bucket's all-reduce is issued as soon as backward has produced
all of its gradients, on the rank's communication stream, while backward goes
on with earlier layers; without it every all-reduce waits for the end of
backward. Then each rank applies the same optimizer step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Literal

from strategies.bucketing import MIB, Bucket, assign_buckets
from strategies.context import Job, RankContext
from strategies.ops import TensorRef

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
GradDtype = Literal["fp32", "fp16", "bf16"]


def _check_bucket_caps(strategy) -> None:
    """``bucket_mb`` and ``first_bucket_mb`` of ``strategy`` are finite sizes > 0 (MiB)."""
    for field in ("bucket_mb", "first_bucket_mb"):
        value = getattr(strategy, field)
        if isinstance(value, bool) or not (isinstance(value, int | float) and 0 < value < float("inf")):
            raise ValueError(f"{type(strategy).__name__}.{field} must be a finite number > 0 (MiB), got {value!r}")


def _check_algorithm(op: str, algorithm: str, field: str) -> None:
    from strategies.collectives import ALGORITHMS

    allowed = ALGORITHMS[op]
    if algorithm not in allowed:
        raise ValueError(f"{field} must be one of {tuple(allowed)} for {op}, got {algorithm!r}")


def idle(ctx: RankContext):
    """The program of a rank a strategy gives no work (a host process all-reduce does not use)."""
    return
    yield


@dataclass(frozen=True, kw_only=True)
class AllReduceSGD:
    """Synchronous data parallel: DDP buckets, all-reduce, optimizer step."""

    name: ClassVar[str] = "allreduce"

    algorithm: str = "ring"
    """All-reduce algorithm, a name from ``strategies.collectives.ALGORITHMS['all_reduce']``."""
    bucket_mb: float = 25.0
    """Bucket cap in MiB (DDP's ``bucket_cap_mb``)."""
    first_bucket_mb: float = 1.0
    """Cap of the first bucket in MiB (DDP: 1 MiB)."""
    overlap: bool = True
    """Issue each bucket's all-reduce as soon as its gradients are ready."""
    grad_dtype: GradDtype = "fp32"
    """Element type gradients travel in."""

    def __post_init__(self) -> None:
        _check_algorithm("all_reduce", self.algorithm, "AllReduceSGD.algorithm")
        _check_bucket_caps(self)
        if not isinstance(self.overlap, bool):
            raise ValueError(f"AllReduceSGD.overlap must be true or false, got {self.overlap!r}")
        if self.grad_dtype not in DTYPE_BYTES:
            raise ValueError(
                f"AllReduceSGD.grad_dtype must be one of {tuple(DTYPE_BYTES)}, got {self.grad_dtype!r}"
            )

    def buckets(self, job: Job) -> tuple[Bucket, ...]:
        return assign_buckets(
            job.layer_params,
            bytes_per_param=DTYPE_BYTES[self.grad_dtype],
            bucket_bytes=self.bucket_mb * MIB,
            first_bucket_bytes=self.first_bucket_mb * MIB,
        )

    def programs(self, job: Job) -> list:
        buckets = self.buckets(job)
        group = None if not job.hosts else tuple(range(job.accelerators))
        return [self._worker(buckets, group)] * job.accelerators + [idle] * len(job.hosts)

    def _worker(self, buckets: tuple[Bucket, ...], group: tuple[int, ...] | None = None):
        algorithm, overlap = self.algorithm, self.overlap
        tensors = [TensorRef(f"grads[{b.index}]", b.nbytes, "grads", b.layers) for b in buckets]

        def worker(ctx: RankContext):
            n = ctx.job.num_layers
            for _ in ctx.iterations():
                yield ctx.forward((0, n))
                if not buckets:
                    yield ctx.backward((0, n))
                handles = []
                for bucket, tensor in zip(buckets, tensors, strict=True):
                    yield ctx.backward(bucket.layers)
                    if overlap:
                        handles.append((yield ctx.all_reduce(tensor, algorithm=algorithm, group=group, async_op=True)))
                if overlap:
                    for handle in handles:
                        yield ctx.wait(handle)
                else:
                    for tensor in tensors:
                        yield ctx.all_reduce(tensor, algorithm=algorithm, group=group)
                yield ctx.optimizer_step((0, n))

        return worker

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}
