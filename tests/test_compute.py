"""Compute model: roofline arithmetic and the variability distributions."""

import dataclasses
import math

import numpy as np
import pytest

from simulator.compute import ComputeModel, ComputeTimer, Slowdown, layer_times
from simulator.hardware import Device
from simulator.workload import Layer, Workload

DEV = Device(name="d", peak_flops={"fp32": 1e12, "bf16": 4e12}, mem_bandwidth=1e11, mem_capacity=1e10,
             compute_efficiency=0.5, memory_efficiency=0.8, kernel_overhead=1e-6)


def wl():
    return Workload(name="w", layers=(
        Layer(name="mm", kind="Linear", params=1000, fwd_flops=2e6, bwd_flops=4e6, input_elems=10, output_elems=10),
        Layer(name="relu", kind="ReLU", params=0, fwd_flops=0, bwd_flops=0, input_elems=1e6, output_elems=1e6,
              kernels=1),
    ))


def test_roofline_by_hand():
    fwd, bwd = layer_times(wl(), DEV, "fp32", 8)
    # matmul: compute bound, 2e6*8 FLOPs at 1e12*0.5, plus one kernel
    assert math.isclose(fwd[0], max(2e6 * 8 / 5e11, 4 * (1000 + 8 * 20) / 8e10) + 1e-6)
    assert math.isclose(bwd[0], 4e6 * 8 / 5e11 + 2e-6)
    # relu: memory bound, reads and writes 1e6 elements per sample in fp32
    assert math.isclose(fwd[1], 4 * 8 * 2e6 / 8e10 + 1e-6)
    # bf16 halves the bytes and uses the bf16 peak
    fwd16, _ = layer_times(wl(), DEV, "bf16", 8)
    assert math.isclose(fwd16[1], 2 * 8 * 2e6 / 8e10 + 1e-6)
    assert math.isclose(fwd16[0], max(2e6 * 8 / 2e12, 2 * (1000 + 160) / 8e10) + 1e-6)


def draws(model, n=20000, seed=3):
    rngs = [np.random.default_rng(seed)]
    timer = ComputeTimer(wl(), [DEV], "fp32", "sgd", model, rngs)
    base = timer.base_time(0, "forward", (0, 2), 8)
    return np.array([timer.time(0, "forward", (0, 2), 8) for _ in range(n)]) / base


@pytest.mark.parametrize("distribution", ["lognormal", "normal"])
def test_mean_one_with_the_requested_cv(distribution):
    x = draws(ComputeModel(distribution=distribution, noise_cv=0.2))
    assert abs(x.mean() - 1) < 0.01  # standard error 0.2/sqrt(20000) = 0.0014
    assert abs(x.std() / x.mean() - 0.2) < 0.01


def test_exponential_has_rate_one_over_the_model_time():
    x = draws(ComputeModel(distribution="exponential"))
    assert abs(x.mean() - 1) < 0.03
    assert abs(x.std() - 1) < 0.05
    assert abs((x > 1).mean() - math.exp(-1)) < 0.015  # P(T > t) = e^{-1}


def test_deterministic_and_zero_cv_draw_nothing():
    assert (draws(ComputeModel(distribution="deterministic", noise_cv=0.5), n=10) == 1).all()
    assert (draws(ComputeModel(noise_cv=0.0), n=10) == 1).all()


def test_transient_slowdown_window():
    model = ComputeModel(slowdowns=(Slowdown(rank=0, start=1.0, end=2.0, factor=3.0),))
    timer = ComputeTimer(wl(), [DEV, DEV], "fp32", "sgd", model, [np.random.default_rng(0)] * 2)
    base = timer.base_time(0, "forward", (0, 2), 8)
    assert timer.time(0, "forward", (0, 2), 8, now=0.5) == base
    assert timer.time(0, "forward", (0, 2), 8, now=1.0) == 3 * base
    assert timer.time(0, "forward", (0, 2), 8, now=2.0) == base
    assert timer.time(1, "forward", (0, 2), 8, now=1.5) == base


def test_bad_variability_settings():
    with pytest.raises(ValueError, match="compute.distribution"):
        ComputeModel(distribution="weibull")
    with pytest.raises(ValueError, match="Slowdown.end"):
        Slowdown(rank=0, start=2.0, end=1.0, factor=2.0)
    with pytest.raises(ValueError, match="compute.slowdowns"):
        ComputeModel(slowdowns=({"rank": 0},))
    model = ComputeModel(slowdowns=({"rank": 1, "start": 0, "end": 1, "factor": 2},))
    assert ComputeModel(**{**model.to_dict(), "stragglers": {}}) == model


def test_shifted_exponential_has_the_shift_as_its_minimum():
    x = draws(ComputeModel(distribution="exponential", shift=0.25))
    assert x.min() >= 0.25
    assert abs(x.mean() - 1) < 0.03
    assert abs(x.std() - 0.75) < 0.04  # the exponential part has mean (and sd) 1 - shift


