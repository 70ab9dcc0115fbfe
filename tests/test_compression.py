"""Compressors in the simulator: wire bytes, collective choice, encode/decode cost, strategies."""

import math

import pytest
from builders import small_workload

from simulator import Cluster, Experiment, Workload, simulate
from simulator.hardware import DEVICES
from simulator.workload import Layer
from strategies import AllReduceSGD, LocalSGD, ParameterServer
from strategies.compression import (
    QSGD,
    Cast,
    PowerSGD,
    RandomK,
    SignSGD,
    TopK,
    compressor_from_spec,
)

SHAPES = [(64, 3, 7, 7), (64,), (1000, 2048), (4, 4)]
N = 64 * 3 * 7 * 7 + 64 + 1000 * 2048 + 16


@pytest.fixture(scope="module")
def resnet50():
    return Workload.from_zoo("resnet50")


# -- wire bytes: each formula written out from the compressor's definition --------------

def test_cast_sends_two_bytes_per_element():
    assert Cast("fp16").wire_bytes(SHAPES, 4) == 2 * N
    assert Cast("bf16").wire_bytes(SHAPES, 2) == 2 * N


@pytest.mark.parametrize("elem_bytes", [4, 2])
def test_topk_sends_k_values_and_k_int32_indices(elem_bytes):
    k = math.ceil(0.01 * N)
    assert TopK(ratio=0.01).wire_bytes(SHAPES, elem_bytes) == k * elem_bytes + k * 4
    assert TopK(ratio=1e-9).wire_bytes([(10,)], 4) == 8  # at least one entry


def test_randomk_sends_values_only():
    k = math.ceil(0.05 * N)
    assert RandomK(ratio=0.05).wire_bytes(SHAPES, 4) == 4 * k


def test_qsgd_bit_count():
    # s = 7: 15 signed levels -> 4 bits; s = 1: 3 levels -> 2 bits; s = 127 -> 8 bits.
    for s, bits in ((7, 4), (1, 2), (127, 8), (3, 3)):
        q = QSGD(levels=s, bucket_size=512)
        assert q.bits == bits
        assert q.wire_bytes([(1000,)], 4) == 4 * 2 + math.ceil(1000 * bits / 8)
    assert QSGD(levels=7, bucket_size=100).wire_bytes([(1001,)], 4) == 4 * 11 + math.ceil(1001 * 4 / 8)


def test_sign_sends_one_bit_per_element():
    assert SignSGD(vote="majority").wire_bytes([(1001,)], 4) == 126
    assert SignSGD(vote="scaled").wire_bytes([(1001,)], 4) == 126 + 4


def test_powersgd_sends_rank_times_rows_plus_cols_per_compressed_matrix():
    r = 4
    # (64, 147): (64 + 147) * 4 * 2 = 1688 < 9408 -> compressed; (1000, 2048) compressed;
    # (64,) is 1-D and (4, 4): (4 + 4) * 4 * 2 = 64 >= 16 -> both sent as they are.
    expected = r * (64 + 147) + r * (1000 + 2048) + 64 + 16
    comp = PowerSGD(rank=r)
    assert comp.wire_bytes(SHAPES, 4) == 4 * expected
    assert comp.wire_bytes(SHAPES, 2) == 2 * expected
    plan = comp.plan(SHAPES, 4, 8)
    assert [op for rnd in plan.rounds for op, _ in rnd.collectives] == ["all_reduce"] * 3
    uncompressed, p_bytes = (b for _, b in plan.rounds[0].collectives)
    (q_bytes,) = (b for _, b in plan.rounds[1].collectives)
    assert uncompressed == 4 * (64 + 16)
    assert p_bytes == 4 * r * (64 + 1000) and q_bytes == 4 * r * (147 + 2048)


def test_summable_compressors_all_reduce_the_others_all_gather():
    for comp in (Cast("fp16"), RandomK(0.1), PowerSGD()):
        assert all(op == "all_reduce" for rnd in comp.plan(SHAPES, 4, 8).rounds for op, _ in rnd.collectives)
    for comp in (TopK(0.1), QSGD(), SignSGD()):
        ((op, nbytes),) = comp.plan(SHAPES, 4, 8).rounds[0].collectives
        assert op == "all_gather" and nbytes == 8 * comp.wire_bytes(SHAPES, 4)


