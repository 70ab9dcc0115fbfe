"""Synchronous data parallel with all-reduce, as DistributedDataParallel runs it.

Every rank holds the whole model, runs forward and backward on its own
samples, and the gradients are summed by all-reduce, bucket by bucket. With
``overlap`` a bucket's all-reduce is issued as soon as backward has produced
all of its gradients, on the rank's communication stream, while backward goes
on with earlier layers; without it every all-reduce waits for the end of
backward. Then each rank applies the same optimizer step.

With ``compression`` (a :mod:`strategies.compression` compressor) each bucket
is encoded on the compute stream once backward has produced it, its payload is
all-reduced (compressors whose payloads add up: casts, random-k, PowerSGD) or
all-gathered (top-k, QSGD, sign), and decoded before the optimizer step; see
:mod:`strategies.exchange`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Literal

from strategies.bucketing import MIB, Bucket, assign_buckets
from strategies.compression import Compressor, compressor_from_spec
from strategies.context import Job, RankContext

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
GradDtype = Literal["fp32", "fp16", "bf16"]


def _check_dtype(strategy, field: str) -> None:
    value = getattr(strategy, field)
    if value is not None and value not in DTYPE_BYTES:
        raise ValueError(
            f"{type(strategy).__name__}.{field} must be one of {tuple(DTYPE_BYTES)} or None "
            f"(the training precision's), got {value!r}"
        )


def _set_compression(strategy) -> None:
    """Normalise ``strategy.compression`` (a name or table becomes a compressor)."""
    comp = compressor_from_spec(strategy.compression, f"{type(strategy).__name__}.compression")
    object.__setattr__(strategy, "compression", comp)


def check_compression(strategy, job: Job) -> None:
    """A compressor that needs matrix shapes gets a workload that has them."""
    comp = strategy.compression
    if comp is not None and comp.needs_shapes and not job.shapes_known():
        raise ValueError(
            f"{type(strategy).__name__}.compression {comp.name!r} needs the shape of every parameter tensor; "
            "this workload's layers have no param_shapes (extract it with Workload.from_module or from_zoo)"
        )


class Bucketed:
    """What the bucketed data-parallel strategies share: DDP-style buckets of tensors in
    ``dtype_field``'s element type (or the training precision's), a compressor check, and
    the exchange that moves the buckets over the GPU ranks."""

    dtype_field: ClassVar[str]
    role: ClassVar[str]

    def check(self, job: Job) -> None:
        check_compression(self, job)

    def elem_bytes(self, job: Job) -> int:
        return DTYPE_BYTES[getattr(self, self.dtype_field) or job.param_dtype]

    def buckets(self, job: Job) -> tuple[Bucket, ...]:
        return assign_buckets(
            job.layer_params,
            bytes_per_param=self.elem_bytes(job),
            bucket_bytes=self.bucket_mb * MIB,
            first_bucket_bytes=self.first_bucket_mb * MIB,
        )

    def symmetries(self, job: Job) -> str:
        """Every GPU rank runs the same program on its own data: any permutation of the
        ranks maps the programs onto each other (the simulator keeps those that also map
        the cluster and each collective's schedule onto themselves)."""
        return "any"

    def bucket_memory(self, job: Job) -> float:
        """Bytes of the bucket buffers and of the compressor's buffers."""
        buckets = self.buckets(job)
        total = float(sum(b.nbytes for b in buckets))
        comp = self.compression
        if comp is not None:
            e = self.elem_bytes(job)
            total += sum(comp.memory_bytes(job.shapes(b.layers), e, job.accelerators) for b in buckets)
        return total

    def exchange(self, job: Job):
        """The :class:`strategies.exchange.BucketExchange` of this job's buckets."""
        from strategies.exchange import BucketExchange

        self.check(job)
        group = None if not job.hosts else tuple(range(job.accelerators))
        return BucketExchange(self.compression, self.buckets(job), job, group=group,
                              elem_bytes=self.elem_bytes(job), role=self.role, algorithm=self.algorithm)


def strategy_dict(strategy) -> dict:
    """``{"name": ..., **fields}`` with the compressor as its own table."""
    d = {"name": strategy.name, **asdict(strategy)}
    if getattr(strategy, "compression", None) is not None:
        d["compression"] = strategy.compression.to_dict()
    return d


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
class AllReduceSGD(Bucketed):
    """Synchronous data parallel: DDP buckets, all-reduce, optimizer step."""

    name: ClassVar[str] = "allreduce"
    dtype_field: ClassVar[str] = "grad_dtype"
    role: ClassVar[str] = "grads"

    algorithm: str = "ring"
    """All-reduce algorithm, a name from ``strategies.collectives.ALGORITHMS['all_reduce']``."""
    bucket_mb: float = 25.0
    """Bucket cap in MiB (DDP's ``bucket_cap_mb``)."""
    first_bucket_mb: float = 1.0
    """Cap of the first bucket in MiB (DDP: 1 MiB)."""
    overlap: bool = True
    """Issue each bucket's all-reduce as soon as its gradients are ready."""
    grad_dtype: GradDtype | None = None
    """Element type of the gradients (``None``: the training precision's, fp32 or 16-bit)."""
    compression: Compressor | str | dict | None = None
    """A compressor (``strategies.compression``), its name, or a table; ``None``: none."""

    def __post_init__(self) -> None:
        _check_algorithm("all_reduce", self.algorithm, "AllReduceSGD.algorithm")
        _check_bucket_caps(self)
        if not isinstance(self.overlap, bool):
            raise ValueError(f"AllReduceSGD.overlap must be true or false, got {self.overlap!r}")
        _check_dtype(self, "grad_dtype")
        _set_compression(self)

    def programs(self, job: Job) -> list:
        worker = self._worker(self.buckets(job), self.exchange(job))
        return [worker] * job.accelerators + [idle] * len(job.hosts)

    def residency(self, job: Job, rank: int):
        """DDP's flat bucket buffers (a copy of the gradients) and the compressor's buffers on top
        of the replicated model."""
        from strategies.residency import replicated

        return replicated(job, rank, buffers=self.bucket_memory(job))

    def _worker(self, buckets: tuple[Bucket, ...], exchange):
        overlap = self.overlap

        def worker(ctx: RankContext):
            n = ctx.job.num_layers
            for _ in ctx.iterations():
                yield ctx.forward((0, n))
                if not buckets:
                    yield ctx.backward((0, n))
                handles = []
                for k, bucket in enumerate(buckets):
                    yield ctx.backward(bucket.layers)
                    if overlap:
                        handles.append((yield from exchange.issue(ctx, k)))
                if overlap:
                    yield from exchange.complete(ctx, handles)
                else:
                    yield from exchange.exchange(ctx)
                yield ctx.optimizer_step((0, n))

        return worker

    def to_dict(self) -> dict:
        return strategy_dict(self)
