"""Flow-level network with max-min fair bandwidth sharing.

A transfer is a *flow* of bytes over a path of directed links. At every
instant the active flows share link capacity max-min fairly, computed by
progressive filling: raise every flow's rate together until some link is
full, freeze the flows crossing it, repeat with the rest. A flow's bytes
drain at its rate; when the last byte has left, the flow pays its path
latency once and completes. Uncontended, ``n`` bytes over bandwidth ``B`` and
latency ``a`` take exactly ``n / B + a``.

Rates are recomputed only when the set of flows changes, and at most once per
simulated instant (flows starting together are batched), so a collective step
of ``p`` flows costs one recomputation, not ``p``.

Flows can carry per-link byte counts different from their own size (a
collective fast path moves one "bundle" over many links); by default each link
on the path carries the flow's bytes.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import simpy

_DONE_RTOL = 1e-12


class Flow:
    __slots__ = ("path", "size", "remaining", "rate", "latency", "done", "start", "link_bytes")

    def __init__(self, path, size, latency, done, start, link_bytes):
        self.path: tuple[int, ...] = path
        self.size: float = size
        self.remaining: float = size
        self.rate: float = 0.0
        self.latency: float = latency
        self.done: simpy.Event = done
        self.start: float = start
        self.link_bytes = link_bytes


class Network:
    """Links with capacities, and the flows currently crossing them.

    ``capacities[i]`` is link ``i``'s bandwidth in bytes/s. Per link it counts
    bytes carried and busy time (time with at least one flow), and keeps the
    busy intervals for the timeline.
    """

    def __init__(self, env: simpy.Environment, capacities: Sequence[float], *, record_busy: bool = True):
        for i, c in enumerate(capacities):
            if not c > 0:
                raise ValueError(f"link {i} capacity must be > 0 bytes/s, got {c!r}")
        self.env = env
        self.capacity = list(capacities)
        n = len(self.capacity)
        self.link_flows: list[set[Flow]] = [set() for _ in range(n)]
        self.bytes = [0.0] * n
        self.busy_time = [0.0] * n
        self._busy_since: list[float | None] = [None] * n
        self.record_busy = record_busy
        self.busy_intervals: list[tuple[int, float, float]] = []
        self._flows: set[Flow] = set()
        self._last = 0.0
        self._generation = 0
        self._recompute_pending = False
        self.flows_started = 0

    # public API
    def transfer(
        self,
        path: Sequence[int],
        nbytes: float,
        latency: float = 0.0,
        *,
        link_bytes: Sequence[float] | None = None,
    ) -> simpy.Event:
        """Start a flow now; the returned event fires when its last byte has arrived."""
        if not nbytes >= 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")
        if not latency >= 0:
            raise ValueError(f"latency must be >= 0, got {latency!r}")
        env = self.env
        done = env.event()
        self.flows_started += 1
        path = tuple(path)
        if link_bytes is None:
            for link in path:
                self.bytes[link] += nbytes
        else:
            for link, b in zip(path, link_bytes, strict=True):
                self.bytes[link] += b
        if nbytes == 0 or not path:
            self._finish_after(done, latency)
            return done
        self._advance()
        flow = Flow(path, nbytes, latency, done, env.now, link_bytes)
        self._flows.add(flow)
        now = env.now
        for link in path:
            flows = self.link_flows[link]
            if not flows:
                self._busy_since[link] = now
            flows.add(flow)
        self._generation += 1  # a planned wake-up no longer knows this flow's rate
        self._request_recompute()
        return done

    @property
    def active_flows(self) -> int:
        return len(self._flows)

    def utilisation(self, horizon: float) -> list[float]:
        """Busy fraction of each link over ``[0, horizon]``."""
        if horizon <= 0:
            return [0.0] * len(self.capacity)
        return [b / horizon for b in self.busy_time]

    # internals
    def _finish_after(self, done: simpy.Event, latency: float) -> None:
        if latency > 0:
            self.env.timeout(latency).callbacks.append(lambda _e: done.succeed())
        else:
            done.succeed()

    def _advance(self) -> None:
        """Drain every flow's bytes up to now at its current rate."""
        now = self.env.now
        dt = now - self._last
        if dt > 0:
            for f in self._flows:
                f.remaining -= f.rate * dt
        self._last = now

    def _request_recompute(self) -> None:
        if not self._recompute_pending:
            self._recompute_pending = True
            self.env.timeout(0).callbacks.append(self._recompute)

    def _recompute(self, _event=None) -> None:
        self._recompute_pending = False
        self._advance()
        self._assign_rates()
        self._schedule_next_completion()

    def _assign_rates(self) -> None:
        """Max-min fair rates by progressive filling (lazy-deletion heap of link shares)."""
        flows = self._flows
        if not flows:
            return
        link_flows = self.link_flows
        spare: dict[int, float] = {}
        count: dict[int, int] = {}
        for f in flows:
            f.rate = -1.0  # unfrozen
        for f in flows:
            for link in f.path:
                if link not in spare:
                    spare[link] = self.capacity[link]
                    count[link] = len(link_flows[link])
        heap = [(spare[k] / count[k], k) for k in spare]
        heapq.heapify(heap)
        while heap:
            share, link = heapq.heappop(heap)
            c = count[link]
            if c == 0:
                continue
            current = max(spare[link], 0.0) / c
            if current > share * (1 + 1e-12):  # stale entry: its share has grown since
                heapq.heappush(heap, (current, link))
                continue
            for f in link_flows[link]:
                if f.rate >= 0:
                    continue
                f.rate = current if current > 0 else self.capacity[link] * 1e-12  # rounding guard
                for other in f.path:
                    spare[other] -= current
                    count[other] -= 1
                    if other != link and count[other] > 0:
                        heapq.heappush(heap, (max(spare[other], 0.0) / count[other], other))

    def _schedule_next_completion(self) -> None:
        self._generation += 1
        if not self._flows:
            return
        wait = min(f.remaining / f.rate for f in self._flows)
        generation = self._generation
        self.env.timeout(max(wait, 0.0)).callbacks.append(lambda _e: self._on_drain(generation))

    def _on_drain(self, generation: int) -> None:
        if generation != self._generation:
            return  # the flow set changed since this wake-up was planned
        self._advance()
        now = self.env.now
        # Done: bytes left are rounding noise, or the time left is below the clock's
        # resolution (now + dt == now would wake us at this same instant forever).
        horizon = max(now, 1e-9) * _DONE_RTOL
        finished = [f for f in self._flows if f.remaining <= f.size * _DONE_RTOL or f.remaining <= f.rate * horizon]
        for f in finished:
            self._flows.discard(f)
            for link in f.path:
                flows = self.link_flows[link]
                flows.discard(f)
                if not flows:
                    since = self._busy_since[link]
                    self.busy_time[link] += now - since
                    if self.record_busy:
                        self.busy_intervals.append((link, since, now))
                    self._busy_since[link] = None
            self._finish_after(f.done, f.latency)
        self._assign_rates()
        self._schedule_next_completion()
