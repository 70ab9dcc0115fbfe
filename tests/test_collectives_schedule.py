"""Collective step schedules, proved by running them on numpy buffers.

The reference executor below follows the package's executor semantics (sends
read start-of-step state, then receives add or overwrite). Data are random
integers in float64, so sums are exact; chunks an op says a rank does not yet
hold start as NaN, so a schedule that reads or reduces a chunk too early shows
up as NaN in the result.
"""

from __future__ import annotations

import math
import os
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.collectives import ALGORITHMS, OPS, Phase, Schedule, schedule
from strategies.collectives._core import Rings, Segment
from strategies.collectives.tree import double_tree_parents

PS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)
FLAT = [(op, alg) for op in OPS for alg in ALGORITHMS[op] if alg != "hierarchical"]
NODE_SHAPES = [
    [0, 0, 1, 1],
    [0, 1, 0, 1],
    [7, 7, 7, 3, 3, 3],
    [5, 5, 2, 2, 9, 9],
    [0] * 8,
    list(range(8)),
    [0, 0, 0, 0, 1, 1, 1, 1],
    [0, 0, 1, 1, 2, 2, 3, 3],
    [2, 0, 1, 2, 0, 1, 1, 2, 0, 0, 1, 2],
    [i // 4 for i in range(16)],
]


# reference executor ---------------------------------------------------------


def run(sched: Schedule, bufs: np.ndarray) -> np.ndarray:
    """Apply ``sched`` to per-rank buffers ``bufs[rank]`` (cut into ``nchunks`` parts)."""
    bufs = bufs.copy()
    edges = np.cumsum([0] + [len(c) for c in np.array_split(bufs[0], sched.nchunks)])
    for step in sched.steps():
        mode: dict[tuple[int, int], bool] = {}
        reads = []
        for t in step.transfers:
            assert 0 <= t.src < sched.p and 0 <= t.dst < sched.p and t.src != t.dst
            assert 0 <= t.chunk < sched.nchunks
            assert t.nbytes == sched.chunk_bytes
            key = (t.dst, t.chunk)
            # never two overwrites of one chunk, nor an overwrite and an add
            assert key not in mode or (mode[key] and t.reduce), key
            mode[key] = t.reduce
            reads.append((t, bufs[t.src, edges[t.chunk] : edges[t.chunk + 1]].copy()))
        for t, data in reads:
            part = slice(edges[t.chunk], edges[t.chunk + 1])
            if t.reduce:
                bufs[t.dst, part] += data
            else:
                bufs[t.dst, part] = data
    return bufs


def random_buffers(rng, p: int, nelem: int) -> np.ndarray:
    return rng.integers(-1000, 1000, size=(p, nelem)).astype(np.float64)


def check_result(sched: Schedule, rng) -> None:
    """Run ``sched`` on random data and assert the op's end state."""
    op, p = sched.op, sched.p
    if op == "all_to_all":
        block = 2
        start = np.full((p, p * p * block), np.nan)
        for i in range(p):
            row = slice(i * p * block, (i + 1) * p * block)
            start[i, row] = rng.integers(-1000, 1000, size=p * block)
        end = run(sched, start)
        for i in range(p):
            for j in range(p):
                c = slice((i * p + j) * block, (i * p + j + 1) * block)
                np.testing.assert_array_equal(end[j, c], start[i, c])
        return
    nelem = 2 * sched.nchunks + 1  # uneven parts, like a real tensor
    data = random_buffers(rng, p, nelem)
    parts = np.array_split(np.arange(nelem), sched.nchunks)
    start = data.copy()
    if op == "all_gather":
        start[:] = np.nan
        for i in range(p):
            start[i, parts[i]] = data[i, parts[i]]
    elif op == "broadcast":
        start[:] = np.nan
        start[sched.root] = data[sched.root]
    end = run(sched, start)
    total = data.sum(axis=0)
    if op == "all_reduce":
        np.testing.assert_array_equal(end, np.broadcast_to(total, end.shape))
    elif op == "reduce_scatter":
        assert sched.nchunks == p
        for i in range(p):
            np.testing.assert_array_equal(end[i, parts[i]], total[parts[i]])
    elif op == "all_gather":
        expected = np.concatenate([data[i, parts[i]] for i in range(p)])
        np.testing.assert_array_equal(end, np.broadcast_to(expected, end.shape))
    elif op == "broadcast":
        np.testing.assert_array_equal(end, np.broadcast_to(data[sched.root], end.shape))
    elif op == "reduce":
        np.testing.assert_array_equal(end[sched.root], total)
    else:  # pragma: no cover
        raise AssertionError(op)


def roots(p: int) -> list[int]:
    return sorted({0, p // 2, p - 1})


# 1. correctness ------------------------------------------------------------


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize(("op", "algorithm"), FLAT)
def test_schedule_computes_the_collective(op, algorithm, p):
    rng = np.random.default_rng(p)
    for root in roots(p) if op in ("broadcast", "reduce") else [0]:
        for chunks in (None, 1, 3) if algorithm in ("tree", "ring") else (None,):
            sched = schedule(op, algorithm, p, 1000.0, root=root, pipeline_chunks=chunks)
            check_result(sched, rng)


@pytest.mark.parametrize("node_of", NODE_SHAPES, ids=str)
def test_hierarchical_all_reduce_computes_the_sum(node_of):
    sched = schedule("all_reduce", "hierarchical", len(node_of), 4096.0, node_of=node_of)
    check_result(sched, np.random.default_rng(len(node_of)))


def test_p1_has_no_steps():
    for op, algorithm in FLAT:
        sched = schedule(op, algorithm, 1, 100.0)
        assert sched.num_steps() == 0 and list(sched.steps()) == []
        assert sched.phases() == () and sched.bytes_sent().tolist() == [0.0]
    assert schedule("all_reduce", "hierarchical", 1, 8.0, node_of=[3]).num_steps() == 0


# 2. phases and bytes_sent agree with steps ---------------------------------


def step_messages(sched: Schedule) -> list[Counter]:
    """Chunks per (src, dst) of every step, from the expanded transfers."""
    return [Counter((t.src, t.dst) for t in step.transfers) for step in sched.steps()]


def check_views(sched: Schedule) -> None:
    messages = step_messages(sched)
    assert sched.num_steps() == len(messages)
    sent = np.zeros(sched.p)
    for step in sched.steps():
        for t in step.transfers:
            sent[t.src] += t.nbytes
    np.testing.assert_allclose(sched.bytes_sent(), sent, rtol=1e-12, atol=1e-9)
    phases = sched.phases()
    if phases is None:
        assert any(len(set(m.values())) > 1 for m in messages), "phases None without cause"
        return
    expanded = [ph for ph in phases for _ in range(ph.repeat)]
    assert len(expanded) == len(messages)
    for ph, msgs in zip(expanded, messages, strict=True):
        assert ph.pairs == tuple(sorted(msgs))
        assert ph.nbytes == pytest.approx(next(iter(msgs.values())) * sched.chunk_bytes)
        assert len(set(msgs.values())) == 1
    for a, b in zip(phases, phases[1:], strict=False):
        assert (a.pairs, a.nbytes) != (b.pairs, b.nbytes), "adjacent phases left unmerged"


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize(("op", "algorithm"), FLAT)
def test_phases_and_bytes_sent_match_steps(op, algorithm, p):
    for chunks in (None, 2, 5) if algorithm in ("tree", "ring") else (None,):
        check_views(schedule(op, algorithm, p, 12345.0, root=p - 1, pipeline_chunks=chunks))


@pytest.mark.parametrize("node_of", NODE_SHAPES, ids=str)
def test_hierarchical_phases_match_steps(node_of):
    check_views(schedule("all_reduce", "hierarchical", len(node_of), 999.0, node_of=node_of))


def test_phases_uniform_where_expected():
    for p in PS:
        for op, alg in FLAT:
            if alg == "tree" and op == "all_reduce":
                continue
            if alg == "halving_doubling" and op != "all_reduce" and p & (p - 1):
                assert schedule(op, alg, p, 1.0).phases() is None  # folded ranks carry 2 chunks
                continue
            assert schedule(op, alg, p, 1.0).phases() is not None, (op, alg, p)


# 3. closed forms --------------------------------------------------------------


@pytest.mark.parametrize("p", [2, 3, 5, 8, 13, 16, 33])
def test_ring_all_reduce_volume(p):
    n = 1e6
    sched = schedule("all_reduce", "ring", p, n)
    assert sched.num_steps() == 2 * (p - 1)
    np.testing.assert_allclose(sched.bytes_sent(), 2 * (p - 1) / p * n)
    ring = tuple(sorted((i, (i + 1) % p) for i in range(p)))
    assert sched.phases() == (Phase(ring, n / p, 2 * (p - 1)),)


@pytest.mark.parametrize("p", [2, 4, 8, 16, 64])
def test_halving_doubling_volume_power_of_two(p):
    n = 3e6
    sched = schedule("all_reduce", "halving_doubling", p, n)
    assert sched.num_steps() == 2 * int(math.log2(p))
    np.testing.assert_allclose(sched.bytes_sent(), 2 * (p - 1) / p * n)
    sizes = [ph.nbytes for ph in sched.phases() for _ in range(ph.repeat)]
    k = int(math.log2(p))
    assert sizes == pytest.approx(
        [n / 2 ** (i + 1) for i in range(k)] + [n / 2 ** (k - i) for i in range(k)]
    )
    for op in ("reduce_scatter", "all_gather"):
        half = schedule(op, "halving_doubling", p, n)
        assert half.num_steps() == k
        np.testing.assert_allclose(half.bytes_sent(), (p - 1) / p * n)


@pytest.mark.parametrize("p", [3, 5, 6, 7, 12])
def test_halving_doubling_fold_costs_two_steps(p):
    pof2 = 1 << (p.bit_length() - 1)
    sched = schedule("all_reduce", "halving_doubling", p, 1.0)
    assert sched.num_steps() == 2 * int(math.log2(pof2)) + 2
    assert sched.nchunks == pof2


@pytest.mark.parametrize("p", [2, 3, 7, 16])
def test_all_gather_and_reduce_scatter_ring_volume(p):
    for op in ("all_gather", "reduce_scatter"):
        sched = schedule(op, "ring", p, 7e5)
        assert sched.num_steps() == p - 1
        np.testing.assert_allclose(sched.bytes_sent(), (p - 1) / p * 7e5)


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5, 8, 9, 17, 100])
def test_binomial_broadcast_and_reduce_rounds(p):
    for op in ("broadcast", "reduce"):
        sched = schedule(op, "tree", p, 10.0, root=p // 3)
        assert sched.num_steps() == math.ceil(math.log2(p))
        assert sched.bytes_sent().sum() == (p - 1) * 10.0  # every non-root receives/sends once


@pytest.mark.parametrize("p", [2, 3, 6, 10])
@pytest.mark.parametrize("k", [1, 4])
def test_chain_pipeline(p, k):
    sched = schedule("broadcast", "ring", p, 8.0, root=1, pipeline_chunks=k)
    assert sched.num_steps() == k + p - 2
    assert sched.bytes_sent()[1] == 8.0 and sched.bytes_sent()[0] == 0.0  # chain ends before root


@pytest.mark.parametrize("p", [2, 3, 4, 7, 8, 13, 16, 31, 64])
def test_double_binary_tree_shape(p):
    a, b = double_tree_parents(p)
    for parent in (a, b):
        assert sum(u < 0 for u in parent) == 1
        assert all(parent.count(u) <= 2 for u in set(parent) if u >= 0)  # binary
    interior_a = {u for u in a if u >= 0}
    interior_b = {u for u in b if u >= 0}
    # Even p (mirror): interior in at most one tree. Odd p (shift): rank 0, tree A's
    # single-child root, is also interior in tree B, as in NCCL.
    assert interior_a & interior_b == (set() if p % 2 == 0 else {0})
    k = 3
    sched = schedule("all_reduce", "tree", p, 6e5, pipeline_chunks=k)
    height = max(_depth(a, r) for r in range(p))
    assert sched.num_steps() == k + 2 * height - 1
    assert sched.nchunks == 2 * k
    assert sched.bytes_sent().sum() == pytest.approx(2 * (p - 1) * 6e5)


def _depth(parent, r):
    d = 0
    while parent[r] >= 0:
        r, d = parent[r], d + 1
    return d


def test_tree_default_pipeline_is_512_kib_chunks():
    assert schedule("all_reduce", "tree", 8, 1.0).nchunks == 2
    assert schedule("all_reduce", "tree", 8, 64 * 2**20).nchunks == 128
    assert schedule("broadcast", "ring", 8, 64 * 2**20).nchunks == 128


@pytest.mark.parametrize(("nodes", "local"), [(2, 4), (4, 2), (3, 3), (1, 5), (5, 1)])
def test_hierarchical_volume(nodes, local):
    n, p = 1e6, nodes * local
    sched = schedule("all_reduce", "hierarchical", p, n, node_of=[i // local for i in range(p)])
    assert sched.num_steps() == 2 * (local - 1) + 2 * (nodes - 1)
    expected = 2 * (local - 1) / local * n + 2 * (nodes - 1) / nodes * n / local
    np.testing.assert_allclose(sched.bytes_sent(), expected)


@pytest.mark.parametrize("p", [2, 5, 8])
def test_direct_volumes(p):
    n = 4e4
    ar = schedule("all_reduce", "direct", p, n)
    assert ar.num_steps() == 2
    np.testing.assert_allclose(ar.bytes_sent(), 2 * (p - 1) / p * n)
    a2a = schedule("all_to_all", "direct", p, n)
    assert a2a.num_steps() == p - 1 and a2a.nchunks == p * p and a2a.chunk_bytes == n / p
    np.testing.assert_allclose(a2a.bytes_sent(), (p - 1) / p * n)
    assert all(len(ph.pairs) == p for ph in a2a.phases())  # one flow per rank a step


# 4. laziness ----------------------------------------------------------------------


def _forbid(*_args, **_kwargs):
    raise AssertionError("expanded the steps")


def test_large_ring_views_do_not_expand(monkeypatch):
    monkeypatch.setattr(Segment, "steps", _forbid)
    monkeypatch.setattr(Rings, "step_messages", _forbid)
    p, n = 1024, 2.0**30
    sched = schedule("all_reduce", "ring", p, n)
    assert sched.num_steps() == 2046
    (phase,) = sched.phases()
    assert phase.repeat == 2046 and len(phase.pairs) == p and phase.nbytes == n / p
    np.testing.assert_allclose(sched.bytes_sent(), 2 * (p - 1) / p * n)
    node_of = [i // 8 for i in range(p)]
    hier = schedule("all_reduce", "hierarchical", p, n, node_of=node_of)
    assert len(hier.phases()) == 3 and hier.num_steps() == 2 * 7 + 2 * 127


def test_large_schedules_never_build_transfers_for_views(monkeypatch):
    monkeypatch.setattr(Segment, "steps", _forbid)
    for op, alg in [
        ("all_reduce", "halving_doubling"),
        ("all_reduce", "tree"),
        ("reduce_scatter", "halving_doubling"),
        ("broadcast", "ring"),
        ("broadcast", "tree"),
        ("reduce", "tree"),
    ]:
        sched = schedule(op, alg, 1024, 2.0**28)
        sched.num_steps()
        sched.phases()
        assert sched.bytes_sent().shape == (1024,)
    steps = schedule("all_reduce", "ring", 1024, 1.0).steps()
    with pytest.raises(AssertionError):
        next(steps)  # steps() is a generator: expanding starts only when iterated


# 5. bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "words"),
    [
        (("scan", "ring", 4, 1.0), {}, ["op", "'scan'", "all_reduce"]),
        (("all_reduce", "foo", 4, 1.0), {}, ["algorithm", "'foo'", "'ring'", "all_reduce"]),
        (("all_to_all", "ring", 4, 1.0), {}, ["algorithm", "'ring'", "('direct',)"]),
        (("all_reduce", "ring", 0, 1.0), {}, ["p", "0"]),
        (("all_reduce", "ring", 2.5, 1.0), {}, ["p", "2.5"]),
        (("all_reduce", "ring", 4, -1.0), {}, ["nbytes", "-1.0"]),
        (("all_reduce", "ring", 4, float("nan")), {}, ["nbytes", "nan"]),
        (("broadcast", "tree", 4, 1.0), {"root": 4}, ["root", "4", "0..3"]),
        (("reduce", "ring", 4, 1.0), {"root": -1}, ["root", "-1"]),
        (("all_reduce", "hierarchical", 4, 1.0), {}, ["node_of", "hierarchical"]),
        (
            ("all_reduce", "hierarchical", 4, 1.0),
            {"node_of": [0, 0, 1]},
            ["node_of", "length 3", "p=4"],
        ),
        (("all_reduce", "ring", 4, 1.0), {"node_of": [0]}, ["node_of", "length 1"]),
        (
            ("all_reduce", "hierarchical", 4, 1.0),
            {"node_of": [0, 0, 0, 1]},
            ["node_of", "{0: 3, 1: 1}"],
        ),
        (("all_reduce", "tree", 4, 1.0), {"pipeline_chunks": 0}, ["pipeline_chunks", "0"]),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, words):
    with pytest.raises(ValueError) as info:
        schedule(*args, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_root_ignored_for_unrooted_ops():
    assert schedule("all_reduce", "ring", 4, 1.0, root=99).root is None
    assert schedule("broadcast", "ring", 4, 1.0, root=3).root == 3


# hypothesis -----------------------------------------------------------------------

algorithms = st.sampled_from(FLAT)


# The full suite draws 150 schedules; the fast one (make test-fast) 40, which still
# covers every algorithm and op several times.
@settings(max_examples=40 if os.environ.get("CLUSTERSIM_FAST") else 150, deadline=None)
@given(
    algorithms,
    st.integers(1, 24),
    st.floats(0, 1e10, allow_nan=False),
    st.data(),
)
def test_random_schedules_are_correct_and_consistent(op_alg, p, nbytes, data):
    op, algorithm = op_alg
    root = data.draw(st.integers(0, p - 1))
    chunks = data.draw(st.one_of(st.none(), st.integers(1, 6)))
    sched = schedule(op, algorithm, p, nbytes, root=root, pipeline_chunks=chunks)
    check_result(sched, np.random.default_rng(p))
    check_views(sched)
    # bytes_sent accounts for every transfer, whatever the size of n.
    assert sched.bytes_sent().sum() == pytest.approx(
        sum(t.nbytes for s in sched.steps() for t in s.transfers), rel=1e-9, abs=1e-6
    )


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.randoms(use_true_random=False), st.data())
def test_random_hierarchies(nodes, local, rnd, data):
    ids = data.draw(st.lists(st.integers(-5, 50), min_size=nodes, max_size=nodes, unique=True))
    node_of = [ids[i // local] for i in range(nodes * local)]
    rnd.shuffle(node_of)
    sched = schedule("all_reduce", "hierarchical", len(node_of), 1e5, node_of=node_of)
    check_result(sched, np.random.default_rng(0))
    check_views(sched)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 300), st.floats(1, 1e12))
def test_bandwidth_optimal_algorithms_send_the_ring_volume(p, n):
    for alg in ("ring", "direct"):
        np.testing.assert_allclose(
            schedule("all_reduce", alg, p, n).bytes_sent(), 2 * (p - 1) / p * n
        )
    if p & (p - 1) == 0:
        hd = schedule("all_reduce", "halving_doubling", p, n).bytes_sent()
        np.testing.assert_allclose(hd, 2 * (p - 1) / p * n)
