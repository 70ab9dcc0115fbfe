"""Rendezvous for messages above Experiment.eager_limit: two workers send S bytes each to
one receiver that takes them one at a time (``recv_any``). Eager, the two flows share the
receiver's link and both arrive at L + 2S/B; in rendezvous (eager_limit=0) the first flows
alone once its envelope is taken and the receiver's ready notification is back (3L + S/B:
envelope, notification, data) and the second after it (5L + 2S/B: its envelope is already
there when the receiver takes it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
from builders import small_workload

from simulator import Cluster, Experiment, simulate
from strategies.ops import TensorRef

S = 4e6
B = 1e9 / 8  # 1 Gb/s
L = 1e-3


@dataclass(frozen=True)
class TwoToOne:
    name: ClassVar[str] = "two_to_one"

    def programs(self, job):
        data = TensorRef("data", S, "custom")

        def sender(ctx):
            for _ in ctx.iterations():
                yield ctx.send(2, data, tag=1)

        def receiver(ctx):
            for _ in ctx.iterations():
                yield ctx.recv_any(data, tag=1)
                yield ctx.recv_any(data, tag=1)

        return [sender, sender, receiver]

    def to_dict(self):
        return {"name": self.name}


def _timeline(strategy, nodes, eager_limit):
    exp = Experiment(workload=small_workload(),
                     cluster=Cluster.homogeneous(nodes=nodes, gpus_per_node=1, inter="10GbE", inter_bandwidth=B,
                                                 inter_latency=L),
                     strategy=strategy, batch_size=1, iterations=1, eager_limit=eager_limit)
    return simulate(exp).timeline


def _arrivals(eager_limit):
    tl = _timeline(TwoToOne(), 3, eager_limit)
    return sorted(tl.loc[tl["name"].str.startswith("send:"), "end"])


def test_eager_messages_share_the_link():
    assert _arrivals(None) == pytest.approx([L + 2 * S / B] * 2)


def test_rendezvous_messages_flow_one_after_another():
    assert _arrivals(0) == pytest.approx([3 * L + S / B, 5 * L + 2 * S / B])


@dataclass(frozen=True)
class SendThenCompute:
    name: ClassVar[str] = "send_then_compute"

    def programs(self, job):
        data = TensorRef("data", S, "custom")

        def sender(ctx):
            for _ in ctx.iterations():
                yield ctx.send(1, data, tag=1)
                yield ctx.forward((0, job.num_layers))

        def receiver(ctx):
            for _ in ctx.iterations():
                yield ctx.recv(0, data, tag=1)

        return [sender, receiver]

    def to_dict(self):
        return {"name": self.name}


def test_a_rendezvous_send_is_done_once_handed_over():
    """Eager, a blocking send returns when the message has arrived (L + S/B); by rendezvous,
    once the receiver's ready notification is back and the message is handed to the
    transport (2L), as a gloo send completes once written out."""
    def forward_start(eager_limit):
        tl = _timeline(SendThenCompute(), 2, eager_limit)
        return float(tl.loc[(tl["rank"] == 0) & tl["name"].str.startswith("forward"), "start"].min())

    assert forward_start(None) == pytest.approx(L + S / B)
    assert forward_start(0) == pytest.approx(2 * L)


def test_messages_under_the_limit_stay_eager():
    assert _arrivals(S) == pytest.approx([L + 2 * S / B] * 2)


def test_bad_eager_limit():
    with pytest.raises(ValueError, match="eager_limit"):
        Experiment(workload=small_workload(), cluster=Cluster.homogeneous(nodes=3, gpus_per_node=1),
                   strategy=TwoToOne(), eager_limit=-1)
