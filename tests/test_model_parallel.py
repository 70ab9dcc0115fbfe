"""Pipeline, tensor and hybrid parallelism and ZeRO against closed-form results.

Expected values come from the schedules' published formulas (GPipe/1F1B:
(m + p - 1)(t_f + t_b), bubble (p - 1)/(m + p - 1); interleaved: bubble / v,
Narayanan et al. SC 2021), Megatron-LM's communication per transformer layer
(Shoeybi et al. 2019: two all-reduces of b·s·h in forward, two in backward),
the ring collectives' bytes (2(t-1)/t·N per all-reduce) and the ZeRO paper's
memory per device ((2 + 2 + K)·Ψ, (2 + 2 + K/N)·Ψ, (2 + (2 + K)/N)·Ψ,
(2 + 2 + K)·Ψ/N with K = 12 for mixed-precision Adam).
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from simulator import Cluster, Experiment, Workload, simulate
from simulator.compute import layer_times
from simulator.hardware import LinkSpec
from simulator.workload import Layer
from strategies import Hybrid, PipelineParallel, TensorParallel, ZeRO
from strategies.pipeline import balance, checkpoint_units, in_flight, schedule

FWD, BWD, CAL = 0.4, 0.8, 8  # whole-model seconds at the calibration batch


def uniform(n: int, params: int = 0, out: float = 0.0) -> Workload:
    """``n`` identical layers with measured times; no parameters: no optimizer or gradient cost."""
    layers = tuple(Layer(name=f"l{i}", kind="Linear", params=params, fwd_flops=1.0, bwd_flops=1.0,
                         input_elems=out, output_elems=out, fwd_time=FWD / n, bwd_time=BWD / n)
                   for i in range(n))
    return Workload(name="uniform", layers=layers, calibration_batch=CAL)


def free_network(nodes: int, gpus: int = 1) -> Cluster:
    return Cluster.homogeneous(nodes=nodes, gpus_per_node=gpus,
                               intra=LinkSpec(name="free", bandwidth=1e18, latency=0.0),
                               inter=LinkSpec(name="free", bandwidth=1e18, latency=0.0))


def periods(r) -> list[float]:
    """Each iteration's time for the whole pipeline: from the previous iteration's last end
    (0 for the first) to this one's last end on any rank (every schedule flushes)."""
    ends = r.iterations.groupby("iteration")["end"].max().sort_index().tolist()
    return [b - a for a, b in zip([0.0, *ends], ends)]


def pipeline_run(p: int, m: int, sched: str, v: int = 1):
    exp = Experiment(workload=uniform(p * v), cluster=free_network(p), batch_size=CAL * m, iterations=2,
                     strategy=PipelineParallel(pp=p, micro_batches=m, schedule=sched, chunks=v), optimizer="sgd")
    return exp, simulate(exp)


@pytest.mark.parametrize("sched", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("p", "m"), [(2, 1), (2, 6), (4, 4), (4, 8), (8, 16), (3, 7)])
def test_gpipe_and_1f1b_take_m_plus_p_minus_1_slots(sched, p, m):
    _, r = pipeline_run(p, m, sched)
    tf, tb = FWD / p, BWD / p  # one stage, one micro-batch of CAL samples
    expected = (m + p - 1) * (tf + tb)
    for t in periods(r):
        assert t == pytest.approx(expected, rel=0.005)
    bubble = (t - m * (tf + tb)) / t
    assert bubble == pytest.approx((p - 1) / (m + p - 1), rel=0.005, abs=1e-9)
    assert r.summary()["throughput"] == pytest.approx(CAL * m / expected, rel=0.005)


@pytest.mark.parametrize(("p", "m", "v"), [(2, 4, 2), (4, 8, 2), (4, 8, 4), (4, 4, 3), (8, 16, 2)])
def test_interleaving_shrinks_the_bubble_by_v(p, m, v):
    _, r = pipeline_run(p, m, "interleaved", v)
    tf, tb = FWD / p, BWD / p  # a stage's v chunks together
    for t in periods(r):
        bubble = t - m * (tf + tb)
        assert bubble == pytest.approx((p - 1) * (tf + tb) / v, rel=0.005)


