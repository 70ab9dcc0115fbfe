"""Collectives on the simulated network: step schedules become flows.

A collective's step schedule (``strategies.collectives``) runs with per-rank
step dependencies: a rank starts its sends of step ``k`` once its sends of
earlier steps have left it (drained) and its receives of earlier steps have
arrived (latency included). A sender does not wait for its receiver, so
pipelined schedules (a chain broadcast, a tree) pay each hop's latency once,
not once per chunk. Every transfer is a flow in the
max-min fair network, so collectives contend with each other and with
point-to-point traffic.

Fast path. Stepping a 1024-rank ring all-reduce means two million flows. When
the outcome is known in closed form it is computed instead as a short chain of
*bundle* flows. The schedule's phases are grouped into runs that repeat one set
of (src, dst) pairs; each run becomes one flow over every link the run uses,
carrying ``sum(repeat * chunk)`` bytes with latency ``sum(repeat * a)`` at
bottleneck ``B``. This is taken only where it equals the stepped result
uncontended: no link carries two transfers of one step, and either

* there is one run (a ring): every step repeats the same pairs, so each link
  only ever carries one pair's transfers, one at a time, and the stepped flows
  never share a link. The run's finish then follows from the stepped rules
  alone (a max-plus recurrence over ranks, evaluated with numpy), and the bundle
  carries the run's bytes at its bottleneck with the rest as latency; or
* in every run all pairs see the same ``a`` and ``B`` and every member takes
  part in every phase, so all ranks finish every step together and the runs
  follow one another (hierarchical all-reduce with a NIC per GPU, halving-
  doubling on single-GPU nodes).

Under contention the bundle advances at its fair share on its most loaded link,
as a ring advances at the pace of its slowest hop. ``model="stepped"`` forces
the step-by-step path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import simpy

from simulator.network import Network
from strategies.collectives import ALGORITHMS, schedule

CollectiveModel = Literal["auto", "stepped"]
COLLECTIVE_MODELS = ("auto", "stepped")


@dataclass(frozen=True, slots=True)
class _Bundle:
    path: tuple[int, ...]
    link_bytes: tuple[float, ...]
    nbytes: float
    latency: float
    steps: int
    """The schedule's steps the bundle stands for (messages on its critical path)."""


def key_of(sched, group) -> tuple:
    """What identifies a collective's flows: its schedule's shape and its group."""
    return (sched.op, sched.algorithm, sched.nbytes, sched.root, group)


@lru_cache(maxsize=256)
def _schedule(op, algorithm, p, nbytes, root, node_of):
    return schedule(op, algorithm, p, nbytes, root=root, node_of=node_of)


