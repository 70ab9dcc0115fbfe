"""Flow-level network with max-min fair bandwidth sharing.

A transfer is a *flow* of bytes over a path of directed links. At every
instant the active flows share link capacity max-min fairly, computed by
progressive filling: raise every flow's rate together until some link is
full, freeze the flows crossing it, repeat with the rest. A flow's bytes
drain at its rate; when the last byte has left, the flow pays its path
latency once and completes. Uncontended, ``n`` bytes over bandwidth ``B`` and
latency ``a`` take exactly ``n / B + a``.

Cost. Rates change only when flows start or finish, and only for the flows
connected to the change through shared links (a *component*), so a change
recomputes that component alone. Flows starting at one instant are batched
into one recomputation. Each flow keeps its bytes as of its last rate change
and its projected finish time in a heap, so nothing is touched between events.
Ties are broken by start order (dicts, not sets), so a run is reproducible.
A flow that starts alone on its links (no other flow, no token bucket) takes
their least capacity at once, without a recomputation: most of a large
simulation's flows (a tensor-parallel collective on its node's NVLink, an
uncontended bundle) cost one wake-up event.

Flows can carry per-link byte counts different from their own size (a
collective's fast path moves one "bundle" over many links); by default each
link on the path carries the flow's bytes. A bundle credits each link with the
time its bytes take at the link's capacity, and records no busy interval.

Queues. A link may have a *flow window* ``w`` (bytes): the link is then a deep
first-in-first-out queue into which every flow crossing it keeps up to ``w``
bytes (a TCP sender's window; a shaper such as ``tc tbf`` with a long
``latency`` holds all of them). A flow that starts on such a link first waits
behind what is queued ahead of it, ``min(w, bytes left)`` of every flow that
entered the link before it (or is itself still waiting), at the link's
capacity; over a path it waits for the longest such queue. Of flows that start
at one instant, each waits behind those started before it in program order.
Then it shares the link max-min fairly with the rest. A small message on a busy link therefore
takes the queue's drain time, not its own size over a fair share: latency
under load. With ``w = 0`` (the default) a flow shares from its first byte.
Bundles neither wait nor count in a queue.

Token buckets. A link may be shaped by a token bucket of ``burst`` bytes (a
rate limiter such as ``tc tbf``): tokens accrue at the link's capacity ``R`` up
to ``burst``, the bytes crossing the link spend them, and while the bucket
holds any the link runs at its ``peak`` rate ``P > R``. As a fluid: with ``T``
tokens and throughput ``x`` the bucket changes at ``R - x`` (within
``[0, burst]``); the link shares ``P`` while ``T > 0`` and ``R`` once it is
empty, which happens ``T / (x - R)`` after the last rate change (an event).
A message of ``n`` bytes on an idle link with a full bucket ``B`` therefore
takes ``n / P`` if ``n <= B P / (P - R)``, else ``B / (P - R) + (n - B P / (P -
R)) / R = (n - B) / R``. Queues drain at ``R`` (a backlog means the bucket is
empty). ``burst = 0`` (the default) is a plain link.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import simpy

_RTOL = 1e-12


class Flow:
    __slots__ = ("id", "path", "size", "remaining", "rate", "t0", "finish", "latency", "done", "link_bytes",
                 "on_drain")

    def __init__(self, fid, path, size, latency, done, now, link_bytes=None, on_drain=None):
        self.id: int = fid
        self.path: tuple[int, ...] = path
        self.size: float = size
        self.remaining: float = size  # bytes left as of time t0
        self.rate: float = 0.0
        self.t0: float = now
        self.finish: float = float("inf")
        self.latency: float = latency
        self.done: simpy.Event = done
        self.link_bytes = link_bytes
        """Per-link bytes of a bundle (a collective's fast path), else None."""
        self.on_drain = on_drain

    def left(self, now: float) -> float:
        """Bytes not yet sent at ``now``."""
        return self.remaining - self.rate * (now - self.t0)

    def set_rate(self, rate: float, now: float) -> None:
        self.remaining -= self.rate * (now - self.t0)
        self.t0 = now
        self.rate = rate
        self.finish = now + self.remaining / rate


class Network:
    """Links with capacities, and the flows currently crossing them.

    ``capacities[i]`` is link ``i``'s bandwidth in bytes/s; ``windows[i]`` its
    flow window in bytes, ``bursts[i]`` its token bucket in bytes and ``peaks[i]``
    its rate while the bucket holds tokens (see the module docstring; default 0
    everywhere: no queue, no bucket). Per link it counts bytes carried and busy
    time (time with at least one flow), and keeps the busy intervals for the
    timeline.
    """

    def __init__(self, env: simpy.Environment, capacities: Sequence[float], *,
                 windows: Sequence[float] | None = None, bursts: Sequence[float] | None = None,
                 peaks: Sequence[float] | None = None, record_busy: bool = True):
        for i, c in enumerate(capacities):
            if not c > 0:
                raise ValueError(f"link {i} capacity must be > 0 bytes/s, got {c!r}")
        self.env = env
        self.capacity = list(capacities)
        n = len(self.capacity)
        windows = [0.0] * n if windows is None else list(windows)
        if len(windows) != n:
            raise ValueError(f"windows must give one flow window per link ({n}), got {len(windows)}")
        for i, w in enumerate(windows):
            if not w >= 0:
                raise ValueError(f"link {i} flow window must be >= 0 bytes, got {w!r}")
        self.window = windows
        self._queued = any(w > 0 for w in windows)
        bursts = [0.0] * n if bursts is None else list(bursts)
        peaks = [0.0] * n if peaks is None else list(peaks)
        if len(bursts) != n or len(peaks) != n:
            raise ValueError(f"bursts and peaks must give one value per link ({n}), got {len(bursts)} and {len(peaks)}")
        for i, (b, p) in enumerate(zip(bursts, peaks)):
            if not b >= 0:
                raise ValueError(f"link {i} burst must be >= 0 bytes, got {b!r}")
            if b > 0 and not p > self.capacity[i]:
                raise ValueError(f"link {i} peak must exceed its capacity {self.capacity[i]!r} B/s when its burst "
                                 f"is > 0, got {p!r}")
        self.burst = bursts
        self.peak = peaks
        self._tokens = list(bursts)  # full buckets at the start
        self._tokens_at = [0.0] * n
        self._throughput = [0.0] * n  # bytes/s crossing each link since _tokens_at
        self._empty_epoch = [0] * n  # invalidates a planned "bucket empty" event
        self._waiting: list[dict[Flow, None]] = [{} for _ in range(n)]  # flows queued behind others
        self.link_flows: list[dict[Flow, None]] = [{} for _ in range(n)]
        self.bytes = [0.0] * n
        self.busy_time = [0.0] * n
        self._busy_since: list[float | None] = [None] * n
        self.record_busy = record_busy
        self.busy_intervals: list[tuple[int, float, float]] = []
        self._flows: dict[Flow, None] = {}
        self._finish_heap: list[tuple[float, int, Flow]] = []
        self._dirty: dict[int, None] = {}  # links whose flow set changed since the last recompute
        self._recompute_pending = False
        self._wake_at = float("inf")
        self._wake_token = 0
        self._busy_count = [0] * n
        self.flows_started = 0
        self.fast_starts = 0
        """Flows that started alone on their links, their rate set without a recomputation."""
        self.bundles_contended = 0
        """Bundles that shared a link with another flow: there the fast path is approximate."""
        self.message_delay = None
        """None, or a function of no arguments giving the seconds each message of a transfer
        starting now spends in its hosts' software beyond the path latency (see
        :attr:`simulator.ComputeModel.message_delay`)."""

    @classmethod
    def for_links(cls, env: simpy.Environment, links, *, record_busy: bool = True) -> Network:
        """A network over a cluster's links (:attr:`simulator.Cluster.links`): their
        bandwidths, flow windows and token buckets."""
        return cls(env, [link.bandwidth for link in links], windows=[link.window for link in links],
                   bursts=[link.burst for link in links], peaks=[link.burst_bandwidth for link in links],
                   record_busy=record_busy)

    # public API
    def transfer(
        self,
        path: Sequence[int],
        nbytes: float,
        latency: float = 0.0,
        *,
        link_bytes: Sequence[float] | None = None,
        on_drain=None,
        messages: int = 1,
    ) -> simpy.Event:
        """Start a flow now; the returned event fires when its last byte has arrived.

        ``on_drain()``, if given, is called when the last byte has left the sender
        (before the path latency): a sender is free from then on. ``messages``: how many
        messages the flow stands for (a bundle of a collective's steps), each delayed by
        :attr:`message_delay` once.
        """
        if not nbytes >= 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")
        if not latency >= 0:
            raise ValueError(f"latency must be >= 0, got {latency!r}")
        if self.message_delay is not None:
            latency += messages * self.message_delay()
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
        if nbytes == 0 or not path:  # an empty message still queues behind the bytes ahead of it
            if on_drain is not None:
                on_drain()
            self._finish_after(done, latency + (self.backlog(path) if self._queued else 0.0))
            return done
        now = env.now
        flow = Flow(self.flows_started, path, nbytes, latency, done, now, link_bytes, on_drain)
        wait = self.backlog(path) if self._queued and link_bytes is None else 0.0
        if wait > 0:
            for link in path:
                self._waiting[link][flow] = None
            env.timeout(wait).callbacks.append(lambda _e: self._enter(flow))
        else:
            self._enter(flow)
        return done

    def backlog(self, path: Sequence[int]) -> float:
        """Seconds a byte entering ``path`` now waits behind the bytes queued ahead of it:
        on each link with a flow window, ``min(window, bytes left)`` of every flow that
        entered it (even at this instant: of two messages written at once one is first)
        or is waiting to, at the link's capacity; the longest over the path. 0 on links
        without a window."""
        now = self.env.now
        longest = 0.0
        for link in path:
            w = self.window[link]
            if w <= 0:
                continue
            queued = sum(min(w, f.left(now)) for f in self.link_flows[link] if f.link_bytes is None)
            queued += sum(min(w, f.size) for f in self._waiting[link])
            longest = max(longest, queued / self.capacity[link])
        return longest

    def _enter(self, flow: Flow) -> None:
        """The flow takes its place on its links and shares them from now on."""
        now = self.env.now
        path, link_bytes = flow.path, flow.link_bytes
        flow.t0 = now
        for link in path:
            self._waiting[link].pop(flow, None)
        self._flows[flow] = None
        link_flows, burst = self.link_flows, self.burst
        alone = all(not link_flows[link] and not burst[link] for link in path)
        contended = False
        for link in path:
            flows = link_flows[link]
            if flows and (link_bytes is not None or any(f.link_bytes is not None for f in flows)):
                contended = True
            if link_bytes is None:
                self._busy_more(link, now)
            flows[flow] = None
            if not alone:
                self._dirty[link] = None
        if contended:
            self.bundles_contended += 1
        if alone:
            # Nothing else on its links: progressive filling would give it their least capacity.
            # Set it now rather than in a recomputation; a flow that joins a link later makes
            # that link dirty, and the recomputation then includes this one.
            flow.set_rate(min(self.capacity[link] for link in path), now)
            heapq.heappush(self._finish_heap, (flow.finish, flow.id, flow))
            self.fast_starts += 1
            self._schedule_wake()
        else:
            self._request_recompute()

    def _busy_more(self, link: int, now: float) -> None:
        if self._busy_count[link] == 0:
            self._busy_since[link] = now
        self._busy_count[link] += 1

    def _busy_less(self, link: int, now: float) -> None:
        self._busy_count[link] -= 1
        if self._busy_count[link] == 0:
            since = self._busy_since[link]
            self.busy_time[link] += now - since
            if self.record_busy:
                self.busy_intervals.append((link, since, now))
            self._busy_since[link] = None

    @property
    def active_flows(self) -> int:
        return len(self._flows)

    # internals
    def _finish_after(self, done: simpy.Event, latency: float) -> None:
        if latency > 0:
            self.env.timeout(latency).callbacks.append(lambda _e: done.succeed())
        else:
            done.succeed()

    def _request_recompute(self) -> None:
        if not self._recompute_pending:
            self._recompute_pending = True
            self.env.timeout(0).callbacks.append(self._recompute)

    def _recompute(self, _event=None) -> None:
        self._recompute_pending = False
        dirty, self._dirty = self._dirty, {}
        for link in dirty:  # a link left without flows stops spending its tokens
            if self.burst[link] > 0 and not self.link_flows[link]:
                self._advance_tokens(link)
                self._throughput[link] = 0.0
        flows = self._component(dirty)
        if flows:
            self._assign_rates(flows)
        self._schedule_wake()

    def _advance_tokens(self, link: int) -> None:
        """Bring ``link``'s bucket up to now at the throughput it has had since its last change."""
        now = self.env.now
        dt = now - self._tokens_at[link]
        if dt > 0:
            tokens = self._tokens[link] + (self.capacity[link] - self._throughput[link]) * dt
            self._tokens[link] = min(self.burst[link], max(0.0, tokens))
            self._tokens_at[link] = now

    def _rate_now(self, link: int) -> float:
        """The capacity ``link`` shares now: its peak while its bucket holds tokens."""
        if self.burst[link] > 0:
            self._advance_tokens(link)
            if self._tokens[link] > self.burst[link] * 1e-9:
                return self.peak[link]
        return self.capacity[link]

    def _watch_bucket(self, link: int) -> None:
        """After a rate change on a shaped link: plan the instant its bucket runs dry."""
        self._empty_epoch[link] += 1
        drain = self._throughput[link] - self.capacity[link]
        if drain <= 0 or self._tokens[link] <= self.burst[link] * 1e-9:
            return
        epoch = self._empty_epoch[link]

        def empty(_event) -> None:
            if self._empty_epoch[link] != epoch:
                return  # rates changed since; a later watch holds
            self._advance_tokens(link)
            self._tokens[link] = 0.0
            self._dirty[link] = None
            self._request_recompute()

        self.env.timeout(self._tokens[link] / drain).callbacks.append(empty)

    def _component(self, links) -> list[Flow]:
        """Every active flow connected to ``links`` through shared links, in start order."""
        link_flows = self.link_flows
        seen_links = set(links)
        stack = list(links)
        found: dict[Flow, None] = {}
        while stack:
            for f in link_flows[stack.pop()]:
                if f not in found:
                    found[f] = None
                    for other in f.path:
                        if other not in seen_links:
                            seen_links.add(other)
                            stack.append(other)
        return list(found)  # deterministic: dicts keep start order

    def _assign_rates(self, flows: list[Flow]) -> None:
        """Max-min fair rates for one component, by progressive filling."""
        link_flows = self.link_flows
        spare: dict[int, float] = {}
        count: dict[int, int] = {}
        for f in flows:
            for link in f.path:
                if link not in spare:
                    spare[link] = self._rate_now(link)
                    count[link] = len(link_flows[link])
        rate: dict[Flow, float] = {}
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
            if current <= 0:
                current = self.capacity[link] * 1e-12  # rounding left nothing: keep flows moving
            for f in link_flows[link]:
                if f in rate:
                    continue
                rate[f] = current
                for other in f.path:
                    spare[other] -= current
                    count[other] -= 1
                    if other != link and count[other] > 0:
                        heapq.heappush(heap, (max(spare[other], 0.0) / count[other], other))
        now = self.env.now
        heap_push = heapq.heappush
        finish_heap = self._finish_heap
        for f in flows:
            r = rate[f]
            if r != f.rate:
                f.set_rate(r, now)
                heap_push(finish_heap, (f.finish, f.id, f))
        for link in spare:
            if self.burst[link] > 0:  # tokens were brought up to now by _rate_now
                self._throughput[link] = sum(f.rate for f in link_flows[link])
                self._watch_bucket(link)

    def _schedule_wake(self) -> None:
        heap = self._finish_heap
        while heap and (heap[0][2] not in self._flows or heap[0][0] != heap[0][2].finish):
            heapq.heappop(heap)  # finished, or its rate changed since this entry
        if not heap:
            return
        at = heap[0][0]
        if at < self._wake_at:
            self._wake_at = at
            self._wake_token += 1
            token = self._wake_token
            # now + (at - now) may round below at: _on_wake accepts finishes within the clock's resolution
            self.env.timeout(max(at - self.env.now, 0.0)).callbacks.append(lambda _e: self._on_wake(token))

    def _on_wake(self, token: int) -> None:
        if token != self._wake_token:
            return  # superseded by an earlier wake-up planned after this one
        now = self.env.now
        self._wake_at = float("inf")
        heap = self._finish_heap
        # Done when the projected finish is now, or within the clock's resolution of it.
        horizon = now + max(now, 1e-9) * _RTOL
        finished: dict[Flow, None] = {}
        while heap and heap[0][0] <= horizon:
            finish, _, f = heapq.heappop(heap)
            if f in self._flows and finish == f.finish:
                finished[f] = None
        for f in finished:
            del self._flows[f]
            for i, link in enumerate(f.path):
                del self.link_flows[link][f]
                self._dirty[link] = None
                if f.link_bytes is None:
                    self._busy_less(link, now)
                else:
                    # A bundle stands for many short transfers: credit the time its bytes keep
                    # this link busy at full rate, not the whole collective.
                    self.busy_time[link] += f.link_bytes[i] / self.capacity[link]
            if f.on_drain is not None:
                f.on_drain()
            self._finish_after(f.done, f.latency)
        if finished:
            self._recompute()
        else:
            self._schedule_wake()