def _live_on_stage0(r) -> int:
    """Most micro-batches whose forward has ended and backward has not, on rank 0, from the timeline."""
    tl = r.timeline
    spans = tl[(tl["rank"] == 0) & (tl["iteration"] == 0) & (tl["stream"] == "compute")]
    events = sorted([(row.end, 1) for row in spans.itertuples() if row.name.startswith("forward")]
                    + [(row.end, -1) for row in spans.itertuples() if row.name.startswith("backward")])
    live = peak = 0
    for _, step in events:
        live += step
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(("p", "m"), [(4, 8), (4, 16), (2, 6), (4, 3)])
def test_1f1b_keeps_at_most_p_micro_batches_in_flight_and_gpipe_m(p, m):
    for sched, expected in (("1f1b", min(p, m)), ("gpipe", m)):
        exp, r = pipeline_run(p, m, sched)
        assert _live_on_stage0(r) == expected
        assert exp.strategy.micro_batches_in_flight(exp.job(), 0) == expected
        assert in_flight(schedule(sched, p, m)[p - 1]) == (1 if sched == "1f1b" else m)  # the last stage


def test_activation_memory_follows_micro_batches_in_flight():
    p, m = 4, 16
    wl = uniform(p, params=1000, out=1000.0)
    mems = {}
    for sched in ("gpipe", "1f1b"):
        exp = Experiment(workload=wl, cluster=free_network(p), batch_size=CAL * m,
                         strategy=PipelineParallel(pp=p, micro_batches=m, schedule=sched))
        mems[sched] = exp.memory()
    # one stage: 1000 outputs + its 1000-element input per sample, fp32
    per_micro_batch = CAL * (1000 + 1000) * 4
    assert mems["gpipe"].loc[0, "activations"] == pytest.approx(m * per_micro_batch)
    assert mems["1f1b"].loc[0, "activations"] == pytest.approx(p * per_micro_batch)
    assert mems["1f1b"].loc[p - 1, "activations"] == pytest.approx(per_micro_batch)


def test_schedules_run_every_pass_once_and_1f1b_order():
    for sched, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        for s, passes in enumerate(schedule(sched, 4, 8, v)):
            assert sorted(passes) == sorted((k, mb, c) for k in "FB" for mb in range(8) for c in range(v)), (sched, s)
    stage0 = schedule("1f1b", 4, 8)[0]
    assert [k for k, _, _ in stage0[:5]] == ["F", "F", "F", "F", "B"]  # p - 1 warm-up forwards, then 1F1B


def test_balance_minimises_the_costliest_stage():
    from itertools import combinations

    costs = [5, 1, 1, 1, 1, 1, 5, 1]
    bounds = balance(costs, 3)
    loads = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
    optimum = min(max(sum(costs[a:b]) for a, b in zip((0, *cut), (*cut, len(costs))))
                  for cut in combinations(range(1, len(costs)), 2))  # every way to cut in three
    assert max(loads) == optimum
    assert bounds[0] == 0 and bounds[-1] == len(costs) and len(bounds) == 4
    assert balance([1, 1, 1, 1], 2, [True, False, True, False]) == [0, 2, 4]
    with pytest.raises(ValueError, match="cannot cut"):
        balance([1, 1], 3)


# -- tensor parallel --------------------------------------------------------------------------

L, H, S, B, T = 2, 64, 16, 4, 4  # layers, width, sequence, batch, tensor-parallel degree


@pytest.fixture(scope="module")
def gpt_small():
    return Workload.from_zoo("gpt", size="gpt2-small", n_layer=L, d_model=H, n_head=4, seq_len=S,
                             vocab_size=512)