class CollectiveRunner:
    """Runs collective instances on a :class:`~simulator.network.Network`."""

    def __init__(self, env: simpy.Environment, network: Network, cluster, *, model: CollectiveModel = "auto",
                 symmetry=None):
        if model not in COLLECTIVE_MODELS:
            raise ValueError(f"collective model must be one of {COLLECTIVE_MODELS}, got {model!r}")
        self.env = env
        self.network = network
        self.cluster = cluster
        self.model = model
        self.symmetry = symmetry
        """A :class:`simulator.symmetry.Symmetry` when only representatives are simulated."""
        self._bundles: dict = {}
        self._projected: dict = {}
        self._geometries: dict = {}
        self._node_of: dict[int, tuple] = {}
        self._plans: dict = {}
        self._routes: dict[tuple[int, int], tuple[tuple[int, ...], float]] = {}
        self.transfers = 0

    def route(self, src: int, dst: int) -> tuple[tuple[int, ...], float]:
        """(link path, latency) from rank ``src`` to ``dst``, cached."""
        key = (src, dst)
        hit = self._routes.get(key)
        if hit is None:
            path = self.cluster.route(src, dst)
            if self.symmetry is not None:
                path = self.symmetry.path(path)
            hit = self._routes[key] = (path, self.cluster.path_latency(src, dst))
        return hit

    def start(
        self,
        op: str,
        algorithm: str,
        group: Sequence[int],
        nbytes: float,
        *,
        root: int = 0,
        on_rank_done: Callable[[int], None],
        view=None,
    ):
        """Start a collective now; ``on_rank_done(i)`` fires as member ``i`` finishes.

        ``view``: with representatives, the group's :meth:`~simulator.symmetry.Symmetry.group_view`;
        only its representatives take part and are reported. Returns the step schedule
        (``bytes_sent()`` gives each member's traffic).
        """
        if op not in ALGORITHMS:
            raise ValueError(f"collective op must be one of {tuple(ALGORITHMS)}, got {op!r}")
        if algorithm not in ALGORITHMS[op]:
            raise ValueError(f"algorithm must be one of {tuple(ALGORITHMS[op])} for {op}, got {algorithm!r}")
        group = tuple(group)
        p = len(group)
        hit = self._node_of.get(id(group))
        if hit is None or hit[0] is not group:
            hit = self._node_of[id(group)] = (group, tuple(self.cluster.node_of(r) for r in group))
        sched = _schedule(op, algorithm, p, float(nbytes), root, hit[1])
        members = range(p) if view is None else view[0]
        if sched.num_steps() == 0:
            for i in members:
                on_rank_done(i)
            return sched
        if view is not None and view[1] and key_of(sched, group) not in self._projected:
            self.symmetry.check_phases(sched, view)  # before the bundles: it is cheaper
        bundles = self._bundle(sched, group) if self.model == "auto" else None
        if view is not None and (bundles is not None or view[1]):
            bundles = self._project(sched, group, bundles, view)
        if bundles is not None:
            self._run_chain(bundles, 0, members, on_rank_done)
            return sched
        key = key_of(sched, group)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _StepPlan(sched, len(group))
        _SteppedRun(self, plan, group, on_rank_done).begin()
        return sched

    def _run_chain(self, bundles, k, members, on_rank_done) -> None:
        if k == len(bundles):
            for i in members:
                on_rank_done(i)
            return
        b = bundles[k]
        done = self.network.transfer(b.path, b.nbytes, b.latency, link_bytes=b.link_bytes, messages=b.steps)
        self.transfers += 1
        done.callbacks.append(lambda _e: self._run_chain(bundles, k + 1, members, on_rank_done))

    def _project(self, sched, group, bundles, view):
        """The bundles on representative links. A group that other images share (some
        generator maps it onto itself) must take the closed form and have a symmetric
        schedule; a group of representatives alone may step, on representative links."""
        from simulator.symmetry import Asymmetric

        key = key_of(sched, group)
        if key not in self._projected:
            if bundles is None:
                raise Asymmetric(f"{sched.op}/{sched.algorithm} on a group its images share has no closed form",
                                 view[1])
            self._projected[key] = self.symmetry.project(bundles, view)
        return self._projected[key]

    # fast path
    def _bundle(self, sched, group) -> tuple[_Bundle, ...] | None:
        key = key_of(sched, group)
        if key not in self._bundles:
            self._bundles[key] = self._make_bundles(sched, group)
        return self._bundles[key]

    def _make_bundles(self, sched, group) -> tuple[_Bundle, ...] | None:
        phases = sched.phases()
        if not phases:
            return None
        # Runs: maximal stretches of phases that repeat one set of (src, dst) pairs.
        runs: list[list] = []
        for phase in phases:
            if runs and frozenset(runs[-1][0].pairs) == frozenset(phase.pairs):
                runs[-1].append(phase)
            else:
                runs.append([phase])
        bundles = []
        for run in runs:
            made = self._run_bundle(run, group)
            if made is None:
                return None
            bundle, uniform, everyone = made
            if len(runs) > 1 and not (uniform and everyone):
                return None  # ranks would leave this run at different times: step it
            bundles.append(bundle)
        return tuple(bundles)

    def _geometry(self, pairs, group):
        """(links the pairs use, each pair's latency, each pair's bottleneck) of one step's
        pairs in ``group``, or None when two of them share a link; cached, as many
        collectives of one group differ only in their sizes."""
        key = (pairs, group)
        if key not in self._geometries:
            links = self.cluster.links
            used: dict[int, None] = {}
            lat = np.empty(len(pairs))
            bw = np.empty(len(pairs))
            shared = False
            for i, (s, d) in enumerate(pairs):
                route = self.cluster.route(group[s], group[d])
                for link in route:
                    shared = shared or link in used
                    used[link] = None
                lat[i] = math.fsum(links[k].latency for k in route)  # as Cluster.path_latency
                bw[i] = min(links[k].bandwidth for k in route)
            self._geometries[key] = None if shared else (tuple(used), lat, bw)
        return self._geometries[key]

    def _run_bundle(self, run, group):
        """One bundle for a run of phases with the same pairs, or None if it can't be exact.

        Returns (bundle, uniform, everyone): uniform when every pair sees the same
        latency and bottleneck; everyone when every member both sends and receives.
        """
        geometry = self._geometry(run[0].pairs, group)
        if geometry is None:
            return None  # two transfers of one step share a link
        path, lat, bw = geometry
        pairs = run[0].pairs
        p = len(group)
        run_bytes = sum(ph.repeat * ph.nbytes for ph in run)
        src = np.array([s for s, _ in pairs])
        dst = np.array([d for _, d in pairs])
        everyone = set(src.tolist()) == set(dst.tolist()) == set(range(p))
        # Exact finish of the run from a common start, by the stepped rules: a sender is
        # free when its bytes have left, a receiver when they have arrived. No link carries
        # two transfers of a step and every step repeats the same pairs, so a link only ever
        # carries one pair's transfers, one at a time: the stepped flows never share.
        total = _run_finish(run, src, dst, bw, lat, p)
        b = float(bw.min())
        # The bundle drains at its most constrained link; the rest of the time is latency.
        # Each link carries one pair's transfers: the run's bytes.
        bundle = _Bundle(path, (run_bytes,) * len(path), run_bytes, max(total - run_bytes / b, 0.0),
                         sum(ph.repeat for ph in run))
        return bundle, len(set(zip(lat.tolist(), bw.tolist(), strict=True))) == 1, everyone


