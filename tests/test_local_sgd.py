"""Local SGD: H = 1 is synchronous all-reduce of parameters; communication falls by H."""

import pytest

from simulator import Cluster, Experiment, simulate
from simulator.compute import ComputeModel
from simulator.workload import Workload
from strategies import AllReduceSGD, LocalSGD


def experiment(strategy, iterations=8, batch_size=16):
    return Experiment(workload=Workload.from_zoo("resnet18"), strategy=strategy, iterations=iterations,
                      batch_size=batch_size, compute=ComputeModel(distribution="deterministic"),
                      cluster=Cluster.homogeneous(nodes=4, gpus_per_node=2, inter="25GbE"))


def test_period_one_matches_synchronous_allreduce_without_overlap():
    local = simulate(experiment(LocalSGD(period=1)))
    sync = simulate(experiment(AllReduceSGD(overlap=False)))
    # Same buckets (fp32 parameters have the size of fp32 gradients), same all-reduces:
    # forward, backward, all-reduce, step takes as long as forward, backward, step, all-reduce.
    assert local.summary()["iteration_time_mean"] == pytest.approx(sync.summary()["iteration_time_mean"], rel=1e-9)
    assert local.summary()["bytes_on_wire"] == pytest.approx(sync.summary()["bytes_on_wire"], rel=1e-12)


@pytest.mark.parametrize("period", [2, 4, 8])
def test_communication_volume_falls_by_the_period(period):
    every = simulate(experiment(LocalSGD(period=1)))
    local = simulate(experiment(LocalSGD(period=period)))
    assert local.summary()["bytes_on_wire"] == pytest.approx(every.summary()["bytes_on_wire"] / period, rel=1e-12)
    assert local.summary()["throughput"] > every.summary()["throughput"]


def test_a_last_partial_period_still_averages():
    result = simulate(experiment(LocalSGD(period=3), iterations=7))
    comm = result.timeline[(result.timeline["stream"] == "comm") & (result.timeline["rank"] == 0)]
    assert sorted(comm["iteration"].unique()) == [2, 5, 6]


def test_weighted_average_uses_each_workers_share_of_samples():
    exp = experiment(LocalSGD(weighted=True), batch_size=[8, 8, 16, 16, 32, 32, 8, 8])
    job = exp.job()
    weights = [exp.strategy.weight(job, r) for r in range(8)]
    assert weights == pytest.approx([b / 128 for b in (8, 8, 16, 16, 32, 32, 8, 8)])
    assert sum(weights) == pytest.approx(1.0)
    plain = LocalSGD()
    assert [plain.weight(job, r) for r in range(8)] == pytest.approx([1 / 8] * 8)


def test_bad_local_sgd_fields():
    with pytest.raises(ValueError, match=r"LocalSGD.period must be an integer >= 1, got 0"):
        LocalSGD(period=0)
    with pytest.raises(ValueError, match=r"LocalSGD.algorithm must be one of"):
        LocalSGD(algorithm="butterfly")