def test_zoo_transformer_layers_get_megatron_roles(gpt_small):
    roles = dict(zip((x.name for x in gpt_small.layers), gpt_small.tp_roles, strict=True))
    assert roles["blocks.0.attn.qkv"] == roles["blocks.0.mlp.fc"] == "column"
    assert roles["blocks.0.attn.proj"] == roles["blocks.0.mlp.proj"] == "row"
    assert roles["blocks.0.attn"] == roles["blocks.0.mlp.act"] == "inner"
    assert roles["blocks.0.ln_1"] == roles["blocks.0.mlp.drop"] == roles["ln_f"] == "replicated"
    assert roles["embed.wte"] == "vocab" and roles["lm_head"] == "head"


def _tp_experiment(wl, sp=False, tp=T):
    cluster = Cluster.homogeneous(nodes=1, gpus_per_node=tp)
    return Experiment(workload=wl, cluster=cluster, batch_size=B, iterations=1,
                      strategy=TensorParallel(tp=tp, sequence_parallel=sp))


@pytest.mark.parametrize("sp", [False, True])
def test_tensor_parallel_adds_the_megatron_collectives(gpt_small, sp):
    r = simulate(_tp_experiment(gpt_small, sp))
    tl = r.timeline
    comm = tl[(tl["rank"] == 0) & (tl["stream"] == "comm")]
    kinds = comm["name"].str.split(":").str[0]
    forward = comm["name"].str.contains(":act")
    backward = comm["name"].str.contains(":grad")
    per_layer = 2 * L + 1  # two per transformer layer, plus the embedding (forward) or the head (backward)
    if not sp:
        assert (kinds == "all_reduce").all()
        assert forward.sum() == per_layer and backward.sum() == per_layer
    else:  # each all-reduce becomes a reduce-scatter, and each f an all-gather (Korthikanti et al.)
        assert forward.sum() == backward.sum() == 2 * per_layer
        assert set(kinds[forward | backward]) == {"reduce_scatter", "all_gather"}
    # Ring bytes: an all-reduce of N sends 2(t-1)/t·N; a reduce-scatter or all-gather (t-1)/t·N,
    # so sequence parallelism moves the same bytes of activations.
    n = B * S * H * 4  # b·s·h fp32 elements
    expected = (2 * per_layer) * 2 * (T - 1) / T * n
    if sp:
        # ... plus one all-reduce per iteration of the gradients of the replicated layers with
        # parameters (layer norms, position embedding), each rank's being a sum over its tokens only
        rest = comm[~(forward | backward)]
        assert list(rest["name"].str.split(":").str[0]) == ["all_reduce"]
        replicated = [x.params for x, role in zip(gpt_small.layers, gpt_small.tp_roles, strict=True)
                      if role == "replicated" and x.params]
        assert len(replicated) == 2 * L + 2  # ln_1, ln_2 per layer, ln_f and the position embedding
        expected += 2 * (T - 1) / T * sum(replicated) * 4
    assert r.ranks.loc[0, "bytes_sent"] == pytest.approx(expected, rel=1e-9)


def test_sequence_parallel_sums_replicated_gradients_before_zero_partitions_them(gpt_small):
    """Under ZeRO the gradients are reduce-scattered per bucket; the replicated layers' partial
    gradients must be summed over the tensor-parallel group before that, bucket by bucket, and
    then not again at the end: the same bytes in total as one all-reduce."""
    exp = Experiment(workload=gpt_small, cluster=Cluster.homogeneous(nodes=2, gpus_per_node=T), batch_size=B,
                     iterations=1, strategy=Hybrid(tp=T, zero=1, sequence_parallel=True, bucket_mb=0.05,
                                                   first_bucket_mb=0.05))
    tl = simulate(exp).timeline
    comm = tl[(tl["rank"] == 0) & (tl["stream"] == "comm")].sort_values("start")
    def span(name, prefix):
        return tuple(int(v) for v in name[len(prefix):-1].split(":"))

    sp = comm[comm["name"].str.startswith("all_reduce:sp_grads[")]
    scatters = comm[comm["name"].str.startswith("reduce_scatter:grads[")]
    assert len(scatters) >= 3 and 2 <= len(sp) <= len(scatters)
    for _, row in sp.iterrows():  # each before the reduce-scatter of the bucket that holds its layers
        lo, hi = span(row["name"], "all_reduce:sp_grads[")
        holder = [r for _, r in scatters.iterrows()
                  if span(r["name"], "reduce_scatter:grads[")[0] <= lo < hi <= span(r["name"], "reduce_scatter:grads[")[1]]
        assert len(holder) == 1 and holder[0]["start"] >= row["end"]
    summed = sum(x.params for x, role in zip(gpt_small.layers, gpt_small.tp_roles, strict=True)
                 if role == "replicated")
    plain = simulate(exp.replace(strategy=Hybrid(tp=T, zero=1, sequence_parallel=False, bucket_mb=0.05,
                                                 first_bucket_mb=0.05)))
    extra = simulate(exp).ranks.loc[0, "bytes_sent"] - plain.ranks.loc[0, "bytes_sent"]
    assert extra == pytest.approx(2 * (T - 1) / T * summed * 4, rel=1e-9)


