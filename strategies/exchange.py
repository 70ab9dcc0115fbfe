"""Collective exchange of per-bucket tensors, plain or compressed, shared by the data-parallel
strategies.

Without a compressor a bucket is one all-reduce. With one, the compressor's
:class:`~strategies.compression.Plan` gives rounds of encode work and
collectives, then decode work. :meth:`BucketExchange.issue` runs round ``r`` of
a bucket (encode on the compute stream, then its collectives, async, on the
communication stream); :meth:`BucketExchange.complete` runs the later rounds of
every bucket as the earlier ones finish, then waits and decodes. A strategy
issues round 0 of each bucket as soon as its tensors are ready (overlap) or
after backward, and completes before its optimizer step. Later rounds
(PowerSGD's Q) start only once the program reaches ``complete``, after
backward; in PyTorch's hook they are chained callbacks that may start during
backward, so the model is conservative there.
"""

from __future__ import annotations

from strategies.bucketing import Bucket
from strategies.collectives import ALGORITHMS
from strategies.compression import Compressor
from strategies.context import Job, RankContext
from strategies.ops import TensorRef


class BucketExchange:
    def __init__(self, compressor: Compressor | None, buckets: tuple[Bucket, ...], job: Job, *,
                 group: tuple[int, ...] | None, elem_bytes: int, role: str, algorithm: str):
        self.compressor = compressor
        self.group = group
        self.p = len(group) if group is not None else job.world_size
        self.algorithm = algorithm
        self.gather_algorithm = algorithm if algorithm in ALGORITHMS["all_gather"] else "ring"
        self.sources = [TensorRef(f"{role}[{b.index}]", b.nbytes, role, b.layers) for b in buckets]
        if compressor is None:
            self.plans = [None] * len(buckets)
            self.rounds = 1
            return
        self.plans = [compressor.plan(job.shapes(b.layers), elem_bytes, self.p) for b in buckets]
        self.rounds = max((len(plan.rounds) for plan in self.plans), default=0)
        self.payloads = [
            [
                [TensorRef(f"{role}[{b.index}].r{r}.{j}", nbytes, "payload", b.layers)
                 for j, (_, nbytes) in enumerate(rnd.collectives)]
                for r, rnd in enumerate(plan.rounds)
            ]
            for b, plan in zip(buckets, self.plans, strict=True)
        ]
        self.decode_payloads = 1 if compressor.summable else self.p

    def issue(self, ctx: RankContext, k: int, r: int = 0):
        """Round ``r`` of bucket ``k``: encode, then issue its collectives; answers their handles."""
        if self.compressor is None:
            return [(yield ctx.all_reduce(self.sources[k], algorithm=self.algorithm, group=self.group,
                                          async_op=True))]
        rnd = self.plans[k].rounds[r]
        yield ctx.encode(self.sources[k], self.compressor, r, rnd.encode)
        handles = []
        for (op, _), tensor in zip(rnd.collectives, self.payloads[k][r], strict=True):
            if op == "all_reduce":
                handle = yield ctx.all_reduce(tensor, algorithm=self.algorithm, group=self.group, async_op=True)
            else:
                handle = yield ctx.all_gather(tensor, algorithm=self.gather_algorithm, group=self.group, async_op=True)
            handles.append(handle)
        return handles

    def complete(self, ctx: RankContext, handles: list):
        """Run the later rounds of every bucket (``handles[k]``: its round-0 handles), then wait
        for the last and decode."""
        for r in range(1, self.rounds):
            for k, plan in enumerate(self.plans):
                if r < len(plan.rounds):
                    for handle in handles[k]:
                        yield ctx.wait(handle)
                    handles[k] = yield from self.issue(ctx, k, r)
        for k, plan in enumerate(self.plans):
            for handle in handles[k]:
                yield ctx.wait(handle)
            if plan is not None:
                yield ctx.decode(self.sources[k], self.compressor, plan.decode, payloads=self.decode_payloads)

    def exchange(self, ctx: RankContext):
        """Every bucket's whole exchange, after the compute that produced them."""
        handles = []
        for k in range(len(self.plans)):
            handles.append((yield from self.issue(ctx, k)))
        yield from self.complete(ctx, handles)
