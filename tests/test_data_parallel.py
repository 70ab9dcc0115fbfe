"""Synchronous data parallel: iteration time composed from compute and all-reduce formulas.

A hand-made workload on a hand-made device: compute-bound (memory bandwidth
huge), no kernel overhead, efficiency 1, so a layer's forward takes exactly
fwd_flops * batch / peak. Each layer's gradients fill a bucket of their own.
"""

import math

import pytest

from simulator.cluster import Cluster
from simulator.compute import ComputeModel
from simulator.executor import simulate
from simulator.experiment import Experiment
from simulator.hardware import Device, LinkSpec
from simulator.workload import Layer, Workload
from strategies import AllReduceSGD

PEAK = 1e12  # FLOP/s
MEM_BW = 1e12  # bytes/s: sets the optimizer step time
A, B = 10e-6, 1e9  # network latency (s) and bandwidth (bytes/s)
BATCH = 4
MIB = 1024 * 1024

DEVICE = Device(name="test-gpu", peak_flops={"fp32": PEAK}, mem_bandwidth=MEM_BW, mem_capacity=80e9,
                compute_efficiency=1.0, memory_efficiency=1.0, kernel_overhead=0.0)


def workload(params, fwd, bwd):
    layers = tuple(
        Layer(name=f"l{i}", kind="Linear", params=p, fwd_flops=f, bwd_flops=b, input_elems=0, output_elems=0)
        for i, (p, f, b) in enumerate(zip(params, fwd, bwd))
    )
    return Workload(name="hand", layers=layers)


def cluster(p):
    return Cluster.homogeneous(nodes=p, gpus_per_node=1, gpu=DEVICE,
                               inter=LinkSpec(name="net", bandwidth=B, latency=A))


def ring(p, nbytes):
    return 2 * (p - 1) * A + 2 * (p - 1) / p * nbytes / B


def sgd_step(params):
    # SGD streams w, g in and w out (3 fp32 words), 2 FLOPs per parameter; one kernel per layer.
    return max(2 * params / PEAK, 12 * params / MEM_BW)


def run(wl, p, *, overlap, iterations=3, **kw):
    exp = Experiment(workload=wl, cluster=cluster(p), batch_size=BATCH, iterations=iterations,
                     strategy=AllReduceSGD(overlap=overlap, bucket_mb=1, first_bucket_mb=1), **kw)
    return simulate(exp)


# two layers of 1M parameters (4 MiB of fp32 gradients each, one bucket each)
PARAMS = [1_000_000, 1_000_000]


def times(fwd, bwd):
    return [f * BATCH / PEAK for f in fwd], [b * BATCH / PEAK for b in bwd]


@pytest.mark.parametrize("p", [2, 4, 8])
def test_overlap_off_is_compute_plus_all_reduce_plus_step(p):
    fwd, bwd = [3e9, 5e9], [6e9, 10e9]
    wl = workload(PARAMS, fwd, bwd)
    tf, tb = times(fwd, bwd)
    expected = sum(tf) + sum(tb) + sum(ring(p, 4 * n) for n in PARAMS) + sgd_step(sum(PARAMS))
    r = run(wl, p, overlap=False)
    it = r.iterations
    assert (abs(it["duration"] - expected) / expected < 0.01).all()
    assert math.isclose(r.summary()["iteration_time_mean"], expected, rel_tol=1e-9)


@pytest.mark.parametrize("hidden", [True, False])
def test_overlap_by_hand(hidden):
    """Backward runs layer 1 then layer 0; bucket 0 (layer 1) is all-reduced during layer 0's backward.

    iteration = F + b1 + max(b0, c1) + c0 + step, where c_k is bucket k's all-reduce.
    """
    p = 4
    c = ring(p, 4 * PARAMS[0])  # both buckets are the same size
    b0 = 2 * c if hidden else c / 2  # layer 0's backward longer or shorter than bucket 0's all-reduce
    bwd = [b0 * PEAK / BATCH, 1e9]
    fwd = [2e9, 2e9]
    wl = workload(PARAMS, fwd, bwd)
    tf, tb = times(fwd, bwd)
    expected = sum(tf) + tb[1] + max(tb[0], c) + c + sgd_step(sum(PARAMS))
    on = run(wl, p, overlap=True).summary()["iteration_time_mean"]
    off = run(wl, p, overlap=False).summary()["iteration_time_mean"]
    assert math.isclose(on, expected, rel_tol=1e-9)
    assert on <= off
    assert math.isclose(off - on, min(tb[0], c), rel_tol=1e-9)  # what overlap hides


def test_one_device_scales_perfectly_and_sends_nothing():
    wl = workload(PARAMS, [1e9, 1e9], [2e9, 2e9])
    s = run(wl, 1, overlap=True).summary()
    assert s["scaling_efficiency"] == pytest.approx(1.0, rel=1e-12)
    assert s["bytes_on_wire"] == 0


def test_straggler_sets_the_pace_of_synchronous_training():
    fwd, bwd = [3e9, 5e9], [6e9, 10e9]
    wl = workload(PARAMS, fwd, bwd)
    tf, tb = times(fwd, bwd)
    p, slow, iters = 4, 2.5, 4
    r = run(wl, p, overlap=False, iterations=iters, compute=ComputeModel(stragglers={2: slow}))
    period = slow * (sum(tf) + sum(tb)) + sum(ring(p, 4 * n) for n in PARAMS) + slow * sgd_step(sum(PARAMS))
    assert math.isclose(r.stats["makespan"], iters * period, rel_tol=1e-9)