def test_sequence_parallel_needs_the_word_embedding_first():
    def linear(name, role, n=64):
        return Layer(name=name, kind="Linear", params=n * n, fwd_flops=2 * n * n, bwd_flops=4 * n * n,
                     input_elems=n, output_elems=n, tp_role=role)

    mlp = Workload(name="mlp", layers=(linear("ln", "replicated"), linear("fc", "column"), linear("proj", "row")))
    exp = Experiment(workload=mlp, cluster=Cluster.homogeneous(nodes=1, gpus_per_node=2), batch_size=4,
                     strategy=TensorParallel(tp=2))
    assert len(simulate(exp).iterations) == exp.iterations * 2  # a row per rank and iteration
    with pytest.raises(ValueError, match=r"sequence_parallel=True needs a vocabulary-parallel word embedding as "
                                         r"the first tensor-parallel layer .*got 'fc' \(column\)"):
        exp.replace(strategy=TensorParallel(tp=2, sequence_parallel=True))


def test_a_tied_embedding_across_stages_is_summed_and_kept_on_the_last_stage(gpt_small):
    """GPT's head uses the word embedding's weight. With the two on different pipeline stages
    the last stage keeps a copy (parameters, gradients, optimizer state) and the two stages
    all-reduce their gradients of it once per iteration, Megatron's embedding group."""
    names = [x.name for x in gpt_small.layers]
    emb = names.index("embed.wte")
    assert gpt_small.tied[names.index("lm_head")] == emb
    exp = Experiment(workload=gpt_small, cluster=Cluster.homogeneous(nodes=1, gpus_per_node=4), batch_size=B,
                     iterations=2, strategy=PipelineParallel(pp=4, micro_batches=2))
    r = simulate(exp)
    tied = r.timeline[r.timeline["name"] == f"all_reduce:tied[{emb}]"]
    assert sorted(tied["rank"]) == [0, 0, 3, 3]  # first and last stage, each iteration
    # an all-reduce of N bytes between two ranks sends N from each (2(p-1)/p · N, p = 2)
    untied = Workload(name="untied", layers=tuple(dataclasses.replace(x, tied_to="") for x in gpt_small.layers))
    base = simulate(exp.replace(workload=untied))
    words = gpt_small.layers[emb].params * 4
    for rank, extra in ((0, words), (1, 0), (2, 0), (3, words)):
        assert r.ranks.loc[rank, "bytes_sent"] - base.ranks.loc[rank, "bytes_sent"] == pytest.approx(
            extra * exp.iterations)
    own = [sum(x.params for x in gpt_small.layers[a:b]) for a, b in exp.strategy.stages(exp.job())]
    mem = exp.memory()
    assert [mem.loc[rank, "params"] for rank in range(4)] == pytest.approx(
        [own[0] * 4, own[1] * 4, own[2] * 4, (own[3] + gpt_small.layers[emb].params) * 4])


