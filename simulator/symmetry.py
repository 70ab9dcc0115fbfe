"""Representative ranks: simulate one rank per class of interchangeable ranks.

GPT-3 on 1024 GPUs with tp 8, pp 8 and dp 16 runs eight different programs,
one per pipeline stage; the other 1016 ranks do exactly what one of those
eight does, at the same instants, on links that carry exactly the same
traffic. Simulating them adds nothing but time.

A *symmetry* here is a permutation of the ranks that maps the cluster onto
itself (devices, links, routes) and every rank's program onto the program of
the rank it is mapped to. Strategies say which permutations their programs
respect (``strategy.symmetries(job)``: a data-parallel replica shift, a
tensor-parallel shift, or ``"any"`` when every rank runs the same program);
this module keeps those that are also automorphisms of the cluster and
generate a group Γ that acts *freely* on ranks and on links (no element but
the identity fixes a rank or a link). Then:

* each rank orbit has ``|Γ|`` ranks; its lowest rank is its *representative*
  and the only one simulated;
* each link orbit has ``|Γ|`` links; flows run on the orbit's representative
  link, which in the full simulation carries the same flows' images (a flow
  from a representative crosses each link orbit at most once, checked);
* a collective on a group ``G`` runs among the group's representatives when
  ``G`` is the union of its representatives' orbits under the generators
  that map ``G`` onto itself (``H``), and its schedule is invariant under
  ``H``; its closed-form bundles are projected onto representative links
  (each link orbit crossed ``|H|`` times with equal bytes, checked);
* a message to a rank that is not simulated goes to that rank's
  representative, from the sender's image as that representative sees it.

Anything that breaks these rules raises :class:`Asymmetric`, naming the
generators to drop; the executor then tries again with fewer of them, and
with none simulates every rank.
"""

from __future__ import annotations

import math

import numpy as np


class Asymmetric(Exception):
    """A run met something the representatives cannot stand for."""

    def __init__(self, reason: str, drop: tuple[int, ...]):
        super().__init__(reason, drop)  # both in args: SimPy rebuilds an exception from them
        self.reason = reason
        self.drop = drop
        """Indices of the generators whose symmetry does not hold; all of them if empty."""


def node_shift(cluster, nodes: int) -> np.ndarray:
    """Ranks moved ``nodes`` nodes on (mod the cluster): rank ``r`` -> ``r + nodes * gpus_per_node``."""
    w = cluster.num_gpus
    return (np.arange(w) + nodes * cluster.gpus_per_node) % w


def local_shift(cluster, size: int | None = None) -> np.ndarray:
    """Ranks moved one GPU on within blocks of ``size`` GPUs of a node (default: the whole node)."""
    g = cluster.gpus_per_node
    size = g if size is None else size
    r = np.arange(cluster.num_gpus)
    block = r - r % size
    return block + (r % size + 1) % size


def cluster_candidates(cluster) -> list[np.ndarray]:
    """Symmetries of a cluster whose ranks all run the same program: whole nodes shifted
    (by a leaf's nodes on a leaf-spine fabric, so leaves map to leaves) and GPUs shifted
    within a node."""
    from simulator.cluster import LeafSpine

    topo = cluster.topology
    step = topo.nodes_per_leaf if isinstance(topo, LeafSpine) else 1
    gens = []
    if cluster.nodes > step and cluster.nodes % step == 0:
        gens.append(node_shift(cluster, step))
    if cluster.gpus_per_node > 1:
        gens.append(local_shift(cluster))
    return gens


