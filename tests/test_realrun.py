"""realrun runs the strategies' role programs on torch.distributed: the training they do is
checked against single-process references written here with plain torch."""

from __future__ import annotations

import pytest
import torch

import realrun
from simulator import Cluster, Experiment, Workload
from strategies import AllReduceSGD, LocalSGD, ParameterServer, PipelineParallel, ZeRO
from strategies.codecs import decode, encode
from tests.realrun_helpers import FailingMLP, gradient, reference

pytestmark = pytest.mark.spawns

LR = 0.05
MLP = Workload.from_zoo("mlp", in_features=16, hidden=[32, 32], out_features=5)


def nodes(n: int) -> Cluster:
    return Cluster.homogeneous(nodes=n, gpus_per_node=1)


def final_params(folder, rank: int) -> torch.Tensor:
    return torch.load(folder / f"params{rank}.pt")


def run(exp, tmp_path, **kw):
    return realrun.run(exp, out=tmp_path, save_params=True, lr=LR, timeout=120, **kw)


def sgd_on_concatenated_batches(exp) -> torch.Tensor:
    """One process, every rank's batch at once (mean loss over all samples), plain SGD."""
    model, state, data = reference(exp)
    sizes = exp.batch_sizes
    for it in range(exp.iterations):
        total = torch.zeros_like(state.params)
        for r, b in enumerate(sizes):
            total += gradient(model, state, data, r, it, b) * (b / sum(sizes))
        with torch.no_grad():
            state.params -= LR * total
    return state.params.clone()


@pytest.mark.parametrize("algorithm,sizes", [("ring", (8, 8)), ("halving_doubling", (4, 6, 2))])
def test_sync_allreduce_equals_one_process_on_concatenated_batches(tmp_path, algorithm, sizes):
    exp = Experiment(workload=MLP, cluster=nodes(len(sizes)), batch_size=sizes, iterations=4,
                     strategy=AllReduceSGD(algorithm=algorithm, bucket_mb=0.002, first_bucket_mb=0.001))
    result = run(exp, tmp_path)
    expected = sgd_on_concatenated_batches(exp)
    for rank in range(len(sizes)):
        torch.testing.assert_close(final_params(tmp_path, rank), expected, rtol=1e-5, atol=1e-6)
    assert len(result.iterations) == 4 * len(sizes)
    assert (result.iterations.groupby("rank")["samples"].sum() == [4 * b for b in sizes]).all()
    # Several buckets, each all-reduced on the communication stream while backward went on.
    comm = result.timeline[result.timeline["stream"] == "comm"]
    assert comm["name"].str.startswith("all_reduce:grads[").sum() >= 2 * 4 * len(sizes)


def test_sync_parameter_server_equals_one_process_on_concatenated_batches(tmp_path):
    exp = Experiment(workload=MLP, cluster=nodes(2), batch_size=8, iterations=3,
                     strategy=ParameterServer(servers=2, partition="slice"))
    result = run(exp, tmp_path)
    expected = sgd_on_concatenated_batches(exp)
    for worker in (0, 1):
        torch.testing.assert_close(final_params(tmp_path, worker), expected, rtol=1e-5, atol=1e-6)
    applied = result.updates[result.updates["applied"]]
    assert len(applied) == 3 * 2 * 2  # iterations x workers x shards, each once
    assert (applied["staleness"] == 0).all()


def test_async_parameter_server_records_the_versions_it_read_and_applies_each_push_once(tmp_path):
    exp = Experiment(workload=MLP, cluster=nodes(2), batch_size=8, iterations=5,
                     strategy=ParameterServer(mode="async"))
    result = run(exp, tmp_path)
    up = result.updates.sort_values("version_applied").reset_index(drop=True)
    gpu_iterations = result.iterations[result.iterations["rank"] < 2]
    assert len(up) == len(gpu_iterations) >= 5 * 2  # every push applied, none twice, none lost
    assert up["applied"].all()
    assert list(up["version_applied"]) == list(range(len(up)))
    assert not up.duplicated(["worker", "clock"]).any()
    assert (up["staleness"] == up["version_applied"] - up["version_read"]).all()
    # A worker's next gradient is computed on the parameters the server answered its push with.
    for _, rows in up.sort_values("clock").groupby("worker"):
        assert list(rows["version_read"])[1:] == [v + 1 for v in rows["version_applied"]][:-1]
    assert up["staleness"].max() >= 1  # two workers interleave
    # Replay: each update is the gradient at the version its worker read, on its worker's batch.
    model, state, data = reference(exp)
    versions = [state.params.clone()]
    for row in up.itertuples():
        with torch.no_grad():
            state.params.copy_(versions[row.version_read])
        g = gradient(model, state, data, row.worker, row.clock, 8)
        versions.append(versions[-1] - LR * g)
    torch.testing.assert_close(final_params(tmp_path, 2), versions[-1], rtol=1e-5, atol=1e-6)