def test_sequence_parallel_stages_send_their_slice_of_the_sequence(gpt_small):
    """Under sequence parallelism a block's last row layer reduce-scatters its output along the
    sequence before the stage boundary: each rank sends b·s·h/t elements, not b·s·h."""
    names = [x.name for x in gpt_small.layers]
    cut = names.index("blocks.1")
    job_exp = Experiment(workload=gpt_small, cluster=Cluster.homogeneous(nodes=2, gpus_per_node=T), batch_size=B,
                         iterations=1, strategy=Hybrid(tp=T, pp=2, micro_batches=2, boundaries=(cut,),
                                                       sequence_parallel=True))
    tl = simulate(job_exp).timeline
    sends = tl[(tl["rank"] == 0) & tl["name"].str.startswith("send:act")]
    assert len(sends) == 2
    per = {}
    for sp in (True, False):
        r = simulate(job_exp.replace(strategy=dataclasses.replace(job_exp.strategy, sequence_parallel=sp)))
        per[sp] = r.ranks.loc[0, "bytes_sent"]
    # rank 0 sends 2 micro-batches of activations forward; the rest of its traffic is the same
    # bytes either way except the sequence-parallel gradient sum of its stage's replicated layers
    stage0 = sum(x.params for x, role in zip(gpt_small.layers[:cut], gpt_small.tp_roles[:cut], strict=True)
                 if role == "replicated")
    act = B // 2 * S * H * 4  # one micro-batch's b·s·h fp32 output of the block
    assert per[True] - per[False] == pytest.approx(2 * (T - 1) / T * stage0 * 4 - 2 * act * (1 - 1 / T))


def test_sequence_parallel_refuses_an_output_left_split():
    def layer(name, role, kind="Linear"):
        return Layer(name=name, kind=kind, params=64 * 64, fwd_flops=1.0, bwd_flops=2.0, input_elems=64,
                     output_elems=64, tp_role=role)

    wl = Workload(name="pooled", layers=(layer("wte", "vocab", "Embedding"), layer("fc", "column"),
                                         layer("proj", "row"), layer("pool", "replicated")))
    with pytest.raises(ValueError, match=r"leaves the output split along the sequence: after the last "
                                         r"row-parallel layer 'proj'"):
        Experiment(workload=wl, cluster=Cluster.homogeneous(nodes=1, gpus_per_node=2), batch_size=4,
                   strategy=TensorParallel(tp=2, sequence_parallel=True))


def test_a_weight_tied_across_three_stages_is_refused(gpt_small):
    names = [x.name for x in gpt_small.layers]
    emb = names.index("embed.wte")
    layers = list(gpt_small.layers)
    mid = names.index("blocks.1.ln_1")
    layers[mid] = dataclasses.replace(layers[mid], tied_to="embed.wte", params=0, param_shapes=())
    wl = Workload(name="tied3", layers=tuple(layers))
    b1, b2 = names.index("blocks.1"), names.index("ln_f")
    assert emb < b1 <= mid < b2
    with pytest.raises(ValueError, match=r"used on more than two stages"):
        Experiment(workload=wl, cluster=Cluster.homogeneous(nodes=1, gpus_per_node=3), batch_size=B,
                   strategy=PipelineParallel(pp=3, boundaries=(b1, b2))).memory()


def test_tensor_parallel_splits_work_and_memory(gpt_small):
    fwd1, _ = layer_times(gpt_small, Cluster.homogeneous(nodes=1).device_of(0), "fp32", 1024)
    fwd4, _ = layer_times(gpt_small, Cluster.homogeneous(nodes=1).device_of(0), "fp32", 1024, tp=4)
    names = [x.name for x in gpt_small.layers]
    i = names.index("blocks.0.mlp.fc")
    overhead = gpt_small.layers[i].kernels * Cluster.homogeneous(nodes=1).device_of(0).kernel_overhead
    assert fwd4[i] - overhead == pytest.approx((fwd1[i] - overhead) / 4)
    assert fwd4[names.index("blocks.0.ln_1")] == fwd1[names.index("blocks.0.ln_1")]
    mem = _tp_experiment(gpt_small).memory()
    split = sum(x.params for x, role in zip(gpt_small.layers, gpt_small.tp_roles, strict=True) if role != "replicated")
    whole = sum(x.params for x in gpt_small.layers)
    assert mem.loc[0, "params"] == pytest.approx((split / T + whole - split) * 4)