def test_noise_is_seeded():
    wl = workload(PARAMS, [3e9, 5e9], [6e9, 10e9])
    noisy = ComputeModel(noise_cv=0.2)
    a = run(wl, 4, overlap=True, seed=7, compute=noisy).iterations
    b = run(wl, 4, overlap=True, seed=7, compute=noisy).iterations
    c = run(wl, 4, overlap=True, seed=8, compute=noisy).iterations
    assert a.equals(b)
    assert not a["duration"].equals(c["duration"])


def test_stepped_and_fast_collectives_give_the_same_training_run():
    wl = workload([300_000, 2_000_000, 700_000], [1e9, 4e9, 2e9], [2e9, 8e9, 4e9])
    cl = Cluster.homogeneous(nodes=3, gpus_per_node=4, nics_per_node=2, inter="25GbE")
    for algorithm in ("ring", "halving_doubling", "hierarchical", "tree"):
        base = Experiment(workload=wl, cluster=cl, strategy=AllReduceSGD(algorithm=algorithm, bucket_mb=2),
                          batch_size=BATCH, iterations=2)
        fast = simulate(base).stats["makespan"]
        stepped = simulate(base.replace(collective_model="stepped")).stats["makespan"]
        assert math.isclose(fast, stepped, rel_tol=1e-9), algorithm


def test_experiment_pickles_for_process_pools():
    import pickle

    wl = workload(PARAMS, [1e9, 1e9], [2e9, 2e9])
    exp = Experiment(workload=wl, cluster=cluster(2), strategy=AllReduceSGD(), batch_size=BATCH,
                     compute=ComputeModel(noise_cv=0.1, stragglers={1: 2.0}))
    clone = pickle.loads(pickle.dumps(exp))
    assert simulate(clone).iterations.equals(simulate(exp).iterations)


def test_measured_layer_times_replace_the_roofline():
    """Measured times at batch 8 scale linearly to the batch simulated (4 here)."""
    import dataclasses

    wl = workload(PARAMS, [1e9, 1e9], [2e9, 2e9])
    measured = tuple(dataclasses.replace(layer, fwd_time=0.010, bwd_time=0.030) for layer in wl.layers)
    calibrated = Workload(name="measured", layers=measured, calibration_batch=8)
    assert Workload.from_dict(calibrated.to_dict()) == calibrated
    r = run(calibrated, 1, overlap=False)
    expected = 2 * (0.010 + 0.030) * BATCH / 8 + sgd_step(sum(PARAMS))
    assert math.isclose(r.summary()["iteration_time_mean"], expected, rel_tol=1e-9)
    with pytest.raises(ValueError, match="calibration_batch"):
        simulate(Experiment(workload=Workload(name="m", layers=measured), cluster=cluster(1),
                            strategy=AllReduceSGD(), batch_size=BATCH))


def test_mixed_devices_run_at_the_slowest_pace_and_efficiency_counts_each_device():
    import dataclasses

    fwd, bwd = [3e9, 5e9], [6e9, 10e9]
    wl = workload(PARAMS, fwd, bwd)
    slow = dataclasses.replace(DEVICE, name="half-speed", peak_flops={"fp32": PEAK / 2})
    mixed = dataclasses.replace(cluster(2), devices=(DEVICE, slow))
    r = simulate(Experiment(workload=wl, cluster=mixed, strategy=AllReduceSGD(overlap=False, bucket_mb=1),
                            batch_size=BATCH, iterations=2))
    tf, tb = times(fwd, bwd)
    step_fast, step_slow = max(2 * 2e6 / PEAK, 12 * 2e6 / MEM_BW), max(2 * 2e6 / (PEAK / 2), 12 * 2e6 / MEM_BW)
    # the all-reduce waits for the half-speed rank; each rank then takes its own step
    ar = sum(ring(2, 4 * n) for n in PARAMS)
    assert math.isclose(r.stats["makespan"], 2 * (2 * (sum(tf) + sum(tb)) + ar + step_slow), rel_tol=1e-9)
    alone = BATCH / (sum(tf) + sum(tb) + step_fast) + BATCH / (2 * (sum(tf) + sum(tb)) + step_slow)
    s = r.summary()
    assert math.isclose(s["scaling_efficiency"], s["throughput"] / alone, rel_tol=1e-12)


def test_link_tables_do_not_depend_on_the_collective_model():
    wl = workload([300_000, 2_000_000, 700_000], [1e9, 4e9, 2e9], [2e9, 8e9, 4e9])
    cl = Cluster.homogeneous(nodes=2, gpus_per_node=4, inter="25GbE")
    base = Experiment(workload=wl, cluster=cl, strategy=AllReduceSGD(bucket_mb=2), batch_size=BATCH, iterations=2)
    fast, stepped = simulate(base), simulate(base.replace(collective_model="stepped"))
    assert fast.stats["bundles_contended"] == 0
    assert list(fast.links["bytes"]) == pytest.approx(list(stepped.links["bytes"]), rel=1e-12)
    assert list(fast.links["utilisation"]) == pytest.approx(list(stepped.links["utilisation"]), rel=1e-9)
    assert list(fast.links["busy_time"]) == pytest.approx(list(stepped.links["busy_time"]), rel=1e-9)
    assert fast.summary()["network_utilisation"] == pytest.approx(stepped.summary()["network_utilisation"])
