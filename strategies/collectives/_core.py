"""The schedule data types, and the segments a schedule is made of.

A schedule is a few *segments* run one after another (a ring all-reduce is a
reduce-scatter segment then an all-gather segment). A segment yields its steps
as *messages*, ``(src, dst, chunks, reduce)``, the chunks a rank sends one peer
in one step; ``steps()`` expands messages into per-chunk transfers. Segments
with a regular shape (rings, pipelined streams) also give their phases and
per-rank volumes in closed form, so a 1024-rank ring never expands.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


@dataclass(frozen=True, slots=True)
class Transfer:
    """One chunk moving from one rank to another within a step."""

    src: int
    """Sending rank, group-local index 0..p-1."""
    dst: int
    """Receiving rank, group-local index 0..p-1."""
    chunk: int
    """Which chunk of the buffer is carried, 0..nchunks-1."""
    nbytes: float
    """Bytes carried (the chunk's size)."""
    reduce: bool
    """True: the receiver adds it into its copy of the chunk; False: overwrites its copy."""


@dataclass(frozen=True, slots=True)
class Step:
    """Transfers that all read the buffers as they were when the step began."""

    transfers: tuple[Transfer, ...]


@dataclass(frozen=True, slots=True)
class Phase:
    """``repeat`` consecutive steps of one chunk-free shape.

    A step's transfers between the same ``(src, dst)`` are one message: ``pairs``
    lists every message of the step once, and each carries ``nbytes`` bytes.
    """

    pairs: tuple[tuple[int, int], ...]
    """(src, dst) of every message of the step, sorted."""
    nbytes: float
    """Bytes of each message."""
    repeat: int
    """How many steps in a row have this shape."""


class Message(NamedTuple):
    """The chunks one rank sends one peer in one step."""

    src: int
    dst: int
    chunks: Sequence[int]
    reduce: bool


class Stream(NamedTuple):
    """An edge of a pipeline: at step ``start + i`` it carries chunk ``first_chunk + i``."""

    src: int
    dst: int
    start: int
    first_chunk: int
    count: int
    reduce: bool


def step_phase(counts: Counter, chunk_bytes: float) -> Phase | None:
    """The phase of one step from its chunk count per (src, dst); None if messages differ in size."""
    assert counts, "a step without transfers"
    sizes = set(counts.values())
    if len(sizes) != 1:
        return None
    return Phase(tuple(sorted(counts)), sizes.pop() * chunk_bytes, 1)


def merge_phases(phases: Iterable[Phase]) -> tuple[Phase, ...]:
    """Fold consecutive phases of equal shape into one with the summed repeat."""
    out: list[Phase] = []
    for ph in phases:
        if out and out[-1].pairs == ph.pairs and out[-1].nbytes == ph.nbytes:
            ph = Phase(ph.pairs, ph.nbytes, out.pop().repeat + ph.repeat)
        out.append(ph)
    return tuple(out)


class Segment:
    """A run of steps. Subclasses give ``num_steps`` and ``step_messages``; the rest
    defaults to walking the messages (never the per-chunk transfers)."""

    __slots__ = ()
    chunk_bytes: float

    def num_steps(self) -> int:
        raise NotImplementedError

    def step_messages(self) -> Iterator[Iterable[Message]]:
        raise NotImplementedError

    def steps(self) -> Iterator[Step]:
        cb = self.chunk_bytes
        for messages in self.step_messages():
            yield Step(
                tuple(Transfer(m.src, m.dst, c, cb, m.reduce) for m in messages for c in m.chunks)
            )

    def phases(self) -> tuple[Phase, ...] | None:
        out = []
        for messages in self.step_messages():
            counts: Counter = Counter()
            for m in messages:
                counts[m.src, m.dst] += len(m.chunks)
            phase = step_phase(counts, self.chunk_bytes)
            if phase is None:
                return None
            out.append(phase)
        return merge_phases(out)

    def bytes_sent(self, p: int) -> np.ndarray:
        chunks = np.zeros(p)
        for messages in self.step_messages():
            for m in messages:
                chunks[m.src] += len(m.chunks)
        return chunks * self.chunk_bytes


@dataclass(frozen=True, slots=True)
class Explicit(Segment):
    """Steps listed message by message (small schedules: folds, binomial trees)."""

    messages: tuple[tuple[Message, ...], ...]
    chunk_bytes: float

    def num_steps(self) -> int:
        return len(self.messages)

    def step_messages(self) -> Iterator[Iterable[Message]]:
        return iter(self.messages)


@dataclass(frozen=True, slots=True)
class Rings(Segment):
    """Disjoint rings of equal size ``s`` running ``s - 1`` ring steps side by side.

    Member ``q`` of a ring sends to member ``q + 1``. Reduce-scatter
    (``reduce=True``): at step ``t`` member ``q`` sends block ``q - t - 1``, so
    member ``q`` ends with block ``q`` summed over the ring. All-gather: member
    ``q`` starts with block ``q`` and at step ``t`` forwards block ``q - t``.
    """

    rings: tuple[tuple[int, ...], ...]
    blocks: tuple[tuple[Sequence[int], ...], ...]
    """``blocks[i][q]``: the chunks of block ``q`` of ring ``i``; all blocks equally long."""
    reduce: bool
    chunk_bytes: float

    def _size(self) -> int:
        return len(self.rings[0]) if self.rings else 0

    def num_steps(self) -> int:
        return max(self._size() - 1, 0)

    def step_messages(self) -> Iterator[Iterable[Message]]:
        s = self._size()
        lag = 1 if self.reduce else 0
        for t in range(s - 1):
            yield tuple(
                Message(ring[q], ring[(q + 1) % s], blocks[(q - t - lag) % s], self.reduce)
                for ring, blocks in zip(self.rings, self.blocks, strict=True)
                for q in range(s)
            )

    def _message_bytes(self) -> float:
        return len(self.blocks[0][0]) * self.chunk_bytes

    def phases(self) -> tuple[Phase, ...]:
        s = self._size()
        if s < 2:
            return ()
        pairs = sorted((ring[q], ring[(q + 1) % s]) for ring in self.rings for q in range(s))
        return (Phase(tuple(pairs), self._message_bytes(), s - 1),)

    def bytes_sent(self, p: int) -> np.ndarray:
        sent = np.zeros(p)
        for ring in self.rings:
            sent[list(ring)] = (len(ring) - 1) * self._message_bytes()
        return sent


@dataclass(frozen=True, slots=True)
class Streams(Segment):
    """Pipelined edges (chains, trees): each stream carries consecutive chunks, one per step.

    Between two consecutive stream starts or ends the set of busy edges is
    fixed, so phases come from those boundaries without walking the steps.
    """

    streams: tuple[Stream, ...]
    chunk_bytes: float
    _order: tuple[Stream, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_order", tuple(sorted(self.streams, key=lambda s: s.start)))

    def num_steps(self) -> int:
        return max((s.start + s.count for s in self.streams), default=0)

    def step_messages(self) -> Iterator[Iterable[Message]]:
        order, nxt, active = self._order, 0, []
        for t in range(self.num_steps()):
            while nxt < len(order) and order[nxt].start <= t:
                active.append(order[nxt])
                nxt += 1
            active = [s for s in active if t < s.start + s.count]
            yield tuple(
                Message(s.src, s.dst, (s.first_chunk + t - s.start,), s.reduce) for s in active
            )

    def phases(self) -> tuple[Phase, ...] | None:
        events: dict[int, list[tuple[tuple[int, int], int]]] = {}
        for s in self.streams:
            events.setdefault(s.start, []).append(((s.src, s.dst), 1))
            events.setdefault(s.start + s.count, []).append(((s.src, s.dst), -1))
        times = sorted(events)
        counts: Counter = Counter()
        out = []
        for t0, t1 in zip(times, times[1:], strict=False):
            for pair, delta in events[t0]:
                counts[pair] += delta
                if not counts[pair]:
                    del counts[pair]
            phase = step_phase(counts, self.chunk_bytes)
            if phase is None:
                return None
            out.append(Phase(phase.pairs, phase.nbytes, t1 - t0))
        return merge_phases(out)

    def bytes_sent(self, p: int) -> np.ndarray:
        chunks = np.zeros(p)
        for s in self.streams:
            chunks[s.src] += s.count
        return chunks * self.chunk_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    """A collective as steps of chunk transfers; see the package docstring for the semantics."""

    op: str
    """The collective, one of ``OPS``."""
    algorithm: str
    """How it is done, one of ``ALGORITHMS[op]``."""
    p: int
    """Group size; ranks are group-local indices 0..p-1."""
    nbytes: float
    """Size of the full buffer in bytes (gathered output, full input, or a rank's send buffer)."""
    nchunks: int
    """How many chunks the buffer is cut into."""
    chunk_bytes: float
    """Bytes of one chunk: ``nbytes / nchunks``, except all_to_all (``nbytes / p``)."""
    root: int | None
    """Root rank of broadcast and reduce; None for the other ops."""
    segments: tuple[Segment, ...] = field(repr=False)
    """The parts run one after another (an implementation detail, not a contract)."""

    def steps(self) -> Iterator[Step]:
        """The steps in order, built one at a time as iterated."""
        for seg in self.segments:
            yield from seg.steps()

    def num_steps(self) -> int:
        return sum(seg.num_steps() for seg in self.segments)

    def phases(self) -> tuple[Phase, ...] | None:
        """Exact chunk-free compression of ``steps()``; None if some step's messages differ in size."""
        out: list[Phase] = []
        for seg in self.segments:
            phases = seg.phases()
            if phases is None:
                return None
            out.extend(phases)
        return merge_phases(out)

    def bytes_sent(self) -> np.ndarray:
        """Bytes each rank sends over the whole collective, indexed by group-local rank."""
        sent = np.zeros(self.p)
        for seg in self.segments:
            sent += seg.bytes_sent(self.p)
        return sent