# -- the strategy picks the collective, and traffic grows with p where it should ---------

def _run(workload, cluster, strategy, **kw):
    return simulate(Experiment(workload=workload, cluster=cluster, strategy=strategy, **kw))


def _one_bucket(comp):
    return AllReduceSGD(compression=comp, bucket_mb=1000, first_bucket_mb=1000)


@pytest.mark.parametrize("p", [2, 4, 8, 16])
def test_all_gather_traffic_grows_with_p_all_reduce_traffic_does_not(p):
    w = small_workload()
    shapes = [(layer.params,) for layer in w.layers]
    cluster = Cluster.homogeneous(nodes=p, gpu="V100", inter="25GbE")
    iters = 2
    for comp, per_rank in (
        (TopK(ratio=0.01), (p - 1) * TopK(ratio=0.01).wire_bytes(shapes, 4)),  # ring all-gather
        (QSGD(), (p - 1) * QSGD().wire_bytes(shapes, 4)),
        (RandomK(ratio=0.01), 2 * (p - 1) / p * RandomK(ratio=0.01).wire_bytes(shapes, 4)),  # ring all-reduce
        (Cast("fp16"), 2 * (p - 1) / p * 2 * w.params),
    ):
        r = _run(w, cluster, _one_bucket(comp), iterations=iters, batch_size=4)
        sent = r.ranks["bytes_sent"].to_numpy()
        assert sent == pytest.approx([iters * per_rank] * p, rel=1e-9), comp


def test_all_gather_time_grows_linearly_with_p():
    w = small_workload()
    times = {}
    for p in (4, 16):
        cluster = Cluster.homogeneous(nodes=p, gpu="V100", inter="10GbE", inter_bandwidth="1Gbps")
        r = _run(w, cluster, _one_bucket(TopK(ratio=0.1)), iterations=2, batch_size=4)
        comm = r.timeline[r.timeline["name"].str.startswith("all_gather")]
        times[p] = (comm["end"] - comm["start"]).mean()
    # ring all-gather of p payloads of W bytes: (p - 1) W / B (+ latency): 15 / 3 = 5 times longer
    assert times[16] / times[4] == pytest.approx(15 / 3, rel=0.02)


# -- encode and decode are charged on the compute stream ---------------------------------

def test_cast_encode_and_decode_take_their_roofline_time():
    w = small_workload()
    cluster = Cluster.homogeneous(nodes=2, gpu="V100", inter="100GbE")
    r = _run(w, cluster, _one_bucket(Cast("fp16")), iterations=1, batch_size=4)
    dev = DEVICES["V100"]
    n = w.params
    bw = dev.mem_bandwidth * dev.memory_efficiency
    flops = dev.flops("fp32") * dev.compute_efficiency
    # encode: read 4n, write 2n; decode: divide (read + write 2n), cast back (read 2n, write 4n)
    enc = max(n / flops, 6 * n / bw) + dev.kernel_overhead
    dec = max(n / flops, 4 * n / bw) + max(n / flops, 6 * n / bw) + 2 * dev.kernel_overhead
    tl = r.timeline[r.timeline["rank"] == 0]
    spans = tl[tl["name"].str.startswith(("encode", "decode"))]
    got = dict(zip(spans["name"].str[:6], spans["end"] - spans["start"], strict=True))
    assert got["encode"] == pytest.approx(enc, rel=1e-9)
    assert got["decode"] == pytest.approx(dec, rel=1e-9)


def test_cast_of_16_bit_gradients_costs_nothing_to_encode():
    w = small_workload()
    cluster = Cluster.homogeneous(nodes=2, gpu="V100")
    r = _run(w, cluster, _one_bucket(Cast("fp16")), iterations=1, batch_size=4, precision="fp16")
    assert not r.timeline["name"].str.startswith("encode").any()
    assert r.ranks["bytes_sent"].iloc[0] == pytest.approx(2 * (2 - 1) / 2 * 2 * w.params)


