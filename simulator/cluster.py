"""Cluster: nodes of GPUs, their links, the fabric between them, and routes.

A :class:`Cluster` has ``nodes`` nodes of ``gpus_per_node`` GPUs (rank ``r``
lives on node ``r // gpus_per_node`` as local GPU ``r % gpus_per_node``). It
expands into a graph of *directed* links (:class:`Link`, full duplex means one
link per direction) that the flow-level network model shares max-min fairly,
and it answers ``route(src, dst)``: the link ids a transfer from rank ``src``
to rank ``dst`` crosses.

Routing rules
-------------
Each modelled link carries part of a hop's latency so that latencies add up to
the catalogue figures:

* Same node, ``intra_kind="nvlink"``: ``gpu_src.nvl_up -> gpu_dst.nvl_down``.
  Every GPU has its own up and down link into an NVSwitch (non-blocking), each
  with ``intra.bandwidth`` and ``intra.latency / 2``. Total latency is
  ``intra.latency``, bottleneck ``intra.bandwidth``. (Built only when a node
  has more than one GPU.)
* Same node, ``intra_kind="pcie"``: ``gpu_src.pcie_up -> gpu_dst.pcie_down``,
  the same split.
* Different nodes: ``[gpu_src.pcie_up] -> nic_src.up -> (fabric) -> nic_dst.down
  -> [gpu_dst.pcie_down]``. Local GPU ``g`` uses NIC ``g % nics_per_node``.
  NIC links carry ``inter.bandwidth`` and ``inter.latency / 2`` each, so two
  single-GPU nodes on a :class:`SingleSwitch` see exactly ``inter.latency`` and
  ``inter.bandwidth``. With PCIe the GPU's own PCIe link is also its path to
  the NIC, so inter-node traffic shares it with intra-node traffic and the path
  latency is ``inter.latency + intra.latency``. With NVLink the GPU reaches its
  NIC (GPUDirect RDMA through a PCIe switch) without a modelled link.
* :class:`SingleSwitch`: one non-blocking switch joins all NICs; it adds no link.
* :class:`LeafSpine`: nodes ``[l * nodes_per_leaf, (l + 1) * nodes_per_leaf)``
  hang off leaf ``l``. Same-leaf traffic goes ``nic up -> nic down``. Cross-leaf
  traffic adds ``leaf{a}->spine{s}`` and ``spine{s}->leaf{b}``, each with
  ``hop_latency`` (the two extra switches traversed), so the path latency is
  ``inter.latency + 2 * hop_latency``. Each leaf has uplink capacity
  ``nodes_per_leaf * nics_per_node * inter.bandwidth / oversubscription`` per
  direction, split evenly over ``spines`` links (a last, partly filled leaf
  has the same switch and uplinks). The spine is the source NIC's slot in its
  leaf modulo ``spines``: static, deterministic routing in which a leaf's NICs
  spread over its uplinks, so permutation traffic does not collide on them.

Host processes
--------------
``hosts`` adds CPU processes with ranks of their own after the GPU ranks
(rank ``nodes * gpus_per_node + j`` is ``hosts[j]``): parameter servers, for
instance. A host on a GPU node (``node < nodes``) shares that node's NICs
(NIC ``(gpus_per_node + j') % nics_per_node`` for the node's ``j'``-th host);
a host on node ``nodes + d`` lives on a *dedicated* node of its own, with one
NIC of ``inter`` into the same fabric (dedicated nodes are numbered after the
GPU nodes and hang off the leaves in that order). Within a node a host is
reached through its own ``host_up``/``host_down`` links (``host_link``, PCIe to
host memory by default); with ``intra_kind="pcie"`` a GPU's own PCIe link is on
that path too. A host's traffic to other nodes goes straight to its NIC (DMA
from host memory, no modelled link).

Path latencies are summed with ``math.fsum``, so a sum of halves is the exact,
correctly rounded sum of the catalogue latencies.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from simulator import units
from simulator.hardware import Device, LinkSpec, _device_for, _link_for

__all__ = ["Link", "SingleSwitch", "LeafSpine", "Host", "Cluster", "INTRA_KINDS"]

INTRA_KINDS: tuple[str, ...] = ("nvlink", "pcie")


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{field} must be >= 1, got {value!r}")
    return int(value)


@dataclass(frozen=True, kw_only=True, slots=True)
class Link:
    """One directed link instance in the network graph; its id is its index in ``Cluster.links``."""

    name: str
    """E.g. ``"node3.nic0.up"``, ``"leaf1->spine0"``."""
    bandwidth: float
    """Bytes/s."""
    latency: float
    """Seconds this link adds to a path's latency."""
    window: float = 0.0
    """Flow window in bytes (:attr:`LinkSpec.flow_window`)."""
    burst: float = 0.0
    """Token bucket in bytes (:attr:`LinkSpec.burst`)."""
    burst_bandwidth: float = 0.0
    """Bytes/s while the bucket holds tokens (:attr:`LinkSpec.burst_bandwidth`)."""


