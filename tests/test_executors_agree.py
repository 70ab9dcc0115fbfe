"""The two executors count a run the same way.

For each strategy family the same experiment runs in the simulator and for real
(local processes, gloo). Times differ, by design; what is counted must not:
samples per rank and iteration (throughput's numerator), bytes each rank sends
(up to whole-element rounding), how many gradients servers apply or drop, and
the staleness definition (versions applied minus versions read).
"""

from __future__ import annotations

import numpy as np
import pytest

import realrun
from simulator import Cluster, Experiment, Workload, simulate
from strategies import (
    AllReduceSGD,
    Hybrid,
    LocalSGD,
    ParameterServer,
    PipelineParallel,
    TensorParallel,
    ZeRO,
)

pytestmark = pytest.mark.spawns

MLP = Workload.from_zoo("mlp", in_features=16, hidden=[32, 32, 32], out_features=5)
GPT = Workload.from_zoo("gpt", size="gpt2-small", n_layer=2, d_model=32, n_head=4, vocab_size=64, n_ctx=8,
                        seq_len=8, dropout=0.0)

CASES = {
    "allreduce-ring": (MLP, 2, 1, AllReduceSGD(algorithm="ring")),
    "allreduce-topk": (MLP, 2, 1, AllReduceSGD(algorithm="ring", compression="topk")),
    "local-sgd": (MLP, 2, 1, LocalSGD(period=2)),
    "ps-sync": (MLP, 2, 1, ParameterServer(mode="sync", servers=2)),
    "ps-async": (MLP, 2, 1, ParameterServer(mode="async")),
    "pipeline-1f1b": (MLP, 2, 1, PipelineParallel(pp=2, micro_batches=2, schedule="1f1b")),
    "tensor-parallel": (GPT, 1, 2, TensorParallel(tp=2)),
    "zero-2": (MLP, 2, 1, ZeRO(zero=2)),
    "hybrid-tp-pp": (GPT, 2, 2, Hybrid(tp=2, pp=2, micro_batches=2)),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both executors' results per case, made once for the module's tests."""
    made = {}

    def get(name):
        if name not in made:
            workload, nodes, gpus, strategy = CASES[name]
            exp = Experiment(workload=workload, cluster=Cluster.homogeneous(nodes=nodes, gpus_per_node=gpus),
                             strategy=strategy, batch_size=4, iterations=3, seed=1)
            made[name] = simulate(exp), realrun.run(exp, out=tmp_path_factory.mktemp(name), timeout=180)
        return made[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_samples_and_updates_are_counted_alike(name, runs):
    sim, real = runs(name)
    a = sim.iterations.set_index(["rank", "iteration"])["samples"].sort_index()
    b = real.iterations.set_index(["rank", "iteration"])["samples"].sort_index()
    if name == "ps-async":  # who runs the shared iterations depends on timing; how many does not
        assert a.sum() == b.sum() and len(a) == len(b)
    else:
        assert a.to_dict() == b.to_dict()
    # samples in all: 4 per replica and iteration, whatever the tensor-parallel degree
    replicas = {"tensor-parallel": 1, "hybrid-tp-pp": 1, "pipeline-1f1b": 1}.get(name, 2)
    for result in (sim, real):
        total = result.summary()["throughput"] * result.stats["makespan"]
        if name == "ps-async":  # the executors agree (above) on how many rounds the workers ran
            assert total == pytest.approx(a.sum())
        else:
            assert total == pytest.approx(4 * replicas * 3)
    for result in (sim, real):
        up = result.updates
        assert (up["staleness"] == up["version_applied"] - up["version_read"]).all()
    if name == "ps-sync":  # a synchronous server applies every gradient, in both
        assert len(sim.updates) == len(real.updates) > 0
        assert sim.updates["applied"].sum() == real.updates["applied"].sum()
    if name == "ps-async":  # every push is applied once, whenever it arrives
        assert len(sim.updates) == len(real.updates) > 0


VOCAB_LOSS = pytest.mark.xfail(
    strict=True, reason="realrun's vocabulary-parallel cross-entropy all-reduces three per-token scalars per "
    "micro-batch (max, sum of exponentials, target logit) that the role program does not yield")


@pytest.mark.parametrize("name", [pytest.param(n, marks=VOCAB_LOSS) if n in ("tensor-parallel", "hybrid-tp-pp")
                                  else n for n in CASES])
def test_bytes_sent_are_counted_alike(name, runs):
    sim, real = runs(name)
    element = 4  # fp32: a message may round to whole elements
    sent_sim, sent_real = sim.ranks["bytes_sent"].to_numpy(), real.ranks["bytes_sent"].to_numpy()
    if name == "ps-async":  # which worker pushes more depends on timing; the servers' and the total do not
        sent_sim, sent_real = np.array([sent_sim.sum(), sent_sim[-1]]), np.array([sent_real.sum(), sent_real[-1]])
    np.testing.assert_allclose(sent_real, sent_sim, atol=element * 64, rtol=1e-3)
