"""Simulated collectives against their closed forms (alpha-beta), stepped and fast."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.cluster import Cluster, LeafSpine
from simulator.collectives import simulate_collective
from simulator.hardware import LinkSpec

A = 5e-6  # latency, s
B = 12.5e9  # bandwidth, bytes/s
N = 256e6  # message, bytes


def flat(p, *, a=A, b=B, topology=None):
    """p single-GPU nodes on one non-blocking switch with NIC links (b, a)."""
    kw = {} if topology is None else {"topology": topology}
    return Cluster.homogeneous(nodes=p, gpus_per_node=1, inter=LinkSpec(name="net", bandwidth=b, latency=a), **kw)


def rel(x, y):
    return abs(x - y) / y


@pytest.mark.parametrize("model", ["auto", "stepped"])
@pytest.mark.parametrize("p", [2, 3, 4, 8, 16, 64])
def test_ring_all_reduce(p, model):
    expected = 2 * (p - 1) * A + 2 * (p - 1) / p * N / B
    t = simulate_collective(flat(p), "all_reduce", N, algorithm="ring", model=model)
    assert rel(t, expected) < 0.005


@pytest.mark.parametrize("model", ["auto", "stepped"])
@pytest.mark.parametrize("p", [2, 4, 8, 16, 64])
def test_halving_doubling_all_reduce_power_of_two(p, model):
    expected = 2 * math.log2(p) * A + 2 * (p - 1) / p * N / B
    t = simulate_collective(flat(p), "all_reduce", N, algorithm="halving_doubling", model=model)
    assert rel(t, expected) < 0.005


@pytest.mark.parametrize("model", ["auto", "stepped"])
@pytest.mark.parametrize("p", [2, 3, 4, 8, 16, 64])
def test_ring_all_gather(p, model):
    expected = (p - 1) * A + (p - 1) / p * N / B
    t = simulate_collective(flat(p), "all_gather", N, algorithm="ring", model=model)
    assert rel(t, expected) < 0.005


@pytest.mark.parametrize("p", [2, 5, 8, 13])
def test_ring_reduce_scatter(p):
    t = simulate_collective(flat(p), "reduce_scatter", N, algorithm="ring")
    assert rel(t, (p - 1) * (A + N / p / B)) < 1e-9


@pytest.mark.parametrize("p", [2, 4, 8, 16])
def test_binomial_broadcast_power_of_two(p):
    # the deepest chain forwards log2(p) times, each hop after the previous arrival
    t = simulate_collective(flat(p), "broadcast", N, algorithm="tree")
    assert rel(t, math.log2(p) * (A + N / B)) < 1e-9


def test_binomial_broadcast_of_five_senders_free_at_drain():
    # The root sends to 4, then 2, then 1; each send starts when the previous one has left
    # the root (N/B), not when it has arrived. Rank 2 (arrival 2N/B + a) forwards to 3:
    # arrival 3N/B + 2a; rank 1 gets the root's third send at 3N/B + a.
    t = simulate_collective(flat(5), "broadcast", N, algorithm="tree")
    assert rel(t, 3 * N / B + 2 * A) < 1e-9


@pytest.mark.parametrize("p", [2, 3, 8])
def test_chain_broadcast_pipelines_latency(p):
    """k chunks of c down a chain: the first chunk reaches the end after (p-1)(a + c/B);
    the root streams the rest back to back, one every c/B."""
    from strategies.collectives import schedule

    k = schedule("broadcast", "ring", p, N).nchunks
    c = N / k
    t = simulate_collective(flat(p), "broadcast", N, algorithm="ring")
    assert k > 100
    assert rel(t, (p - 1) * (A + c / B) + (k - 1) * c / B) < 1e-9


def test_non_power_of_two_halving_doubling_pays_the_fold():
    """p = 6 (T = N/B): ranks 0 and 2 fold their buffers into 1 and 3; 4 and 5 are not folded.

    0-T+A: 0->1 and 2->3 carry N. 4<->5 exchange N/2 at once and are ready at T/2+A, so
    they send their next N/4 to 1 and 3, sharing those down-links with the fold (B/2
    each) until T+A; the fold then finishes alone at 1.25T, arriving 1.25T+A. From there:
    1<->3 N/2 (arrive 1.75T+2A); 1->4 N/4 (1 free at 2T+2A, 4 has it at 2T+3A);
    all-gather 1<->4 N/4 (1 ready at 2.25T+4A); 1<->3 N/2 (2.75T+5A); 1->0 N: 3.75T+6A.
    """
    T = N / B
    t = simulate_collective(flat(6), "all_reduce", N, algorithm="halving_doubling")
    assert rel(t, 3.75 * T + 6 * A) < 1e-9


def test_one_rank_takes_no_time():
    assert simulate_collective(flat(1), "all_reduce", N, algorithm="ring") == 0.0


def test_oversubscribed_core_slows_cross_leaf_steps():
    """Halving-doubling on 2 leaves x 4 nodes with 4:1 oversubscription.

    Distances 1 and 2 stay inside a leaf. At distance 4 all four nodes of a leaf send
    across at once over an uplink of 4*B/4 = B, so each flow gets B/4, and the path
    crosses two more switches.
    """
    top = LeafSpine(nodes_per_leaf=4, oversubscription=4.0, hop_latency=1e-6)
    p = 8
    chunks = [N / 2, N / 4, N / 8, N / 8, N / 4, N / 2]  # reduce-scatter then all-gather
    crossing = [False, False, True, True, False, False]
    expected = sum(
        (A + 2 * top.hop_latency + 4 * c / B) if x else (A + c / B) for c, x in zip(chunks, crossing)
    )
    cluster = flat(p, topology=top)
    for model in ("auto", "stepped"):
        t = simulate_collective(cluster, "all_reduce", N, algorithm="halving_doubling", model=model)
        assert rel(t, expected) < 1e-9
    # A ring crosses each leaf boundary with one flow per step: no bandwidth loss. The
    # critical chain is 2(p-1) = 14 consecutive hops around the ring, at most 4 of which
    # cross leaves and pay 2 extra switch hops.
    ring = simulate_collective(cluster, "all_reduce", N, algorithm="ring")
    assert rel(ring, 2 * (p - 1) * (A + N / p / B) + 4 * 2 * top.hop_latency) < 1e-9


def test_ring_on_multi_gpu_nodes_is_nic_bound():
    # 4 nodes x 4 GPUs, NVLink inside, one NIC per node. A node's NIC sender needs each
    # chunk from its NVLink neighbour, which had it one step (c/B = 1.28 ms) earlier plus
    # a few microseconds of NVLink: it is never starved, sends its 2(p-1) chunks back to
    # back, and the last one arrives one NIC latency later.
    nv = LinkSpec(name="nv", bandwidth=300e9, latency=1e-6)
    net = LinkSpec(name="net", bandwidth=B, latency=A)
    cluster = Cluster.homogeneous(nodes=4, gpus_per_node=4, intra=nv, inter=net)
    p = 16
    expected = 2 * (p - 1) * N / p / B + A
    for model in ("auto", "stepped"):
        assert rel(simulate_collective(cluster, "all_reduce", N, algorithm="ring", model=model), expected) < 1e-9


def test_hierarchical_all_reduce_with_a_nic_per_gpu():
    # intra ring reduce-scatter (g-1 steps of N/g), inter ring all-reduce of the N/g shard
    # over n nodes (2(n-1) steps of N/(g n)), intra all-gather (g-1 steps of N/g).
    g, n = 4, 4
    a_nv, b_nv = 1e-6, 300e9
    cluster = Cluster.homogeneous(
        nodes=n, gpus_per_node=g, nics_per_node=g,
        intra=LinkSpec(name="nv", bandwidth=b_nv, latency=a_nv), inter=LinkSpec(name="net", bandwidth=B, latency=A),
    )
    expected = 2 * (g - 1) * (a_nv + N / g / b_nv) + 2 * (n - 1) * (A + N / (g * n) / B)
    for model in ("auto", "stepped"):
        t = simulate_collective(cluster, "all_reduce", N, algorithm="hierarchical", model=model)
        assert rel(t, expected) < 1e-9


@given(
    nodes=st.integers(1, 5),
    gpus=st.sampled_from([1, 2, 4]),
    nics=st.sampled_from([1, 2, 4]),
    op_alg=st.sampled_from([
        ("all_reduce", "ring"), ("all_reduce", "halving_doubling"), ("all_reduce", "tree"),
        ("all_reduce", "hierarchical"), ("all_reduce", "direct"), ("all_gather", "ring"),
        ("reduce_scatter", "halving_doubling"), ("broadcast", "ring"), ("all_to_all", "direct"),
    ]),
    nbytes=st.floats(1e3, 1e9),
    pcie=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_fast_path_equals_stepped(nodes, gpus, nics, op_alg, nbytes, pcie):
    cluster = Cluster.homogeneous(nodes=nodes, gpus_per_node=gpus, nics_per_node=min(nics, gpus),
                                  intra="pcie4" if pcie else "nvlink3", inter="25GbE")
    op, alg = op_alg
    fast = simulate_collective(cluster, op, nbytes, algorithm=alg)
    stepped = simulate_collective(cluster, op, nbytes, algorithm=alg, model="stepped")
    assert math.isclose(fast, stepped, rel_tol=1e-9)


def test_bad_arguments():
    with pytest.raises(ValueError, match="algorithm"):
        simulate_collective(flat(4), "all_reduce", N, algorithm="carrier_pigeon")
    with pytest.raises(ValueError, match="op"):
        simulate_collective(flat(4), "all_shuffle", N, algorithm="ring")
    with pytest.raises(ValueError, match="ranks"):
        simulate_collective(flat(4), "all_reduce", N, algorithm="ring", ranks=[0, 9])
    with pytest.raises(ValueError, match="nbytes"):
        simulate_collective(flat(4), "all_reduce", -1, algorithm="ring")


def test_wake_up_rounding_below_the_finish_time_still_completes():
    # Found by hypothesis: now + (finish - now) rounded just below finish, and the
    # network's only wake-up was dropped, leaving two flows unfinished forever.
    cluster = Cluster.homogeneous(nodes=2, gpus_per_node=2, nics_per_node=1, intra="pcie4", inter="25GbE")
    nbytes = 631455188.3314838
    fast = simulate_collective(cluster, "all_reduce", nbytes, algorithm="ring")
    stepped = simulate_collective(cluster, "all_reduce", nbytes, algorithm="ring", model="stepped")
    assert math.isclose(fast, stepped, rel_tol=1e-12)


@pytest.mark.parametrize("spines", [2, 4])
def test_non_blocking_leaf_spine_with_spines_matches_one_switch(spines):
    # each NIC of a leaf has its own uplink slot, so permutation traffic never collides
    top = LeafSpine(nodes_per_leaf=4, oversubscription=1.0, spines=spines, hop_latency=0.0)
    for alg in ("halving_doubling", "ring"):
        t = simulate_collective(flat(8, topology=top), "all_reduce", N, algorithm=alg)
        assert rel(t, simulate_collective(flat(8), "all_reduce", N, algorithm=alg)) < 1e-12
