"""The torch codecs of the compressors (strategies.codecs) against their wire formats and maths.

Ranks are simulated in one process: every rank encodes with its own state, and
``_collective`` plays the all-reduce (summable payloads) or the all-gather. Expected
values come from the formulas or from independent numpy computations (bit unpacking with
``np.unpackbits``, top-k by sorting, QR projections), never from the codec's own output.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from strategies.compression import QSGD, Cast, PowerSGD, RandomK, SignSGD, TopK

# ---------------------------------------------------------------------------------------
# helpers: play the collectives of one step for several ranks


def _collective(comp, payloads):
    """What every rank receives for the per-rank ``payloads`` (list over ranks of lists)."""
    first = payloads[0]
    for p in payloads:
        assert len(p) == len(first)
        for a, b in zip(p, first):
            assert a.shape == b.shape and a.dtype == b.dtype
    if comp.summable:
        summed = []
        for i in range(len(first)):
            acc = payloads[0][i].clone()
            for p in payloads[1:]:
                acc += p[i]  # in the payload's dtype, as an all-reduce does
            summed.append(acc)
        return [[t.clone() for t in summed] for _ in payloads]
    gathered = [[t.clone() for t in p] for p in payloads]
    return [[[t.clone() for t in p] for p in gathered] for _ in payloads]


def _nbytes(payload) -> int:
    return sum(t.numel() * t.element_size() for t in payload)


def run_step(comp, grads_per_rank, states):
    """One step on every rank: (decoded outputs per rank, bytes sent per rank, payloads per round)."""
    world = len(grads_per_rank)
    payloads = [comp.encode(0, g, s) for g, s in zip(grads_per_rank, states)]
    rounds = [payloads]
    for r in range(1, comp.rounds):
        received = _collective(comp, payloads)
        payloads = [
            comp.encode(r, g, s, rec) for g, s, rec in zip(grads_per_rank, states, received)
        ]
        rounds.append(payloads)
    received = _collective(comp, payloads)
    outs = [comp.decode(rec, g, s, world) for g, s, rec in zip(grads_per_rank, states, received)]
    sent = [sum(_nbytes(rnd[i]) for rnd in rounds) for i in range(world)]
    return outs, sent, rounds


def new_states(comp, world):
    states = [comp.new_state() for _ in range(world)]
    for rank, s in enumerate(states):
        s["rank"] = rank
    return states


def flat64(tensors) -> np.ndarray:
    return np.concatenate([t.detach().to(torch.float64).reshape(-1).numpy() for t in tensors])


def make_grads(shapes, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * scale).to(dtype) for s in shapes]


def split_like(flat: np.ndarray, shapes):
    out, i = [], 0
    for s in shapes:
        m = math.prod(s)
        out.append(flat[i : i + m].reshape(s))
        i += m
    return out


def unpack_np(packed: torch.Tensor, bits: int, n: int) -> np.ndarray:
    """Independent little-endian unpacking: element i is stream bits [i*bits, (i+1)*bits)."""
    stream = np.unpackbits(packed.numpy().astype(np.uint8), bitorder="little")
    assert stream.size >= n * bits
    b = stream[: n * bits].reshape(n, bits).astype(np.int64)
    return (b << np.arange(bits, dtype=np.int64)).sum(axis=1)


# ---------------------------------------------------------------------------------------
# 1. payload bytes == wire_bytes

COMPRESSORS = [
    Cast("fp16"),
    Cast("bf16"),
    TopK(0.1),
    TopK(0.05, error_feedback=False),
    TopK(1.0),
    RandomK(0.3, seed=5),
    QSGD(),
    QSGD(levels=1, bucket_size=5),
    QSGD(levels=127, bucket_size=100),
    QSGD(levels=300, bucket_size=7),
    SignSGD("majority"),
    SignSGD("scaled"),
    SignSGD("scaled", error_feedback=False),
    PowerSGD(rank=1),
    PowerSGD(rank=4, warm_start=False),
    PowerSGD(rank=2, error_feedback=False, min_compression_rate=1),
]

SHAPE_SETS = [
    [(13,)],
    [(1,)],
    [(64, 3, 7, 7), (64,)],
    [(10, 20), (7,), (3, 3, 3), (5, 1)],
    [(300, 2), (17, 33)],
    [(32, 40)],
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shapes", SHAPE_SETS, ids=lambda s: "+".join("x".join(map(str, x)) for x in s)
)
@pytest.mark.parametrize("comp", COMPRESSORS, ids=repr)
def test_payload_bytes_equal_wire_bytes(comp, shapes, dtype):
    grads = [make_grads(shapes, dtype, seed=r) for r in range(2)]
    states = new_states(comp, 2)
    e = grads[0][0].element_size()
    for _step in range(2):  # the second step uses the warm-start / residual state
        outs, sent, _ = run_step(comp, grads, states)
        assert sent == [comp.wire_bytes(shapes, e)] * 2
        for out in outs:
            assert [o.shape for o in out] == [torch.Size(s) for s in shapes]
            assert all(o.dtype == dtype for o in out)
            assert all(torch.isfinite(o).all() for o in out)
    assert [s["step"] for s in states] == [2, 2]


@pytest.mark.parametrize("comp", [c for c in COMPRESSORS if not isinstance(c, Cast)], ids=repr)
def test_payload_bytes_bf16(comp):
    shapes = [(64, 3, 7, 7), (64,), (13,)]
    grads = [make_grads(shapes, torch.bfloat16, seed=r) for r in range(2)]
    _, sent, _ = run_step(comp, grads, new_states(comp, 2))
    assert sent == [comp.wire_bytes(shapes, 2)] * 2


def test_wire_bytes_by_hand():
    """The formulas themselves, on hand-computed cases (n = 9472 = 64*147 + 64)."""
    shapes = [(64, 3, 7, 7), (64,)]
    assert Cast().wire_bytes(shapes, 4) == 2 * 9472
    assert TopK(0.01).wire_bytes(shapes, 4) == 95 * 8  # ceil(94.72) = 95 values + int32 indices
    assert TopK(0.01).wire_bytes(shapes, 2) == 95 * 6
    assert RandomK(0.01).wire_bytes(shapes, 2) == 95 * 2
    assert QSGD(levels=7, bucket_size=512).wire_bytes(shapes) == 4 * 19 + 9472 * 4 // 8
    assert QSGD(levels=1, bucket_size=5).wire_bytes([(13,)]) == 4 * 3 + math.ceil(13 * 2 / 8)
    assert SignSGD("majority").wire_bytes([(13,)]) == 2
    assert SignSGD("scaled").wire_bytes([(13,)]) == 6
    # rank 1: the conv (64 x 147) is compressed, the bias is not
    assert PowerSGD(rank=1).wire_bytes(shapes, 4) == 4 * (64 + (64 + 147))


@pytest.mark.parametrize(
    "comp, dtypes",
    [
        (Cast("fp16"), [torch.float16]),
        (Cast("bf16"), [torch.bfloat16]),
        (TopK(0.1), ["grad", torch.int32]),
        (RandomK(0.1), ["grad"]),
        (QSGD(), [torch.float32, torch.uint8]),
        (SignSGD("majority"), [torch.uint8]),
        (SignSGD("scaled"), [torch.uint8, torch.float32]),
        (PowerSGD(rank=1), ["grad", "grad"]),
    ],
    ids=repr,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_payload_dtypes(comp, dtypes, dtype):
    shapes = [(64, 3, 7, 7), (64,)]
    payload = comp.encode(0, make_grads(shapes, dtype), comp.new_state())
    assert [t.dtype for t in payload] == [dtype if d == "grad" else d for d in dtypes]


def test_encode_leaves_grads_untouched():
    shapes = [(32, 40), (40,)]
    for comp in COMPRESSORS:
        grads = make_grads(shapes)
        before = [g.clone() for g in grads]
        run_step(comp, [grads], new_states(comp, 1))
        assert all(torch.equal(a, b) for a, b in zip(grads, before)), comp


# ---------------------------------------------------------------------------------------
# wire formats, decoded independently


def test_qsgd_wire_format():
    s, d = 3, 64  # bits = ceil(log2 7) = 3
    comp = QSGD(levels=s, bucket_size=d, seed=1)
    x = np.random.default_rng(0).normal(size=300)
    x[64:128] = 0.0  # a zero-norm bucket
    n = x.size
    state = comp.new_state()
    norms, packed = comp.encode(0, [torch.tensor(x, dtype=torch.float32)], state)
    assert comp.bits == 3 and packed.numel() == math.ceil(n * 3 / 8) and norms.numel() == 5
    xb = np.zeros(5 * d)
    xb[:n] = np.float32(x)
    expect_norms = np.linalg.norm(xb.reshape(5, d), axis=1)
    np.testing.assert_allclose(norms.numpy(), expect_norms, rtol=1e-6)
    levels = unpack_np(packed, 3, n) - s
    assert levels.min() >= -s and levels.max() <= s
    norm_of = np.repeat(expect_norms, d)[:n]
    a = np.divide(np.abs(np.float32(x)), norm_of, out=np.zeros(n), where=norm_of > 0) * s
    lo, hi = np.floor(a - 1e-5), np.ceil(a + 1e-5)
    assert np.all((np.abs(levels) >= lo) & (np.abs(levels) <= hi))  # stochastic rounding of a
    assert np.all(levels[64:128] == 0)
    assert np.all(np.sign(levels) * np.sign(x) >= 0)
    # decode of the single payload: norm * level / s
    (out,) = comp.decode([[norms, packed]], [torch.zeros(n)], state, 1)
    np.testing.assert_allclose(out.numpy(), norm_of * levels / s, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 9, 11])
def test_pack_bits_matches_numpy(bits):
    from strategies.codecs import pack_bits, unpack_bits

    n = 37
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=n)
    stream = ((codes[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    expect = np.packbits(stream, bitorder="little")  # zero-padded to whole bytes
    packed = pack_bits(torch.tensor(codes), bits)
    assert packed.dtype == torch.uint8
    np.testing.assert_array_equal(packed.numpy(), expect)
    np.testing.assert_array_equal(unpack_bits(packed, bits, n).numpy(), codes)


def test_sign_wire_format():
    x = np.array([1.5, -2.0, 0.0, -0.25, 3.0, 7.0, -1.0, 0.5, -4.0, 2.0, -0.0], dtype=np.float32)
    comp = SignSGD("scaled", error_feedback=False)
    packed, scale = comp.encode(0, [torch.tensor(x)], comp.new_state())
    assert packed.numel() == 2 and scale.shape == (1,)
    bits = unpack_np(packed, 1, x.size)
    assert bits.tolist() == [int(v >= 0) for v in x]  # -0.0 >= 0: bit set
    assert scale.item() == pytest.approx(np.abs(x).mean(), rel=1e-6)


# ---------------------------------------------------------------------------------------
# 2. unbiasedness (QSGD, RandomK)

T_DRAWS = 2000
DELTA = 1e-9  # failure probability allowed to the union-bounded Hoeffding checks


def _mean_decoded(comp, x: np.ndarray, draws: int):
    state = comp.new_state()
    grads = [torch.tensor(x, dtype=torch.float32)]
    total = np.zeros_like(x)
    sq_err = 0.0
    for _ in range(draws):
        out, _, _ = run_step(comp, [grads], [state])
        y = flat64(out[0])
        total += y
        sq_err += float(((y - np.float32(x)) ** 2).sum())
    assert state["step"] == draws
    return total / draws, sq_err / draws


def test_qsgd_unbiased():
    s, d = 2, 64
    comp = QSGD(levels=s, bucket_size=d, seed=3)
    x = np.float32(np.random.default_rng(1).normal(size=300))  # buckets 64,64,64,64,44
    n = x.size
    mean, mse = _mean_decoded(comp, x, T_DRAWS)
    buckets = [x[i : i + d].astype(np.float64) for i in range(0, n, d)]
    norms = np.array([np.linalg.norm(b) for b in buckets])
    norm_of = np.repeat(norms, d)[:n]
    # Hoeffding per coordinate: every draw lies in [floor(a), floor(a) + 1] * norm / s
    tol = norm_of / s * math.sqrt(math.log(2 * n / DELTA) / (2 * T_DRAWS))
    assert np.all(np.abs(mean - x) <= tol)
    # Alistarh et al., Lemma 3.1: E||Q(v) - v||^2 <= min(d/s^2, sqrt(d)/s) ||v||^2 per bucket
    bound = sum(min(b.size / s**2, math.sqrt(b.size) / s) * float(b @ b) for b in buckets)
    # the exact variance of stochastic rounding: (norm/s)^2 p (1 - p), p = frac(|x| s / norm)
    p = np.abs(x) / norm_of * s % 1.0
    exact = float(((norm_of / s) ** 2 * p * (1 - p)).sum())
    assert exact <= bound
    # E||mean - x||^2 = exact / T <= bound / T; Markov gives P(> 4 bound / T) <= 1/4, and the
    # sum over 300 independent coordinates concentrates far tighter around its mean
    assert float(((mean - x) ** 2).sum()) <= 4 * bound / T_DRAWS
    # one draw's squared error matches the stochastic-rounding variance (not a biased rounding)
    assert mse == pytest.approx(exact, rel=0.1)


def test_randomk_unbiased():
    comp = RandomK(ratio=0.25, seed=7)
    x = np.float32(np.random.default_rng(2).normal(size=200))
    n, k = x.size, comp.k(x.size)
    assert k == 50
    mean, mse = _mean_decoded(comp, x, T_DRAWS)
    # Hoeffding per coordinate: every draw of coordinate i is 0 or x_i * n / k
    tol = np.abs(x) * (n / k) * math.sqrt(math.log(2 * n / DELTA) / (2 * T_DRAWS))
    assert np.all(np.abs(mean - x) <= tol + 1e-12)
    # per-coordinate variance x_i^2 (n/k - 1) (inclusion probability k/n); Markov as above
    var = float((x.astype(np.float64) ** 2).sum()) * (n / k - 1)
    assert float(((mean - x) ** 2).sum()) <= 4 * var / T_DRAWS
    assert mse == pytest.approx(var, rel=0.1)


# ---------------------------------------------------------------------------------------
# 3. error feedback


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_topk_residual_is_what_was_not_sent(dtype):
    comp = TopK(ratio=0.1)
    n = 97
    k = comp.k(n)
    rng = np.random.default_rng(4)
    gs = [rng.normal(size=n).astype(np.float32) * 3 for _ in range(3)]
    npdt = np.float16 if dtype == torch.float16 else np.float32
    state = comp.new_state()
    residual = np.zeros(n, dtype=np.float32)
    for g in gs:
        gt = torch.tensor(g).to(dtype)
        acc = gt.to(torch.float32).numpy() + residual  # fp32, as the codec keeps it
        values, idx = comp.encode(0, [gt], state)
        expect_idx = np.argsort(-np.abs(acc), kind="stable")[:k]
        assert sorted(idx.tolist()) == sorted(expect_idx.tolist())
        order = np.argsort(idx.numpy())
        sent = acc[expect_idx].astype(npdt)
        np.testing.assert_array_equal(values.numpy()[order], sent[np.argsort(expect_idx)])
        residual = acc.copy()
        residual[expect_idx] = acc[expect_idx] - sent.astype(np.float32)
        np.testing.assert_array_equal(state["residual"].numpy(), residual)
        comp.decode([[values, idx]], [gt], state, 1)


def test_scaled_sign_residual():
    comp = SignSGD("scaled")
    rng = np.random.default_rng(5)
    gs = [rng.normal(size=41).astype(np.float32) for _ in range(2)]
    gs[0][3] = 0.0
    state = comp.new_state()
    residual = np.zeros(41, dtype=np.float32)
    for g in gs:
        acc = g + residual
        packed, scale = comp.encode(0, [torch.tensor(g)], state)
        signs = np.where(acc >= 0, 1.0, -1.0).astype(np.float32)
        expect_scale = np.abs(acc.astype(np.float64)).mean()
        assert scale.item() == pytest.approx(expect_scale, rel=1e-6)
        residual = acc - scale.numpy() * signs
        np.testing.assert_allclose(state["residual"].numpy(), residual, rtol=1e-6, atol=1e-7)
        comp.decode([[packed, scale]], [torch.tensor(g)], state, 1)


def test_majority_with_error_feedback_keeps_acc_minus_sign():
    comp = SignSGD("majority", error_feedback=True)
    g = np.array([0.3, -0.2, 0.0, 5.0], dtype=np.float32)
    state = comp.new_state()
    comp.encode(0, [torch.tensor(g)], state)
    np.testing.assert_allclose(state["residual"].numpy(), g - np.array([1, -1, 1, 1]), rtol=1e-6)


def _dense_sent(comp, payload, n):
    """What one rank sent, decoded from its payload by the test."""
    if isinstance(comp, TopK):
        values, idx = payload
        out = np.zeros(n)
        out[idx.numpy().astype(np.int64)] = values.to(torch.float64).numpy()
        return out
    packed, scale = payload
    return np.where(unpack_np(packed, 1, n) == 1, 1.0, -1.0) * float(scale.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("comp", [TopK(0.1), TopK(0.2), SignSGD("scaled")], ids=repr)
def test_error_feedback_telescopes(comp, dtype):
    """Constant gradient g over T steps: sum of what a rank sent + its final residual = T g
    (in fp16 too: the residual keeps the rounding of the values sent)."""
    shapes = [(6, 5), (7,)]
    steps, world = 25, 2
    grads = [make_grads(shapes, dtype, seed=10 + r) for r in range(world)]
    states = new_states(comp, world)
    n = sum(math.prod(s) for s in shapes)
    sent = np.zeros((world, n))
    outs_sum = np.zeros(n)
    rounding = np.zeros(n)  # outputs in fp16: half an ulp, 2^-11 relative, per step
    for _ in range(steps):
        outs, _, rounds = run_step(comp, grads, states)
        for r in range(world):
            sent[r] += _dense_sent(comp, rounds[0][r], n)
        outs_sum += flat64(outs[0])
        if dtype == torch.float16:
            rounding += np.abs(flat64(outs[0])) * 2.0**-11
    for r in range(world):
        g = flat64(grads[r])
        total = sent[r] + states[r]["residual"].to(torch.float64).numpy()
        np.testing.assert_allclose(total, steps * g, rtol=1e-5, atol=1e-4)
    # the decoded averages are the averages of what was sent
    assert np.all(np.abs(outs_sum - sent.mean(axis=0)) <= rounding + 1e-5 * (1 + np.abs(outs_sum)))


def _orth_np(p):
    q, _ = np.linalg.qr(p)
    return q


def test_powersgd_residual_and_warm_start():
    """Two ranks, two steps. Step 1: output = Phat Phat^T mean(M) with Phat orthonormal on the
    summed P the ranks sent; residual_r = acc_r - output (PyTorch's error_dict). Step 2 (warm
    start): P_r = M_r Q1 with Q1 the averaged Q of step 1, recomputed here in float64."""
    comp = PowerSGD(rank=2)
    shapes = [(20, 3, 2, 2), (20,), (30, 16)]
    world = 2
    states = new_states(comp, world)
    steps = [[make_grads(shapes, seed=20 + 2 * t + r) for r in range(world)] for t in range(2)]
    acc = [flat64(steps[0][r]) for r in range(world)]

    def mats_of(flat):
        w, b, m = split_like(flat, shapes)
        return w.reshape(20, 12), b, m

    outs, _, rounds = run_step(comp, steps[0], states)
    p_sum = sum(rounds[0][r][1].to(torch.float64).numpy() for r in range(world))
    q_sum = sum(rounds[1][r][0].to(torch.float64).numpy() for r in range(world))
    p1, p2 = _orth_np(p_sum[:40].reshape(20, 2)), _orth_np(p_sum[40:].reshape(30, 2))
    mean_m = [np.mean([mats_of(a)[i] for a in acc], axis=0) for i in range(3)]
    expect = np.concatenate(
        [(p1 @ p1.T @ mean_m[0]).reshape(-1), mean_m[1], (p2 @ p2.T @ mean_m[2]).reshape(-1)]
    )
    np.testing.assert_allclose(flat64(outs[0]), expect, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(flat64(outs[1]), expect, rtol=1e-4, atol=1e-5)
    for r in range(world):
        np.testing.assert_allclose(
            states[r]["residual"].numpy(), acc[r] - expect, rtol=1e-4, atol=1e-5
        )
    # the averaged Q kept for the warm start
    q1 = [q_sum[: 12 * 2].reshape(12, 2) / world, q_sum[12 * 2 :].reshape(16, 2) / world]

    acc = [flat64(steps[1][r]) + (acc[r] - expect) for r in range(world)]
    payloads = [comp.encode(0, steps[1][r], states[r]) for r in range(world)]
    for r in range(world):
        w, b, m = mats_of(acc[r])
        np.testing.assert_allclose(payloads[r][0].numpy(), b, rtol=1e-5, atol=1e-6)
        expect_p = np.concatenate([(w @ q1[0]).reshape(-1), (m @ q1[1]).reshape(-1)])
        np.testing.assert_allclose(payloads[r][1].numpy(), expect_p, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_powersgd_error_feedback_telescopes(dtype):
    comp = PowerSGD(rank=1)
    shapes = [(16, 24), (16,), (8, 2, 3, 3)]
    steps, world = 15, 2
    grads = [make_grads(shapes, dtype, seed=30 + r) for r in range(world)]
    states = new_states(comp, world)
    outs_sum = np.zeros(sum(math.prod(s) for s in shapes))
    for _ in range(steps):
        outs, _, _ = run_step(comp, grads, states)
        outs_sum += flat64(outs[0])
    for r in range(world):
        total = outs_sum + states[r]["residual"].to(torch.float64).numpy()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        np.testing.assert_allclose(total, steps * flat64(grads[r]), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------
# 4. exact where lossless


@pytest.mark.parametrize("comp", [Cast("fp16"), Cast("bf16")], ids=repr)
def test_cast_exact_on_representable_values(comp):
    rng = np.random.default_rng(6)
    shapes = [(5, 7), (9,)]
    # multiples of 1/4 in [-4, 4]: exact in fp16 and bf16, and so are sums of 4 and / 4
    grads = [
        [torch.tensor(rng.integers(-16, 17, size=s) / 4, dtype=torch.float32) for s in shapes]
        for _ in range(4)
    ]
    outs, _, _ = run_step(comp, grads, new_states(comp, 4))
    expect = np.mean([flat64(g) for g in grads], axis=0)
    for out in outs:
        np.testing.assert_array_equal(flat64(out), expect)
    # a single rank: any fp16 value survives
    x = torch.tensor(rng.normal(size=50) * 100).to(torch.float16).to(torch.float32)
    (out,), _, _ = run_step(Cast("fp16"), [[x]], new_states(comp, 1))
    assert torch.equal(out[0], x)


def test_topk_ratio_one_exact_average():
    comp = TopK(1.0)
    shapes = [(4, 3, 2, 2), (11,)]
    grads = [make_grads(shapes, seed=40 + r) for r in range(4)]
    states = new_states(comp, 4)
    outs, _, _ = run_step(comp, grads, states)
    expect = np.mean([flat64(g) for g in grads], axis=0)
    for out, st in zip(outs, states):
        np.testing.assert_allclose(flat64(out), expect, rtol=1e-6, atol=1e-7)
        assert torch.count_nonzero(st["residual"]) == 0


def _low_rank(rows, cols, r, seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(rows, r)) @ rng.normal(size=(r, cols))).astype(np.float32)


@pytest.mark.parametrize("r, shape", [(1, (40, 30)), (2, (64, 3, 7, 7)), (3, (50, 60))])
def test_powersgd_recovers_low_rank_in_one_step(r, shape):
    """A rank-r matrix with rank r: P = M Q spans M's columns for a generic Q, so
    Phat Phat^T M = M after one power step."""
    comp = PowerSGD(rank=r, error_feedback=False)
    rows = shape[0]
    cols = math.prod(shape) // rows
    m = _low_rank(rows, cols, r, seed=r)
    grads = [torch.tensor(m).reshape(shape)]
    (out,), _, _ = run_step(comp, [grads], new_states(comp, 1))
    np.testing.assert_allclose(
        out[0].numpy().reshape(rows, cols), m, rtol=1e-4, atol=1e-4 * np.abs(m).max()
    )


def test_powersgd_warm_start_converges_to_best_rank_one():
    """Warm start is a power iteration across steps: on a fixed M it converges to the best
    rank-1 approximation (SVD), at rate sigma2/sigma1 per step; a fresh Q each step does not."""
    rng = np.random.default_rng(7)
    u, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    v, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    sig = np.array([10.0, 3.0, 1.0] + [0.1] * 17)
    m = (u[:, :20] * sig) @ v.T
    best = sig[0] * np.outer(u[:, 0], v[:, 0])
    grads = [torch.tensor(m, dtype=torch.float32)]
    for warm, expect_close in ((True, True), (False, False)):
        comp = PowerSGD(rank=1, warm_start=warm, error_feedback=False, seed=1)
        state = comp.new_state()
        errs = []
        for _ in range(30):
            (out,), _, _ = run_step(comp, [grads], [state])
            errs.append(np.abs(out[0].numpy() - best).max())
        if expect_close:
            assert errs[-1] < 1e-4 * sig[0]
        else:
            assert min(errs[-5:]) > 1e-2  # each step starts from a new random Q


def test_powersgd_nothing_compressed():
    comp = PowerSGD(rank=4)
    shapes = [(13,), (3, 5)]  # (3 + 5) * 4 * 2 >= 15: not compressed
    grads = [make_grads(shapes, seed=50 + r) for r in range(3)]
    states = new_states(comp, 3)
    payloads = [comp.encode(0, g, s) for g, s in zip(grads, states)]
    assert [len(p) for p in payloads] == [1, 1, 1]
    received = _collective(comp, payloads)
    assert [comp.encode(1, g, s, rec) for g, s, rec in zip(grads, states, received)] == [[], [], []]
    outs = [comp.decode([], g, s, 3) for g, s in zip(grads, states)]
    expect = np.mean([flat64(g) for g in grads], axis=0)
    for out, st in zip(outs, states):
        np.testing.assert_allclose(flat64(out), expect, rtol=1e-6, atol=1e-7)
        assert st["step"] == 1


# ---------------------------------------------------------------------------------------
# 5. majority vote


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_majority_vote(dtype):
    comp = SignSGD("majority")
    x = np.array(
        [
            [1.0, -1.0, 2.0, -3.0, 0.0, -0.5, 4.0, -2.0, 1.0, 0.0],
            [-1.0, -1.0, 2.0, 3.0, -1.0, 0.5, -4.0, -2.0, 1.0, 0.0],
            [1.0, 2.0, -2.0, -3.0, -1.0, 0.5, -4.0, 2.0, 1.0, -1.0],
        ],
        dtype=np.float32,
    )
    grads = [[torch.tensor(row).to(dtype)] for row in x]
    outs, _, _ = run_step(comp, grads, new_states(comp, 3))
    votes = np.where(x >= 0, 1, -1).sum(axis=0)  # zero counts as +
    expect = np.sign(votes).astype(np.float64)
    assert expect.tolist() == [1, -1, 1, -1, -1, 1, -1, -1, 1, 1]
    for (out,) in outs:
        assert out.dtype == dtype
        assert out.to(torch.float64).numpy().tolist() == expect.tolist()
    # four ranks: a tie votes 0
    grads4 = [
        [torch.tensor(v, dtype=dtype)] for v in ([1.0, 1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0])
    ]
    outs, _, _ = run_step(comp, grads4, new_states(comp, 4))
    assert outs[0][0].tolist() == [0.0, 1.0]


# ---------------------------------------------------------------------------------------
# 6. multi-rank average


@pytest.mark.parametrize(
    "comp", [TopK(1.0, error_feedback=False), RandomK(1.0), TopK(1.0)], ids=repr
)
def test_four_rank_average_exact(comp):
    shapes = [(8, 3, 3, 3), (8,), (5,)]
    grads = [make_grads(shapes, seed=60 + r) for r in range(4)]
    outs, _, _ = run_step(comp, grads, new_states(comp, 4))
    expect = np.mean([flat64(g) for g in grads], axis=0)
    for out in outs:
        np.testing.assert_allclose(flat64(out), expect, rtol=1e-6, atol=1e-6)


def test_four_rank_average_qsgd_many_levels():
    s, d = 1000, 50
    comp = QSGD(levels=s, bucket_size=d)
    shapes = [(120,), (7, 3)]
    grads = [make_grads(shapes, seed=70 + r) for r in range(4)]
    outs, _, _ = run_step(comp, grads, new_states(comp, 4))
    xs = [flat64(g) for g in grads]
    n = xs[0].size
    # each rank's decoded element is within one level (norm / s) of its value
    steps = [
        np.repeat([np.linalg.norm(x[i : i + d]) for i in range(0, n, d)], d)[:n] / s for x in xs
    ]
    tol = np.mean(steps, axis=0) + 1e-6
    for out in outs:
        assert np.all(np.abs(flat64(out) - np.mean(xs, axis=0)) <= tol)


def test_four_rank_average_scaled_sign_exact_on_constant_magnitudes():
    """A rank whose entries share one magnitude c is sent exactly (scale = c)."""
    comp = SignSGD("scaled")
    rng = np.random.default_rng(8)
    xs = [np.float32(c * rng.choice([-1.0, 1.0], size=37)) for c in (0.5, 2.0, 0.25, 1.0)]
    outs, _, _ = run_step(comp, [[torch.tensor(x)] for x in xs], new_states(comp, 4))
    for (out,) in outs:
        np.testing.assert_allclose(out.numpy(), np.mean(xs, axis=0), rtol=1e-6)


def test_four_rank_average_powersgd_shared_column_space():
    """M_r = u v_r^T (one column space): the mean u mean(v)^T is rank 1 and recovered
    exactly with rank 1; the uncompressed bias is averaged exactly."""
    comp = PowerSGD(rank=1, error_feedback=False)
    rng = np.random.default_rng(9)
    u = rng.normal(size=(24, 1))
    ms = [np.float32(u @ rng.normal(size=(1, 18))) for _ in range(4)]
    bs = [np.float32(rng.normal(size=24)) for _ in range(4)]
    grads = [[torch.tensor(m), torch.tensor(b)] for m, b in zip(ms, bs)]
    outs, _, _ = run_step(comp, grads, new_states(comp, 4))
    for out in outs:
        np.testing.assert_allclose(out[0].numpy(), np.mean(ms, axis=0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out[1].numpy(), np.mean(bs, axis=0), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------
# 7. cross-rank consistency of the random choices


def test_randomk_same_indices_on_every_rank_new_ones_each_step():
    comp = RandomK(ratio=0.1, seed=11)
    n, world = 500, 3
    k = comp.k(n)
    # rank r's value at index i is i + 1 + 10000 r (exact in fp32): the payload reveals the indices
    grads = [[torch.arange(n, dtype=torch.float32) + 1 + 10000 * r] for r in range(world)]
    states = new_states(comp, world)
    picked = []
    for _ in range(2):
        outs, _, rounds = run_step(comp, grads, states)
        idx = [rounds[0][r][0].numpy() - 1 - 10000 * r for r in range(world)]
        assert all(np.array_equal(idx[0], i) for i in idx)
        assert idx[0].size == k and np.unique(idx[0]).size == k
        assert idx[0].min() >= 0 and idx[0].max() < n
        # decode puts the (rescaled) average at those indices only
        for (out,) in outs:
            assert sorted(np.flatnonzero(out.numpy()).tolist()) == sorted(
                idx[0].astype(int).tolist()
            )
        picked.append(set(idx[0].astype(int).tolist()))
    assert picked[0] != picked[1]
    # another seed picks other indices
    other = RandomK(ratio=0.1, seed=12)
    payload = other.encode(0, grads[0], other.new_state())
    assert set((payload[0].numpy() - 1).astype(int).tolist()) != picked[0]


def test_qsgd_randomness_differs_by_rank_and_step():
    comp = QSGD(levels=2, bucket_size=64)
    x = [torch.tensor(np.random.default_rng(12).normal(size=256), dtype=torch.float32)]
    states = new_states(comp, 2)
    outs, _, rounds = run_step(comp, [x, x], states)
    assert not torch.equal(rounds[0][0][1], rounds[0][1][1])  # ranks draw differently
    again = comp.encode(0, x, states[0])  # step 1
    assert not torch.equal(again[1], rounds[0][0][1])
    # ... and reproducibly: a fresh state at rank 0 repeats step 0
    fresh = comp.new_state()
    assert torch.equal(comp.encode(0, x, fresh)[1], rounds[0][0][1])


def test_bad_rounds_and_world_size():
    with pytest.raises(ValueError):
        TopK().encode(1, [torch.zeros(3)], {"step": 0}, [])
    with pytest.raises(ValueError):
        Cast().decode([torch.zeros(3, dtype=torch.float16)], [torch.zeros(3)], {"step": 0}, 0)
    with pytest.raises(ValueError):
        Cast().encode(0, [torch.zeros(3), torch.zeros(2, dtype=torch.float16)], {"step": 0})


def test_cast_divides_before_the_sum_when_it_knows_the_world_size():
    # four ranks at 30000 each: the fp16 sum (120000) overflows fp16's 65504 unless divided first
    grads = [torch.full((8,), 30000.0)]
    comp = Cast("fp16")
    sums = {}
    for known in (False, True):
        states = [comp.new_state() for _ in range(4)]
        if known:
            for state in states:
                state["world_size"] = 4
        payloads = [comp.encode(0, grads, state) for state in states]
        summed = [sum(p[0] for p in payloads[1:]) + payloads[0][0]]
        sums[known] = comp.decode(summed, grads, states[0], 4)[0]
    assert torch.isinf(sums[False]).all()
    assert torch.equal(sums[True], torch.full((8,), 30000.0))