def test_fp16_pays_off_at_1_gbps_on_resnet50(resnet50):
    cluster = Cluster.homogeneous(nodes=16, gpu="V100", inter="100GbE", inter_bandwidth="1Gbps")
    base = _run(resnet50, cluster, AllReduceSGD(), iterations=3, batch_size=64).summary()
    fp16 = _run(resnet50, cluster, AllReduceSGD(compression="fp16"), iterations=3, batch_size=64).summary()
    assert fp16["throughput"] > base["throughput"]
    # communication-bound: halving the bytes nearly halves the iteration
    assert fp16["iteration_time_p50"] < 0.6 * base["iteration_time_p50"]


def test_topk_loses_at_100_gbps_with_overlap(resnet50):
    cluster = Cluster.homogeneous(nodes=16, gpu="V100", inter="100GbE")
    base = _run(resnet50, cluster, AllReduceSGD(overlap=True), iterations=3, batch_size=64)
    topk = _run(resnet50, cluster, AllReduceSGD(overlap=True, compression=TopK(ratio=0.01, select_passes=8)),
                iterations=3, batch_size=64)
    b, t = base.summary(), topk.summary()
    assert t["throughput"] < b["throughput"]
    # why: uncompressed all-reduce hides behind backward, while top-k's encode sits on the
    # compute stream and its all-gather and decode come after backward
    assert b["exposed_comm_mean"] < 0.02 * b["iteration_time_p50"]
    tl = topk.timeline[(topk.timeline["rank"] == 0) & (topk.timeline["iteration"] == 1)]
    codec = tl[tl["name"].str.startswith(("encode", "decode"))]
    codec_time = (codec["end"] - codec["start"]).sum()
    assert codec_time > 0
    assert t["iteration_time_p50"] >= b["compute_time_mean"] + codec_time


def test_powersgd_runs_three_all_reduces_per_bucket(resnet50):
    cluster = Cluster.homogeneous(nodes=4, gpu="A100-80GB")
    r = _run(resnet50, cluster, AllReduceSGD(compression=PowerSGD(rank=2)), iterations=2, batch_size=32)
    it = r.timeline[(r.timeline["rank"] == 0) & (r.timeline["iteration"] == 1)]
    names = it[it["stream"] == "comm"]["name"]
    comp = PowerSGD(rank=2)
    exp = Experiment(workload=resnet50, cluster=cluster, strategy=AllReduceSGD())
    job = exp.job()
    buckets = AllReduceSGD().buckets(job)
    # round 0: the uncompressed tensors (biases, batch-norm weights) if any, then P; round 1: Q
    splits = [comp.split(job.shapes(b.layers)) for b in buckets]
    assert names.str.contains(r"\.r0\.").sum() == sum((plain > 0) + (len(mats) > 0) for mats, plain in splits)
    assert names.str.contains(r"\.r1\.").sum() == sum(len(mats) > 0 for mats, _ in splits) == len(buckets)
    shapes = [s for layer in resnet50.layers for s in layer.param_shapes]
    assert r.summary()["bytes_on_wire"] == pytest.approx(
        2 * 4 * 2 * (4 - 1) / 4 * PowerSGD(rank=2).wire_bytes(shapes, 4), rel=1e-9)


def test_powersgd_needs_parameter_shapes():
    w = small_workload()  # hand-written layers: no param_shapes
    with pytest.raises(ValueError, match="param_shapes"):
        Experiment(workload=w, cluster=Cluster.homogeneous(nodes=2), strategy=AllReduceSGD(compression="powersgd"))


# -- parameter servers and local SGD ---------------------------------------------------------

