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

With ``compression`` a worker sends its model's change since the last average
(as compressed local SGD does, e.g. Basu et al., "Qsparse-local-SGD",
NeurIPS 2019), encoded by the compressor, and every worker adds the decoded
average change to the last averaged model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from strategies.compression import Compressor
from strategies.context import Job, RankContext
from strategies.data_parallel import (
    Bucketed,
    _check_algorithm,
    _check_bucket_caps,
    _check_dtype,
    _set_compression,
    idle,
    strategy_dict,
)


@dataclass(frozen=True, kw_only=True)
class LocalSGD(Bucketed):
    """Periodic model averaging by all-reduce."""

    name: ClassVar[str] = "local_sgd"
    dtype_field: ClassVar[str] = "param_dtype"
    role: ClassVar[str] = "params"

    period: int = 8
    """H: local steps between averages."""
    algorithm: str = "ring"
    """All-reduce algorithm for the averaging."""
    weighted: bool = False
    """Average weighted by each worker's samples per iteration."""
    bucket_mb: float = 25.0
    first_bucket_mb: float = 1.0
    param_dtype: str | None = None
    """Element type the parameters travel in (``None``: the training precision's)."""
    compression: Compressor | str | dict | None = None
    """Compress the model change each worker sends (a compressor, its name or a table)."""

    def __post_init__(self) -> None:
        p = self.period
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"LocalSGD.period must be an integer >= 1, got {p!r}")
        _check_algorithm("all_reduce", self.algorithm, "LocalSGD.algorithm")
        if not isinstance(self.weighted, bool):
            raise ValueError(f"LocalSGD.weighted must be true or false, got {self.weighted!r}")
        _check_bucket_caps(self)
        _check_dtype(self, "param_dtype")
        _set_compression(self)

    def residency(self, job: Job, rank: int):
        """The parameter buckets being averaged and, when compressing the change, the last
        averaged model it is measured from, on top of the replicated model."""
        from strategies.residency import replicated

        anchor = sum(job.layer_params) * self.elem_bytes(job) if self.compression is not None else 0.0
        return replicated(job, rank, buffers=self.bucket_memory(job) + anchor)

    def weight(self, job: Job, rank: int) -> float:
        """The factor a worker scales its parameters by before the all-reduce sum."""
        if self.weighted:
            return job.samples(rank) / sum(job.batch_sizes)
        return 1.0 / job.accelerators

    def programs(self, job: Job) -> list:
        period, exchange = self.period, self.exchange(job)

        def worker(ctx: RankContext):
            n = ctx.job.num_layers
            last = ctx.job.iterations - 1
            for i in ctx.iterations():
                yield ctx.forward((0, n))
                yield ctx.backward((0, n))
                yield ctx.optimizer_step((0, n))
                if (i + 1) % period == 0 or i == last:
                    yield from exchange.exchange(ctx)

        return [worker] * job.accelerators + [idle] * len(job.hosts)

    def to_dict(self) -> dict:
        return strategy_dict(self)
