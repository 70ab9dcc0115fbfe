"""Measure the links realrun's ranks talk over: how fast a message crosses the emulated
cluster's shaped links (or any launcher's), against the bandwidth configured.

``python -m realrun.linkbench --bandwidth 200Mbps --size 20MB`` sets up a
two-node emulated cluster (needs root), sends ``size`` bytes from node 0 to
node 1 ``repeats`` times (each answered by an empty acknowledgement) and
prints the bandwidth measured, its ratio to the configured one, and a ring
all-reduce over three nodes against the ring formula ``2(p-1)/p · n / B``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from typing import ClassVar

from strategies.context import Job, RankContext
from strategies.ops import TensorRef


@dataclass(frozen=True, kw_only=True)
class LinkProbe:
    """A strategy that only moves bytes, once per iteration: ``send`` (``nbytes`` from rank 0
    to 1, acknowledged), a ring ``all_reduce`` of ``nbytes`` over every rank, or ``queue``:
    rank 0 sends ``nbytes`` to rank 1 and, as soon as that send is handed to the transport,
    an empty message to rank 2 over the same outgoing link, which rank 2 answers at once
    with another (over links that idle; rank 0 has posted its receive for the answer
    before the bulk message, so no ready notification waits behind it). The round trip
    beyond two latencies is the time the first waits behind the bulk message's bytes
    already queued on the link (:attr:`simulator.LinkSpec.flow_window`), timed on rank 0's
    clock alone: from the start of the span ``send:queue-token->2`` to that of
    ``send:queue-mark->2``, an empty message rank 0 sends as soon as the answer is in. ``burst``:
    rank 2 sends ``filler`` bytes to rank 0, whose outgoing link idles meanwhile, then rank 0
    sends ``nbytes`` to rank 1: on a link shaped by a token bucket
    (:attr:`simulator.LinkSpec.burst`) the message starts on a bucket refilled for the
    filler's time; its send is the span ``send:probe->1`` on rank 0 and, as soon as it has
    arrived, rank 1 sends an empty acknowledgement back, which ends rank 0's iteration."""

    name: ClassVar[str] = "link_probe"
    nbytes: float
    pattern: str = "send"
    sizes: tuple = ()
    """Sizes in bytes to cycle through, one per iteration (iteration ``i`` moves
    ``sizes[i % len(sizes)]``); empty: ``nbytes`` every iteration."""
    filler: float = 4 << 20
    """Bytes rank 2 sends to rank 0 before each message of the ``burst`` pattern: the idle
    spell of rank 0's outgoing link is their time on the wire (a bucket larger than this
    is not seen whole)."""

    def __post_init__(self) -> None:
        if self.pattern not in ("send", "all_reduce", "queue", "burst"):
            raise ValueError(f"LinkProbe.pattern must be 'send', 'all_reduce', 'queue' or 'burst', "
                             f"got {self.pattern!r}")
        if not self.filler > 0:
            raise ValueError(f"LinkProbe.filler must be > 0 bytes, got {self.filler!r}")
        if not self.nbytes > 0:
            raise ValueError(f"LinkProbe.nbytes must be > 0, got {self.nbytes!r}")
        object.__setattr__(self, "sizes", tuple(self.sizes))
        if any(not (isinstance(s, int | float) and s > 0) for s in self.sizes):
            raise ValueError(f"LinkProbe.sizes must be numbers > 0, got {self.sizes!r}")

    def programs(self, job: Job) -> list:
        sizes = self.sizes or (self.nbytes,)
        datas = [TensorRef("probe", float(s), "custom") for s in sizes]
        ack = TensorRef("ack", 0, "custom")

        def sender(ctx: RankContext):
            for i in ctx.iterations():
                yield ctx.send(1, datas[i % len(datas)], tag=1)
                yield ctx.recv(1, ack, tag=2)

        def receiver(ctx: RankContext):
            for i in ctx.iterations():
                yield ctx.recv(0, datas[i % len(datas)], tag=1)
                yield ctx.send(0, ack, tag=2)

        def idle(ctx: RankContext):
            for _ in ctx.iterations():
                pass
            return
            yield

        def reducer(ctx: RankContext):
            for i in ctx.iterations():
                yield ctx.all_reduce(datas[i % len(datas)], algorithm="ring")

        token = TensorRef("queue-token", 0, "custom")
        mark = TensorRef("queue-mark", 0, "custom")

        def queuer(ctx: RankContext):
            for i in ctx.iterations():
                yield ctx.recv(1, ack, tag=2)  # both receivers are waiting
                yield ctx.recv(2, ack, tag=2)
                answer = yield ctx.recv(2, ack, tag=6, async_op=True)  # posted before the bulk bytes
                bulk = yield ctx.send(1, datas[i % len(datas)], tag=1, async_op=True)
                yield ctx.wait(bulk)
                yield ctx.send(2, token, tag=3)
                yield ctx.wait(answer)
                yield ctx.send(2, mark, tag=7)  # its span starts as the answer is in
                yield ctx.recv(1, ack, tag=4)  # the bulk message is in

        def bulk_receiver(ctx: RankContext):
            for i in ctx.iterations():
                yield ctx.send(0, ack, tag=2)
                yield ctx.recv(0, datas[i % len(datas)], tag=1)
                yield ctx.send(0, ack, tag=4)

        def token_receiver(ctx: RankContext):
            for _ in ctx.iterations():
                yield ctx.send(0, ack, tag=2)
                yield ctx.recv(0, token, tag=3)
                yield ctx.send(0, ack, tag=6)
                yield ctx.recv(0, mark, tag=7)

        filler = TensorRef("filler", float(self.filler), "custom")

        def burster(ctx: RankContext):  # rank 1 runs bulk_receiver
            for i in ctx.iterations():
                yield ctx.recv(1, ack, tag=2)  # the receiver is waiting
                yield ctx.recv(2, filler, tag=5)  # meanwhile the outgoing link idles
                yield ctx.send(1, datas[i % len(datas)], tag=1)
                yield ctx.recv(1, ack, tag=4)  # it has arrived

        def filler_sender(ctx: RankContext):
            for _ in ctx.iterations():
                yield ctx.send(0, filler, tag=5)

        if self.pattern == "all_reduce":
            return [reducer] * job.world_size
        if self.pattern == "burst":
            if job.world_size < 3:
                raise ValueError(f"LinkProbe(pattern='burst') needs 3 ranks, got {job.world_size}")
            return [burster, bulk_receiver, filler_sender] + [idle] * (job.world_size - 3)
        if self.pattern == "queue":
            if job.world_size < 3:
                raise ValueError(f"LinkProbe(pattern='queue') needs 3 ranks, got {job.world_size}")
            return [queuer, bulk_receiver, token_receiver] + [idle] * (job.world_size - 3)
        return [sender, receiver] + [idle] * (job.world_size - 2)

    def to_dict(self) -> dict:
        return {"name": self.name, "nbytes": self.nbytes, "pattern": self.pattern, "sizes": list(self.sizes),
                "filler": self.filler}