@dataclass(frozen=True, kw_only=True)
class SingleSwitch:
    """One non-blocking switch joining every NIC."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "single_switch"}


@dataclass(frozen=True, kw_only=True)
class LeafSpine:
    """Two-level leaf-spine (folded Clos) fabric with optional oversubscription."""

    nodes_per_leaf: int
    """Nodes attached to each leaf switch."""
    oversubscription: float = 1.0
    """Leaf downlink capacity / uplink capacity, >= 1 (1 = non-blocking)."""
    spines: int = 1
    """Spine switches, one uplink per leaf to each. The default, one aggregate
    spine, is perfect load balancing over a leaf's uplinks; more spines model
    ECMP hash collisions."""
    hop_latency: float = 0.5e-6
    """Seconds per extra switch traversed (cut-through Ethernet switches are
    ~0.3-0.8 us port to port, InfiniBand ~0.1-0.2 us, plus cable flight time)."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "nodes_per_leaf", _positive_int(self.nodes_per_leaf, "LeafSpine.nodes_per_leaf")
        )
        o = self.oversubscription
        if isinstance(o, bool) or not isinstance(o, numbers.Real) or not 1 <= o < math.inf:
            raise ValueError(f"LeafSpine.oversubscription must be a finite number >= 1, got {o!r}")
        object.__setattr__(self, "oversubscription", float(o))
        object.__setattr__(self, "spines", _positive_int(self.spines, "LeafSpine.spines"))
        object.__setattr__(
            self, "hop_latency", units.parse_time(self.hop_latency, "LeafSpine.hop_latency")
        )

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "leaf_spine", **dataclasses.asdict(self)}


Topology = SingleSwitch | LeafSpine


@dataclass(frozen=True, kw_only=True)
class Host:
    """A CPU process with a rank of its own (e.g. a parameter server).

    ``node < Cluster.nodes`` puts it on a GPU node, sharing that node's NICs;
    ``node >= Cluster.nodes`` puts it on a dedicated node of its own.
    """

    node: int
    device: Device = "cpu-socket"  # type: ignore[assignment]  # normalised to a Device

    def __post_init__(self) -> None:
        node = self.node
        if isinstance(node, bool) or not isinstance(node, numbers.Integral) or node < 0:
            raise ValueError(f"Host.node must be an integer >= 0, got {node!r}")
        object.__setattr__(self, "node", int(node))
        object.__setattr__(self, "device", _device_for(self.device, "Host.device"))

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "device": self.device.to_dict()}


def _host(spec: Any, field: str) -> Host:
    if isinstance(spec, Host):
        return spec
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"node", "device"})
        if unknown or "node" not in spec:
            raise ValueError(f"{field} must be a table with node (and optional device), got {dict(spec)!r}")
        return Host(**spec)
    raise ValueError(f"{field} must be a Host or a table with node and device, got {spec!r}")


def _topology(spec: Any) -> Topology:
    if isinstance(spec, (SingleSwitch, LeafSpine)):
        return spec
    if spec == "single_switch":
        return SingleSwitch()
    if isinstance(spec, Mapping) and spec.get("kind") in ("single_switch", "leaf_spine"):
        fields = {k: v for k, v in spec.items() if k != "kind"}
        cls = SingleSwitch if spec["kind"] == "single_switch" else LeafSpine
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(allowed))
        if unknown:
            raise ValueError(
                f"Cluster.topology: unknown field(s) {', '.join(unknown)} for {spec['kind']}; "
                f"allowed: {', '.join(allowed) or 'none'}"
            )
        try:
            return cls(**fields)
        except TypeError:
            required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
            raise ValueError(f"Cluster.topology: {spec['kind']} needs {', '.join(required)}; got {dict(fields)}") from None
    raise ValueError(
        f"Cluster.topology must be SingleSwitch(), LeafSpine(...) or a mapping with "
        f"kind 'single_switch' or 'leaf_spine', got {spec!r}"
    )


