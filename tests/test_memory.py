"""The memory model, mixed precision's costs, and the out-of-memory check."""

import warnings

import pytest
from builders import small_workload

from simulator import Cluster, Experiment, Workload, simulate
from simulator.compute import optimizer_time
from simulator.hardware import DEVICES
from simulator.memory import OutOfMemoryError
from strategies import AllReduceSGD, LocalSGD, ParameterServer
from strategies.compression import TopK

STATE_COLUMNS = ["params", "grads", "optimizer_state", "master_weights"]


@pytest.fixture(scope="module")
def bert_large():
    return Workload.from_zoo("bert", size="bert-large")


def _exp(workload, **kw):
    kw.setdefault("cluster", Cluster.homogeneous(nodes=1, gpus_per_node=8, gpu="A100-80GB"))
    kw.setdefault("strategy", AllReduceSGD())
    return Experiment(workload=workload, **kw)


def test_bert_large_mixed_precision_adam_needs_16_bytes_per_parameter(bert_large):
    # ZeRO (Rajbhandari et al. 2020), 3.1: fp16 weights 2 + fp16 grads 2 + fp32 master 4 + Adam 4 + 4
    mem = _exp(bert_large, precision="fp16", optimizer="adam", batch_size=8).memory()
    row = mem.iloc[0]
    assert row[STATE_COLUMNS].sum() == 16 * bert_large.params
    assert 330e6 < bert_large.params < 345e6  # BERT-large: 340M parameters (Devlin et al.)
    assert row["activations"] > 0 and row["total"] > 16 * bert_large.params
    # bf16 keeps the same states
    mem = _exp(bert_large, precision="bf16", optimizer="adam", batch_size=8).memory()
    assert mem.iloc[0][STATE_COLUMNS].sum() == 16 * bert_large.params


@pytest.mark.parametrize("optimizer, per_param", [("sgd", 8), ("momentum", 12), ("adam", 16), ("adagrad", 12)])
def test_fp32_states_per_parameter(optimizer, per_param):
    w = small_workload()
    row = _exp(w, optimizer=optimizer).memory().iloc[0]
    assert row[STATE_COLUMNS].sum() == per_param * w.params
    assert row["master_weights"] == 0


def test_activations_are_saved_outputs_for_the_batch():
    w = small_workload()  # every layer: 500 output elements per sample, first input 500
    for batch, precision, e in ((4, "fp32", 4), (8, "fp32", 4), (8, "bf16", 2)):
        row = _exp(w, batch_size=batch, precision=precision).memory().iloc[0]
        assert row["activations"] == batch * (4 * 500 + 500) * e


def test_ddp_buckets_and_compressor_buffers():
    w = small_workload()
    n = w.params
    plain = _exp(w).memory().iloc[0]
    assert plain["buffers"] == 4 * n  # DDP's flat buckets: a copy of the gradients
    comp = TopK(ratio=0.01)
    row = _exp(w, strategy=AllReduceSGD(compression=comp, bucket_mb=1000, first_bucket_mb=1000)).memory().iloc[0]
    shapes = [(layer.params,) for layer in w.layers]
    wire = comp.wire_bytes(shapes, 4)
    # buckets + gathered payloads of 8 ranks and its own + the fp32 error-feedback residual
    assert row["buffers"] == 4 * n + 9 * wire + 4 * n


def test_parameter_server_memory():
    w = small_workload()
    exp = _exp(w, cluster=Cluster.homogeneous(nodes=4, gpu="V100"), strategy=ParameterServer(servers=1),
               optimizer="momentum", precision="fp16")
    mem = exp.memory()
    n = w.params
    worker, server = mem.iloc[0], mem.iloc[4]
    assert (worker["params"], worker["grads"], worker["optimizer_state"], worker["master_weights"]) == (
        2 * n, 2 * n, 0, 0)
    assert worker["buffers"] == 2 * n  # receive buffer for the pulled parameters
    assert server["kind"] == "host" and server["device"] == "cpu-socket"
    # fp32 shard, its gradient sum, momentum, no master copy; one fp16 push from each of 4 workers
    assert (server["params"], server["grads"], server["optimizer_state"], server["master_weights"]) == (
        4 * n, 4 * n, 4 * n, 0)
    assert server["buffers"] == 4 * 2 * n
    assert server["activations"] == 0


def test_local_sgd_memory_counts_the_averaging_buffers():
    w = small_workload()
    row = _exp(w, strategy=LocalSGD(period=4)).memory().iloc[0]
    assert row["buffers"] == 4 * w.params


def test_summary_reports_peak_memory():
    w = small_workload()
    r = simulate(_exp(w, iterations=1, batch_size=4))
    s = r.summary()
    mem = r.memory
    assert s["peak_memory"] == mem["total"].max()
    assert s["peak_memory_fraction"] == pytest.approx(mem["total"].max() / DEVICES["A100-80GB"].mem_capacity)
    assert s["memory_fits"] is True


