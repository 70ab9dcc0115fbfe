"""Direct schedules: every rank talks to every peer at once.

One step per collective half, ``p(p-1)`` messages a step: the fewest steps
(latency-optimal) at the price of ``p - 1`` concurrent flows per rank. The
all-to-all uses MPI's pairwise shift schedule for large messages instead
(MPICH ``alltoall`` pairwise exchange): ``p - 1`` steps, in step ``s`` rank
``i`` sends to ``i + s`` and receives from ``i - s``, one flow per rank a step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from strategies.collectives._core import Explicit, Message, Phase, Segment


@dataclass(frozen=True, slots=True)
class AllPairs(Segment):
    """Direct reduce-scatter or all-gather (one step), or the all-to-all shift (p - 1 steps).

    reduce_scatter: rank i sends chunk j to rank j. all_gather: rank i sends
    chunk i to everyone. all_to_all: chunk ``i·p + j`` is rank i's block for rank j.
    """

    kind: Literal["reduce_scatter", "all_gather", "all_to_all"]
    p: int
    chunk_bytes: float

    def num_steps(self) -> int:
        if self.p == 1:
            return 0
        return self.p - 1 if self.kind == "all_to_all" else 1

    def step_messages(self) -> Iterator[Iterable[Message]]:
        p = self.p
        if p == 1:
            return
        if self.kind == "reduce_scatter":
            yield tuple(Message(i, j, (j,), True) for i in range(p) for j in range(p) if i != j)
        elif self.kind == "all_gather":
            yield tuple(Message(i, j, (i,), False) for i in range(p) for j in range(p) if i != j)
        else:
            for s in range(1, p):
                yield tuple(
                    Message(i, (i + s) % p, (i * p + (i + s) % p,), False) for i in range(p)
                )

    def phases(self) -> tuple[Phase, ...]:
        p, cb = self.p, self.chunk_bytes
        if p == 1:
            return ()
        if self.kind != "all_to_all":
            return (Phase(tuple((i, j) for i in range(p) for j in range(p) if i != j), cb, 1),)
        return tuple(
            Phase(tuple(sorted((i, (i + s) % p) for i in range(p))), cb, 1) for s in range(1, p)
        )

    def bytes_sent(self, p: int) -> np.ndarray:
        return np.full(p, (p - 1) * self.chunk_bytes)


def reduce_scatter(p: int, nbytes: float) -> tuple[int, float, list[Segment]]:
    return p, nbytes / p, [AllPairs(kind="reduce_scatter", p=p, chunk_bytes=nbytes / p)]


def all_gather(p: int, nbytes: float) -> tuple[int, float, list[Segment]]:
    return p, nbytes / p, [AllPairs(kind="all_gather", p=p, chunk_bytes=nbytes / p)]


def all_reduce(p: int, nbytes: float) -> tuple[int, float, list[Segment]]:
    """Direct reduce-scatter (rank j sums chunk j) then direct all-gather."""
    cb = nbytes / p
    return (
        p,
        cb,
        [
            AllPairs(kind="reduce_scatter", p=p, chunk_bytes=cb),
            AllPairs(kind="all_gather", p=p, chunk_bytes=cb),
        ],
    )


def all_to_all(p: int, nbytes: float) -> tuple[int, float, list[Segment]]:
    """``p²`` chunks of ``n/p`` each: chunk ``i·p + j`` goes from rank i to rank j."""
    return p * p, nbytes / p, [AllPairs(kind="all_to_all", p=p, chunk_bytes=nbytes / p)]


def broadcast(p: int, nbytes: float, root: int) -> tuple[int, float, list[Segment]]:
    step = tuple(Message(root, j, (0,), False) for j in range(p) if j != root)
    return 1, float(nbytes), [Explicit(messages=(step,) if step else (), chunk_bytes=float(nbytes))]


def reduce(p: int, nbytes: float, root: int) -> tuple[int, float, list[Segment]]:
    step = tuple(Message(i, root, (0,), True) for i in range(p) if i != root)
    return 1, float(nbytes), [Explicit(messages=(step,) if step else (), chunk_bytes=float(nbytes))]