def probe(bandwidth, nbytes: float, *, pattern: str = "send", nodes: int | None = None, repeats: int = 5,
          launcher=None) -> dict:
    """Measured against expected time of one ``pattern`` of ``nbytes`` at ``bandwidth`` (bytes/s or
    a string); the first iteration (connection set-up) is left out of the median."""
    from realrun.launch import EmulatedCluster
    from realrun.run import run
    from simulator import Cluster, Experiment, Workload
    from simulator.units import parse_bandwidth

    rate = parse_bandwidth(bandwidth, field="bandwidth")
    nodes = nodes or (2 if pattern == "send" else 3)
    workload = Workload.from_zoo("mlp", in_features=4, hidden=[4], out_features=2)
    cluster = Cluster.homogeneous(nodes=nodes, gpus_per_node=1, inter_bandwidth=rate)
    exp = Experiment(workload=workload, cluster=cluster, strategy=LinkProbe(nbytes=nbytes, pattern=pattern),
                     iterations=repeats + 1, batch_size=1, name=f"linkbench-{pattern}")
    result = run(exp, launcher=launcher or EmulatedCluster(), threads=1)
    it = result.iterations
    times = it[(it["rank"] == 0) & (it["iteration"] > 0)]["duration"].tolist()
    measured = statistics.median(times)
    p = nodes
    expected = nbytes / rate if pattern == "send" else 2 * (p - 1) / p * nbytes / rate
    return {"pattern": pattern, "nodes": nodes, "bytes": nbytes, "configured_Bps": rate,
            "measured_s": measured, "expected_s": expected, "ratio": expected / measured,
            "measured_Bps": nbytes / measured if pattern == "send" else 2 * (p - 1) / p * nbytes / measured}


def main(argv=None) -> int:
    from simulator.units import fmt_bandwidth, parse_bytes

    parser = argparse.ArgumentParser(prog="python -m realrun.linkbench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bandwidth", default="200Mbps")
    parser.add_argument("--size", default="20MB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    nbytes = parse_bytes(args.size, field="--size")
    # By its import name: the ranks unpickle the probe from there, not from __main__.
    from realrun import linkbench

    for pattern in ("send", "all_reduce"):
        r = linkbench.probe(args.bandwidth, nbytes, pattern=pattern, repeats=args.repeats)
        print(f"{pattern:>10} over {r['nodes']} nodes: {r['measured_s']:.3f} s measured, {r['expected_s']:.3f} s "
              f"expected at {fmt_bandwidth(r['configured_Bps'], 'bps')} -> measured "
              f"{fmt_bandwidth(r['measured_Bps'], 'bps')} ({100 * (1 / r['ratio'] - 1):+.1f} % time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