def test_backup_workers_apply_k_gradients_per_iteration_and_record_the_rest(tmp_path):
    exp = Experiment(workload=MLP, cluster=nodes(3), batch_size=8, iterations=4,
                     strategy=ParameterServer(wait_for=2))
    result = run(exp, tmp_path)
    up = result.updates
    applied = up[up["applied"]]
    assert (applied.groupby("version_applied").size() == 2).all()
    assert sorted(applied["version_applied"].unique()) == [0, 1, 2, 3]
    assert (applied["staleness"] == 0).all()
    assert not up.duplicated(["worker", "clock"]).any()


def test_local_sgd_averages_every_period(tmp_path):
    exp = Experiment(workload=MLP, cluster=nodes(2), batch_size=8, iterations=5, strategy=LocalSGD(period=2))
    run(exp, tmp_path)
    replicas = [reference(exp) for _ in range(2)]
    for it in range(5):
        for r, (model, state, data) in enumerate(replicas):
            g = gradient(model, state, data, r, it, 8)
            with torch.no_grad():
                state.params -= LR * g
        if it % 2 == 1 or it == 4:
            mean = (replicas[0][1].params + replicas[1][1].params) / 2
            for _, state, _ in replicas:
                state.params.copy_(mean)
    for rank in (0, 1):
        torch.testing.assert_close(final_params(tmp_path, rank), replicas[0][1].params, rtol=1e-5, atol=1e-6)


