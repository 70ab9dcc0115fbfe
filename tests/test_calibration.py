"""Calibration and validation pieces that need no root: the shared-cores compute model,
compressor cost scales, the alpha-beta fit, the layer profile, calibrate() on local
processes, and the validation table's arithmetic."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import simpy
from builders import timed_workload

import realrun
from realrun.calibrate import (
    Calibration,
    calibrate,
    compute_batch,
    measure_executor,
    profile_layers,
)
from realrun.linkbench import LinkProbe
from realrun.linkcal import (
    bucket_time,
    burst_delays,
    fit_alpha_beta,
    fit_burst,
    fit_flow_window,
    fit_message_delay,
    queue_delays,
    simulated_round_trip,
)
from realrun.validate import VALIDATION_COLUMNS, compare, error_summary, steady_metrics, validate
from simulator import Cluster, ComputeModel, Experiment, Workload, simulate
from simulator.compute import SharedCores
from simulator.results import RunResult
from strategies import AllReduceSGD, PipelineParallel
from strategies.ops import TensorRef

# ------------------------------------------------------------------ shared cores


def _finish_times(cores: int, works, starts=None, cancel=None):
    env = simpy.Environment()
    cpu = SharedCores(env, cores)
    done = {}

    def job(i, work, start):
        yield env.timeout(start)
        event = cpu.run(work)
        if cancel and i in cancel:
            yield env.timeout(cancel[i])
            cpu.cancel(event)
            done[i] = None
            return
        yield event
        done[i] = env.now

    for i, work in enumerate(works):
        env.process(job(i, work, (starts or [0] * len(works))[i]))
    env.run()
    return done


def test_processor_sharing_by_hand():
    # One core, works 1 and 2 from t=0: both at half speed until t=2 (the first has done 1),
    # then the second alone with 1 left: t=3.
    assert _finish_times(1, [1.0, 2.0]) == pytest.approx({0: 2.0, 1: 3.0})
    # Two cores, two ops: each has a core.
    assert _finish_times(2, [1.0, 2.0]) == pytest.approx({0: 1.0, 1: 2.0})
    # Three equal ops on two cores: each at 2/3 speed, all done at 1.5.
    assert _finish_times(2, [1.0, 1.0, 1.0]) == pytest.approx({0: 1.5, 1: 1.5, 2: 1.5})
    # A late arrival: op 0 (work 2) alone for 1 s, then shares one core with op 1 (work 0.5):
    # op 1 done at 1 + 0.5 * 2 = 2, op 0 has 1 - 0.5 = 0.5 left, alone: 2.5.
    assert _finish_times(1, [2.0, 0.5], starts=[0.0, 1.0]) == pytest.approx({0: 2.5, 1: 2.0})
    # Cancelling op 1 at t=0.5 gives op 0 the core back: 0.25 done by then, 0.75 left: t=1.25.
    assert _finish_times(1, [1.0, 5.0], cancel={1: 0.5}) == pytest.approx({0: 1.25, 1: None})


def _dp(shared_cores: int, nodes: int = 2) -> Experiment:
    return Experiment(workload=timed_workload(params=(4096, 4096), fwd=0.2, bwd=0.4, batch=8),
                      cluster=Cluster.homogeneous(nodes=nodes, gpus_per_node=1, inter="400GbE"),
                      strategy=AllReduceSGD(), batch_size=8, iterations=4,
                      compute=ComputeModel(shared_cores=shared_cores))


def test_shared_cores_slow_lockstep_ranks_by_the_ratio():
    alone = simulate(_dp(0)).iterations
    one_core = simulate(_dp(1)).iterations
    two_cores = simulate(_dp(2)).iterations
    # Two ranks computing in lockstep on one core: every compute op takes twice as long.
    np.testing.assert_allclose(one_core["compute"].to_numpy(), 2 * alone["compute"].to_numpy(), rtol=1e-9)
    # As many cores as ranks: nothing changes.
    np.testing.assert_allclose(two_cores["compute"].to_numpy(), alone["compute"].to_numpy(), rtol=1e-12)
    # Four ranks on two cores: 4/2.
    four = simulate(_dp(2, nodes=4)).iterations
    np.testing.assert_allclose(four["compute"].to_numpy(), 2 * simulate(_dp(0, nodes=4)).iterations["compute"],
                               rtol=1e-9)


def test_compute_model_rejects_bad_sharing_and_scales():
    with pytest.raises(ValueError, match="shared_cores"):
        ComputeModel(shared_cores=-1)
    with pytest.raises(ValueError, match="cost_scale keys"):
        ComputeModel(cost_scale={"topk": 2.0})
    with pytest.raises(ValueError, match=r"cost_scale\['topk.encode'\]"):
        ComputeModel(cost_scale={"topk.encode": 0.0})
    model = ComputeModel(shared_cores=2, cost_scale={"topk.encode": 3.0})
    assert ComputeModel(**model.to_dict()) == model


def test_cost_scale_multiplies_compressor_spans():
    base = Experiment(workload=Workload.from_zoo("mlp", in_features=64, hidden=[256], out_features=10),
                      cluster=Cluster.homogeneous(nodes=2, gpus_per_node=1, gpu="cpu-core"),
                      strategy=AllReduceSGD(compression={"name": "topk", "ratio": 0.01}), batch_size=8,
                      iterations=2)
    scaled = base.replace(compute=ComputeModel(cost_scale={"topk.encode": 3.0, "topk.decode": 0.5}))

    def spans(exp, kind):
        tl = simulate(exp).timeline
        tl = tl[tl["name"].str.startswith(kind + "[")].sort_values(["rank", "start"])
        return (tl["end"] - tl["start"]).to_numpy()

    np.testing.assert_allclose(spans(scaled, "encode"), 3.0 * spans(base, "encode"), rtol=1e-9)
    np.testing.assert_allclose(spans(scaled, "decode"), 0.5 * spans(base, "decode"), rtol=1e-9)


# ------------------------------------------------------------------ message delay

_S, _B, _L = 1e6, 1.25e8, 2e-4  # bytes, bytes/s, seconds


@dataclass(frozen=True)
class _SendBesideCompute:
    """Ranks 0 .. computing-1 run a long forward from t=0; rank ``computing`` sends ``_S``
    bytes to the next rank meanwhile (processes start in rank order, so the computing ranks'
    ops are in progress when the message starts)."""

    name: ClassVar[str] = "send_beside_compute"
    computing: int

    def programs(self, job):
        data = TensorRef("data", _S, "custom")

        def compute(ctx):
            for _ in ctx.iterations():
                yield ctx.forward((0, job.num_layers))

        def sender(ctx):
            for _ in ctx.iterations():
                yield ctx.send(self.computing + 1, data, tag=1)

        def receiver(ctx):
            for _ in ctx.iterations():
                yield ctx.recv(self.computing, data, tag=1)

        return [compute] * self.computing + [sender, receiver]

    def to_dict(self):
        return {"name": self.name, "computing": self.computing}


def _arrival(computing: int, compute: ComputeModel) -> float:
    exp = Experiment(workload=timed_workload(fwd=1.0, bwd=1.0, batch=8),
                     cluster=Cluster.homogeneous(nodes=computing + 2, gpus_per_node=1, gpu="cpu-core",
                                                 inter="10GbE", inter_bandwidth=_B, inter_latency=_L),
                     strategy=_SendBesideCompute(computing), batch_size=8, iterations=1, compute=compute)
    tl = simulate(exp).timeline
    return float(tl.loc[tl["name"].str.startswith("send:"), "end"].iloc[0])


def test_message_delay_by_busy_cores():
    delays = (1e-3, 5e-3, 2e-3)
    # A message takes L + S/B, plus the delay of the cores busy when it starts; the last
    # entry serves more busy cores than it lists, and the cores can be busier than there are.
    for computing, expected in ((0, delays[0]), (1, delays[1]), (2, delays[2]), (3, delays[2])):
        got = _arrival(computing, ComputeModel(shared_cores=2, message_delay=delays))
        assert got == pytest.approx(_L + _S / _B + expected, rel=1e-9), computing
    # Without shared cores every message takes entry 0; with no table, none.
    assert _arrival(1, ComputeModel(message_delay=delays)) == pytest.approx(_L + _S / _B + delays[0], rel=1e-9)
    assert _arrival(1, ComputeModel(shared_cores=2)) == pytest.approx(_L + _S / _B, rel=1e-9)


def _all_reduce_time(p: int, model: str, delay: tuple) -> float:
    exp = Experiment(workload=Workload.from_zoo("mlp", in_features=4, hidden=[4], out_features=2),
                     cluster=Cluster.homogeneous(nodes=p, gpus_per_node=1, inter="10GbE", inter_bandwidth=_B,
                                                 inter_latency=_L),
                     strategy=LinkProbe(nbytes=_S, pattern="all_reduce"), batch_size=1, iterations=1,
                     collective_model=model, compute=ComputeModel(message_delay=delay))
    return float(simulate(exp).iterations["duration"].max())


@pytest.mark.parametrize("p", [2, 4])
def test_message_delay_once_per_step_of_a_ring_all_reduce(p):
    # A ring all-reduce is 2(p - 1) steps, each on the critical path: stepped and bundled
    # (the closed-form fast path) both pay the delay once per step.
    d = 3e-3
    for model in ("stepped", "auto"):
        extra = _all_reduce_time(p, model, (d,)) - _all_reduce_time(p, model, ())
        assert extra == pytest.approx(2 * (p - 1) * d, rel=1e-9), model


def test_compute_model_rejects_bad_message_delay():
    for bad, field in ((-1e-3,), r"message_delay\[0\]"), ((1e-3, float("nan")), r"message_delay\[1\]"), \
            ("1ms", "message_delay must be a list"), ({"0": 1e-3}, "message_delay must be a list"):
        with pytest.raises(ValueError, match=field):
            ComputeModel(message_delay=bad)
    model = ComputeModel(shared_cores=2, message_delay=[1e-4, 2e-3, 1e-3])
    assert model.message_delay == (1e-4, 2e-3, 1e-3)
    assert ComputeModel(**model.to_dict()) == model


def test_message_delay_fit_recovers_the_simulated_round_trips():
    # "Measured" round trips simulated with a known delay per busy-cores entry: the fit
    # gives the delays back. The probe computes nothing, so each row's delay is entry 0 of
    # a one-entry table, as measuring with b other processes busy would see entry b.
    exp = Experiment(workload=Workload.from_zoo("mlp", in_features=4, hidden=[4], out_features=2),
                     cluster=Cluster.homogeneous(nodes=2, gpus_per_node=1), strategy=AllReduceSGD(),
                     batch_size=1, iterations=2)
    link = exp.cluster.inter
    known = (2e-4, 3e-3, 1.1e-3)
    measured = [simulated_round_trip(exp, link, 4096, message_delay=(d,)) for d in known]
    baseline = simulated_round_trip(exp, link, 4096)
    table = pd.DataFrame({"busy": [2, 0, 1], "size": 4096.0, "seconds": [measured[2], measured[0], measured[1]]})
    assert fit_message_delay(table, baseline) == pytest.approx(known, rel=1e-9)
    # A round trip faster than the link's: no negative delay.
    fast = pd.DataFrame({"busy": [0], "size": 4096.0, "seconds": [0.5 * baseline]})
    assert fit_message_delay(fast, baseline) == (0.0,)
    with pytest.raises(ValueError, match="busy = 0, 1"):
        fit_message_delay(table[table["busy"] > 0], baseline)
    with pytest.raises(ValueError, match="baseline"):
        fit_message_delay(table, -1.0)
    with pytest.raises(ValueError, match=r"missing \['busy'\]"):
        fit_message_delay(table.drop(columns="busy"), baseline)


@pytest.mark.spawns
def test_calibration_applies_and_saves_the_message_delay(tmp_path, small_calibration):
    exp, measured, _ = small_calibration
    assert measured.message_delay == ()  # calibrate() without links measures none
    back = Calibration.load(dataclasses.replace(measured, message_delay=(1e-4, 2e-3)).save(tmp_path / "cal"))
    assert back.message_delay == (1e-4, 2e-3)
    exp = exp.replace(compute=ComputeModel(message_delay=(5e-3,)))
    assert back.apply(exp).compute.message_delay == (1e-4, 2e-3)
    # Not measured: the experiment's own stays.
    assert measured.apply(exp).compute.message_delay == (5e-3,)


# ------------------------------------------------------------------ fits and profiles


def test_executor_compute_pools_its_launches(monkeypatch):
    """Each launch is a draw of its own: the measurement is the mean over every launch's
    ranks and iterations (from the third to the second-last)."""
    import importlib

    iterations, launches, calls = 6, 3, []

    def fake_run(experiment, **_):
        k = len(calls)
        calls.append(experiment)
        rows = []
        for rank in range(experiment.cluster.num_gpus):
            for i in range(iterations):
                t = float(i)
                rows += [("compute", rank, "forward[0:3]", t, t + 0.001 * (k + 1), i),
                         ("compute", rank, "backward[0:3]", t + 0.01, t + 0.01 + 0.002 * (k + 1) * (rank + 1), i),
                         ("compute", rank, "optimizer_step", t + 0.1, t + 0.1005, i)]
        timeline = pd.DataFrame(rows, columns=["stream", "rank", "name", "start", "end", "iteration"])
        return type("Result", (), {"timeline": timeline})()

    monkeypatch.setattr(importlib.import_module("realrun.run"), "run", fake_run)
    exp = Experiment(workload=Workload.from_zoo("mlp", in_features=4, hidden=[4], out_features=2),
                     cluster=Cluster.homogeneous(nodes=1, gpus_per_node=1), strategy=AllReduceSGD(),
                     batch_size=8, iterations=2)
    got = measure_executor(exp, 8, threads=1, device="cpu", ranks=2, iterations=iterations, launches=launches)
    assert len(calls) == launches and all(c.cluster.num_gpus == 2 for c in calls)
    mean_k = np.mean([k + 1 for k in range(launches)])  # launch k's factor, equal counts per launch
    assert got["forward"] == pytest.approx(0.001 * mean_k)
    assert got["backward"] == pytest.approx(0.002 * mean_k * 1.5)  # ranks 1 and 2 times, averaged
    assert got["optimizer_step"] == pytest.approx(0.0005)
    with pytest.raises(ValueError, match="launches must be an integer >= 1"):
        measure_executor(exp, 8, threads=1, device="cpu", launches=0)


def test_alpha_beta_fit_recovers_known_link():
    alpha, beta = 2e-4, 5e7
    rows = [(m, w, m * alpha + w / beta) for m, w in ((2, 65536), (2, 1 << 20), (4, 3e5), (4, 5e6))]
    a, b = fit_alpha_beta(rows)
    assert a == pytest.approx(alpha, rel=1e-6)
    assert b == pytest.approx(beta, rel=1e-6)
    # A negative intercept is clipped, and the bandwidth refitted through the origin.
    a, b = fit_alpha_beta([(1, 1e6, 0.009), (1, 2e6, 0.0195)])
    assert a == 0.0 and 1e6 / 0.009 > b > 2e6 / 0.0195


def test_alpha_beta_fit_takes_bandwidth_from_the_long_transfers():
    """Times measured on the emulated cluster with links shaped by tc tbf to 400 Mbit/s
    (50 MB/s): point-to-point (2 nodes) and ring all-reduce (3 nodes) at 64 KiB-4 MiB. The
    256 KiB all-reduce beat the line rate (the token bucket's burst) and the 64 KiB one waited
    on the scheduler; every transfer of 1 MiB and more ran at 49-50 MB/s. The fit's bandwidth
    is the shaped rate's, not one the small messages pull up."""
    rows = [(2, 65536, 0.001314), (2, 262144, 0.005220), (2, 1048576, 0.021359), (2, 4194304, 0.084594),
            (4, 87381.3, 0.003318), (4, 349525.3, 0.005388), (4, 1398101.3, 0.028712), (4, 5592405.3, 0.112655)]
    alpha, beta = fit_alpha_beta(rows)
    assert beta == pytest.approx(50e6, rel=0.02)
    assert 0 <= alpha < 1e-3


def test_flow_window_fit_recovers_a_known_window():
    alpha, beta, window = 1e-4, 50e6, 3e5
    sizes = (65536, 262144, 1 << 20, 4 << 20)
    rows = [(n, 2 * alpha + min(window, n) / beta) for n in sizes]  # round trips: two latencies
    assert fit_flow_window(rows, alpha, beta) == pytest.approx(window)
    # Small messages drain partly before the empty one is sent: they do not pull the window down.
    drained = [(65536, 2 * alpha + 1e4 / beta), (262144, 2 * alpha + 1e5 / beta)] + rows[2:]
    assert fit_flow_window(drained, alpha, beta) == pytest.approx(window)
    # With no large message, every size counts.
    assert fit_flow_window(rows[:2], alpha, beta) == pytest.approx((65536 + 262144) / 2)
    with pytest.raises(ValueError, match="no queue"):
        fit_flow_window([], alpha, beta)


def test_queue_probe_measures_the_flow_window_in_the_simulator():
    """The probe calibration runs for real, run in the simulator on a link with a known
    window, by rendezvous as gloo does: the empty message arrives latency + min(W, S)/B after
    its send and its answer one latency later, so the fit gives the window back."""
    B, L, W = 50e6, 1e-4, 3e5
    sizes = (65536.0, 1 << 20, 4 << 20)
    exp = Experiment(workload=Workload.from_zoo("mlp", in_features=4, hidden=[4], out_features=2),
                     cluster=Cluster.homogeneous(nodes=3, gpus_per_node=1, inter="10GbE", inter_bandwidth=B,
                                                 inter_latency=L, inter_flow_window=W),
                     strategy=LinkProbe(nbytes=sizes[0], pattern="queue", sizes=sizes), batch_size=1,
                     iterations=2 * len(sizes), eager_limit=0)
    delays = queue_delays(simulate(exp))
    for i, d in delays.items():
        assert d == pytest.approx(2 * L + min(W, sizes[i % len(sizes)]) / B)
    rows = [(sizes[i % len(sizes)], d) for i, d in delays.items()]
    assert fit_flow_window(rows, L, B) == pytest.approx(W)


def test_bucket_time_is_the_fluid_bucket_closed_form():
    alpha, R, B, P = 1e-4, 50e6, 175e3, 1e9
    reach = B * P / (P - R)
    assert bucket_time(64e3, alpha, R, B, P) == pytest.approx(alpha + 64e3 / P)
    assert bucket_time(4e6, alpha, R, B, P) == pytest.approx(alpha + (4e6 - B) / R)
    # continuous where the bucket runs dry
    assert bucket_time(reach, alpha, R, B, P) == pytest.approx(alpha + (reach - B) / R)
    assert bucket_time(1e6, alpha, R, 0.0, 0.0) == pytest.approx(alpha + 1e6 / R)


def test_burst_fit_recovers_a_known_bucket():
    alpha, R, B, P = 1e-4, 50e6, 175e3, 4e8
    sizes = (16384, 65536, 262144, 1 << 20, 4 << 20)
    rows = [(n, float(bucket_time(n, alpha, R, B, P))) for n in sizes]
    burst, peak = fit_burst(rows, alpha, R)
    assert burst == pytest.approx(B, rel=0.03)  # the grid's step: 1/400 of 4 MiB
    assert peak == pytest.approx(P, rel=0.06)  # the grid's step: 5.9 %
    # Messages no faster than the rate: no bucket.
    plain = [(n, alpha + n / R) for n in sizes]
    assert fit_burst(plain, alpha, R) == (0.0, 0.0)
    with pytest.raises(ValueError, match="no burst"):
        fit_burst([], alpha, R)
    with pytest.raises(ValueError, match="seconds must be > 0"):
        fit_burst([(65536, -1e-3)], alpha, R)


def test_burst_probe_measures_the_bucket_in_the_simulator():
    """The burst probe run in the simulator on a link with a known bucket: each message
    follows a filler that idles the sender's outgoing link for longer than the bucket takes
    to fill, so it crosses in the closed form's time (rendezvous: three latencies, and one
    for the empty answer that ends the measurement, which fits the eager limit of 0), and
    the fit gives the bucket back."""
    R, L, B, P = 50e6, 1e-6, 175e3, 4e8
    sizes = (16384.0, 65536.0, 262144.0, 1 << 20, 4 << 20)
    exp = Experiment(workload=Workload.from_zoo("mlp", in_features=4, hidden=[4], out_features=2),
                     cluster=Cluster.homogeneous(nodes=3, gpus_per_node=1, inter="10GbE", inter_bandwidth=R,
                                                 inter_latency=L, inter_burst=B, inter_burst_bandwidth=P),
                     strategy=LinkProbe(nbytes=sizes[0], pattern="burst", sizes=sizes), batch_size=1,
                     iterations=2 * len(sizes), eager_limit=0)
    delays = burst_delays(simulate(exp))
    assert len(delays) == 2 * len(sizes)
    for i, d in delays.items():
        assert d == pytest.approx(bucket_time(sizes[i % len(sizes)], 4 * L, R, B, P))
    burst, peak = fit_burst([(sizes[i % len(sizes)], d) for i, d in delays.items()], 4 * L, R)
    assert burst == pytest.approx(B, rel=0.03)
    assert peak == pytest.approx(P, rel=0.06)


def test_profile_gives_the_big_layer_the_time():
    import torch

    from realrun.model import Data, ModelState, build_model

    w = Workload.from_zoo("mlp", in_features=16, hidden=[1024, 1024], out_features=4)
    model = build_model(w, 0)
    ModelState(model, w, torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as calibrate() runs it: one intra-op thread, like realrun's ranks
    try:
        prof = profile_layers(model, w, Data(model, 0, torch.device("cpu")), 64, torch.device("cpu"), repeats=7)
    finally:
        torch.set_num_threads(threads)
    names = [layer.name for layer in w.layers]
    big = [i for i, layer in enumerate(w.layers) if layer.params > 1_000_000]
    assert len(big) == 1, names
    flops = np.array([layer.fwd_flops for layer in w.layers])
    assert flops[big[0]] / flops.sum() > 0.9
    # The 1024x1024 layer does 97 % of the FLOPs: it must take most of the time both ways.
    assert prof["fwd"][big[0]] > 0.5 * prof["fwd"].sum()
    assert prof["bwd"][big[0]] > 0.5 * prof["bwd"].sum()
    assert (prof["fwd"] >= 0).all() and (prof["bwd"] >= 0).all()


def test_a_batch_of_another_size_is_another_batch():
    """Timing layers at several sizes must not reuse the first size's cached batch."""
    import torch

    from realrun.model import Data, build_model

    w = Workload.from_zoo("mlp", in_features=16, hidden=[32], out_features=4)
    model = build_model(w, 0)
    data = Data(model, 0, torch.device("cpu"))
    assert data.inputs(0, 0, 8, 0, 8).shape[0] == 8
    assert data.inputs(0, 0, 32, 0, 32).shape[0] == 32
    out = model(data.inputs(0, 0, 32, 0, 32))
    assert data.loss(out, 0, 0, 32, 0, 32).ndim == 0
    assert torch.equal(data.inputs(0, 0, 8, 2, 6), data.inputs(0, 0, 8, 0, 8)[2:6])


def test_compute_batch_is_the_micro_batch():
    w = Workload.from_zoo("mlp", in_features=16, hidden=[32], out_features=4)
    cluster = Cluster.homogeneous(nodes=2, gpus_per_node=1, gpu="cpu-core")
    pp = Experiment(workload=w, cluster=cluster, strategy=PipelineParallel(pp=2, micro_batches=4), batch_size=64)
    assert compute_batch(pp) == 16
    assert compute_batch(pp.replace(strategy=AllReduceSGD())) == 64


# ------------------------------------------------------------------ calibrate() on local processes


@pytest.fixture(scope="module")
def small_calibration(tmp_path_factory):
    w = Workload.from_zoo("mlp", in_features=32, hidden=[128], out_features=4)
    exp = Experiment(workload=w, cluster=Cluster.homogeneous(nodes=2, gpus_per_node=1, gpu="cpu-core"),
                     strategy=AllReduceSGD(compression={"name": "qsgd", "levels": 15}), batch_size=16,
                     iterations=6, seed=3, name="small")
    folder = tmp_path_factory.mktemp("cal")
    return exp, calibrate(exp, repeats=3, batches=(4, 64), out=folder), folder


@pytest.mark.spawns
def test_calibrate_measures_every_layer_and_round_trips(small_calibration):
    exp, cal, folder = small_calibration
    assert cal.workload.calibration_batch == 16 and cal.workload.calibration_batches == (4, 64)
    # the whole model's time at each size was measured on a batch of that size
    totals = cal.measurements[cal.measurements["kind"] == "forward_total"]
    assert sorted(totals["size"]) == [4, 16, 64]
    f64 = sum(layer.fwd_times[1] for layer in cal.workload.layers)
    f4 = sum(layer.fwd_times[0] for layer in cal.workload.layers)
    assert f64 > f4  # 16 times the samples: a CPU takes longer
    assert all(layer.fwd_time is not None and layer.bwd_time is not None for layer in cal.workload.layers)
    assert sum(layer.fwd_time for layer in cal.workload.layers) > 0
    assert cal.device.kernel_overhead > 0 and cal.device.flops("fp32") > 0
    assert set(cal.cost_scale) == {"qsgd.encode", "qsgd.decode"}
    assert cal.link is None  # no launcher given: no links measured
    back = Calibration.load(folder)
    assert back.device == cal.device and back.workload == cal.workload
    assert back.cost_scale == cal.cost_scale and back.shared_cores == cal.shared_cores
    assert cal.eager_limit == 0.0 and back.eager_limit == cal.eager_limit  # realrun's transports: rendezvous
    # The saved workload loads from an experiment file's [workload] path too.
    spec = {**exp.to_dict(), "workload": {"path": str(folder / "workload.json")}}
    assert Experiment.from_dict(spec).workload == cal.workload


@pytest.mark.spawns
def test_calibrated_experiment_uses_the_measurements(small_calibration):
    exp, cal, _ = small_calibration
    model = cal.apply(exp)
    assert model.cluster.device == cal.device
    assert model.compute.shared_cores == cal.shared_cores
    assert model.compute.cost_scale == cal.cost_scale
    assert model.eager_limit == cal.eager_limit == 0.0
    # The layers' times are the measured ones, times the slowdown after the idle time the
    # run has (on this CPU), and one iteration's forward is their sum.
    factor = cal.idle_factor(exp.replace(workload=cal.workload, cluster=cal.cluster_for(exp.cluster),
                                         compute=model.compute, eager_limit=cal.eager_limit))
    for mine, measured in zip(model.workload.layers, cal.workload.layers):
        assert mine.fwd_time == pytest.approx(factor * measured.fwd_time)
    tl = simulate(model.replace(compute=dataclasses.replace(model.compute, shared_cores=0))).timeline
    fwd = tl[tl["name"].str.startswith("forward") & (tl["rank"] == 0) & (tl["iteration"] == 1)]
    assert (fwd["end"] - fwd["start"]).sum() == pytest.approx(sum(lay.fwd_time for lay in model.workload.layers))
    other = exp.replace(workload=Workload.from_zoo("mlp", in_features=32, hidden=[64], out_features=4))
    with pytest.raises(ValueError, match="not the calibrated model"):
        cal.apply(other)


@pytest.mark.spawns
def test_calibrate_rejects_bad_arguments(small_calibration):
    exp = small_calibration[0]
    for kw, field in (({"device": "tpu"}, "device"), ({"threads": 0}, "threads"), ({"repeats": 1}, "repeats"),
                      ({"batch": 0}, "batch"), ({"shared_cores": -2}, "shared_cores"),
                      ({"message_delay": "yes"}, "message_delay")):
        with pytest.raises(ValueError, match=field):
            calibrate(exp, **kw)
    with pytest.raises(ValueError, match="launcher must be"):
        calibrate(exp, launcher=realrun.Torchrun())
    with pytest.raises(ValueError, match="no calibration.json"):
        Calibration.load(small_calibration[2] / "missing")


# ------------------------------------------------------------------ the validation table


def _result(iterations, updates=None, bytes_sent=(100.0, 300.0)) -> RunResult:
    it = pd.DataFrame(iterations, columns=["rank", "iteration", "start", "end"])
    it["duration"] = it["end"] - it["start"]
    it["compute"] = it["duration"] / 2
    it["comm"] = 0.0
    it["exposed_comm"] = it["duration"] / 2
    it["samples"] = 10
    ranks = pd.DataFrame({"rank": [0, 1, 2], "node": [0, 1, 2], "device": "x", "kind": ["gpu", "gpu", "host"],
                          "peak_flops": 1.0, "bytes_sent": [*bytes_sent, 1e9]})
    up = pd.DataFrame(updates or [], columns=["worker", "server", "shard", "clock", "samples", "version_read",
                                               "version_applied", "staleness", "read_time", "time", "applied"])
    empty = pd.DataFrame()
    return RunResult(experiment={}, iterations=it, timeline=empty, links=empty, ranks=ranks, updates=up)


def test_steady_metrics_by_hand():
    rows = [(r, i, float(i), float(i) + d) for r, d in ((0, 0.5), (1, 0.7)) for i in range(4)]
    rows.append((2, 3, 0.0, 100.0))  # a host rank's iterations do not count
    ups = [(0, 2, 0, c, 10, 0, s, s, 0.0, 0.0, True) for c, s in ((0, 9), (1, 9), (2, 1), (3, 3))]
    ups.append((1, 2, 0, 3, 10, 0, 7, 7, 0.0, 0.0, False))  # dropped: not counted
    m = steady_metrics(_result(rows, ups), warmup=2)
    # iterations 2 and 3 of ranks 0 and 1: durations 0.5, 0.5, 0.7, 0.7
    assert m["iteration_time_mean"] == pytest.approx(0.6)
    assert m["iteration_time_p90"] == pytest.approx(np.quantile([0.5, 0.5, 0.7, 0.7], 0.9))
    # 40 samples between t=2 (first start) and t=3.7 (last end)
    assert m["throughput"] == pytest.approx(40 / 1.7)
    assert m["staleness_mean"] == pytest.approx(2.0)  # clocks 2 and 3: staleness 1 and 3
    assert m["bytes_per_rank"] == pytest.approx(200.0)


def test_compare_gives_relative_errors():
    rows = compare("e", "s", {"iteration_time_mean": 1.1, "staleness_mean": 0.0, "throughput": 5.0},
                   {"iteration_time_mean": 1.0, "staleness_mean": 0.0}, "calibrated")
    table = pd.DataFrame(rows, columns=VALIDATION_COLUMNS).set_index("metric")
    assert table.loc["iteration_time_mean", "rel_error"] == pytest.approx(0.1)
    assert table.loc["staleness_mean", "rel_error"] == 0.0  # both zero
    assert "throughput" not in table.index  # measured lacks it
    summary = error_summary(pd.DataFrame(rows + compare("f", "s", {"iteration_time_mean": 0.7},
                                                        {"iteration_time_mean": 1.0}, "calibrated"),
                                         columns=VALIDATION_COLUMNS))
    assert summary.loc[0, "median_abs_error"] == pytest.approx(0.2)
    assert summary.loc[0, "max_abs_error"] == pytest.approx(0.3) and summary.loc[0, "worst"] == "f"


@pytest.mark.spawns
def test_validate_rejects_bad_input(small_calibration):
    exp = small_calibration[0]
    with pytest.raises(ValueError, match="empty"):
        validate([])
    with pytest.raises(ValueError, match=r"experiments\[0\]"):
        validate(["x"])
    with pytest.raises(ValueError, match="unique"):
        validate([exp, exp])
    with pytest.raises(ValueError, match="warmup"):
        validate([exp], warmup=6)
    with pytest.raises(ValueError, match="calibration"):
        validate([exp], calibration="yes")
    with pytest.raises(ValueError, match="values must be Calibrations"):
        validate([exp], calibration={"small": "cal.json"})


@pytest.mark.spawns
def test_validate_on_local_processes(small_calibration, tmp_path):
    exp, cal, _ = small_calibration
    out = tmp_path / "v.csv"
    table = validate([exp.replace(strategy=AllReduceSGD())], launcher=realrun.Local(), calibration=cal, out=out,
                     progress=False)
    assert list(table.columns) == VALIDATION_COLUMNS
    assert set(table["model"]) == {"catalogue", "calibrated"}
    written = pd.read_csv(out)
    assert len(written) == len(table)
    # bytes: the ring moves 2(p-1)/p of the gradients per iteration, in both executors
    b = table[table["metric"] == "bytes_per_rank"]
    expected = exp.iterations * 2 * (2 - 1) / 2 * 4 * exp.workload.params
    np.testing.assert_allclose(b["measured"], expected, rtol=1e-9)
    np.testing.assert_allclose(b["predicted"], expected, rtol=1e-9)
    # beside the table: the real run, the calibrated model's run and the calibration it was given
    case = tmp_path / "v-runs" / exp.name
    real, predicted = (pd.read_csv(case / sub / "iterations.csv") for sub in (".", "predicted"))
    it = table[(table["metric"] == "iteration_time_mean") & (table["model"] == "calibrated")].iloc[0]
    for tab, col in ((real, "measured"), (predicted, "predicted")):
        assert tab.loc[tab["iteration"] >= 2, "duration"].mean() == pytest.approx(it[col], rel=1e-9)
    saved = Calibration.load(case / "calibration")
    assert saved.workload == cal.workload and saved.cost_scale == cal.cost_scale


def test_idle_slowdown_hits_the_forward_after_communication():
    """With a slowdown of 1.5 after any idle time and none without, in data parallel without
    overlap only the forwards (after the all-reduce and the optimizer step) slow down: the
    factor is (1.5 F (n-1) + B n) / (F (n-1) + B n), the run's first forward left out."""
    w = timed_workload(params=(4096,), fwd=0.2, bwd=0.4, batch=8)
    exp = Experiment(workload=w, cluster=Cluster.homogeneous(nodes=2, gpus_per_node=1, inter="10GbE"),
                     strategy=AllReduceSGD(overlap=False), batch_size=8, iterations=5)
    base = Calibration(device=exp.cluster.device, workload=w)
    slow = dataclasses.replace(base, idle_slowdown=((0.0, 1.0), (1e-9, 1.5), (10.0, 1.5)))
    n, f, b = 5, 0.2, 0.4
    expected = (1.5 * f * (n - 1) + b * n) / (f * (n - 1) + b * n)
    assert slow.idle_factor(base.apply(exp)) == pytest.approx(expected, rel=1e-9)
    scaled = slow.apply(exp).workload
    for mine, theirs in zip(scaled.layers, w.layers):
        assert mine.fwd_time == pytest.approx(expected * theirs.fwd_time)
        assert mine.bwd_time == pytest.approx(expected * theirs.bwd_time)
    assert base.apply(exp).workload == w  # no table: nothing changes


def test_idle_slowdown_measured_on_this_machine_starts_at_one():
    import torch

    from realrun.calibrate import measure_idle_slowdown
    from realrun.model import Data, ModelState, build_model

    w = Workload.from_zoo("mlp", in_features=16, hidden=[64], out_features=4)
    model = build_model(w, 0)
    ModelState(model, w, torch.device("cpu"))
    table = measure_idle_slowdown(model, Data(model, 0, torch.device("cpu")), 8, torch.device("cpu"),
                                  gaps=(0.0, 0.001), repeats=3)
    assert [g for g, _ in table] == [0.0, 0.001]
    assert table[0][1] == 1.0 and table[1][1] > 0


def test_idle_slowdown_is_blind_to_a_linear_drift(monkeypatch):
    """With every step 1 % slower than the one before and no cost of idling, the gaps take
    turns, so each sees the same mean drift: every factor is 1 (timed one gap after another,
    the last of six gaps at six passes each would come out 1 + 0.01 * 30 / 1.025 higher)."""
    import importlib
    import types

    import torch

    from realrun.model import Data, ModelState, build_model

    calibrate_module = importlib.import_module("realrun.calibrate")  # the package's name is the function
    ticks = {"calls": 0, "now": 0.0}

    def perf_counter():  # even calls start a step, odd ones end it: step k takes 1 + 0.01 k
        n = ticks["calls"]
        ticks["calls"] += 1
        if n % 2:
            ticks["now"] += 1 + 0.01 * (n // 2)
        return ticks["now"]

    monkeypatch.setattr(calibrate_module, "time", types.SimpleNamespace(perf_counter=perf_counter,
                                                                        sleep=lambda s: None))
    w = Workload.from_zoo("mlp", in_features=4, hidden=[8], out_features=2)
    model = build_model(w, 0)
    ModelState(model, w, torch.device("cpu"))
    gaps = (0.0, 0.002, 0.005, 0.01, 0.02, 0.05)
    table = calibrate_module.measure_idle_slowdown(model, Data(model, 0, torch.device("cpu")), 4,
                                                   torch.device("cpu"), gaps=gaps, repeats=6)
    assert ticks["calls"] == 2 * 6 * len(gaps)
    for gap, factor in table:
        assert factor == pytest.approx(1.0, rel=1e-12), (gap, factor)
    for bad in ((), (0.01, 0.0), (0.0, -1.0)):
        with pytest.raises(ValueError, match="gaps must be seconds >= 0 starting with 0"):
            calibrate_module.measure_idle_slowdown(model, Data(model, 0, torch.device("cpu")), 4,
                                                   torch.device("cpu"), gaps=bad)
    with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
        calibrate_module.measure_idle_slowdown(model, Data(model, 0, torch.device("cpu")), 4,
                                               torch.device("cpu"), repeats=0)
