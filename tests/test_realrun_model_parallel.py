"""realrun runs tensor parallelism, activation recomputation and ZeRO-3 with several buckets:
the training they do equals single-process training of the whole model (plain torch here)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import realrun
from realrun.tensor_parallel import shard_module, vocab_parallel_cross_entropy
from simulator import Cluster, Experiment, Workload
from strategies import AllReduceSGD, Hybrid, PipelineParallel, TensorParallel, ZeRO
from tests.realrun_helpers import gradient, reference

pytestmark = pytest.mark.spawns

LR = 0.05
GPT = Workload.from_zoo("gpt", size="gpt2-small", n_layer=2, d_model=32, n_head=4, vocab_size=64, n_ctx=8,
                        seq_len=8, dropout=0.0)
NAMES = [layer.name for layer in GPT.layers]


def cluster(nodes: int, gpus: int) -> Cluster:
    return Cluster.homogeneous(nodes=nodes, gpus_per_node=gpus)


def final_params(folder, rank: int) -> torch.Tensor:
    return torch.load(folder / f"params{rank}.pt")


def run(exp, folder):
    return realrun.run(exp, out=folder, save_params=True, lr=LR, timeout=180)


def one_process(exp, shards: int, batch: int):
    """Plain SGD of the whole model on the mean gradient of ``shards`` batches; returns the
    model and the mean loss of each iteration."""
    model, state, data = reference(exp)
    losses = []
    for it in range(exp.iterations):
        total = torch.zeros_like(state.params)
        loss = 0.0
        for d in range(shards):
            total += gradient(model, state, data, d, it, batch) / shards
            with torch.no_grad():
                x = data.inputs(d, it, batch, 0, batch)
                loss += float(data.loss(model(x), d, it, batch, 0, batch)) / shards
        losses.append(loss)
        with torch.no_grad():
            state.params -= LR * total
    return model, losses


def sharded(model, exp, t: int, r: int):
    """Rank ``r`` of ``t``'s share of (a copy of) ``model``, as realrun lays it out flat."""
    from realrun.model import ModelState

    model = copy.deepcopy(model)
    owned = shard_module(model, NAMES, exp.job().layer_tp, t, r) if t > 1 else None
    return ModelState(model, exp.workload, torch.device("cpu"), owned)


def slice_of(model, exp, t: int, r: int) -> torch.Tensor:
    return sharded(model, exp, t, r).params.clone()


def test_the_sharded_gpt_computes_the_whole_models_logits():
    """Each rank's slice, fed the whole model's output after every row and vocab layer (what
    the all-reduce there gives), makes its vocabulary slice of the whole model's logits; and
    the ranks' partial outputs of those layers sum to the whole model's."""
    exp = Experiment(workload=GPT, cluster=cluster(1, 2), batch_size=4, strategy=TensorParallel(tp=2))
    whole, _, data = reference(exp)
    x = data.inputs(0, 0, 4, 0, 4)
    roles = exp.job().layer_tp
    summed = [n for n, role in zip(NAMES, roles, strict=True) if role in ("row", "vocab")]
    assert summed == ["embed.wte", "blocks.0.attn.proj", "blocks.0.mlp.proj", "blocks.1.attn.proj",
                      "blocks.1.mlp.proj"]
    totals = {}
    for n in summed:
        whole.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: totals.__setitem__(n, o))
    with torch.no_grad():
        expected = whole(x)
    partials = {n: [] for n in summed}
    for r, (lo, hi) in enumerate(((0, 32), (32, 64))):
        model, _, _ = reference(exp)
        shard_module(model, NAMES, roles, 2, r)
        for n in summed:
            model.get_submodule(n).register_forward_hook(
                lambda m, a, o, n=n: (partials[n].append(o), totals[n])[1])
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected[..., lo:hi], rtol=1e-5, atol=1e-5)
        assert model.blocks[0].attn.n_head == 2 and model.blocks[0].attn.qkv.weight.shape == (48, 32)
        assert model.lm_head.weight is model.embed.wte.weight  # the head stays tied, to the slice
    for n in summed:
        torch.testing.assert_close(partials[n][0] + partials[n][1], totals[n], rtol=1e-5, atol=1e-5)