def test_topk_all_gather_exchange_matches_the_codecs_applied_by_hand(tmp_path):
    exp = Experiment(workload=MLP, cluster=nodes(2), batch_size=8, iterations=3,
                     strategy=AllReduceSGD(compression={"name": "topk", "ratio": 0.1}))
    run(exp, tmp_path)
    comp = exp.strategy.compression
    model, state, data = reference(exp)
    states = [{"rank": r, "step": 0} for r in range(2)]
    shapes = [p.shape for p in state.param_list]
    for it in range(3):
        payloads = []
        for r in range(2):
            g = gradient(model, state, data, r, it, 8)
            payloads.append(encode(comp, 0, list(g.split([s.numel() for s in shapes])), states[r]))
        avg = decode(comp, payloads, [torch.zeros(s.numel()) for s in shapes], states[0], 2)
        with torch.no_grad():
            state.params -= LR * torch.cat(avg)
    for rank in (0, 1):
        torch.testing.assert_close(final_params(tmp_path, rank), state.params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compression", ["powersgd", "qsgd", "sign", "randomk", "fp16"])
def test_every_compressor_runs_with_all_reduce(tmp_path, compression):
    exp = Experiment(workload=MLP, cluster=nodes(2), batch_size=8, iterations=2,
                     strategy=AllReduceSGD(compression=compression))
    result = run(exp, tmp_path)
    torch.testing.assert_close(final_params(tmp_path, 0), final_params(tmp_path, 1))  # replicas agree
    assert result.timeline["name"].str.startswith("decode[").sum() == 2 * 2


def test_compressed_pushes_to_a_parameter_server(tmp_path):
    exp = Experiment(workload=MLP, cluster=nodes(2), batch_size=8, iterations=3,
                     strategy=ParameterServer(compression="qsgd"))
    result = run(exp, tmp_path)
    assert len(result.updates) == 3 * 2
    torch.testing.assert_close(final_params(tmp_path, 0), final_params(tmp_path, 1))
    assert result.ranks.loc[0, "bytes_sent"] < 0.3 * 4 * MLP.params * 3  # 4-bit codes, not fp32


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_equals_one_process_on_the_whole_batch(tmp_path, schedule):
    exp = Experiment(workload=MLP, cluster=nodes(2), batch_size=8, iterations=3,
                     strategy=PipelineParallel(pp=2, micro_batches=4, schedule=schedule, boundaries=(2,)))
    result = run(exp, tmp_path)
    model, state, data = reference(exp)
    for it in range(3):
        g = gradient(model, state, data, 0, it, 8)
        with torch.no_grad():
            state.params -= LR * g
    cut = state.offsets[2]
    torch.testing.assert_close(final_params(tmp_path, 0)[:cut], state.params[:cut], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(final_params(tmp_path, 1)[cut:], state.params[cut:], rtol=1e-5, atol=1e-6)
    assert result.timeline["name"].str.startswith("send:act[").sum() == 3 * 4


def test_a_failing_rank_ends_the_run_with_its_traceback(tmp_path):
    exp = Experiment(workload=Workload.from_module(FailingMLP(1, 2), torch.randn(2, 8)), cluster=nodes(2),
                     batch_size=4, iterations=20, strategy=AllReduceSGD())
    with pytest.raises(realrun.RealRunError) as info:
        realrun.run(exp, model=FailingMLP(1, 2), out=tmp_path, timeout=120)
    assert info.value.rank == 1
    assert "deliberate failure on rank 1" in info.value.traceback
    partial = info.value.partial  # what was measured before the failure
    assert partial is not None and len(partial.iterations[partial.iterations["rank"] == 1]) == 2


def test_bad_arguments_name_the_field():
    exp = Experiment(workload=MLP, cluster=nodes(2), strategy=AllReduceSGD())
    for kwargs, word in ((dict(backend="mpi"), "backend"), (dict(device="tpu"), "device"),
                         (dict(backend="nccl"), "nccl"), (dict(lr=0), "lr"), (dict(collectives="x"), "collectives"),
                         (dict(launcher="local"), "launcher"), (dict(timeout=-1), "timeout")):
        with pytest.raises(ValueError, match=word):
            realrun.run(exp, **kwargs)


def test_interleaved_pipeline_and_data_parallel_pipelines_equal_one_process(tmp_path):
    deep = Workload.from_zoo("mlp", in_features=16, hidden=[32, 32, 32], out_features=5)
    exp = Experiment(workload=deep, cluster=nodes(4), batch_size=8, iterations=2,
                     strategy=PipelineParallel(pp=2, micro_batches=2, boundaries=(4,)))  # dp = 2 replicas
    run(exp, tmp_path / "dp")
    expected = sgd_on_concatenated_batches(exp.replace(cluster=nodes(2), strategy=AllReduceSGD()))
    _, state, _ = reference(exp)
    cut = state.offsets[4]
    for rank, part in ((0, slice(0, cut)), (1, slice(cut, None)), (2, slice(0, cut)), (3, slice(cut, None))):
        torch.testing.assert_close(final_params(tmp_path / "dp", rank)[part], expected[part], rtol=1e-5, atol=1e-6)
    exp = Experiment(workload=deep, cluster=nodes(2), batch_size=8, iterations=2,
                     strategy=PipelineParallel(pp=2, micro_batches=4, schedule="interleaved", chunks=2,
                                               boundaries=(2, 4, 6)))
    run(exp, tmp_path / "il")
    expected = sgd_on_concatenated_batches(exp.replace(cluster=nodes(1), strategy=AllReduceSGD()))
    o = state.offsets
    mine = {0: [slice(o[0], o[2]), slice(o[4], o[6])], 1: [slice(o[2], o[4]), slice(o[6], None)]}
    for rank, parts in mine.items():
        for part in parts:
            torch.testing.assert_close(final_params(tmp_path / "il", rank)[part], expected[part], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_equal_one_process_on_concatenated_batches(tmp_path, stage):
    exp = Experiment(workload=MLP, cluster=nodes(2), batch_size=8, iterations=3,
                     strategy=ZeRO(zero=stage, micro_batches=2))
    result = run(exp, tmp_path)
    expected = sgd_on_concatenated_batches(exp.replace(strategy=AllReduceSGD()))
    final = [final_params(tmp_path, r) for r in (0, 1)]
    if stage < 3:  # the step's all-gather leaves every replica whole
        for rank in (0, 1):
            torch.testing.assert_close(final[rank], expected, rtol=1e-5, atol=1e-6)
    else:  # ZeRO-3 gathers before use: each rank's own part is current
        half = expected.numel() // 2 + expected.numel() % 2
        torch.testing.assert_close(final[0][:half], expected[:half], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(final[1][half:], expected[half:], rtol=1e-5, atol=1e-6)
    names = result.timeline["name"]
    assert names.str.startswith("reduce_scatter:grads").any() and names.str.startswith("all_gather:params").any()


def test_a_model_that_is_no_module_or_a_bad_thread_count_is_refused():
    exp = Experiment(workload=MLP, cluster=nodes(2), strategy=AllReduceSGD())
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        realrun.run(exp, model="mlp")
    with pytest.raises(ValueError, match="threads"):
        realrun.run(exp, threads=0)
