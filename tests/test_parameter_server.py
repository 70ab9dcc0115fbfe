"""Parameter servers: staleness, throughput, backup workers, incast, SSP bounds, accounting.

Expected values come from queueing and order-statistics formulas and from
the incast arithmetic, not from the simulator's own output.
"""

import math

import numpy as np
import pytest
from builders import timed_workload

from simulator import Cluster, Experiment, simulate
from simulator.compute import ComputeModel
from simulator.workload import Workload
from strategies import ParameterServer

FAST_SERVER = {"name": "cpu-socket", "mem_bandwidth": 1e18, "peak_flops": {"fp32": 1e21},
               "kernel_overhead": 0.0}
"""A server whose updates take ~1e-12 s: 'negligible server cost'."""


def fast_cluster(nodes: int) -> Cluster:
    """Communication negligible against 1 s of compute: 1 PB/s, no latency."""
    return Cluster.homogeneous(nodes=nodes, gpus_per_node=1, inter="100GbE", inter_bandwidth=1e15,
                               inter_latency=0.0)


def run(nodes, strategy, *, iterations, compute=None, workload=None, seed=0, cluster=None):
    exp = Experiment(workload=workload or timed_workload(), cluster=cluster or fast_cluster(nodes),
                     strategy=strategy, iterations=iterations, batch_size=32, seed=seed,
                     compute=compute or ComputeModel(distribution="deterministic"))
    return simulate(exp)


EXPONENTIAL = ComputeModel(distribution="exponential", scope="iteration")


@pytest.mark.parametrize("n", [2, 4, 7])
def test_async_identical_deterministic_workers_have_staleness_n_minus_1(n):
    result = run(n, ParameterServer(mode="async", server_device=FAST_SERVER), iterations=20)
    up = result.updates
    assert up["applied"].all()
    steady = up[up["clock"] >= 1]
    assert len(steady) > 0
    assert (steady["staleness"] == n - 1).all()
    # The first round: the j-th gradient applied saw j - 1 updates since version 0.
    first = up[up["clock"] == 0].sort_values("time")
    assert first["staleness"].tolist() == list(range(n))


def test_async_exponential_workers_staleness_and_throughput():
    n, mu = 8, 1.0  # compute 1 s per iteration on average: rate 1 per second
    result = run(n, ParameterServer(mode="async", server_device=FAST_SERVER), iterations=1500,
                 compute=EXPONENTIAL, seed=3)
    s = result.summary()
    # Each worker is a Poisson process of rate mu; during one exponential compute
    # time the other n - 1 workers apply (n - 1) * mu * (1 / mu) updates on average.
    assert s["staleness_mean"] == pytest.approx(n - 1, rel=0.05)
    assert s["updates_per_second"] == pytest.approx(n * mu, rel=0.03)


def expected_kth_of_n(n: int, k: int, mu: float) -> float:
    """E[k-th smallest of n iid Exp(mu)] = (1/mu) * sum_{i=n-k+1}^{n} 1/i."""
    return sum(1.0 / i for i in range(n - k + 1, n + 1)) / mu


@pytest.mark.parametrize("k", [8, 6, 3])
def test_sync_backup_workers_iteration_time_is_kth_order_statistic(k):
    n, mu = 8, 1.0
    wait_for = None if k == n else k
    result = run(n, ParameterServer(mode="sync", wait_for=wait_for, server_device=FAST_SERVER),
                 iterations=1500, compute=EXPONENTIAL, seed=11)
    s = result.summary()
    assert s["iteration_time_mean"] == pytest.approx(expected_kth_of_n(n, k, mu), rel=0.03)
    if k == n:
        assert s["iteration_time_mean"] == pytest.approx(sum(1 / i for i in range(1, n + 1)) / mu, rel=0.03)
        assert s["updates_dropped"] == 0
    up = result.updates
    applied = up[up["applied"]]
    # Every iteration applies exactly k gradients, all computed from the current version.
    assert (applied.groupby("clock").size() == k).all()
    assert (applied["staleness"] == 0).all()