def test_gpt3_175b_does_not_fit_on_one_a100():
    w = Workload.from_zoo("gpt", size="gpt3-175b")
    exp = _exp(w, cluster=Cluster.homogeneous(nodes=1, gpu="A100-80GB"), precision="fp16", optimizer="adam",
               batch_size=1, iterations=1, name="gpt3")
    need = exp.memory().iloc[0]
    assert need[STATE_COLUMNS].sum() == 16 * w.params
    assert 174e9 < w.params < 176e9
    with pytest.raises(OutOfMemoryError) as info:
        simulate(exp)
    text = str(info.value)
    assert "A100-80GB" in text and "80 GiB" in text and "out of memory" in text
    assert "optimizer state" in text and "TiB" in text  # the need, by component
    assert isinstance(info.value, ValueError)


def test_out_of_memory_can_be_reported_instead():
    w = small_workload()
    tiny = Cluster.homogeneous(nodes=2, gpu="V100", gpu_mem_capacity="1MiB")
    exp = _exp(w, cluster=tiny, out_of_memory="report", iterations=1, batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = simulate(exp)
    assert any("out of memory" in str(c.message) and "V100" in str(c.message) for c in caught)
    assert r.summary()["memory_fits"] is False
    assert r.summary()["iterations"] == 1
    with pytest.raises(ValueError, match="out_of_memory must be one of"):
        _exp(w, out_of_memory="ignore")


# -- mixed precision compute and communication ----------------------------------------------

def test_mixed_precision_optimizer_step_cost():
    dev = DEVICES["A100-80GB"]
    n = 1e8
    bw = dev.mem_bandwidth * dev.memory_efficiency
    # Adam: 7 fp32 words per parameter; mixed: 16-bit grad read (-2 bytes), 16-bit copy written (+2);
    # fp16 adds the loss-scale unscale/check pass (read + write a 2-byte gradient) and one kernel
    assert optimizer_time(n, dev, "adam", precision="fp32") == pytest.approx(28 * n / bw + dev.kernel_overhead)
    assert optimizer_time(n, dev, "adam", precision="bf16") == pytest.approx(28 * n / bw + dev.kernel_overhead)
    assert optimizer_time(n, dev, "adam", precision="fp16") == pytest.approx(32 * n / bw + 2 * dev.kernel_overhead)


def test_gradients_travel_in_the_training_precision_unless_told():
    w = small_workload()
    cluster = Cluster.homogeneous(nodes=4, gpu="A100-80GB")
    sent = {}
    for precision, grad_dtype in (("fp32", None), ("bf16", None), ("bf16", "fp32"), ("fp32", "fp16")):
        r = simulate(_exp(w, cluster=cluster, precision=precision, iterations=1, batch_size=4,
                          strategy=AllReduceSGD(grad_dtype=grad_dtype)))
        sent[precision, grad_dtype] = r.ranks["bytes_sent"].iloc[0]
    ring = 2 * 3 / 4 * w.params
    assert sent["fp32", None] == pytest.approx(4 * ring)
    assert sent["bf16", None] == pytest.approx(2 * ring)
    assert sent["bf16", "fp32"] == pytest.approx(4 * ring)
    assert sent["fp32", "fp16"] == pytest.approx(2 * ring)


def test_mixed_precision_computes_at_the_tensor_core_rate():
    from simulator.compute import layer_times

    w = small_workload()  # compute-bound at a large batch: FLOPs time dominates
    dev = DEVICES["A100-80GB"]
    f32, _ = layer_times(w, dev, "fp32", 4096)
    f16, _ = layer_times(w, dev, "fp16", 4096)
    overhead = dev.kernel_overhead
    # layer 1: 2 * 200k FLOPs per sample
    flops = 2 * 200_000 * 4096
    assert f16[1] - overhead == pytest.approx(flops / (dev.flops("fp16") * dev.compute_efficiency))
    assert f32[1] - overhead == pytest.approx(flops / (dev.flops("fp32") * dev.compute_efficiency))


def test_cli_reports_out_of_memory_in_one_line(tmp_path, capsys):
    from simulator.cli import main

    w = small_workload()
    path = tmp_path / "w.json"
    path.write_text(w.to_json())
    exp = tmp_path / "exp.toml"
    exp.write_text(
        'batch_size = 2\niterations = 1\n[workload]\npath = "w.json"\n'
        '[cluster]\nnodes = 2\ngpu = "V100"\ngpu_mem_capacity = "1MiB"\n[strategy]\nname = "allreduce"\n'
    )
    assert main(["simulate", str(exp)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("clustersim: error:") and "out of memory" in err and "1 MiB" in err