def _run_finish(run, src, dst, bw, lat, p: int) -> float:
    """When the last member leaves a run of phases that all start at 0, by the stepped rules:
    each step, a sender is free ``drain`` after it was, a receiver when the bytes arrive
    (``drain + lat`` after its sender was free), whichever is later for a rank that does both.

    The levels follow a max-plus linear recurrence ``level' = level (x) M``. Where the pairs
    and their links repeat every ``q`` members (a ring over nodes of 8 GPUs: q = 8), the
    levels do too, so ``q`` states suffice and ``M`` is raised to each phase's repeat by
    squaring: a 16384-rank ring costs what an 8-rank one does."""
    q = _period(src, dst, bw, lat, p)
    if q > 64:  # no short period: step the recurrence over every member
        level = np.zeros(p)
        for ph in run:
            drain = ph.nbytes / bw
            for _ in range(ph.repeat):
                start = level[src]
                nxt = level.copy()
                nxt[src] = start + drain
                np.maximum.at(nxt, dst, start + drain + lat)
                level = nxt
        return float(level.max())
    level = np.zeros(q)
    into = dst < q  # one member of each class receives for the class
    for ph in run:
        drain = ph.nbytes / bw
        m = np.full((q, q), -np.inf)
        own = np.zeros(q)  # a member that does not send keeps its level
        for j in np.nonzero(src < q)[0]:
            own[src[j]] = drain[j]  # in pair order, as the stepped assignment leaves it
        m[np.arange(q), np.arange(q)] = own
        for j in np.nonzero(into)[0]:
            a, b = src[j] % q, dst[j]
            m[a, b] = max(m[a, b], drain[j] + lat[j])
        level = _max_plus_vector(level, _max_plus_power(m, ph.repeat))
    return float(level.max())


def _period(src, dst, bw, lat, p: int) -> int:
    """The least ``q`` dividing ``p`` such that moving every member ``q`` on maps the pairs,
    with their bandwidth and latency, onto themselves (``p`` when no less one does)."""
    key = src * p + dst
    order = np.argsort(key)
    key, bw, lat = key[order], bw[order], lat[order]
    for q in range(1, p):
        if p % q:
            continue
        moved = ((src[order] + q) % p) * p + (dst[order] + q) % p
        at = np.searchsorted(key, moved)
        if (at < len(key)).all() and (key[np.minimum(at, len(key) - 1)] == moved).all() \
                and (bw[at] == bw).all() and (lat[at] == lat).all():
            return q
        if q > 64:
            break
    return p


def _max_plus_power(m: np.ndarray, k: int) -> np.ndarray:
    """``m`` to the ``k``-th power (``k >= 1``) in the max-plus semiring."""
    result = None
    while k:
        if k & 1:
            result = m if result is None else _max_plus(result, m)
        k >>= 1
        if k:
            m = _max_plus(m, m)
    return result


def _max_plus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a[:, :, None] + b[None, :, :]).max(axis=1)


def _max_plus_vector(v: np.ndarray, m: np.ndarray) -> np.ndarray:
    return (v[:, None] + m).max(axis=0)


class _StepPlan:
    """The immutable part of a stepped collective: steps, and who takes part where."""

    __slots__ = ("steps", "parts", "pending")

    def __init__(self, sched, p: int):
        # One message per (src, dst) in a step: same finish time under fair sharing, fewer flows.
        self.steps = [_merge(step.transfers) for step in sched.steps()]
        self.parts: list[list[int]] = [[] for _ in range(p)]
        # (step, rank) -> indices of that step's messages the rank takes part in
        self.pending: dict[tuple[int, int], list[int]] = {}
        for k, transfers in enumerate(self.steps):
            for idx, t in enumerate(transfers):
                for r in (t.src, t.dst):
                    mine = self.pending.get((k, r))
                    if mine is None:
                        self.parts[r].append(k)
                        self.pending[(k, r)] = mine = []
                    mine.append(idx)


