"""The SimPy executor on hand-written role programs: exact timed traces."""

import math
from dataclasses import dataclass

import pytest

from simulator.cluster import Cluster
from simulator.executor import simulate
from simulator.experiment import Experiment
from simulator.hardware import LinkSpec
from simulator.workload import Layer, Workload
from strategies.ops import TensorRef

A, B = 2e-6, 1e9
WORKLOAD = Workload(name="one", layers=(Layer(name="l", kind="Linear", params=10, fwd_flops=0, bwd_flops=0,
                                              input_elems=0, output_elems=0),))


@dataclass(frozen=True)
class Custom:
    """A user's own strategy: one program for every rank."""

    program: object

    def programs(self, job):
        return [self.program] * job.world_size

    def to_dict(self):
        return {"name": "custom"}


def run(program, nodes=4, **kw):
    cluster = Cluster.homogeneous(nodes=nodes, gpus_per_node=1, inter=LinkSpec(name="n", bandwidth=B, latency=A))
    return simulate(Experiment(workload=WORKLOAD, cluster=cluster, strategy=Custom(program), iterations=1, **kw))


def test_disjoint_subgroups_run_concurrently():
    n = 1e6

    def program(ctx):
        for _ in ctx.iterations():
            group = (0, 1) if ctx.rank < 2 else (2, 3)
            yield ctx.all_reduce(TensorRef("g", n), algorithm="ring", group=group)

    r = run(program)
    # each pair: 2 steps of n/2 on its own links; the pairs do not share a link
    assert math.isclose(r.stats["makespan"], 2 * (A + n / 2 / B), rel_tol=1e-12)


def test_send_recv_and_recv_any_trace():
    n = 4e6
    log = []

    def program(ctx):
        for _ in ctx.iterations():
            if ctx.rank in (1, 2):
                yield ctx.send(0, TensorRef("x", n * ctx.rank), tag=7)
            elif ctx.rank == 0:
                first = yield ctx.recv_any(TensorRef("x", 0), tag=7)
                second = yield ctx.recv_any(TensorRef("x", 0), tag=7)
                log.append((first.src, second.src))

    r = run(program)
    # both senders share rank 0's down link (B/2 each) until rank 1's n bytes are done at 2n/B,
    # then rank 2's remaining n bytes go at B: done at 3n/B (+ latency)
    assert log == [(1, 2)]
    assert math.isclose(r.stats["makespan"], 3 * n / B + A, rel_tol=1e-12)
    assert list(r.ranks["bytes_sent"]) == [0, n, 2 * n, 0]


def test_deadlock_is_reported():
    def program(ctx):
        for _ in ctx.iterations():
            if ctx.rank == 0:
                yield ctx.recv(1, TensorRef("x", 1))

    with pytest.raises(RuntimeError, match="deadlocked.*rank 0"):
        run(program)


def test_mismatched_collectives_are_reported():
    def program(ctx):
        for _ in ctx.iterations():
            yield ctx.all_reduce(TensorRef("g", 100 + ctx.rank), algorithm="ring")

    with pytest.raises(RuntimeError, match="collective mismatch"):
        run(program)


def test_not_an_op_is_reported():
    def program(ctx):
        for _ in ctx.iterations():
            yield "forward please"

    with pytest.raises(RuntimeError, match="not an op"):
        run(program)


def test_strategy_without_programs_is_refused():
    cluster = Cluster.homogeneous(nodes=2)
    with pytest.raises(ValueError, match="Experiment.strategy"):
        Experiment(workload=WORKLOAD, cluster=cluster, strategy=object())


def test_fast_path_contention_is_counted_and_warned():
    """Two rings share each node's NIC (latency 1 ms): there the bundle is only approximate."""
    cluster = Cluster.homogeneous(nodes=4, gpus_per_node=2, inter=LinkSpec(name="n", bandwidth=B, latency=1e-3))

    def program(ctx):
        for _ in ctx.iterations():
            group = tuple(r for r in range(8) if r % 2 == ctx.rank % 2)
            yield ctx.all_reduce(TensorRef("g", 1e6 * (1 + 2 * (ctx.rank % 2))), algorithm="ring", group=group)

    exp = Experiment(workload=WORKLOAD, cluster=cluster, strategy=Custom(program), iterations=1)
    with pytest.warns(RuntimeWarning, match="stepped"):
        fast = simulate(exp)
    assert fast.stats["bundles_contended"] > 0
    stepped = simulate(exp.replace(collective_model="stepped"))
    assert stepped.stats["bundles_contended"] == 0