def test_backup_workers_account_for_every_push():
    n, k = 6, 4
    result = run(n, ParameterServer(mode="sync", wait_for=k, servers=2, partition="slice",
                                    server_device=FAST_SERVER),
                 iterations=200, compute=EXPONENTIAL, seed=5, workload=timed_workload(params=(2_000_000, 2_000_000)),
                 cluster=Cluster.homogeneous(nodes=n, gpus_per_node=1, inter="10GbE", inter_bandwidth="1Gbps"))
    tl = result.timeline
    for shard in (0, 1):
        pushes = tl[tl["name"].str.startswith(f"send:grads/shard{shard}->")]
        rows = result.updates[result.updates["shard"] == shard]
        # Every gradient sent is recorded once: applied, or dropped as late.
        assert len(rows) == len(pushes)
        assert rows.duplicated(["worker", "clock"]).sum() == 0
        assert (rows[rows["applied"]].groupby("clock").size() == k).all()
    # Pushes in flight when an iteration closes arrive late and are dropped.
    assert result.summary()["updates_dropped"] > 0


def incast_time(n, k, m, bandwidth):
    """One direction of a PS exchange: max(M/B, N*M/(k*B)) (k = 1: N*M/B at the server NIC)."""
    return max(m / bandwidth, n * m / (k * bandwidth))


@pytest.mark.parametrize(("n", "k"), [(4, 1), (8, 1), (4, 2), (2, 4), (6, 3)])
def test_sync_communication_follows_incast_arithmetic(n, k):
    params = 2_400_000  # divisible by every k used: equal slices
    m = 4 * params
    bandwidth, latency = 10e9 / 8, 20e-6
    cluster = Cluster.homogeneous(nodes=n, gpus_per_node=1, inter="10GbE")
    strategy = ParameterServer(mode="sync", servers=k, partition="slice", overlap=False,
                               server_device=FAST_SERVER)
    result = run(n, strategy, iterations=3, cluster=cluster, workload=timed_workload(params=(params,)))
    it = result.iterations
    compute = 1.0
    expected = compute + 2 * (latency + incast_time(n, k, m, bandwidth))
    assert it["duration"].to_numpy() == pytest.approx(expected, rel=1e-6)


def slowest_clock_at(up_shard, workers, t):
    done = up_shard[up_shard["time"] <= t]
    counts = done.groupby("worker").size().reindex(range(workers), fill_value=0)
    return int(counts.min())


@pytest.mark.parametrize("bound", [0, 1, 3])
def test_ssp_never_lets_a_worker_run_more_than_s_clocks_ahead(bound):
    n = 5
    compute = ComputeModel(distribution="lognormal", noise_cv=0.5, scope="iteration", stragglers={0: 2.5})
    result = run(n, ParameterServer(mode="ssp", staleness_bound=bound, server_device=FAST_SERVER),
                 iterations=40, compute=compute, seed=2)
    up = result.updates[result.updates["shard"] == 0]
    gaps = []
    for row in up[up["clock"] >= 1].itertuples():
        gaps.append(row.clock - slowest_clock_at(up, n, row.read_time))
    assert max(gaps) <= bound
    assert max(gaps) == bound  # the straggler makes the others reach the bound: the check is live
    # At no instant do the pushes of two workers differ by more than bound + 1.
    counts = np.zeros(n, dtype=int)
    for w in up.sort_values("time")["worker"]:
        counts[w] += 1
        assert counts.max() - counts.min() <= bound + 1


def test_ssp_bound_zero_behaves_like_sync():
    n = 4
    compute = ComputeModel(distribution="lognormal", noise_cv=0.4, scope="iteration")
    sync = run(n, ParameterServer(mode="sync", server_device=FAST_SERVER), iterations=30, compute=compute, seed=9)
    ssp = run(n, ParameterServer(mode="ssp", staleness_bound=0, server_device=FAST_SERVER), iterations=30,
              compute=compute, seed=9)
    a = sync.iterations.sort_values(["rank", "iteration"])["duration"].to_numpy()
    b = ssp.iterations.sort_values(["rank", "iteration"])["duration"].to_numpy()
    assert b == pytest.approx(a, rel=1e-6)
    # A barrier per clock: every gradient was computed from parameters that held every
    # update of the previous clock.
    up = ssp.updates
    assert (up["version_read"] >= up["clock"] * n).all()


