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
from strategies.ops import TensorRef

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


def _bucket_memory(strategy, job: Job) -> float:
    """Bytes of a data-parallel strategy's bucket buffers and its compressor's buffers."""
    buckets = strategy.buckets(job)
    total = float(sum(b.nbytes for b in buckets))
    comp = strategy.compression
    if comp is not None:
        p = job.accelerators
        e = strategy.elem_bytes(job)
        total += sum(comp.memory_bytes(job.shapes(b.layers), e, p) for b in buckets)
    return total


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

    def check(self, job: Job) -> None:
        check_compression(self, job)

    def elem_bytes(self, job: Job) -> int:
        return DTYPE_BYTES[self.grad_dtype or job.param_dtype]

    def buckets(self, job: Job) -> tuple[Bucket, ...]:
        return assign_buckets(
            job.layer_params,
            bytes_per_param=self.elem_bytes(job),
            bucket_bytes=self.bucket_mb * MIB,
            first_bucket_bytes=self.first_bucket_mb * MIB,
        )

    def programs(self, job: Job) -> list:
        buckets = self.buckets(job)
        group = None if not job.hosts else tuple(range(job.accelerators))
        if self.compression is None:
            worker = self._worker(buckets, group)
        else:
            self.check(job)
            worker = self._compressed_worker(buckets, job, group)
        return [worker] * job.accelerators + [idle] * len(job.hosts)

    def residency(self, job: Job, rank: int):
        """DDP's flat bucket buffers (a copy of the gradients) and the compressor's buffers on top
        of the replicated model."""
        from strategies.residency import replicated

        return replicated(job, rank, buffers=_bucket_memory(self, job))

    def _compressed_worker(self, buckets: tuple[Bucket, ...], job: Job, group: tuple[int, ...] | None):
        from strategies.exchange import CompressedExchange

        exchange = CompressedExchange(self.compression, buckets, job, group=group, elem_bytes=self.elem_bytes(job),
                                      role="grads", algorithm=self.algorithm)
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
                        handles.append((yield from exchange.issue(ctx, k, 0)))
                if overlap:
                    yield from exchange.complete(ctx, handles)
                else:
                    yield from exchange.exchange(ctx)
                yield ctx.optimizer_step((0, n))

        return worker

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
        return strategy_dict(self)