def test_vocabulary_slices_of_an_embedding_sum_to_it_with_its_padding_row():
    torch.manual_seed(0)
    whole = torch.nn.Embedding(10, 3, padding_idx=7)
    idx = torch.tensor([[0, 7, 9, 4], [7, 5, 1, 3]])
    whole(idx).pow(2).sum().backward()
    model = torch.nn.Sequential(copy.deepcopy(whole))
    model[0].weight.grad = None
    total, grads = 0, []
    for r in (0, 1):
        part = copy.deepcopy(model)
        shard_module(part, ["0"], ["vocab"], 2, r)
        total = total + part[0](idx)
        grads.append(part[0])
    torch.testing.assert_close(total, whole(idx))
    total.pow(2).sum().backward()  # both slices see the summed output, as after the all-reduce
    torch.testing.assert_close(torch.cat([g.weight.grad for g in grads]), whole.weight.grad)
    assert grads[1].padding_idx == 2 and grads[0].padding_idx is None  # row 7 is row 2 of the slice [5, 10)


def test_vocab_parallel_cross_entropy_equals_cross_entropy_over_the_whole_vocabulary():
    torch.manual_seed(0)
    logits = torch.randn(6, 10, dtype=torch.float64) * 3
    target = torch.tensor([0, 9, 4, 5, 7, 2])
    whole = logits.clone().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(whole, target)
    expected.backward()
    # two ranks in two threads; the group's max and sum exchange through a barrier
    barrier, slots = threading.Barrier(2), [None, None]

    def reducer(r, fn):
        def reduce(t):
            slots[r] = t.detach().clone()
            barrier.wait()
            out = fn(slots[0], slots[1])
            barrier.wait()
            return out
        return reduce

    results = [None, None]

    def rank(r, lo, hi):
        part = logits[:, lo:hi].clone().requires_grad_(True)
        loss = vocab_parallel_cross_entropy(part, target, lo, hi, reducer(r, torch.maximum), reducer(r, torch.add))
        loss.backward()
        results[r] = (loss.item(), part.grad)

    threads = [threading.Thread(target=rank, args=(r, lo, hi)) for r, (lo, hi) in enumerate(((0, 4), (4, 10)))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for r, (lo, hi) in enumerate(((0, 4), (4, 10))):
        assert results[r][0] == pytest.approx(expected.item(), rel=1e-12)
        torch.testing.assert_close(results[r][1], whole.grad[:, lo:hi])


def test_tensor_parallel_training_equals_one_process(tmp_path):
    exp = Experiment(workload=GPT, cluster=cluster(1, 2), batch_size=4, iterations=3,
                     strategy=TensorParallel(tp=2))
    result = run(exp, tmp_path)
    model, losses = one_process(exp, shards=1, batch=4)
    for r in (0, 1):
        torch.testing.assert_close(final_params(tmp_path, r), slice_of(model, exp, 2, r), rtol=1e-4, atol=1e-6)
    assert result.stats["loss"] == pytest.approx(losses, rel=1e-5)
    names = result.timeline["name"]
    # per layer 2 all-reduces forward and 2 backward (Shoeybi et al., section 3), and the embedding's and
    # head's: 2 layers x (2 + 2) + 1 + 1 per iteration, on each rank
    acts = names.str.startswith("all_reduce:act[") | names.str.startswith("all_reduce:grad[")
    assert acts.sum() == 2 * 3 * (2 * 4 + 2)


def test_tensor_and_data_parallel_with_zero_and_recompute_equal_one_process(tmp_path):
    exp = Experiment(workload=GPT, cluster=cluster(2, 2), batch_size=4, iterations=2,
                     strategy=Hybrid(tp=2, zero=1, recompute=True, micro_batches=2))
    run(exp, tmp_path)
    model, _ = one_process(exp, shards=2, batch=4)
    for rank, r in ((0, 0), (1, 1), (2, 0), (3, 1)):  # tp innermost: ranks 0, 1 one group, 2, 3 the other
        torch.testing.assert_close(final_params(tmp_path, rank), slice_of(model, exp, 2, r), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sp", [False, True])
def test_tensor_parallel_pipeline_equals_one_process(tmp_path, sp):
    cut = NAMES.index("blocks.1")
    exp = Experiment(workload=GPT, cluster=cluster(2, 2), batch_size=4, iterations=2,
                     strategy=Hybrid(tp=2, pp=2, micro_batches=2, boundaries=(cut,), sequence_parallel=sp))
    result = run(exp, tmp_path)
    model, _ = one_process(exp, shards=1, batch=4)
    check_stages(tmp_path, exp, model, cut)
    # the output head is tied to the word embedding (layer 1): the two stages sum their gradients of
    # it each iteration (Megatron's embedding all-reduce), each tensor-parallel rank with its peer
    tied = result.timeline[result.timeline["name"] == "all_reduce:tied[1]"]
    assert sorted(tied["rank"]) == [0, 0, 1, 1, 2, 2, 3, 3]


def check_stages(folder, exp, model, cut):
    """Each rank's stage, and the last stage's copy of the tied word embedding, equal one
    process's training; the rest of a rank's buffer is idle."""
    n, emb = len(NAMES), NAMES.index("embed.wte")
    job = exp.job()
    lay = exp.strategy._layout(job)
    for rank in range(job.accelerators):
        t, s, _ = lay.coords[rank]
        st = sharded(model, exp, lay.tp, t)
        o, final = st.offsets, final_params(folder, rank)
        for a, b in [(0, cut)] if s == 0 else [(cut, n), (emb, emb + 1)]:
            torch.testing.assert_close(final[o[a]:o[b]], st.params[o[a]:o[b]], rtol=1e-4, atol=1e-6)


def test_a_tied_embedding_across_stages_with_replicas_and_zero_equals_one_process(tmp_path):
    """pp=2 × dp=2 with ZeRO-1: the first stage sums the embedding's gradient with the head's
    before its reduce-scatter; the last stage's copy is summed, averaged over replicas, stepped."""
    cut = NAMES.index("blocks.1")
    exp = Experiment(workload=GPT, cluster=cluster(2, 2), batch_size=4, iterations=2,
                     strategy=Hybrid(pp=2, zero=1, micro_batches=2, boundaries=(cut,)))
    run(exp, tmp_path)
    model, _ = one_process(exp, shards=2, batch=4)
    check_stages(tmp_path, exp, model, cut)


def test_recomputation_changes_no_training_even_with_dropout(tmp_path):
    """Recomputed units draw the same dropout masks as their first forward: the parameters
    end the same with and without recomputation."""
    wl = Workload.from_zoo("gpt", size="gpt2-small", n_layer=2, d_model=32, n_head=4, vocab_size=64, n_ctx=8,
                           seq_len=8, dropout=0.2)
    finals = {}
    for recompute in (False, True):
        exp = Experiment(workload=wl, cluster=cluster(1, 2), batch_size=4, iterations=2,
                         strategy=PipelineParallel(pp=2, micro_batches=2, recompute=recompute,
                                                   boundaries=([x.name for x in wl.layers].index("blocks.1"),)))
        result = run(exp, tmp_path / str(recompute))
        finals[recompute] = [final_params(tmp_path / str(recompute), r) for r in (0, 1)]
        recomputed = result.timeline["name"].str.startswith("recompute[").sum()
        assert (recomputed > 0) == recompute
    for r in (0, 1):
        torch.testing.assert_close(finals[True][r], finals[False][r], rtol=1e-6, atol=1e-7)


def test_zero3_with_several_buckets_equals_one_process(tmp_path):
    exp = Experiment(workload=GPT, cluster=cluster(2, 1), batch_size=4, iterations=2,
                     strategy=ZeRO(zero=3, bucket_mb=0.02, first_bucket_mb=0.01))
    result = run(exp, tmp_path)
    expected = one_process(exp.replace(strategy=AllReduceSGD()), shards=2, batch=4)[0]
    st = sharded(expected, exp, 1, 0)
    # each bucket is reduce-scattered on its own: rank r steps part r of every bucket, and only
    # the parts it steps are current in its buffer (ZeRO-3 gathers the rest before use)
    names = result.timeline.loc[result.timeline["rank"] == 0, "name"]
    buckets = sorted({tuple(int(v) for v in n[len("reduce_scatter:grads["):-1].split(":"))
                      for n in names if n.startswith("reduce_scatter:grads[")})
    assert len(buckets) >= 3 and buckets[0][0] == 0 and buckets[-1][1] == len(NAMES)
    assert all(x[1] == y[0] for x, y in zip(buckets, buckets[1:]))  # they tile the model
    finals = [final_params(tmp_path, r) for r in (0, 1)]
    for a, b in buckets:
        lo, hi = st.offsets[a], st.offsets[b]
        for r, part in enumerate(torch.arange(lo, hi).tensor_split(2)):
            torch.testing.assert_close(finals[r][part], st.params[part], rtol=1e-4, atol=1e-6)
    gathers = names.str.startswith("all_gather:params").sum()
    assert gathers == 2 * 2 * len(buckets)  # every bucket gathered before its forward and its backward


def test_sequence_parallel_training_equals_one_process(tmp_path):
    """Korthikanti et al.: the replicated layers run on half of the tokens each. The word
    embedding's partial sums are reduce-scattered along the sequence, every column group's
    input is all-gathered and every row layer's output reduce-scattered; the position
    embedding and layer norms' gradients, sums over a half of the tokens each, are summed
    over the pair once per iteration."""
    exp = Experiment(workload=GPT, cluster=cluster(1, 2), batch_size=4, iterations=3,
                     strategy=TensorParallel(tp=2, sequence_parallel=True))
    result = run(exp, tmp_path)
    model, losses = one_process(exp, shards=1, batch=4)
    for r in (0, 1):
        torch.testing.assert_close(final_params(tmp_path, r), slice_of(model, exp, 2, r), rtol=1e-4, atol=1e-6)
    assert result.stats["loss"] == pytest.approx(losses, rel=1e-5)
    tl = result.timeline[result.timeline["rank"] == 0]
    kinds = tl.loc[tl["stream"] == "comm", "name"].str.split("[").str[0].value_counts()
    # per iteration: a reduce-scatter after the embedding and each row layer (1 + 2·2), an
    # all-gather before each column group (2·2 + the head) in forward; the other of each pair
    # in backward
    assert kinds["reduce_scatter:act"] == kinds["all_gather:act"] == 3 * 5
    assert kinds["all_gather:grad"] == kinds["reduce_scatter:grad"] == 3 * 5
    assert kinds["all_reduce:sp_grads"] == 3
    assert "all_reduce:act" not in kinds and "all_reduce:grad" not in kinds


def test_sequence_parallel_with_data_parallel_zero_and_recompute_equals_one_process(tmp_path):
    exp = Experiment(workload=GPT, cluster=cluster(2, 2), batch_size=4, iterations=2,
                     strategy=Hybrid(tp=2, zero=1, recompute=True, micro_batches=2, sequence_parallel=True))
    run(exp, tmp_path)
    model, _ = one_process(exp, shards=2, batch=4)
    for rank, r in ((0, 0), (1, 1), (2, 0), (3, 1)):
        torch.testing.assert_close(final_params(tmp_path, rank), slice_of(model, exp, 2, r), rtol=1e-4, atol=1e-6)


def test_a_stage_cut_inside_a_block_is_refused_clearly(tmp_path):
    inside = NAMES.index("blocks.0.ln_2")
    exp = Experiment(workload=GPT, cluster=cluster(1, 2), batch_size=4, iterations=1,
                     strategy=PipelineParallel(pp=2, boundaries=(inside,)))
    with pytest.raises(realrun.RealRunError, match="stages may"):
        run(exp, tmp_path)
