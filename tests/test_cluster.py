"""Cluster: link graph, routes, latencies and bottlenecks, validation, JSON round trip."""

import json
import math
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.cluster import Cluster, Host, LeafSpine, SingleSwitch
from simulator.hardware import DEVICES, LINKS, device, link


def names(cluster, src, dst):
    return [cluster.links[i].name for i in cluster.route(src, dst)]


@pytest.mark.parametrize("inter", ["10GbE", "25GbE", "100GbE", "IB-EDR", "IB-HDR", "IB-NDR", "400GbE-RoCE"])
def test_single_switch_inter_node_path_is_exactly_the_nic_link(inter):
    c = Cluster.homogeneous(nodes=2, gpus_per_node=1, inter=inter)
    spec = LINKS[inter]
    assert names(c, 0, 1) == ["node0.nic0.up", "node1.nic0.down"]
    assert c.path_latency(0, 1) == spec.latency
    assert c.path_bandwidth(0, 1) == spec.bandwidth
    assert c.path_latency(1, 0) == spec.latency


def test_odd_latency_still_adds_up_exactly():
    c = Cluster.homogeneous(nodes=2, inter_latency=3.3e-6, intra="pcie3", intra_latency=1.7e-6)
    assert c.path_latency(0, 1) == 3.3e-6 + 1.7e-6


@pytest.mark.parametrize("intra", ["nvlink2", "nvlink3", "nvlink4"])
def test_nvlink_intra_node_path(intra):
    c = Cluster.homogeneous(nodes=2, gpus_per_node=8, intra=intra)
    assert c.intra_kind == "nvlink"
    assert names(c, 1, 6) == ["node0.gpu1.nvl_up", "node0.gpu6.nvl_down"]
    assert c.path_latency(1, 6) == LINKS[intra].latency
    assert c.path_bandwidth(1, 6) == LINKS[intra].bandwidth


def test_nvlink_inter_node_path_skips_gpu_links():
    c = Cluster.homogeneous(nodes=2, gpus_per_node=8, intra="nvlink3", inter="IB-HDR")
    assert names(c, 3, 12) == ["node0.nic0.up", "node1.nic0.down"]
    assert c.path_latency(3, 12) == LINKS["IB-HDR"].latency
    assert c.path_bandwidth(3, 12) == LINKS["IB-HDR"].bandwidth


def test_pcie_paths_share_the_gpu_link_and_add_its_latency():
    c = Cluster.homogeneous(nodes=2, gpus_per_node=4, intra="pcie4", inter="100GbE")
    assert c.intra_kind == "pcie"
    intra, inter = LINKS["pcie4"], LINKS["100GbE"]
    assert names(c, 0, 1) == ["node0.gpu0.pcie_up", "node0.gpu1.pcie_down"]
    assert c.path_latency(0, 1) == intra.latency
    assert c.path_bandwidth(0, 1) == intra.bandwidth
    assert names(c, 0, 5) == ["node0.gpu0.pcie_up", "node0.nic0.up", "node1.nic0.down", "node1.gpu1.pcie_down"]
    assert c.path_latency(0, 5) == inter.latency + intra.latency
    assert c.path_bandwidth(0, 5) == min(intra.bandwidth, inter.bandwidth)
    # the same physical link carries rank 0's intra- and inter-node traffic
    assert c.route(0, 1)[0] == c.route(0, 5)[0]


def test_pcie_single_gpu_nodes_still_cross_pcie():
    c = Cluster.homogeneous(nodes=2, intra="pcie3", inter="25GbE")
    assert c.path_latency(0, 1) == LINKS["25GbE"].latency + LINKS["pcie3"].latency


def test_single_gpu_nvlink_nodes_have_no_intra_links():
    c = Cluster.homogeneous(nodes=3)
    assert [lk.name for lk in c.links] == [
        f"node{n}.nic0.{d}" for n in range(3) for d in ("up", "down")
    ]