def test_iteration_scope_draws_once_per_rank_and_iteration():
    model = ComputeModel(distribution="lognormal", noise_cv=0.5, scope="iteration")
    timer = ComputeTimer(wl(), [DEV, DEV], "fp32", "sgd", model, [np.random.default_rng(s) for s in (0, 1)])
    fwd = timer.base_time(0, "forward", (0, 2), 8)
    bwd = timer.base_time(0, "backward", (0, 2), 8)
    factors = []
    for i in range(200):
        f = timer.time(0, "forward", (0, 2), 8, iteration=i) / fwd
        b = timer.time(0, "backward", (0, 2), 8, iteration=i) / bwd
        assert f == pytest.approx(b, rel=1e-12)  # one draw covers the whole iteration
        factors.append(f)
    assert len(set(factors)) == 200
    assert abs(np.std(factors) / np.mean(factors) - 0.5) < 0.1


def test_bad_scope_and_shift():
    with pytest.raises(ValueError, match=r"compute.scope must be one of \('op', 'iteration'\), got 'step'"):
        ComputeModel(scope="step")
    with pytest.raises(ValueError, match=r"compute.shift must be a number in \[0, 1\), got 1"):
        ComputeModel(distribution="exponential", shift=1)


def _curve_workload():
    # one layer measured at 8, 16 and 64 samples: fwd 2, 3, 9 ms; bwd 4, 6, 18 ms
    layer = Layer(name="fc", kind="Linear", params=10, fwd_flops=1.0, bwd_flops=2.0, input_elems=1,
                  output_elems=1, fwd_time=0.003, bwd_time=0.006, fwd_times=(0.002, 0.009),
                  bwd_times=(0.004, 0.018))
    return Workload(name="curve", layers=(layer,), calibration_batch=16, calibration_batches=(8, 64))


@pytest.mark.parametrize("samples, fwd", [
    (16, 0.003),                       # a measured size
    (12, 0.0025),                      # halfway between 8 and 16
    (40, 0.003 + 0.006 * 24 / 48),     # between 16 and 64
    (128, 0.009 + 0.006 / 48 * 64),    # beyond 64: the last segment goes on
    (6, 0.002 - 0.001 / 8 * 2),        # below 8: the first segment goes on
    (1, 0.002 - 0.001 / 8 * 7),
])
def test_times_measured_at_several_batches_are_interpolated(samples, fwd):
    wl = _curve_workload()
    f, b = layer_times(wl, Device(name="d", peak_flops={"fp32": 1e12}, mem_bandwidth=1e11, mem_capacity=1e9),
                       "fp32", samples)
    assert f[0] == pytest.approx(fwd, rel=1e-12) and b[0] == pytest.approx(2 * fwd, rel=1e-12)


@pytest.mark.parametrize("at8, at16, samples, fwd", [
    (0.003, 0.002, 4, 0.003),           # 8 slower than 16 (noise): no longer than at 8
    (0.002, 0.005, 4, 0.002 * 4 / 8),   # steeper than linear: no less than the time at 8 scaled down
])
def test_below_the_smallest_batch_the_time_is_bounded(at8, at16, samples, fwd):
    layer = Layer(name="fc", kind="Linear", params=10, fwd_flops=1.0, bwd_flops=2.0, input_elems=1,
                  output_elems=1, fwd_time=at16, bwd_time=at16, fwd_times=(at8,), bwd_times=(at8,))
    wl = Workload(name="w", layers=(layer,), calibration_batch=16, calibration_batches=(8,))
    f, _ = layer_times(wl, Device(name="d", peak_flops={"fp32": 1e12}, mem_bandwidth=1e11, mem_capacity=1e9),
                       "fp32", samples)
    assert f[0] == pytest.approx(fwd, rel=1e-12)


def test_calibration_batches_round_trip_and_bad_ones_are_named():
    wl = _curve_workload()
    assert Workload.from_dict(wl.to_dict()) == wl
    layer = wl.layers[0]
    with pytest.raises(ValueError, match=r"one time per Workload.calibration_batches \(2\), got 1 and 2"):
        Workload(name="w", layers=(dataclasses.replace(layer, fwd_times=(0.002,)),), calibration_batch=16,
                 calibration_batches=(8, 64))
    with pytest.raises(ValueError, match=r"must differ from each other and from calibration_batch=16, got \[8, 16\]"):
        Workload(name="w", layers=(layer,), calibration_batch=16, calibration_batches=(8, 16))
    with pytest.raises(ValueError, match="calibration_batches must be integers >= 1, got \\[0\\]"):
        Workload(name="w", layers=(layer,), calibration_batch=16, calibration_batches=(0,))
    with pytest.raises(ValueError, match="needs calibration_batch"):
        Workload(name="w", layers=(layer,), calibration_batches=(8, 64))
    with pytest.raises(ValueError, match="fwd_times/bwd_times need fwd_time and bwd_time"):
        Layer(name="fc", kind="Linear", params=1, fwd_flops=1.0, bwd_flops=1.0, input_elems=1, output_elems=1,
              fwd_times=(0.1,), bwd_times=(0.1,))