def test_parameter_server_pushes_payloads_and_server_decodes():
    w = small_workload()
    comp = SignSGD(vote="majority")
    cluster = Cluster.homogeneous(nodes=4, gpu="V100")
    r = _run(w, cluster, ParameterServer(servers=1, compression=comp), iterations=2, batch_size=4)
    shapes = [(layer.params,) for layer in w.layers]
    workers = r.ranks[r.ranks["kind"] == "gpu"]
    # per iteration: one push of the payload (plus a zero-byte goodbye at the end)
    assert workers["bytes_sent"].to_numpy() == pytest.approx([2 * comp.wire_bytes(shapes, 4)] * 4)
    server = r.timeline[r.timeline["rank"] == 4]
    assert server["name"].str.startswith("decode").sum() == 2
    with pytest.raises(ValueError, match="all-reduce between"):
        ParameterServer(compression="powersgd")


def test_local_sgd_compresses_the_averaging():
    w = small_workload()
    comp = RandomK(ratio=0.1)
    cluster = Cluster.homogeneous(nodes=4, gpu="V100")
    r = _run(w, cluster, LocalSGD(period=2, compression=comp, bucket_mb=1000, first_bucket_mb=1000),
             iterations=4, batch_size=4)
    shapes = [(layer.params,) for layer in w.layers]
    assert r.ranks["bytes_sent"].to_numpy() == pytest.approx([2 * 2 * 3 / 4 * comp.wire_bytes(shapes, 4)] * 4)


# -- configuration -----------------------------------------------------------------------------

def test_compressors_round_trip_through_experiment_files():
    w = small_workload()
    for comp in (Cast("bf16"), TopK(ratio=0.001, error_feedback=False), RandomK(0.2, seed=3), QSGD(levels=3),
                 SignSGD(vote="majority"), PowerSGD(rank=2, warm_start=False)):
        layers = tuple(Layer(name=f"l{i}", kind="Linear", params=12, fwd_flops=1, bwd_flops=1, input_elems=1,
                             output_elems=1, param_shapes=((3, 4),)) for i in range(2))
        wl = Workload(name="m", layers=layers) if comp.needs_shapes else w
        exp = Experiment(workload=wl, cluster=Cluster.homogeneous(nodes=2), strategy=AllReduceSGD(compression=comp))
        back = Experiment.from_json(exp.to_json())
        assert back.strategy.compression == comp
        assert back == exp


@pytest.mark.parametrize("spec, match", [
    ("gzip", "compression.name must be one of"),
    ({"name": "topk", "ratio": 0}, "TopK.ratio"),
    ({"name": "topk", "k": 5}, "unknown field"),
    ({"name": "qsgd", "levels": 0}, "QSGD.levels"),
    ({"name": "sign", "vote": "mean"}, "SignSGD.vote"),
    ({"name": "powersgd", "rank": 0}, "PowerSGD.rank"),
    ({"name": "cast", "dtype": "fp8"}, "Cast.dtype"),
    (3, "must be a compressor"),
    ({"name": ["topk"]}, "compression.name must be one of"),
    ({"name": "fp16", "ratio": 0.1}, "compression.name must be one of"),
])
def test_bad_compressors_are_refused_with_the_field(spec, match):
    with pytest.raises(ValueError, match=match):
        AllReduceSGD(compression=spec)


def test_short_names():
    assert compressor_from_spec("fp16") == Cast("fp16")
    assert compressor_from_spec("bf16") == Cast("bf16")
    assert compressor_from_spec({"name": "topk"}) == TopK()


def test_breakeven_reads_the_fastest_network_where_a_compressor_still_pays():
    from experiments.compression_breakeven import breakeven

    rows = [{"model": "m", "gpus": 8, "compressor": "c", "gbps": bw, "speedup": s}
            for bw, s in ((1, 3.0), (10, 1.2), (25, 1.005), (100, 0.8))]
    (row,) = breakeven(rows)
    assert (row["pays_up_to_gbps"], row["first_loss_gbps"]) == (10, 25)
    assert (row["speedup_at_slowest"], row["speedup_at_fastest"]) == (3.0, 0.8)
    (never,) = breakeven([{**r, "speedup": 0.5} for r in rows])
    assert never["pays_up_to_gbps"] is None and never["first_loss_gbps"] == 1