def test_multiple_nics():
    c = Cluster.homogeneous(nodes=2, gpus_per_node=8, nics_per_node=4)
    assert names(c, 5, 14) == ["node0.nic1.up", "node1.nic2.down"]
    assert names(c, 0, 8) == ["node0.nic0.up", "node1.nic0.down"]


def leaf_spine(**kw):
    topo = LeafSpine(nodes_per_leaf=kw.pop("nodes_per_leaf", 4), oversubscription=kw.pop("oversubscription", 1.0),
                     spines=kw.pop("spines", 1), hop_latency=kw.pop("hop_latency", 0.5e-6))
    return Cluster.homogeneous(topology=topo, **kw)


def test_leaf_spine_same_leaf_is_like_a_single_switch():
    c = leaf_spine(nodes=8, inter="IB-HDR")
    assert names(c, 0, 3) == ["node0.nic0.up", "node3.nic0.down"]
    assert c.path_latency(0, 3) == LINKS["IB-HDR"].latency
    assert c.path_bandwidth(0, 3) == LINKS["IB-HDR"].bandwidth


def test_leaf_spine_cross_leaf_adds_two_switch_hops():
    c = leaf_spine(nodes=8, inter="IB-HDR", hop_latency="300ns")
    assert names(c, 1, 6) == ["node1.nic0.up", "leaf0->spine0", "spine0->leaf1", "node6.nic0.down"]
    assert c.path_latency(1, 6) == LINKS["IB-HDR"].latency + 2 * 300e-9
    # non-blocking: the aggregate uplink is as wide as all of a leaf's NICs
    assert c.path_bandwidth(1, 6) == LINKS["IB-HDR"].bandwidth


@pytest.mark.parametrize("spines", [1, 2, 4])
def test_oversubscription_4_gives_a_quarter_of_the_leaf_nic_bandwidth(spines):
    c = leaf_spine(nodes=8, nodes_per_leaf=4, gpus_per_node=2, nics_per_node=2, oversubscription=4, spines=spines)
    nic_total = sum(lk.bandwidth for lk in c.links if lk.name.startswith(("node0.", "node1.", "node2.", "node3."))
                    and lk.name.endswith("up") and ".nic" in lk.name)
    up = [lk for lk in c.links if lk.name.startswith("leaf0->")]
    down = [lk for lk in c.links if lk.name.endswith("->leaf0")]
    assert len(up) == len(down) == spines
    assert sum(lk.bandwidth for lk in up) == nic_total / 4
    assert sum(lk.bandwidth for lk in down) == nic_total / 4
    assert nic_total == 4 * 2 * LINKS["100GbE"].bandwidth


def test_spine_choice_spreads_deterministically():
    # the source NIC's slot in its leaf picks the spine: a leaf's NICs use distinct uplinks
    c = leaf_spine(nodes=4, nodes_per_leaf=2, spines=2)
    assert names(c, 0, 2)[1:3] == ["leaf0->spine0", "spine0->leaf1"]
    assert names(c, 0, 3)[1:3] == ["leaf0->spine0", "spine0->leaf1"]
    assert names(c, 1, 2)[1:3] == ["leaf0->spine1", "spine1->leaf1"]
    assert names(c, 3, 0)[1:3] == ["leaf1->spine1", "spine1->leaf0"]


def test_partial_last_leaf():
    c = leaf_spine(nodes=5, nodes_per_leaf=2)
    assert names(c, 0, 4) == ["node0.nic0.up", "leaf0->spine0", "spine0->leaf2", "node4.nic0.down"]