def test_tensor_parallel_counts_each_sample_once(gpt_small):
    r = simulate(_tp_experiment(gpt_small))
    s = r.summary()
    assert s["throughput"] * s["makespan"] == pytest.approx(B)
    flops = (gpt_small.fwd_flops + gpt_small.bwd_flops) * B / s["makespan"]
    assert s["achieved_flops_per_device"] == pytest.approx(flops / T)
    assert s["model_flops_utilisation"] == pytest.approx(flops / T / r.ranks.loc[0, "peak_flops"])


# -- hybrid and ZeRO ---------------------------------------------------------------------------


def test_hybrid_places_tp_in_node_pp_across_and_replicas_outermost(gpt_small):
    cluster = Cluster.homogeneous(nodes=4, gpus_per_node=2)
    exp = Experiment(workload=gpt_small, cluster=cluster, batch_size=8, iterations=1,
                     strategy=Hybrid(tp=2, pp=2, micro_batches=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = simulate(exp)
    s = r.summary()
    assert s["throughput"] * s["makespan"] == pytest.approx(2 * 8, rel=1e-9)  # dp = 2 replicas, one iteration
    tl = r.timeline
    sends = tl[(tl["rank"] == 0) & tl["name"].str.startswith("send:")]
    assert set(sends["name"].str.split("->").str[1]) == {"2"}  # rank 0's next stage: rank 2, the next node
    syncs = tl[(tl["rank"] == 0) & tl["name"].str.startswith("all_reduce:grads")]
    assert len(syncs) > 0  # with its replica, rank 4
    stages = exp.strategy.stages(exp.job())
    assert stages[0][0] == 0 and stages[-1][1] == len(gpt_small.layers)


def _zero_memory(stage: int, n: int = 8):
    wl = uniform(4, params=1_000_000)
    exp = Experiment(workload=wl, cluster=free_network(1, n), batch_size=8, iterations=1, precision="bf16",
                     optimizer="adam", strategy=ZeRO(zero=stage) if stage else Hybrid())
    return exp, exp.memory().loc[0]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_memory_matches_the_paper(stage):
    n, psi, k = 8, 4_000_000, 12
    expected = {0: (2 + 2 + k) * psi, 1: (2 + 2 + k / n) * psi, 2: (2 + (2 + k) / n) * psi,
                3: (2 + 2 + k) * psi / n}[stage]
    _, row = _zero_memory(stage, n)
    model_states = row["params"] + row["grads"] + row["optimizer_state"] + row["master_weights"]
    assert model_states == pytest.approx(expected)


@pytest.mark.parametrize(("stage", "volume"), [(0, 2), (1, 2), (2, 2), (3, 3)])
def test_zero_communication_volume(stage, volume):
    """Per rank and iteration: all-reduce (stage 0) and reduce-scatter + all-gather (1, 2) move
    2(N-1)/N·Ψ; stage 3 gathers the parameters twice (forward, backward): 3(N-1)/N·Ψ."""
    n = 8
    exp, _ = _zero_memory(stage, n)
    r = simulate(exp)
    psi_bytes = 4_000_000 * 2
    assert r.ranks.loc[0, "bytes_sent"] == pytest.approx(volume * (n - 1) / n * psi_bytes, rel=1e-9)


def test_recompute_adds_a_forward_and_keeps_only_checkpoints(gpt_small):
    cluster = Cluster.homogeneous(nodes=1, gpus_per_node=2)
    base = Experiment(workload=gpt_small, cluster=cluster, batch_size=4, iterations=1,
                      strategy=PipelineParallel(pp=2, micro_batches=2))
    again = base.replace(strategy=PipelineParallel(pp=2, micro_batches=2, recompute=True))
    r0, r1 = simulate(base), simulate(again)
    c0 = r0.iterations.groupby("rank")["compute"].sum()
    c1 = r1.iterations.groupby("rank")["compute"].sum()
    tl = r1.timeline
    recomputed = tl[(tl["stream"] == "compute") & tl["name"].str.startswith("recompute")]
    forward = r0.timeline[r0.timeline["name"].str.startswith("forward")]
    assert recomputed.groupby("rank")["end"].count().sum() > 0
    spent = (recomputed["end"] - recomputed["start"]).groupby(recomputed["rank"]).sum()
    fwd = (forward["end"] - forward["start"]).groupby(forward["rank"]).sum()
    for rank in (0, 1):
        assert c1[rank] - c0[rank] == pytest.approx(spent[rank])
        assert spent[rank] == pytest.approx(fwd[rank])
    assert r1.summary()["throughput"] * r1.summary()["makespan"] == pytest.approx(4)
    assert again.memory().loc[0, "activations"] < base.memory().loc[0, "activations"]
    units = checkpoint_units([x.name for x in gpt_small.layers], 0, len(gpt_small.layers))
    names = [x.name for x in gpt_small.layers]
    assert [names[a] for a, _ in units] == ["embed", "blocks.0", "blocks.1", "ln_f", "lm_head"]


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "match"), [
    (lambda: Hybrid(dp=3, pp=2, tp=2), "dp·pp·tp = 3·2·2 = 12 must equal the number of GPUs, 8"),
    (lambda: Hybrid(pp=3), "pp·tp = 3·1 = 3 does not divide the 8 GPUs"),
    (lambda: Hybrid(tp=4, pp=2, micro_batches=2, order="pp-tp-dp"), "spans nodes"),
    (lambda: TensorParallel(tp=8), "must equal|spans nodes"),
    (lambda: Hybrid(pp=2, micro_batches=3), "micro_batches=3 must divide"),
    (lambda: Hybrid(pp=2, boundaries=(3, 1)), "boundaries must be 1 increasing"),
])
def test_invalid_degrees_and_placements(gpt_small, strategy, match):
    cluster = Cluster.homogeneous(nodes=2, gpus_per_node=4)
    with pytest.raises(ValueError, match=match):
        Experiment(workload=gpt_small, cluster=cluster, batch_size=8, strategy=strategy())


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(pp=0), "pp must be an integer >= 1"),
    (dict(tp=2.0), "tp must be an integer >= 1"),
    (dict(schedule="zigzag"), "schedule must be one of"),
    (dict(chunks=2), "needs schedule='interleaved'"),
    (dict(pp=4, micro_batches=6, schedule="interleaved", chunks=2), "multiple of pp=4"),
    (dict(schedule="interleaved", chunks=2), "needs pp >= 2"),
    (dict(pp=2, zero=2), "zero=2 needs pp=1"),
    (dict(zero=4), "zero must be 0, 1, 2 or 3"),
    (dict(order="tp-dp"), "order must name tp, pp and dp"),
    (dict(zero=1, algorithm="tree"), "no reduce-scatter"),
])
def test_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Hybrid(**kwargs)


