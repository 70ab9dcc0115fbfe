"""Representative ranks (fidelity="auto") against every rank simulated (fidelity="full").

Wherever the representatives run, they must give what the full simulation gives:
the same iteration rows, bytes on every link and from every rank, memory and
updates. Where they cannot, ``auto`` falls back and says why.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from simulator import Cluster, Experiment, LeafSpine, Workload, simulate
from simulator.symmetry import (
    Symmetry,
    cluster_candidates,
    link_permutation,
    local_shift,
    node_shift,
)
from strategies import AllReduceSGD, Hybrid, LocalSGD, ParameterServer

GPT = Workload.from_zoo("gpt", size="gpt2-small", seq_len=128)


def _cluster(nodes=4, gpus=4, nics=None, topology=None):
    extra = {"topology": topology} if topology is not None else {}
    return Cluster.homogeneous(nodes=nodes, gpus_per_node=gpus, gpu="A100-80GB", intra="nvlink3",
                               inter="100GbE", nics_per_node=gpus if nics is None else nics, **extra)


def _both(exp: Experiment):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # contended bundles: the same in both
        full = simulate(exp.replace(fidelity="full"))
        auto = simulate(exp.replace(fidelity="auto"))
    return full, auto


def _assert_same(full, auto) -> None:
    a = full.iterations.sort_values(["iteration", "rank"]).reset_index(drop=True)
    b = auto.iterations.sort_values(["iteration", "rank"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(auto.links["bytes"], full.links["bytes"], rtol=1e-12)
    np.testing.assert_allclose(auto.links["busy_time"], full.links["busy_time"], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(auto.ranks["bytes_sent"], full.ranks["bytes_sent"], rtol=1e-12)
    pd.testing.assert_frame_equal(auto.memory, full.memory)
    pd.testing.assert_frame_equal(auto.updates, full.updates)
    fs, as_ = full.summary(), auto.summary()
    for key in ("throughput", "iteration_time_mean", "iteration_time_p99", "bytes_on_wire", "makespan",
                "network_utilisation", "model_flops_utilisation", "scaling_efficiency"):
        assert as_[key] == pytest.approx(fs[key], rel=1e-9), key


@pytest.mark.parametrize("algorithm", ["ring", "hierarchical", "halving_doubling", "tree"])
@pytest.mark.parametrize("nodes", [2, 4])
def test_data_parallel_each_algorithm(algorithm, nodes):
    exp = Experiment(workload=GPT, cluster=_cluster(nodes), strategy=AllReduceSGD(algorithm=algorithm, bucket_mb=8),
                     batch_size=4, iterations=2)
    full, auto = _both(exp)
    _assert_same(full, auto)
    assert full.stats["fidelity"] == "full"
    if algorithm in ("ring", "hierarchical"):  # symmetric under whole nodes shifted
        assert auto.stats["fidelity"] == "representatives"
        assert auto.stats["simulated_ranks"] < exp.world_size


@pytest.mark.parametrize("compressor", ["fp16", "topk", "powersgd"])
def test_compressed_data_parallel_and_local_sgd(compressor):
    base = Experiment(workload=GPT, cluster=_cluster(2), batch_size=4, iterations=2,
                      strategy=AllReduceSGD(algorithm="ring", compression=compressor))
    for exp in (base, base.replace(strategy=LocalSGD(period=2))):
        full, auto = _both(exp)
        _assert_same(full, auto)
        assert auto.stats["fidelity"] == "representatives"


HYBRIDS = [
    dict(tp=2, pp=2, micro_batches=4),
    dict(tp=2, pp=2, micro_batches=4, schedule="gpipe"),
    dict(tp=4, pp=2, micro_batches=4, schedule="interleaved", chunks=2),
    dict(tp=1, pp=4, micro_batches=4),
    dict(tp=4, pp=1),
    dict(tp=2, pp=2, micro_batches=2, zero=1, recompute=True),
    dict(tp=4, pp=1, zero=2),
    dict(tp=2, pp=1, zero=3),
    dict(tp=2, pp=2, micro_batches=2, zero=1, sequence_parallel=True),
]


@pytest.mark.parametrize("kw", HYBRIDS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_pipelines_tensor_parallel_zero_hybrid(kw):
    exp = Experiment(workload=GPT, cluster=_cluster(4), strategy=Hybrid(**kw), batch_size=8, iterations=2,
                     precision="bf16", optimizer="adam")
    full, auto = _both(exp)
    _assert_same(full, auto)
    assert auto.stats["fidelity"] == "representatives"
    # one replica's programs at most: a dp x tp layout needs one rank per stage, and no more
    assert auto.stats["simulated_ranks"] <= exp.world_size // Hybrid(**kw).degrees(exp.job())[0]


@pytest.mark.parametrize("oversubscription", [1.0, 2.0])
def test_leaf_spine(oversubscription):
    fabric = LeafSpine(nodes_per_leaf=2, oversubscription=oversubscription)
    for strategy in (AllReduceSGD(algorithm="ring"), Hybrid(tp=4, pp=2, micro_batches=2)):
        exp = Experiment(workload=GPT, cluster=_cluster(8, topology=fabric), strategy=strategy, batch_size=4,
                         iterations=2)
        full, auto = _both(exp)
        _assert_same(full, auto)
        assert auto.stats["fidelity"] == "representatives"


def test_parameter_server_falls_back_and_says_why():
    exp = Experiment(workload=GPT, cluster=_cluster(2), strategy=ParameterServer(mode="sync", servers=2),
                     batch_size=4, iterations=2)
    full, auto = _both(exp)
    _assert_same(full, auto)
    assert auto.stats["fidelity"] == "full"
    assert "host" in auto.stats["fidelity_reason"] or "declare" in auto.stats["fidelity_reason"]
    assert auto.summary()["fidelity"] == "full"  # the summary, and so a saved run, says so too
    assert auto.summary()["fidelity_reason"] == auto.stats["fidelity_reason"]


def test_noise_falls_back():
    from simulator import ComputeModel

    exp = Experiment(workload=GPT, cluster=_cluster(2), strategy=AllReduceSGD(), batch_size=4, iterations=2,
                     compute=ComputeModel(noise_cv=0.1))
    result = simulate(exp)
    assert result.stats["fidelity"] == "full"
    assert "noise" in result.stats["fidelity_reason"]


def test_timeline_and_trace_label_the_representatives(tmp_path):
    exp = Experiment(workload=GPT, cluster=_cluster(4), strategy=Hybrid(tp=4, pp=2, micro_batches=2), batch_size=4,
                     iterations=1)
    result = simulate(exp)
    ranks = result.timeline.loc[result.timeline["rank"] >= 0]
    assert sorted(ranks["rank"].unique()) == [0, 4]  # stage 0's and stage 1's first ranks
    assert ranks["resource"].str.endswith("(stands for 8 ranks)").all()  # dp 2 x tp 4
    assert result.summary()["fidelity"] == "representatives"
    assert result.summary()["fidelity_reason"] == "2 representatives of 8 ranks each"
    trace = result.to_chrome_trace(tmp_path / "trace.json")
    assert trace.stat().st_size > 0
    assert len(result.iterations) == exp.world_size  # every rank's row, one iteration


def test_fidelity_is_checked_and_saved():
    exp = Experiment(workload=GPT, cluster=_cluster(1), strategy=AllReduceSGD(), batch_size=4, iterations=1)
    with pytest.raises(ValueError, match=r"Experiment.fidelity must be one of \('auto', 'full'\), got 'fast'"):
        exp.replace(fidelity="fast")
    again = Experiment.from_dict(exp.replace(fidelity="full").to_dict())
    assert again.fidelity == "full"


# the symmetry machinery on its own


def test_only_whole_node_shifts_are_cluster_symmetries():
    cluster = _cluster(4, gpus=4)
    assert link_permutation(cluster, node_shift(cluster, 1)) is not None
    assert link_permutation(cluster, local_shift(cluster)) is not None
    half = (np.arange(16) + 2) % 16  # half a node on: node 0's GPUs land on two nodes
    assert link_permutation(cluster, half) is None
    one_nic = _cluster(4, gpus=4, nics=1)
    # GPUs shifted within a node share one NIC: it is an automorphism, but not a free one
    assert Symmetry.find(one_nic, [local_shift(one_nic)]) is None
    assert Symmetry.find(one_nic, [node_shift(one_nic, 1)]) is not None


def test_orbits_and_images():
    cluster = _cluster(4, gpus=4)
    sym = Symmetry.find(cluster, cluster_candidates(cluster))
    assert sym.order == 16 and sym.simulated == [0]
    assert sorted(sym.orbit(0).tolist()) == list(range(16))
    # rank 5 is node 1's GPU 1: the element taking it to rank 0 moves one node and one GPU
    # back, so it takes node 1's GPU 2 (rank 6) to node 0's GPU 1
    assert sym.seen_from(6, 5) == 1
    assert sym.seen_from(5, 5) == 0
    # every link orbit has 16 links, one per image
    assert (np.bincount(sym.link_rep)[np.bincount(sym.link_rep) > 0] == 16).all()