@st.composite
def clusters(draw):
    nodes = draw(st.integers(1, 6))
    gpus = draw(st.integers(1, 4))
    if nodes * gpus < 2:
        gpus = 2
    topology = draw(st.one_of(
        st.just(SingleSwitch()),
        st.builds(LeafSpine, nodes_per_leaf=st.integers(1, 4), oversubscription=st.sampled_from([1, 2, 3.5, 4]),
                  spines=st.integers(1, 3), hop_latency=st.sampled_from([0.0, 1e-7, 5e-7]))))
    c = Cluster.homogeneous(nodes=nodes, gpus_per_node=gpus, intra=draw(st.sampled_from(["nvlink3", "pcie4"])),
                            inter=draw(st.sampled_from(["25GbE", "IB-NDR"])), nics_per_node=draw(st.integers(1, min(3, gpus))),
                            topology=topology)
    src, dst = draw(st.lists(st.integers(0, c.world_size - 1), min_size=2, max_size=2, unique=True))
    return c, src, dst


@settings(max_examples=200, deadline=None)
@given(clusters())
def test_routes_are_deterministic_simple_and_add_up(case):
    c, src, dst = case
    path = c.route(src, dst)
    assert path == c.route(src, dst)
    assert path == Cluster.from_dict(c.to_dict()).route(src, dst)  # fresh cache, same answer
    assert len(set(path)) == len(path)
    assert all(0 <= i < len(c.links) for i in path)
    intra, inter = c.intra, c.inter
    if c.node_of(src) == c.node_of(dst):
        assert c.path_latency(src, dst) == intra.latency
        assert c.path_bandwidth(src, dst) == intra.bandwidth
        return
    hops = 0
    if isinstance(c.topology, LeafSpine):
        per_leaf = c.topology.nodes_per_leaf
        hops = 2 if c.node_of(src) // per_leaf != c.node_of(dst) // per_leaf else 0
    expected = [inter.latency] + [intra.latency] * (c.intra_kind == "pcie")
    expected += [c.topology.hop_latency] * hops if hops else []
    assert c.path_latency(src, dst) == math.fsum(expected)  # exact: the halves add back up
    assert c.path_bandwidth(src, dst) <= inter.bandwidth


def test_heterogeneous_devices():
    devs = [DEVICES["A100-80GB"]] * 2 + ["V100", {"name": "H100", "compute_efficiency": 0.5}]
    c = Cluster(nodes=2, gpus_per_node=2, device="A100-80GB", intra="nvlink3", intra_kind="nvlink",
                inter="100GbE", devices=devs)
    assert c.device_of(0).name == "A100-80GB"
    assert c.device_of(2).name == "V100-32GB"
    assert c.device_of(3).compute_efficiency == 0.5
    assert Cluster.homogeneous(nodes=1, gpus_per_node=2).device_of(1) is DEVICES["A100-80GB"]


def test_ranks_and_nodes():
    c = Cluster.homogeneous(nodes=3, gpus_per_node=4)
    assert c.world_size == 12
    assert [c.node_of(r) for r in (0, 3, 4, 11)] == [0, 0, 1, 2]
    assert c.local_rank(6) == 2
    assert list(c.node_ranks(1)) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match=r"rank must be a rank in \[0, 12\), got 12"):
        c.node_of(12)
    with pytest.raises(ValueError, match="route needs two different ranks"):
        c.route(3, 3)
    with pytest.raises(ValueError, match="route dst must be a rank"):
        c.route(0, -1)
    assert c.links[c.link_id("node2.nic0.down")].name == "node2.nic0.down"