def test_async_heterogeneous_workers_apply_every_update_exactly_once():
    cluster = Cluster(nodes=4, gpus_per_node=1, device="A100-80GB", intra="nvlink3", intra_kind="nvlink",
                      inter="25GbE", devices=("A100-80GB", "V100-32GB", "A100-80GB", "P100"))
    compute = ComputeModel(distribution="lognormal", noise_cv=0.3, stragglers={2: 3.0})
    workload = Workload.from_zoo("resnet18")
    exp = Experiment(workload=workload, cluster=cluster, iterations=30, batch_size=16, seed=4, compute=compute,
                     strategy=ParameterServer(mode="async", servers=3, placement="dedicated"))
    result = simulate(exp)
    up = result.updates
    it = result.iterations
    assert up["applied"].all()
    for shard in range(3):
        rows = up[up["shard"] == shard]
        assert rows.duplicated(["worker", "clock"]).sum() == 0
        per_worker = rows.groupby("worker").size()
        iterations_done = it.groupby("rank").size()
        assert (per_worker.reindex(iterations_done.index) == iterations_done).all()
        # Versions: one per applied gradient, no gaps, none twice.
        assert sorted(rows["version_applied"]) == list(range(len(rows)))
    assert len(up) / 3 >= 30 * 4  # the global step target is reached
    # Faster devices did more of the work.
    assert it.groupby("rank").size()[0] > it.groupby("rank").size()[2]


def test_colocated_servers_share_worker_nodes():
    exp = Experiment(workload=timed_workload(params=(1000, 2000, 3000, 500)), cluster=fast_cluster(3),
                     strategy=ParameterServer(placement="colocated"), iterations=2)
    cluster = exp.run_cluster
    assert cluster.world_size == 6
    assert [cluster.node_of(r) for r in range(3, 6)] == [0, 1, 2]
    result = simulate(exp)
    assert set(result.updates["server"]) == {3, 4, 5}
    assert result.summary()["updates_applied"] == 2 * 3


def test_server_update_cost_uses_the_optimizer_and_the_server_device():
    """Adam on a slow server takes longer than SGD; the difference is on the server's device."""
    params = 5_000_000

    def iteration_time(optimizer, device):
        exp = Experiment(workload=timed_workload(params=(params,)), cluster=fast_cluster(2), iterations=3,
                         optimizer=optimizer, compute=ComputeModel(distribution="deterministic"),
                         strategy=ParameterServer(server_device=device, overlap=False))
        return simulate(exp).summary()["iteration_time_mean"]

    # One cpu-core (catalogue): 160 GFLOP/s fp32 at 60 %, 6.4 GB/s at 80 %, 5 us per kernel.
    flops, bandwidth, kernel = 160e9 * 0.6, 6.4e9 * 0.8, 5e-6
    # fp32 words streamed and FLOPs per parameter: SGD reads w, g and writes w (2 FLOPs);
    # Adam reads w, g, m, v and writes w, m, v (~12 FLOPs).
    for opt, words, ops in (("sgd", 3, 2), ("adam", 7, 12)):
        step = max(ops * params / flops, 4 * words * params / bandwidth) + kernel
        # Two workers' gradients summed first: read 2 buffers, write 1, one extra kernel.
        summing = 4 * 3 * params / bandwidth + kernel
        assert iteration_time(opt, "cpu-core") == pytest.approx(1.0 + step + summing, rel=1e-6)
    assert iteration_time("adam", "cpu-core") > iteration_time("sgd", "cpu-core")
    assert iteration_time("adam", "cpu-socket") < iteration_time("adam", "cpu-core")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "hogwild"}, r"ParameterServer.mode must be one of \('sync', 'async', 'ssp'\), got 'hogwild'"),
    ({"mode": "ssp", "staleness_bound": -1}, r"staleness_bound must be an integer >= 0, got -1"),
    ({"mode": "sync", "staleness_bound": 2}, r"staleness_bound applies to mode='ssp' only"),
    ({"mode": "async", "wait_for": 2}, r"wait_for applies to mode='sync' only"),
    ({"wait_for": 0}, r"wait_for must be an integer >= 1 or None, got 0"),
    ({"servers": 0}, r"servers must be an integer >= 1, got 0"),
    ({"placement": "rack"}, r"placement must be one of \('dedicated', 'colocated'\), got 'rack'"),
    ({"partition": "hash"}, r"partition must be one of \('layer', 'slice'\), got 'hash'"),
])
def test_bad_parameter_server_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParameterServer(**kwargs)