def test_tensor_parallel_needs_splittable_layers():
    with pytest.raises(ValueError, match="no layer of this workload splits"):
        Experiment(workload=uniform(4), cluster=free_network(1, 2), batch_size=8, strategy=TensorParallel(tp=2))
    wl = Workload(name="odd", layers=(Layer(name="fc", kind="Linear", params=15, fwd_flops=1, bwd_flops=1,
                                            input_elems=5, output_elems=3, param_shapes=((3, 5),),
                                            tp_role="column"),))
    with pytest.raises(ValueError, match="tp=2 does not divide layer 'fc'"):
        Experiment(workload=wl, cluster=free_network(1, 2), batch_size=8, strategy=TensorParallel(tp=2))
    with pytest.raises(ValueError, match="Layer.tp_role must be one of"):
        Layer(name="fc", kind="Linear", params=1, fwd_flops=1, bwd_flops=1, input_elems=1, output_elems=1,
              tp_role="diagonal")


def test_recompute_redoes_each_units_own_tensor_parallel_collectives_once(gpt_small):
    """A recomputed unit re-runs the all-reduces after its own row layers (Megatron's
    checkpointed transformer layer holds them), not the one after the unit before it: the
    forward all-reduces double, the backward ones stay."""
    cluster = Cluster.homogeneous(nodes=1, gpus_per_node=2)
    counts = {}
    for recompute in (False, True):
        exp = Experiment(workload=gpt_small, cluster=cluster, batch_size=4, iterations=1,
                         strategy=TensorParallel(tp=2, recompute=recompute))
        names = simulate(exp).timeline.query("rank == 0")["name"]
        counts[recompute] = (names.str.startswith("all_reduce:act[").sum(), names.str.startswith("all_reduce:grad[").sum())
    # per layer 2 forward and 2 backward all-reduces (Shoeybi et al., section 3), plus the embedding's
    # forward and the head's backward one
    assert counts[False] == (2 * L + 1, 2 * L + 1)
    assert counts[True] == (2 * (2 * L + 1), 2 * L + 1)