def test_homogeneous_overrides():
    c = Cluster.homogeneous(nodes=2, gpu="V100", inter="100GbE", inter_bandwidth="25Gbps",
                            gpu_mem_capacity="16GiB", intra_latency="2us", gpus_per_node=2)
    assert c.inter.bandwidth == 25e9 / 8 and c.inter.latency == LINKS["100GbE"].latency
    assert c.device.mem_capacity == 16 * 2**30
    assert c.intra.latency == 2e-6
    with pytest.raises(ValueError, match="unknown argument 'bandwidth'"):
        Cluster.homogeneous(nodes=2, bandwidth=1)
    with pytest.raises(ValueError, match="cannot override speed"):
        Cluster.homogeneous(nodes=2, inter_speed=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpus_per_node": 0}, r"^Cluster.gpus_per_node must be >= 1, got 0$"),
        ({"nodes": 0}, r"^Cluster.nodes must be >= 1, got 0$"),
        ({"nodes": 2.5}, r"^Cluster.nodes must be >= 1, got 2.5$"),
        ({"nics_per_node": 0}, "Cluster.nics_per_node must be >= 1"),
        ({"device": "Z100"}, r"^Cluster.device: unknown device 'Z100'; known devices: P100, "),
        ({"inter": "1GbE"}, r"^Cluster.inter: unknown link '1GbE'; known links: .*10GbE"),
        ({"intra": "nvlink9"}, r"^Cluster.intra: unknown link 'nvlink9'"),
        ({"intra_kind": "nvswitch"}, r"Cluster.intra_kind must be one of nvlink, pcie, got 'nvswitch'"),
        ({"devices": ["A100-80GB"] * 3}, "Cluster.devices must have one device per GPU .nodes x gpus_per_node = 4., got 3"),
        ({"topology": "torus"}, "Cluster.topology must be SingleSwitch"),
        ({"topology": {"kind": "leaf_spine", "nodes_per_leaf": 2, "depth": 3}}, "unknown field.s. depth"),
    ],
)
def test_cluster_validation(kwargs, message):
    base = dict(nodes=2, gpus_per_node=2, device="A100-80GB", intra="nvlink3", intra_kind="nvlink", inter="100GbE")
    with pytest.raises(ValueError, match=message):
        Cluster(**{**base, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes_per_leaf": 0}, "LeafSpine.nodes_per_leaf must be >= 1, got 0"),
        ({"nodes_per_leaf": 2, "oversubscription": 0.5}, "LeafSpine.oversubscription must be a finite number >= 1, got 0.5"),
        ({"nodes_per_leaf": 2, "spines": 0}, "LeafSpine.spines must be >= 1"),
        ({"nodes_per_leaf": 2, "hop_latency": "-1us"}, "LeafSpine.hop_latency: time must be >= 0"),
    ],
)
def test_leaf_spine_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LeafSpine(**kwargs)


def test_to_dict_from_dict_round_trip_through_json():
    topo = LeafSpine(nodes_per_leaf=2, oversubscription=3.0, spines=2, hop_latency="250ns")
    c = Cluster.homogeneous(nodes=4, gpus_per_node=2, gpu="H100", intra="pcie5", inter="400GbE-RoCE",
                            nics_per_node=2, topology=topo, gpu_compute_efficiency=0.55)
    d = json.loads(json.dumps(c.to_dict()))
    back = Cluster.from_dict(d)
    assert back == c
    assert back.links == c.links
    assert back.to_dict() == c.to_dict()
    hetero = Cluster(nodes=1, gpus_per_node=2, device="A100-80GB", intra="nvlink3", intra_kind="nvlink",
                     inter="100GbE", devices=[device("A100-80GB"), device("P100")])
    assert Cluster.from_dict(json.loads(json.dumps(hetero.to_dict()))) == hetero
    custom = Cluster(nodes=2, gpus_per_node=1, device={"name": "A100-80GB", "peak_flops": {"bf16": 1e12},
                                                      "mem_bandwidth": 1e12, "mem_capacity": 1e9},
                     intra="nvlink3", intra_kind="nvlink", inter=link("100GbE", name="my-nic"))
    back = Cluster.from_dict(json.loads(json.dumps(custom.to_dict())))
    assert back == custom and list(back.device.peak_flops) == ["bf16"]  # not merged with the catalogue
    with pytest.raises(ValueError, match="unknown field.s. racks"):
        Cluster.from_dict({**d, "racks": 2})
    with pytest.raises(ValueError, match="missing field.s. inter"):
        Cluster.from_dict({k: v for k, v in d.items() if k != "inter"})