class _SteppedRun:
    """One collective instance executed step by step with per-rank dependencies."""

    __slots__ = ("runner", "group", "on_rank_done", "steps", "parts", "pos", "pending", "remaining", "started")

    def __init__(self, runner: CollectiveRunner, plan: _StepPlan, group, on_rank_done):
        self.runner = runner
        self.group = group
        self.on_rank_done = on_rank_done
        self.steps = plan.steps
        self.parts = plan.parts
        self.pending = plan.pending
        self.remaining = {key: len(v) for key, v in plan.pending.items()}
        self.pos = [0] * len(group)
        self.started: set[tuple[int, int]] = set()

    def _level(self, r: int) -> float:
        part = self.parts[r]
        return part[self.pos[r]] if self.pos[r] < len(part) else float("inf")

    def begin(self) -> None:
        for r in range(len(self.group)):
            if not self.parts[r]:
                self.on_rank_done(r)
        for r in range(len(self.group)):
            if self.parts[r]:
                self._try_start(r)

    def _try_start(self, r: int) -> None:
        """Start the sends of ``r``'s current step: a sender needs only itself to be ready."""
        k = self._level(r)
        if k == float("inf"):
            return
        transfers = self.steps[k]
        for idx in self.pending[(k, r)]:
            t = transfers[idx]
            if t.src == r and (k, idx) not in self.started:
                self._start(k, idx, t)

    def _start(self, k: int, idx: int, t) -> None:
        self.started.add((k, idx))
        runner = self.runner
        path, latency = runner.route(self.group[t.src], self.group[t.dst])
        done = runner.network.transfer(path, t.nbytes, latency, on_drain=lambda: self._part_done(k, t.src))
        runner.transfers += 1
        done.callbacks.append(lambda _e: self._part_done(k, t.dst))

    def _part_done(self, k: int, r: int) -> None:
        """``r``'s send has left, or its receive has arrived."""
        key = (k, r)
        self.remaining[key] -= 1
        if self.remaining[key]:
            return
        self.pos[r] += 1
        if self.pos[r] == len(self.parts[r]):
            self.on_rank_done(r)
        else:
            self._try_start(r)


@dataclass(frozen=True, slots=True)
class _Message:
    src: int
    dst: int
    nbytes: float


def _merge(transfers) -> list[_Message]:
    sizes: dict[tuple[int, int], float] = {}
    for t in transfers:
        key = (t.src, t.dst)
        sizes[key] = sizes.get(key, 0.0) + t.nbytes
    return [_Message(s, d, n) for (s, d), n in sizes.items()]


def simulate_collective(
    cluster,
    op: str,
    nbytes: float,
    *,
    algorithm: str,
    ranks: Sequence[int] | None = None,
    root: int = 0,
    model: CollectiveModel = "auto",
) -> float:
    """Seconds one collective of ``nbytes`` takes on an idle ``cluster``.

    ``ranks`` are the global ranks of the group (default: every rank); all of
    them issue the collective at time zero. The result is when the last member
    finishes.
    """
    from simulator.cluster import Cluster
    from simulator.units import parse_bytes

    if not isinstance(cluster, Cluster):
        raise ValueError(f"cluster must be a Cluster (e.g. Cluster.homogeneous(...)), got {type(cluster).__name__}")
    nbytes = parse_bytes(nbytes, "nbytes")  # a number of bytes, or a string like "256MB"
    if ranks is not None and (isinstance(ranks, str) or not hasattr(ranks, "__iter__")):
        raise ValueError(f"ranks must be a sequence of ranks, got {ranks!r}")
    group = tuple(range(cluster.world_size)) if ranks is None else tuple(ranks)
    if not group:
        raise ValueError("ranks must name at least one rank")
    bad = [r for r in group if not 0 <= r < cluster.world_size]
    if bad or len(set(group)) != len(group):
        raise ValueError(
            f"ranks must be distinct ranks in [0, {cluster.world_size}), got {list(group)[:16]}"
        )
    env = simpy.Environment()
    network = Network.for_links(env, cluster.links, record_busy=False)
    runner = CollectiveRunner(env, network, cluster, model=model)
    finish = [None] * len(group)

    def done(i):
        finish[i] = env.now

    runner.start(op, algorithm, group, nbytes, root=root, on_rank_done=done)
    env.run()
    assert all(t is not None for t in finish), "collective did not complete"
    return max(finish)
