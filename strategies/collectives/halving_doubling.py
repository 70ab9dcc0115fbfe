"""Recursive halving and doubling (Thakur, Rabenseifner and Gropp 2005, as in MPICH).

Among ``p' = 2^k`` ranks, recursive halving is a reduce-scatter in ``k`` steps:
each rank swaps half of the range it still reduces with the partner across one
bit (``rank ^ mask``), keeps the other half, and halves its range. Recursive
doubling is the all-gather mirror. Each rank sends ``(p'-1)/p'·n`` per half,
like a ring, in ``log2 p'`` steps instead of ``p' - 1``.

Non-powers of two are folded as MPICH does: with ``r = p - p'``, among the
first ``2r`` ranks each even rank first hands its data to the odd rank above it
and sits out; the ``p'`` remaining ranks (virtual rank ``v`` is real rank
``2v + 1`` for ``v < r``, else ``v + r``) run the power-of-two algorithm; a
last step hands results back to the even ranks. That costs two extra steps
and the folded ranks' full buffer on the pre and post step.

Mask order follows MPICH: all-reduce halves across the nearest bit first (the
big exchanges stay between neighbours, often on one node) and doubles in the
reverse order; reduce-scatter halves across the farthest bit first so virtual
rank ``v`` ends with the ``v``-th range; all-gather doubles nearest bit first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from strategies.collectives._core import Explicit, Message, Segment


def _pof2(p: int) -> int:
    return 1 << (p.bit_length() - 1)


def _real(v: int, r: int) -> int:
    return 2 * v + 1 if v < r else v + r


def _ranges(v: int, masks: tuple[int, ...], size: int) -> list[tuple[int, int]]:
    """Position range that virtual rank ``v`` holds before each halving step and after the last."""
    lo, hi = 0, size
    out = [(lo, hi)]
    for m in masks:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if v & m else (lo, mid)
        out.append((lo, hi))
    return out


@dataclass(frozen=True, slots=True)
class RecursiveExchange(Segment):
    """Recursive halving (``reduce=True``) or doubling among ``len(ranks)`` = 2^k virtual ranks.

    Positions ``0..2^k-1`` partition the chunks: position ``u`` is chunks
    ``bounds[u] .. bounds[u + 1] - 1``. Halving with ``masks`` leaves virtual
    rank ``v`` with the single position that ``_ranges`` ends on; doubling with
    ``masks`` starts from where halving with ``reversed(masks)`` ends.
    """

    ranks: tuple[int, ...]
    """Real rank of each virtual rank."""
    bounds: tuple[int, ...]
    masks: tuple[int, ...]
    """Partner of virtual rank ``v`` at step ``i`` is ``v ^ masks[i]``."""
    reduce: bool
    chunk_bytes: float

    def num_steps(self) -> int:
        return len(self.masks)

    def _chunks(self, lo: int, hi: int) -> range:
        return range(self.bounds[lo], self.bounds[hi])

    def step_messages(self) -> Iterator[Iterable[Message]]:
        size, k = len(self.ranks), len(self.masks)
        if self.reduce:
            paths = [_ranges(v, self.masks, size) for v in range(size)]
            for i, m in enumerate(self.masks):
                # v sends its partner the half of its range the partner keeps.
                yield tuple(
                    Message(
                        self.ranks[v], self.ranks[v ^ m], self._chunks(*paths[v ^ m][i + 1]), True
                    )
                    for v in range(size)
                )
        else:
            halving = tuple(reversed(self.masks))
            paths = [_ranges(v, halving, size) for v in range(size)]
            for i, m in enumerate(self.masks):
                # v sends all it holds: the range it had after k - i halving steps.
                yield tuple(
                    Message(self.ranks[v], self.ranks[v ^ m], self._chunks(*paths[v][k - i]), False)
                    for v in range(size)
                )


def _participants(p: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Folded rank count ``r``, real rank of each virtual rank, masks nearest bit first."""
    pof2 = _pof2(p)
    r = p - pof2
    near = tuple(1 << i for i in range(pof2.bit_length() - 1))
    return r, tuple(_real(v, r) for v in range(pof2)), near


def all_reduce(p: int, nbytes: float) -> tuple[int, float, list[Segment]]:
    """Rabenseifner: halving reduce-scatter + doubling all-gather over ``p'`` chunks."""
    r, ranks, near = _participants(p)
    nchunks = len(ranks)
    cb, bounds, everything = nbytes / nchunks, tuple(range(nchunks + 1)), range(nchunks)
    far = tuple(reversed(near))
    segments: list[Segment] = []
    if r:
        fold = tuple(Message(2 * v, 2 * v + 1, everything, True) for v in range(r))
        segments.append(Explicit(messages=(fold,), chunk_bytes=cb))
    segments += [
        RecursiveExchange(ranks=ranks, bounds=bounds, masks=near, reduce=True, chunk_bytes=cb),
        RecursiveExchange(ranks=ranks, bounds=bounds, masks=far, reduce=False, chunk_bytes=cb),
    ]
    if r:
        unfold = tuple(Message(2 * v + 1, 2 * v, everything, False) for v in range(r))
        segments.append(Explicit(messages=(unfold,), chunk_bytes=cb))
    return nchunks, cb, segments


def _owner_bounds(p: int) -> tuple[int, ...]:
    """Chunk bounds per virtual rank when rank i owns chunk i: a folded pair owns two."""
    r = p - _pof2(p)
    return tuple(2 * v if v < r else v + r for v in range(_pof2(p))) + (p,)


def reduce_scatter(p: int, nbytes: float) -> tuple[int, float, list[Segment]]:
    """Recursive halving; rank i ends with chunk i summed (``p`` chunks)."""
    r, ranks, near = _participants(p)
    cb, bounds = nbytes / p, _owner_bounds(p)
    segments: list[Segment] = []
    if r:
        fold = tuple(Message(2 * v, 2 * v + 1, range(p), True) for v in range(r))
        segments.append(Explicit(messages=(fold,), chunk_bytes=cb))
    far = tuple(reversed(near))
    segments.append(
        RecursiveExchange(ranks=ranks, bounds=bounds, masks=far, reduce=True, chunk_bytes=cb)
    )
    if r:
        hand_back = tuple(Message(2 * v + 1, 2 * v, (2 * v,), False) for v in range(r))
        segments.append(Explicit(messages=(hand_back,), chunk_bytes=cb))
    return p, cb, segments


def all_gather(p: int, nbytes: float) -> tuple[int, float, list[Segment]]:
    """Recursive doubling; rank i contributes chunk i (``p`` chunks)."""
    r, ranks, near = _participants(p)
    cb, bounds = nbytes / p, _owner_bounds(p)
    segments: list[Segment] = []
    if r:
        fold = tuple(Message(2 * v, 2 * v + 1, (2 * v,), False) for v in range(r))
        segments.append(Explicit(messages=(fold,), chunk_bytes=cb))
    segments.append(
        RecursiveExchange(ranks=ranks, bounds=bounds, masks=near, reduce=False, chunk_bytes=cb)
    )
    if r:
        # One message per pair: every chunk but the even rank's own.
        unfold = tuple(
            Message(2 * v + 1, 2 * v, tuple(c for c in range(p) if c != 2 * v), False)
            for v in range(r)
        )
        segments.append(Explicit(messages=(unfold,), chunk_bytes=cb))
    return p, cb, segments