def test_cluster_is_frozen_hashable_and_picklable():
    c = Cluster.homogeneous(nodes=2, gpus_per_node=2, topology=LeafSpine(nodes_per_leaf=1))
    c.route(0, 3)  # fill the caches
    assert hash(c) == hash(Cluster.from_dict(c.to_dict()))
    back = pickle.loads(pickle.dumps(c))
    assert back == c and back.route(0, 3) == c.route(0, 3)


def test_dedicated_host_nodes_have_one_nic_into_the_fabric():
    c = Cluster.homogeneous(nodes=2, gpus_per_node=2, intra="nvlink3", inter="25GbE").with_hosts(
        [Host(node=2), Host(node=3, device="cpu-core")])
    assert (c.world_size, c.num_gpus, c.total_nodes) == (6, 4, 4)
    assert [c.node_of(r) for r in range(6)] == [0, 0, 1, 1, 2, 3]
    assert c.device_of(4).name == "cpu-socket" and c.device_of(5).name == "cpu-core"
    assert c.is_host(4) and not c.is_host(3)
    names = [c.links[i].name for i in c.route(1, 4)]
    assert names == ["node0.nic0.up", "node2.nic0.down"]
    assert [c.links[i].name for i in c.route(5, 4)] == ["node3.nic0.up", "node2.nic0.down"]
    # Two single-NIC hops: exactly the catalogue latency and bandwidth.
    assert c.path_latency(1, 4) == LINKS["25GbE"].latency
    assert c.path_bandwidth(4, 0) == 25e9 / 8
    assert c.node_ranks(2) == [4]
    assert Cluster.from_dict(c.to_dict()) == c



def test_colocated_host_shares_its_nodes_nic_and_reaches_local_gpus_over_its_host_link():
    c = Cluster.homogeneous(nodes=2, gpus_per_node=2, nics_per_node=1, intra="nvlink3").with_hosts(
        [Host(node=0), Host(node=1)])
    assert c.node_ranks(0) == [0, 1, 4]
    assert c.local_rank(4) == 2
    assert [c.links[i].name for i in c.route(0, 4)] == ["node0.host0.down"]
    assert [c.links[i].name for i in c.route(4, 1)] == ["node0.host0.up"]
    assert c.path_bandwidth(0, 4) == c.host_link.bandwidth
    assert c.path_latency(0, 4) == c.host_link.latency / 2
    # Another node's GPU reaches the host through the node's NIC, like its GPUs do.
    assert [c.links[i].name for i in c.route(2, 4)] == ["node1.nic0.up", "node0.nic0.down"]
    assert [c.links[i].name for i in c.route(4, 5)] == ["node0.nic0.up", "node1.nic0.down"]
    pcie = Cluster.homogeneous(nodes=1, gpus_per_node=2, intra="pcie4").with_hosts([Host(node=0)])
    assert [pcie.links[i].name for i in pcie.route(1, 2)] == ["node0.gpu1.pcie_up", "node0.host0.down"]


def test_dedicated_host_nodes_must_follow_the_gpu_nodes():
    with pytest.raises(ValueError, match=r"dedicated host nodes must be numbered 2, 3, ... without gaps"):
        Cluster.homogeneous(nodes=2).with_hosts([Host(node=3)])
    with pytest.raises(ValueError, match=r"Host.node must be an integer >= 0, got -1"):
        Host(node=-1)


def test_leaf_spine_places_dedicated_nodes_on_the_next_leaves():
    c = Cluster.homogeneous(nodes=4, gpus_per_node=1, topology=LeafSpine(nodes_per_leaf=2)).with_hosts(
        [Host(node=4), Host(node=5)])
    names = [c.links[i].name for i in c.route(0, 4)]
    assert names == ["node0.nic0.up", "leaf0->spine0", "spine0->leaf2", "node4.nic0.down"]
