"""Compressed collective exchange of per-bucket tensors, shared by the data-parallel strategies.

For each bucket a compressor's :class:`~strategies.compression.Plan` gives
rounds of encode work and collectives, then decode work. :meth:`issue` runs
round ``r`` of a bucket (encode on the compute stream, then its collectives,
async, on the communication stream); :meth:`complete` runs the later rounds of
every bucket as the earlier ones finish, then decodes. A strategy issues round
0 of each bucket as soon as its gradients are ready (overlap) or after
backward, and completes before its optimizer step. Later rounds (PowerSGD's Q)
start only once the program reaches :meth:`complete`, after backward; in
PyTorch's hook they are chained callbacks that may start during backward, so
the model is conservative there.
"""

from __future__ import annotations

from strategies.bucketing import Bucket
from strategies.collectives import ALGORITHMS
from strategies.compression import Compressor
from strategies.context import Job, RankContext
from strategies.ops import TensorRef


class CompressedExchange:
    def __init__(self, compressor: Compressor, buckets: tuple[Bucket, ...], job: Job, *,
                 group: tuple[int, ...] | None, elem_bytes: int, role: str, algorithm: str):
        self.compressor = compressor
        self.group = group
        self.p = len(group) if group is not None else job.world_size
        self.algorithm = algorithm
        self.gather_algorithm = algorithm if algorithm in ALGORITHMS["all_gather"] else "ring"
        self.plans = [compressor.plan(job.shapes(b.layers), elem_bytes, self.p) for b in buckets]
        self.sources = [TensorRef(f"{role}[{b.index}]", b.nbytes, role, b.layers) for b in buckets]
        self.payloads = [
            [
                [TensorRef(f"{role}[{b.index}].r{r}.{j}", nbytes, "payload", b.layers)
                 for j, (_, nbytes) in enumerate(rnd.collectives)]
                for r, rnd in enumerate(plan.rounds)
            ]
            for b, plan in zip(buckets, self.plans, strict=True)
        ]
        self.decode_payloads = 1 if compressor.summable else self.p

    @property
    def wire_bytes(self) -> float:
        """Bytes of one rank's payloads per exchange, all buckets."""
        return sum(plan.wire_bytes for plan in self.plans)

    def issue(self, ctx: RankContext, k: int, r: int):
        """Round ``r`` of bucket ``k``: encode, then issue its collectives; answers their handles."""
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
        """Run the later rounds of every bucket (``handles[k]``: its round-0 handles), then decode."""
        rounds = max((len(plan.rounds) for plan in self.plans), default=0)
        for r in range(1, rounds):
            for k, plan in enumerate(self.plans):
                if r < len(plan.rounds):
                    for handle in handles[k]:
                        yield ctx.wait(handle)
                    handles[k] = yield from self.issue(ctx, k, r)
        for k, plan in enumerate(self.plans):
            for handle in handles[k]:
                yield ctx.wait(handle)
            yield ctx.decode(self.sources[k], self.compressor, plan.decode, payloads=self.decode_payloads)

    def exchange(self, ctx: RankContext):
        """Every bucket's whole exchange, no overlap with compute before it."""
        handles = []
        for k in range(len(self.plans)):
            handles.append((yield from self.issue(ctx, k, 0)))
        yield from self.complete(ctx, handles)