def test_strategies_round_trip_through_experiment_files(gpt_small):
    from strategies import strategy_from_dict

    for strategy in (Hybrid(tp=2, pp=2, micro_batches=4, schedule="interleaved", chunks=2, zero=1,
                            boundaries=(10, 20, 30), recompute=True),
                     PipelineParallel(pp=4), TensorParallel(tp=2, sequence_parallel=True), ZeRO(zero=3)):
        assert strategy_from_dict(strategy.to_dict()) == strategy


def test_gpt3_experiment_reports_flops_mfu_and_memory_for_every_configuration(tmp_path, gpt_small):
    """The experiment script's code path on a small transformer: every grid row has TFLOP/s per GPU,
    MFU and peak memory; the bubble follows (p-1)/(m+p-1)."""
    from experiments import gpt3_parallelism as g3

    points = [{"tp": 2, "pp": 2, "micro_batch_size": 1, "schedule": s, "chunks": v}
              for s, v in (("1f1b", 1), ("interleaved", 2))] + [
              {"tp": 4, "pp": 4, "micro_batch_size": 2, "schedule": "1f1b", "chunks": 1}]
    rows = g3.run_grid(tmp_path, gpt_small, points, gpus=16, global_batch=16, processes=1)
    assert len(rows) == 3 and (tmp_path / "gpt3_grid.csv").read_text().count("\n") == 4
    for r in rows:
        assert r["model_tflops_per_gpu"] > 0 and 0 < r["mfu"] < 1 and r["peak_memory_gb"] > 0
        assert r["hardware_tflops_per_gpu"] > r["model_tflops_per_gpu"]  # recomputation's extra forward
        assert r["tokens_per_second"] == pytest.approx(r["throughput"] * S)
        assert r["dp"] * r["tp"] * r["pp"] == 16 and r["micro_batches"] * r["micro_batch_size"] * r["dp"] == 16
    ranked = g3.best(rows)
    assert [r["throughput"] for r in ranked] == sorted((r["throughput"] for r in ranked), reverse=True)
    g3.plot_grid(rows, tmp_path / "grid.png", 80.0)
    bubble = g3.bubble(tmp_path, gpt_small, counts=(4, 8), tp=8, pp=2)
    by = {(r["schedule"], r["micro_batches"]): r for r in bubble}
    for m in (4, 8):
        assert by[("gpipe", m)]["bubble"] == pytest.approx((2 - 1) / (m + 1), abs=0.05)
        assert by[("1f1b", m)]["bubble"] == pytest.approx((2 - 1) / (m + 1), abs=0.05)
        # On this tiny model communication rivals compute, and interleaving's doubled sends eat its
        # gain (Narayanan et al. note the extra communication); its formula is still (p-1)/v/(m+(p-1)/v).
        assert by[("interleaved", m)]["formula"] == pytest.approx(0.5 / (m + 0.5))
        assert 0 < by[("interleaved", m)]["bubble"] < 1
    assert (tmp_path / "pipeline_bubble.png").stat().st_size > 0
