"""Parameter shards (contiguous, balanced) and data shards (uneven batches)."""

import itertools

import pytest
from builders import timed_workload
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator import Cluster, Experiment, simulate
from simulator.compute import ComputeModel
from strategies import AllReduceSGD, partition_params, split_batch


def best_contiguous_max(sizes, k):
    """Brute force: the smallest largest-group over all ways to cut the parameter layers into k groups."""
    weights = [s for s in sizes if s > 0]
    best = None
    for cuts in itertools.combinations(range(1, len(weights)), k - 1):
        bounds = (0, *cuts, len(weights))
        worst = max(sum(weights[a:b]) for a, b in itertools.pairwise(bounds))
        best = worst if best is None else min(best, worst)
    return best


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=9), st.integers(1, 5))
def test_layer_partition_is_contiguous_complete_and_optimal(sizes, k):
    if k > sum(1 for s in sizes if s > 0):
        with pytest.raises(ValueError, match=r"layers with parameters allow"):
            partition_params(sizes, k, "layer")
        return
    shards = partition_params(sizes, k, "layer")
    assert len(shards) == k
    assert shards[0].elements[0] == 0 and shards[-1].elements[1] == sum(sizes)
    assert shards[0].layers[0] == 0 and shards[-1].layers[1] == len(sizes)
    for a, b in itertools.pairwise(shards):
        assert a.elements[1] == b.elements[0] and a.layers[1] == b.layers[0]
    assert all(s.size > 0 for s in shards)
    assert max(s.size for s in shards) == best_contiguous_max(sizes, k)


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=9), st.integers(1, 7))
def test_slice_partition_is_equal_to_one_element(sizes, k):
    total = sum(sizes)
    if k > total:
        with pytest.raises(ValueError, match=r"parameters allow for partition='slice'"):
            partition_params(sizes, k, "slice")
        return
    shards = partition_params(sizes, k, "slice")
    assert [s.size for s in shards] and max(s.size for s in shards) - min(s.size for s in shards) <= 1
    assert sum(s.size for s in shards) == total
    prefix = list(itertools.accumulate(sizes, initial=0))
    for s in shards:  # the layer range holds the element range
        assert prefix[s.layers[0]] <= s.elements[0] and s.elements[1] <= prefix[s.layers[1]]


@given(st.integers(1, 2000), st.lists(st.floats(0.1, 10), min_size=1, max_size=12))
def test_split_batch_is_proportional_and_complete(extra, weights):
    total = len(weights) + extra
    shares = split_batch(total, weights)
    assert sum(shares) == total and min(shares) >= 1
    exact = [total * w / sum(weights) for w in weights]
    # Largest remainders put every share within 1 of exact; each share raised to the
    # minimum of 1 may then take one more sample from another.
    raised = sum(1 for x in exact if x < 1)
    assert all(abs(s - x) < 1 + raised + 1e-9 for s, x in zip(shares, exact, strict=True))
    if raised == 0:
        assert all(abs(s - x) < 1 for s, x in zip(shares, exact, strict=True))


def test_split_batch_rejects_bad_input():
    with pytest.raises(ValueError, match=r"total must be an integer >= the number of workers \(3\), got 2"):
        split_batch(2, [1, 1, 1])
    with pytest.raises(ValueError, match=r"weights must be positive"):
        split_batch(10, [1, 0])


def test_uneven_shards_count_the_samples_each_worker_processes():
    """Two fast and two half-speed workers, shards in proportion: equal iteration times,
    and throughput = total samples / iteration time."""
    cluster = Cluster.homogeneous(nodes=4, gpus_per_node=1, inter="100GbE", inter_bandwidth=1e15,
                                  inter_latency=0.0)
    sizes = split_batch(96, [2, 2, 1, 1])
    assert sizes == (32, 32, 16, 16)
    exp = Experiment(workload=timed_workload(batch=32), cluster=cluster, batch_size=list(sizes), iterations=4,
                     strategy=AllReduceSGD(), compute=ComputeModel(distribution="deterministic",
                                                                  stragglers={2: 2.0, 3: 2.0}))
    result = simulate(exp)
    it = result.iterations
    assert it.groupby("rank")["samples"].first().tolist() == [32, 32, 16, 16]
    # Compute scales with samples: 1 s for 32 samples at full speed, 16 samples at half speed also 1 s.
    assert it["compute"].to_numpy() == pytest.approx(1.0, rel=1e-3)
    s = result.summary()
    assert s["throughput"] == pytest.approx(96 / s["iteration_time_mean"], rel=1e-3)


def test_batch_size_list_must_match_the_gpus():
    cluster = Cluster.homogeneous(nodes=2, gpus_per_node=2)
    with pytest.raises(ValueError, match=r"batch_size as a list must hold 4 integers >= 1 \(one per GPU rank\)"):
        Experiment(workload=timed_workload(), cluster=cluster, strategy=AllReduceSGD(), batch_size=[8, 8])