def test_bad_parameter_server_for_the_job():
    workload = timed_workload(params=(1000, 0, 2000))
    with pytest.raises(ValueError, match=r"wait_for must be at most the 4 workers, got 5"):
        Experiment(workload=workload, cluster=fast_cluster(4), strategy=ParameterServer(wait_for=5))
    with pytest.raises(ValueError, match=r"servers=3 is more than the 2 layers with parameters allow"):
        Experiment(workload=workload, cluster=fast_cluster(4), strategy=ParameterServer(servers=3))
    with pytest.raises(ValueError, match=r"servers=3001 is more than the model's 3000 parameters"):
        Experiment(workload=workload, cluster=fast_cluster(4),
                   strategy=ParameterServer(servers=3001, partition="slice"))
    with pytest.raises(ValueError, match=r"unknown device 'Z80'"):
        Experiment(workload=workload, cluster=fast_cluster(4), strategy=ParameterServer(server_device="Z80"))


def test_parameter_server_round_trips_through_an_experiment_file(tmp_path):
    from simulator.experiment import load_experiment

    path = tmp_path / "ps.toml"
    path.write_text(
        'iterations = 3\nbatch_size = 8\n[workload]\nzoo = "mlp"\n[cluster]\nnodes = 2\n'
        '[strategy]\nname = "parameter_server"\nmode = "ssp"\nstaleness_bound = 1\nservers = 2\n'
    )
    exp = load_experiment(path)
    assert exp.strategy == ParameterServer(mode="ssp", staleness_bound=1, servers=2)
    assert Experiment.from_dict(exp.to_dict()) == exp
    assert math.isfinite(simulate(exp).summary()["staleness_mean"])


def test_servers_on_cpus_serve_workers_training_in_bf16():
    exp = Experiment(workload=timed_workload(params=(1000, 2000)), cluster=fast_cluster(2), precision="bf16",
                     strategy=ParameterServer(servers=2), iterations=2)
    result = simulate(exp)
    assert result.ranks["kind"].tolist() == ["gpu", "gpu", "host", "host"]
    assert result.ranks["peak_flops"].tolist()[2:] == [5.12e12, 5.12e12]  # cpu-socket fp32
    s = result.summary()
    assert s["updates_applied"] == 4
    # Utilisation counts the GPUs only: the servers do not train.
    peak = 2 * exp.cluster.device.flops("bf16")
    assert s["model_flops_utilisation"] == pytest.approx(
        s["throughput"] * result.stats["flops_per_sample"] / peak, rel=1e-12)


def test_staleness_histogram_and_plot():
    import matplotlib

    matplotlib.use("Agg")
    from simulator.results import plot_staleness, staleness_histogram

    n = 4
    result = run(n, ParameterServer(mode="async", server_device=FAST_SERVER), iterations=10)
    hist = staleness_histogram(result)
    # First round 0, 1, 2, 3 once each; then n - 1 for every other gradient.
    total = len(result.updates)
    assert hist["staleness"].tolist() == [0, 1, 2, 3]
    assert hist["count"].tolist() == [1, 1, 1, total - 3]
    assert hist["fraction"].sum() == pytest.approx(1.0)
    ax = plot_staleness(result, labels=["async"])
    ys, edges, _ = ax.patches[0].get_data()  # a step histogram, one bin per staleness 0..3
    assert list(edges) == [-0.5, 0.5, 1.5, 2.5, 3.5] and ys[-1] == pytest.approx((total - 3) / total)