def link_permutation(cluster, perm: np.ndarray, kinds: np.ndarray | None = None) -> np.ndarray | None:
    """The link permutation that rank permutation ``perm`` induces, or None when ``perm``
    is not an automorphism of ``cluster`` (nodes onto nodes, NICs onto NICs, leaves onto
    leaves with the same spine for every NIC, equal devices and link specs)."""
    from simulator.cluster import LeafSpine

    if cluster.hosts:
        return None
    g = cluster._graph
    gpn, nodes, nics = cluster.gpus_per_node, cluster.nodes, cluster.nics_per_node
    w = cluster.num_gpus
    perm = np.asarray(perm)
    if perm.shape != (w,) or not np.array_equal(np.sort(perm), np.arange(w)):
        return None
    if cluster.devices is not None and any(cluster.devices[r] != cluster.devices[perm[r]] for r in range(w)):
        return None
    r = np.arange(w)
    node, local = r // gpn, r % gpn
    pnode, plocal = perm // gpn, perm % gpn
    nm = pnode.reshape(nodes, gpn)
    if not (nm == nm[:, :1]).all():
        return None  # a node's GPUs land on different nodes
    links = cluster.links
    out = np.full(len(links), -1, dtype=np.int64)

    def put(src, dst) -> bool:
        src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
        old = out[src]
        if ((old != -1) & (old != dst)).any():
            return False
        out[src] = dst
        # one link may be listed many times with one image: a later check catches two images
        return bool((out[src] == dst).all())

    if g.gpu_up:
        up, down = np.asarray(g.gpu_up), np.asarray(g.gpu_down)
        if not (put(up[r], up[perm]) and put(down[r], down[perm])):
            return None
    nic_up, nic_down = np.asarray(g.nic_up[:nodes]), np.asarray(g.nic_down[:nodes])
    k, pk = local % nics, plocal % nics
    if not (put(nic_up[node, k], nic_up[pnode, pk]) and put(nic_down[node, k], nic_down[pnode, pk])):
        return None
    topo = cluster.topology
    if isinstance(topo, LeafSpine):
        npl, spines = topo.nodes_per_leaf, topo.spines
        spine = ((node % npl) * nics + k) % spines
        pspine = ((pnode % npl) * nics + pk) % spines
        if not (spine == pspine).all():
            return None
        leaf, pleaf = node // npl, pnode // npl
        lm = np.full(-(-cluster.total_nodes // npl), -1)
        for a, b in zip(leaf.tolist(), pleaf.tolist(), strict=True):
            if lm[a] not in (-1, b):
                return None
            lm[a] = b
        lu, ld = np.asarray(g.leaf_up), np.asarray(g.leaf_down)
        for a, b in enumerate(lm.tolist()):
            if b < 0:
                continue
            for sp in range(spines):
                if not (put([lu[a * spines + sp]], [lu[b * spines + sp]])
                        and put([ld[a * spines + sp]], [ld[b * spines + sp]])):
                    return None
    unset = out == -1
    out[unset] = np.nonzero(unset)[0]
    if not np.array_equal(np.sort(out), np.arange(len(links))):
        return None
    kinds = link_kinds(links) if kinds is None else kinds
    if not np.array_equal(kinds[out], kinds):
        return None
    return out


def link_kinds(links) -> np.ndarray:
    """A number per link, equal for links of equal bandwidth, latency, window and bucket."""
    specs = {}
    return np.array([specs.setdefault((lk.bandwidth, lk.latency, lk.window, lk.burst, lk.burst_bandwidth), len(specs))
                     for lk in links])


def _orbits(gens: list[np.ndarray], n: int) -> tuple[np.ndarray, list[int]] | None:
    """(lowest element of each element's orbit, each generator's order), or None if the
    generators do not commute or do not act freely on ``range(n)`` as a direct product."""
    for a in range(len(gens)):
        for b in range(a + 1, len(gens)):
            if not np.array_equal(gens[a][gens[b]], gens[b][gens[a]]):
                return None
    orders = []
    label = np.arange(n)
    for gen in gens:
        order = _cycle_length(gen)
        if order is None:
            return None
        orders.append(order)
    # union of orbits: propagate the lowest label until stable
    while True:
        new = label.copy()
        for gen in gens:
            new = np.minimum(new, new[gen])
            inv = np.empty_like(gen)
            inv[gen] = np.arange(n)
            new = np.minimum(new, new[inv])
        new = new[new]
        if np.array_equal(new, label):
            break
        label = new
    size = math.prod(orders)
    counts = np.bincount(label, minlength=n)
    if not (counts[counts > 0] == size).all():
        return None
    return label, orders


def _cycle_length(gen: np.ndarray) -> int | None:
    """The length every cycle of permutation ``gen`` has, or None if they differ (then some
    power of ``gen`` fixes one element and moves another: not a free action)."""
    seen = np.zeros(len(gen), dtype=bool)
    step = gen.tolist()
    length = None
    for start in range(len(gen)):
        if seen[start]:
            continue
        k, x = 0, start
        while not seen[x]:
            seen[x] = True
            x = step[x]
            k += 1
        if length is None:
            length = k
        elif k != length:
            return None
    return length


class Symmetry:
    """A free abelian group of rank and link permutations and its representatives."""

    def __init__(self, gens: list[np.ndarray], link_gens: list[np.ndarray], ranks: np.ndarray, links: np.ndarray,
                 orders: list[int]):
        self.gens = gens
        self.link_gens = link_gens
        self.rep = ranks
        """``rep[r]``: the representative of rank ``r``'s orbit (its lowest rank)."""
        self.link_rep = links
        self.orders = orders
        self.order = math.prod(orders)
        self.is_rep = ranks == np.arange(len(ranks))
        self.simulated = np.nonzero(self.is_rep)[0].tolist()
        # exps[r]: exponents e with r = g_0^e0 g_1^e1 ... (rep[r])
        exps = np.zeros((len(ranks), len(gens)), dtype=np.int64)

        def walk(i: int, cur: np.ndarray, index: tuple[int, ...]) -> None:
            if i == len(gens):
                exps[cur] = index
                return
            for e in range(orders[i]):
                walk(i + 1, cur, (*index, e))
                cur = gens[i][cur]

        walk(0, np.array(self.simulated), ())
        self._exps = exps
        self._views: dict[int, tuple] = {}

    @classmethod
    def find(cls, cluster, gens: list[np.ndarray], kinds: np.ndarray | None = None) -> Symmetry | None:
        """The group generated by ``gens`` where every generator is a cluster automorphism and
        the group acts freely on ranks and links; None otherwise. ``kinds``: the cluster's
        :func:`link_kinds`, if already known."""
        if not gens:
            return None
        link_gens = []
        kinds = link_kinds(cluster.links) if kinds is None else kinds
        for gen in gens:
            lp = link_permutation(cluster, gen, kinds)
            if lp is None:
                return None
            link_gens.append(lp)
        ranks = _orbits(gens, cluster.num_gpus)
        links = _orbits(link_gens, len(cluster.links))
        if ranks is None or links is None or ranks[1] != links[1]:
            return None
        return cls(gens, link_gens, ranks[0], links[0], ranks[1])

    def _power(self, i: int, e: int) -> np.ndarray:
        cache = self.__dict__.setdefault("_powers", {})
        key = (i, e % self.orders[i])
        hit = cache.get(key)
        if hit is None:
            gen, e = self.gens[i], key[1]
            hit = np.arange(len(gen))
            base = gen
            while e:
                if e & 1:
                    hit = base[hit]
                base = base[base]
                e >>= 1
            cache[key] = hit
        return hit

    def orbit(self, rep: int) -> np.ndarray:
        """The ranks ``rep`` stands for, itself first."""
        members = self.__dict__.setdefault("_members", None)
        if members is None:
            order = np.argsort(self.rep, kind="stable")
            members = self._members = {}
            bounds = np.flatnonzero(np.diff(self.rep[order])) + 1
            for chunk in np.split(order, bounds):
                members[int(chunk[0])] = chunk
        return members[rep]

    def seen_from(self, x: int, r: int) -> int:
        """Rank ``x`` as ``rep(r)`` sees it: the image of ``x`` under the element that maps
        ``r`` to its representative."""
        cur = x
        for i, e in enumerate(self._exps[r]):
            if e:
                cur = int(self._power(i, -int(e))[cur])
        return cur

    def path(self, route) -> tuple[int, ...]:
        """A route from a representative on representative links; each link orbit once."""
        reps = tuple(int(self.link_rep[i]) for i in route)
        if len(set(reps)) != len(reps):
            raise Asymmetric("a route crosses two links of one orbit", ())
        return reps

    def group_view(self, gid: int, group: tuple[int, ...]):
        """(local indices of the group's representatives, local index permutations of the
        generators that map the group onto itself), cached by ``gid``."""
        hit = self._views.get(gid)
        if hit is None:
            hit = self._views[gid] = self._view(group)
        return hit

    def _view(self, group):
        g = np.asarray(group)
        pos = np.full(len(self.rep), -1)
        pos[g] = np.arange(len(g))
        stable, perms = [], []
        for i, gen in enumerate(self.gens):
            image = pos[gen[g]]
            if (image >= 0).all():
                stable.append(i)
                perms.append(image)
        size = math.prod(self.orders[i] for i in stable)
        reps = np.unique(self.rep[g])
        if len(reps) * size != len(g) or (pos[reps] < 0).any():
            moved = tuple(i for i in range(len(self.gens)) if i not in stable)
            raise Asymmetric(f"a group of {len(g)} ranks is not a union of its representatives' orbits", moved)
        local = tuple(int(i) for i in np.sort(pos[reps]))
        return local, tuple(stable), tuple(perms)

    def project(self, bundles, view) -> tuple:
        """Closed-form bundles of a whole group moved onto representative links."""
        from simulator.collectives import _Bundle

        _, stable, _ = view
        size = math.prod(self.orders[i] for i in stable)
        out = []
        n = len(self.link_rep)
        for b in bundles:
            path = np.asarray(b.path, dtype=np.int64)
            loads = np.asarray(b.link_bytes, dtype=float)
            if len(np.unique(path)) != len(path):
                raise Asymmetric("a bundle lists a link twice", stable)
            carried = np.full(n, np.nan)
            carried[path] = loads
            # each generator that keeps the group must map the loaded links onto loaded links, bytes and all
            uneven = tuple(i for i in stable if not np.array_equal(carried[self.link_gens[i][path]], loads))
            if uneven:
                raise Asymmetric("a collective loads the links of one orbit unevenly", uneven)
            reps, first, count = np.unique(self.link_rep[path], return_index=True, return_counts=True)
            if (count != size).any():
                raise Asymmetric("a collective crosses a link orbit other than once per image", stable)
            order = np.sort(first)  # keep the path's order
            out.append(_Bundle(tuple(int(x) for x in self.link_rep[path[order]]), tuple(float(x) for x in loads[order]),
                               b.nbytes, b.latency, b.steps))
        return tuple(out)

    @staticmethod
    def check_phases(sched, view) -> None:
        """Every phase of the schedule maps onto itself under the group's stabilising generators."""
        _, stable, perms = view
        phases = sched.phases()
        if phases is None:
            raise Asymmetric("a collective without phases", stable)
        broken = set()
        for ph in phases:
            pairs = np.asarray(ph.pairs)
            p = len(perms[0]) if perms else 0
            key = np.sort(pairs[:, 0] * p + pairs[:, 1])
            for i, perm in zip(stable, perms, strict=True):
                if not np.array_equal(np.sort(perm[pairs[:, 0]] * p + perm[pairs[:, 1]]), key):
                    broken.add(i)
        if broken:
            raise Asymmetric(f"the {sched.algorithm} schedule of {sched.op} is not symmetric", tuple(sorted(broken)))


def candidates(exp, kinds: np.ndarray | None = None) -> tuple[list[np.ndarray], str]:
    """The symmetries to try for ``exp``, and why there are none when there are none
    (``kinds``: the cluster's :func:`link_kinds`, if already known)."""
    if exp.fidelity == "full":
        return [], "fidelity='full' simulates every rank"
    cluster = exp.run_cluster
    strategy = exp.strategy
    offer = getattr(strategy, "symmetries", None)
    if cluster.hosts:
        return [], "host processes (servers) run programs of their own"
    if not callable(offer):
        return [], f"{type(strategy).__name__} does not declare interchangeable ranks"
    cm = exp.compute
    if cm.distribution == "exponential" or (cm.distribution != "deterministic" and cm.noise_cv > 0):
        return [], "compute noise draws differ per rank"
    if cm.stragglers or cm.slowdowns:
        return [], "stragglers or slowdowns make ranks differ"
    if cm.shared_cores:
        return [], "ranks share host cores"
    if exp.eager_limit is not None:
        return [], "rendezvous messages (eager_limit) wait on their receivers"
    if len(set(exp.batch_sizes)) > 1:
        return [], "ranks have different batch sizes"
    if cluster.world_size < 2:
        return [], "one rank"
    offered = offer(exp.job())
    gens = cluster_candidates(cluster) if offered == "any" else [np.asarray(g) for g in offered]
    kinds = link_kinds(cluster.links) if kinds is None else kinds
    gens = [h for h in (_cluster_power(cluster, g, kinds) for g in gens) if h is not None]
    if not gens:
        return [], "no symmetry of the strategy's ranks is one of the cluster"
    return gens, ""


def _cluster_power(cluster, gen: np.ndarray, kinds: np.ndarray) -> np.ndarray | None:
    """The lowest power of ``gen`` that is an automorphism of the cluster (a replica shift
    that moves half a node, taken twice, moves a whole node), or None."""
    cur = gen
    for _ in range(len(gen)):
        if np.array_equal(cur, np.arange(len(gen))):
            return None
        if link_permutation(cluster, cur, kinds) is not None:
            return cur
        cur = gen[cur]
    return None


def stand_in(sim, sym: Symmetry) -> None:
    """Every rank's records from its representative's, in place on the finished simulation
    ``sim``: the iterations, bytes sent and the links' bytes and busy time (the timeline keeps
    the representatives' spans, and ``sim.stands_for`` says how many ranks each stands for)."""
    import pandas as pd

    from simulator.results import ITERATION_COLUMNS

    rows = pd.DataFrame(sim.iteration_rows, columns=ITERATION_COLUMNS)
    members = [sym.orbit(r) for r in rows["rank"].tolist()]
    counts = np.array([len(m) for m in members], dtype=np.int64)
    full = rows.loc[rows.index.repeat(counts)].reset_index(drop=True)
    full["rank"] = np.concatenate(members) if members else np.empty(0, dtype=np.int64)
    # Samples count once per tensor-parallel group, on its first rank (strategies.ops.counted_samples),
    # which the tensor-parallel shift moves: an image counts them only if it is a first rank too.
    group_of = getattr(sim.exp.strategy, "tensor_group", None)
    if callable(group_of):
        first = np.zeros(sim.world, dtype=bool)
        grouped = np.zeros(sim.world, dtype=bool)
        for r in range(sim.job.accelerators):  # one call per group, not per rank
            if not grouped[r]:
                group = group_of(sim.job, r)
                grouped[list(group)] = True
                first[group[0]] = True
        full.loc[~first[full["rank"].to_numpy()], "samples"] = 0
    sim.iteration_rows = full
    sim.bytes_sent = np.asarray(sim.bytes_sent)[sym.rep].tolist()
    net = sim.network
    net.bytes = np.asarray(net.bytes)[sym.link_rep].tolist()
    net.busy_time = np.asarray(net.busy_time)[sym.link_rep].tolist()
    sim.stands_for = {r: len(sym.orbit(r)) for r in sym.simulated}