@dataclass(frozen=True)
class _Graph:
    links: tuple[Link, ...]
    gpu_up: tuple[int, ...]  # per rank; empty when there are no modelled intra links
    gpu_down: tuple[int, ...]
    nic_up: tuple[tuple[int, ...], ...]  # per node (dedicated host nodes included), per NIC
    nic_down: tuple[tuple[int, ...], ...]
    host_up: tuple[int, ...]  # per host
    host_down: tuple[int, ...]
    leaf_up: tuple[int, ...]  # per leaf * spines + spine
    leaf_down: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """Nodes of GPUs, the intra-node link, the NICs and the fabric."""

    nodes: int
    """Number of nodes, >= 1."""
    gpus_per_node: int
    """GPUs (ranks) per node, >= 1."""
    device: Device
    """Default device of every rank (name, mapping or Device)."""
    intra: LinkSpec
    """Intra-node GPU link kind (name, mapping or LinkSpec)."""
    intra_kind: Literal["nvlink", "pcie"]
    """``nvlink``: per-GPU links into an NVSwitch; ``pcie``: the GPU's PCIe link
    is also its path to the NIC, shared by intra- and inter-node traffic."""
    inter: LinkSpec
    """Per-NIC link into the fabric."""
    nics_per_node: int = 1
    """NICs per node; local GPU ``g`` uses NIC ``g % nics_per_node``."""
    topology: SingleSwitch | LeafSpine = SingleSwitch()
    """How the NICs are joined."""
    devices: tuple[Device, ...] | None = None
    """Optional per-GPU devices (heterogeneous clusters), length ``nodes * gpus_per_node``."""
    hosts: tuple[Host, ...] = ()
    """CPU processes with ranks after the GPUs' (see the module docstring)."""
    host_link: LinkSpec = "pcie4"  # type: ignore[assignment]  # normalised to a LinkSpec
    """Link between a host process and the GPUs of its node (each direction)."""

    def __post_init__(self) -> None:
        def s(name: str, value: Any) -> None:  # frozen: normalise once, at construction
            object.__setattr__(self, name, value)

        s("nodes", _positive_int(self.nodes, "Cluster.nodes"))
        s("gpus_per_node", _positive_int(self.gpus_per_node, "Cluster.gpus_per_node"))
        s("nics_per_node", _positive_int(self.nics_per_node, "Cluster.nics_per_node"))
        if self.nics_per_node > self.gpus_per_node:
            raise ValueError(
                f"Cluster.nics_per_node must be at most gpus_per_node={self.gpus_per_node} "
                f"(local GPU g uses NIC g % nics_per_node), got {self.nics_per_node}"
            )
        s("device", _device_for(self.device, "Cluster.device"))
        s("intra", _link_for(self.intra, "Cluster.intra"))
        s("inter", _link_for(self.inter, "Cluster.inter"))
        if self.intra_kind not in INTRA_KINDS:
            raise ValueError(
                f"Cluster.intra_kind must be one of {', '.join(INTRA_KINDS)}, got {self.intra_kind!r}"
            )
        s("topology", _topology(self.topology))
        if self.devices is not None:
            if isinstance(self.devices, (str, Mapping)) or not isinstance(self.devices, Sequence):
                raise ValueError(f"Cluster.devices must be a sequence of devices, got {self.devices!r}")
            if len(self.devices) != self.num_gpus:
                raise ValueError(
                    f"Cluster.devices must have one device per GPU (nodes x gpus_per_node = "
                    f"{self.num_gpus}), got {len(self.devices)}"
                )
            s("devices", tuple(_device_for(d, f"Cluster.devices[{i}]") for i, d in enumerate(self.devices)))
        if isinstance(self.hosts, (str, Mapping)) or not isinstance(self.hosts, Sequence):
            raise ValueError(f"Cluster.hosts must be a sequence of Host, got {self.hosts!r}")
        s("hosts", tuple(_host(h, f"Cluster.hosts[{i}]") for i, h in enumerate(self.hosts)))
        extra = sorted({h.node for h in self.hosts if h.node >= self.nodes})
        if extra != list(range(self.nodes, self.nodes + len(extra))):
            raise ValueError(
                f"Cluster.hosts: dedicated host nodes must be numbered {self.nodes}, {self.nodes + 1}, ... "
                f"without gaps (the GPU nodes are 0..{self.nodes - 1}), got nodes {extra}"
            )
        s("host_link", _link_for(self.host_link, "Cluster.host_link"))

    @classmethod
    def homogeneous(
        cls,
        *,
        nodes: int,
        gpus_per_node: int = 1,
        gpu: str | Device | Mapping[str, Any] = "A100-80GB",
        intra: str | LinkSpec | Mapping[str, Any] = "nvlink3",
        inter: str | LinkSpec | Mapping[str, Any] = "100GbE",
        topology: Topology | Mapping[str, Any] = SingleSwitch(),  # noqa: B008 (frozen, immutable)
        nics_per_node: int = 1,
        intra_kind: Literal["nvlink", "pcie"] | None = None,
        **overrides: Any,
    ) -> Cluster:
        """A cluster of identical nodes, from catalogue names or objects.

        ``overrides`` are field overrides prefixed by what they change:
        ``gpu_<Device field>``, ``intra_<LinkSpec field>``, ``inter_<LinkSpec
        field>``, e.g. ``inter_bandwidth="25Gbps"``, ``gpu_compute_efficiency=0.5``.
        ``intra_kind`` defaults to ``"pcie"`` when the intra link's name starts
        with "pcie", else ``"nvlink"``.
        """
        split: dict[str, dict[str, Any]] = {"gpu": {}, "intra": {}, "inter": {}}
        for key, value in overrides.items():
            prefix, _, name = key.partition("_")
            if prefix not in split or not name:
                raise ValueError(
                    f"Cluster.homogeneous: unknown argument {key!r}; overrides are "
                    f"gpu_<Device field>, intra_<LinkSpec field> or inter_<LinkSpec field>"
                )
            split[prefix][name] = value
        dev = _device_for(gpu, "Cluster.device", **split["gpu"])
        intra_spec = _link_for(intra, "Cluster.intra", **split["intra"])
        inter_spec = _link_for(inter, "Cluster.inter", **split["inter"])
        if intra_kind is None:
            intra_kind = "pcie" if intra_spec.name.lower().startswith("pcie") else "nvlink"
        return cls(nodes=nodes, gpus_per_node=gpus_per_node, device=dev, intra=intra_spec,
                   intra_kind=intra_kind, inter=inter_spec, nics_per_node=nics_per_node,
                   topology=topology)

    # ------------------------------------------------------------------ ranks

    @property
    def num_gpus(self) -> int:
        """GPU ranks, ``0 .. num_gpus - 1``; host ranks follow."""
        return self.nodes * self.gpus_per_node

    @property
    def world_size(self) -> int:
        """All ranks: GPUs, then hosts."""
        return self.nodes * self.gpus_per_node + len(self.hosts)

    @property
    def total_nodes(self) -> int:
        """GPU nodes plus dedicated host nodes."""
        return max([self.nodes] + [h.node + 1 for h in self.hosts])

    def is_host(self, rank: int) -> bool:
        return self._check_rank(rank) >= self.num_gpus

    def with_hosts(self, hosts: Sequence[Host]) -> Cluster:
        """This cluster with ``hosts`` (replacing any it had)."""
        return dataclasses.replace(self, hosts=tuple(hosts))

    def _check_rank(self, rank: Any, field: str = "rank") -> int:
        if type(rank) is int and 0 <= rank < self.world_size:
            return rank  # the common case, without the slow abstract-class check
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 0 <= rank < self.world_size:
            raise ValueError(f"{field} must be a rank in [0, {self.world_size}), got {rank!r}")
        return int(rank)

    def node_of(self, rank: int) -> int:
        rank = self._check_rank(rank)
        if rank >= self.num_gpus:
            return self.hosts[rank - self.num_gpus].node
        return rank // self.gpus_per_node

    def local_rank(self, rank: int) -> int:
        """Index of ``rank`` within its node (a node's hosts come after its GPUs)."""
        rank = self._check_rank(rank)
        if rank < self.num_gpus:
            return rank % self.gpus_per_node
        node = self.node_of(rank)
        return self.node_ranks(node).index(rank)

    def node_ranks(self, node: int) -> list[int]:
        """The ranks on ``node``: its GPUs, then its hosts."""
        total = self.total_nodes
        if isinstance(node, bool) or not isinstance(node, numbers.Integral) or not 0 <= node < total:
            raise ValueError(f"node must be in [0, {total}), got {node!r}")
        gpus = list(range(node * self.gpus_per_node, (node + 1) * self.gpus_per_node)) if node < self.nodes else []
        return gpus + [self.num_gpus + j for j, h in enumerate(self.hosts) if h.node == node]

    def device_of(self, rank: int) -> Device:
        rank = self._check_rank(rank)
        if rank >= self.num_gpus:
            return self.hosts[rank - self.num_gpus].device
        return self.device if self.devices is None else self.devices[rank]

    def _nic_of(self, rank: int) -> tuple[int, int]:
        """(node, NIC index within the node) that ``rank``'s inter-node traffic uses."""
        node = self.node_of(rank)
        if node >= self.nodes:
            return node, 0
        return node, self.local_rank(rank) % self.nics_per_node

    # ------------------------------------------------------------------ graph

    @cached_property
    def _graph(self) -> _Graph:
        links: list[Link] = []
        new, put = object.__new__, object.__setattr__

        def add(name: str, bandwidth: float, latency: float, spec: LinkSpec, shaped: bool = True) -> int:
            """A link of kind ``spec`` (its flow window; its token bucket if ``shaped``: a
            node's port, not a fabric link)."""
            # Link(...) field by field, without its keyword handling: a 16384-GPU cluster has 65536
            link = new(Link)
            put(link, "name", name)
            put(link, "bandwidth", bandwidth)
            put(link, "latency", latency)
            put(link, "window", spec.flow_window)
            put(link, "burst", spec.burst if shaped else 0.0)
            put(link, "burst_bandwidth", spec.burst_bandwidth if shaped else 0.0)
            links.append(link)
            return len(links) - 1

        # Halving is exact in binary floating point, so up + down == the catalogue latency.
        intra_bw, intra_half = self.intra.bandwidth, self.intra.latency / 2
        inter_bw, inter_half = self.inter.bandwidth, self.inter.latency / 2
        has_intra = self.intra_kind == "pcie" or self.gpus_per_node > 1
        tag = "nvl" if self.intra_kind == "nvlink" else "pcie"
        gpu_up, gpu_down, nic_up, nic_down = [], [], [], []
        host_up: list[int] = [-1] * len(self.hosts)
        host_down: list[int] = [-1] * len(self.hosts)
        host_bw, host_half = self.host_link.bandwidth, self.host_link.latency / 2
        for n in range(self.total_nodes):
            if n < self.nodes and has_intra:
                for g in range(self.gpus_per_node):
                    gpu_up.append(add(f"node{n}.gpu{g}.{tag}_up", intra_bw, intra_half, self.intra))
                    gpu_down.append(add(f"node{n}.gpu{g}.{tag}_down", intra_bw, intra_half, self.intra))
            for j, h in enumerate(self.hosts):
                if h.node == n:
                    host_up[j] = add(f"node{n}.host{j}.up", host_bw, host_half, self.host_link)
                    host_down[j] = add(f"node{n}.host{j}.down", host_bw, host_half, self.host_link)
            ups, downs = [], []
            for k in range(self.nics_per_node if n < self.nodes else 1):
                ups.append(add(f"node{n}.nic{k}.up", inter_bw, inter_half, self.inter))
                downs.append(add(f"node{n}.nic{k}.down", inter_bw, inter_half, self.inter))
            nic_up.append(tuple(ups))
            nic_down.append(tuple(downs))
        leaf_up, leaf_down = [], []
        topo = self.topology
        if isinstance(topo, LeafSpine):
            leaves = -(-self.total_nodes // topo.nodes_per_leaf)
            aggregate = topo.nodes_per_leaf * self.nics_per_node * inter_bw
            per_spine = aggregate / topo.oversubscription / topo.spines
            for leaf in range(leaves):
                for sp in range(topo.spines):
                    leaf_up.append(add(f"leaf{leaf}->spine{sp}", per_spine, topo.hop_latency, self.inter, shaped=False))
                    leaf_down.append(add(f"spine{sp}->leaf{leaf}", per_spine, topo.hop_latency, self.inter, shaped=False))
        return _Graph(tuple(links), tuple(gpu_up), tuple(gpu_down), tuple(nic_up),
                      tuple(nic_down), tuple(host_up), tuple(host_down), tuple(leaf_up), tuple(leaf_down))

    @property
    def links(self) -> tuple[Link, ...]:
        """Every directed link; a link's id is its index here. Built once."""
        return self._graph.links

    @cached_property
    def _link_ids(self) -> dict[str, int]:
        return {lk.name: i for i, lk in enumerate(self.links)}

    def link_id(self, name: str) -> int:
        """The id of the link called ``name`` (e.g. ``"node0.nic0.up"``)."""
        try:
            return self._link_ids[name]
        except KeyError:
            raise ValueError(f"no link named {name!r} in this cluster") from None

    @cached_property
    def _routes(self) -> dict[tuple[int, int], tuple[int, ...]]:
        return {}

    def route(self, src: int, dst: int) -> tuple[int, ...]:
        """Link ids from rank ``src`` to rank ``dst`` (``src != dst``), per the module rules."""
        key = (self._check_rank(src, "route src"), self._check_rank(dst, "route dst"))
        path = self._routes.get(key)
        if path is None:
            path = self._routes[key] = self._compute_route(*key)
        return path

    def _compute_route(self, src: int, dst: int) -> tuple[int, ...]:
        if src == dst:
            raise ValueError(f"route needs two different ranks, got src == dst == {src}")
        g = self._graph
        gpus = self.num_gpus
        pcie = self.intra_kind == "pcie"
        src_node, dst_node = self.node_of(src), self.node_of(dst)
        if src_node == dst_node:
            if src < gpus and dst < gpus:
                return (g.gpu_up[src], g.gpu_down[dst])
            path = []
            if src >= gpus:
                path.append(g.host_up[src - gpus])
            elif pcie:
                path.append(g.gpu_up[src])
            if dst >= gpus:
                path.append(g.host_down[dst - gpus])
            elif pcie:
                path.append(g.gpu_down[dst])
            return tuple(path)
        (_, src_k), (_, dst_k) = self._nic_of(src), self._nic_of(dst)
        path = [g.gpu_up[src]] if pcie and src < gpus else []
        path.append(g.nic_up[src_node][src_k])
        topo = self.topology
        if isinstance(topo, LeafSpine):
            src_leaf, dst_leaf = src_node // topo.nodes_per_leaf, dst_node // topo.nodes_per_leaf
            if src_leaf != dst_leaf:
                # The source NIC's slot in its leaf picks the spine: distinct NICs of a leaf use
                # distinct uplinks (a sum of ranks collided for every power-of-two partner).
                slot = (src_node % topo.nodes_per_leaf) * self.nics_per_node + src_k
                spine = slot % topo.spines
                path.append(g.leaf_up[src_leaf * topo.spines + spine])
                path.append(g.leaf_down[dst_leaf * topo.spines + spine])
        path.append(g.nic_down[dst_node][dst_k])
        if pcie and dst < gpus:
            path.append(g.gpu_down[dst])
        return tuple(path)

    def path_latency(self, src: int, dst: int) -> float:
        """Sum of link latencies on ``route(src, dst)``, seconds (exactly rounded)."""
        return math.fsum(self.links[i].latency for i in self.route(src, dst))

    def path_bandwidth(self, src: int, dst: int) -> float:
        """Bottleneck bandwidth of ``route(src, dst)``, bytes/s."""
        return min(self.links[i].bandwidth for i in self.route(src, dst))

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; ``Cluster.from_dict`` inverts it exactly."""
        return {
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "device": self.device.to_dict(),
            "intra": self.intra.to_dict(),
            "intra_kind": self.intra_kind,
            "inter": self.inter.to_dict(),
            "nics_per_node": self.nics_per_node,
            "topology": self.topology.to_dict(),
            "devices": None if self.devices is None else [d.to_dict() for d in self.devices],
            "hosts": [h.to_dict() for h in self.hosts],
            "host_link": self.host_link.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Cluster:
        if not isinstance(d, Mapping):
            raise ValueError(f"Cluster.from_dict expects a mapping, got {d!r}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"Cluster: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in d]
        if missing:
            raise ValueError(f"Cluster: missing field(s) {', '.join(missing)}")
        return cls(**d)
