"""The simulator's executor: role programs run as SimPy processes.

Each rank's program is driven by one process. Compute ops hold the rank's
compute stream (the program itself) for the compute model's time. Collectives
go onto the rank's communication stream of their group in issue order (as
PyTorch's NCCL process groups keep one stream per group and device, so the
collectives of different groups, tensor- and data-parallel say, overlap): a
collective starts once every member has reached it on its own stream, then
its step schedule runs on the flow-level network; ``async_op`` returns a
handle at once and ``Wait`` blocks on it. Point-to-point sends are flows that
deliver a message to the receiver's mailbox; ``Recv`` matches source and tag,
``RecvAny`` takes the first message with the tag. ``Apply`` charges a
shard update on the owner's device, counts the shard's version and records
the staleness of every gradient in it.

Everything a run needs lives in one :class:`_Simulation`: its own
environment, random generator, network and records. Nothing is global.
"""

from __future__ import annotations

import dataclasses
import gc
import time
import warnings
from collections import defaultdict, deque

import simpy

from simulator.collectives import CollectiveRunner
from simulator.compute import ComputeTimer, RankGenerators, SharedCores
from simulator.memory import check_memory, memory_table
from simulator.network import Network
from simulator.records import SpanLog
from simulator.results import RunResult, build_result
from simulator.symmetry import Asymmetric, Symmetry, candidates, link_kinds, stand_in
from strategies.context import RankContext
from strategies.ops import (
    Apply,
    Backward,
    Collective,
    Decode,
    Encode,
    Forward,
    Message,
    OptimizerStep,
    Recv,
    RecvAny,
    Send,
    Wait,
    counted_samples,
)

_COMPUTE_KIND = {Forward: "forward", Backward: "backward", OptimizerStep: "optimizer_step"}


class Handle:
    """What an async op returns to its program; ``Wait(handle)`` blocks on it."""

    __slots__ = ("event", "op")

    def __init__(self, event: simpy.Event, op):
        self.event = event
        self.op = op

    def is_completed(self) -> bool:
        return self.event.triggered


class _Instance:
    """One collective call, matched across the simulated members of its group."""

    __slots__ = ("op", "group", "gid", "seq", "arrived", "members", "events", "start", "view")

    def __init__(self, op: Collective, group: tuple[int, ...], gid: int, seq: int, env: simpy.Environment,
                 view=None):
        self.op = op
        self.group = group
        self.gid = gid
        self.seq = seq
        self.arrived = 0
        self.view = view
        self.members = range(len(group)) if view is None else view[0]
        """Local indices of the members simulated: every member, or the representatives."""
        self.events = {i: env.event() for i in self.members}
        self.start = None


class _Simulation:
    def __init__(self, experiment, symmetry: Symmetry | None = None, reason: str = ""):
        self.exp = experiment
        self.symmetry = symmetry
        self.fidelity_reason = reason
        self.env = env = simpy.Environment()
        # Independent streams per rank, all from the experiment's seed.
        cluster = experiment.run_cluster
        self.rngs = RankGenerators(experiment.seed, cluster.world_size)
        self.cluster = cluster
        self.world = world = cluster.world_size
        self.network = Network.for_links(env, cluster.links)
        self.collectives = CollectiveRunner(env, self.network, cluster, model=experiment.collective_model,
                                            symmetry=symmetry)
        self.devices = [cluster.device_of(r) for r in range(world)]
        self.timer = ComputeTimer(
            experiment.workload, self.devices, experiment.precision, experiment.optimizer,
            experiment.compute, self.rngs,
        )
        cores = experiment.compute.shared_cores
        self.cores = SharedCores(env, cores) if cores else None
        delays = experiment.compute.message_delay
        if delays:
            self.network.message_delay = lambda: delays[min(self.cores.busy if self.cores else 0, len(delays) - 1)]
        self._cost_scale = experiment.compute.cost_scale
        self.job = experiment.job()
        self.everyone = tuple(range(world))
        # records
        self.spans = SpanLog()  # (rank, stream, name, start, end, iteration)
        self.iteration_rows: list[tuple] = []
        self.update_rows: list[tuple] = []
        self._versions: dict[int, int] = {}  # shard -> updates applied
        self.bytes_sent = [0.0] * world
        self.ops_done = 0
        # per-rank state
        self._iteration = [-1] * world
        self._it_start = [0.0] * world
        self._compute_acc = [0.0] * world
        self._comm_acc = [0.0] * world
        self._samples_acc = [0] * world
        self._comm_tail: dict[tuple[int, int], simpy.Event] = {}  # (rank, group) -> its stream's last op
        self._coll_seq: dict[tuple[int, int], int] = {}
        self._group_ids: dict[tuple[int, ...], int] = {}
        self._group_by_object: dict[int, tuple[tuple[int, ...], int]] = {}
        self._group_index: dict[int, dict[int, int]] = {}
        self._instances: dict[tuple[int, int], _Instance] = {}
        self._sent_by_schedule: dict[int, tuple] = {}  # id(schedule) -> (schedule, bytes each member sends)
        self._mailbox: defaultdict[int, deque] = defaultdict(deque)  # made per rank that receives
        self._waiting: defaultdict[int, list] = defaultdict(list)
        self._blocked_on: list = [None] * world
        self._finished = [False] * world

    # driving programs
    def run(self) -> RunResult:
        wall = time.perf_counter()
        self.memory = memory_table(self.exp, None if self.symmetry is None else self.symmetry.rep)
        check_memory(self.memory, self.exp.out_of_memory, self.exp.name)
        programs = self.exp.strategy.programs(self.job)
        if len(programs) != self.world:
            raise RuntimeError(f"strategy made {len(programs)} programs for {self.world} ranks")
        simulated = range(self.world) if self.symmetry is None else self.symmetry.simulated
        for rank in simulated:
            ctx = RankContext(rank, self.job, on_iteration=self._iteration_hook(rank))
            self.env.process(self._drive(rank, programs[rank](ctx)))
        collecting = gc.isenabled()
        gc.disable()  # full collections would sweep a heap that grows with the run, over and over
        try:
            self.env.run()
        finally:
            if collecting:
                gc.enable()
        if not all(self._finished[r] for r in simulated):
            stuck = [(r, self._blocked_on[r]) for r in simulated if not self._finished[r]]
            detail = "; ".join(f"rank {r} waits on {op!r}" for r, op in stuck[:4])
            raise RuntimeError(f"simulation deadlocked: {len(stuck)} rank(s) never finished ({detail})")
        if self.network.bundles_contended:
            warnings.warn(
                f"{self.network.bundles_contended} collective(s) on the closed-form fast path shared links "
                "with other traffic, where that path is approximate; collective_model='stepped' is exact",
                RuntimeWarning, stacklevel=3,
            )
        stats = {
            "wall_seconds": time.perf_counter() - wall,
            "ops": self.ops_done,
            "flows": self.network.flows_started,
            "single_device_iteration_time": self._single_device_time(),
            "ideal_throughput": self._ideal_throughput(),
            "fidelity": "full" if self.symmetry is None else "representatives",
            "fidelity_reason": self.fidelity_reason,
            "simulated_ranks": len(simulated),
        }
        if self.symmetry is not None:
            stand_in(self, self.symmetry)
        return build_result(self, stats)

    def _single_device_time(self) -> float:
        """Rank 0's iteration time alone: forward, backward and step, no communication."""
        return self._alone_time(0)

    def _alone_time(self, rank: int, samples: int | None = None) -> float:
        n = len(self.exp.workload.layers)
        b = self.job.samples(rank) if samples is None else samples
        t = self.timer
        return float(sum(t.base_time(rank, k, (0, n), b) for k in ("forward", "backward", "optimizer_step")))

    def _ideal_throughput(self) -> float:
        """Samples/s if every GPU rank trained its shard alone at its device's speed, without communication."""
        times: dict[tuple[int, int], float] = {}
        total = 0.0
        for rank in range(self.job.accelerators):
            b = self.job.samples(rank)
            key = (id(self.devices[rank]), b)
            if key not in times:
                times[key] = self._alone_time(rank, b)
            total += b / times[key]
        return total

    def _iteration_hook(self, rank: int):
        def hook(kind: str, i: int) -> None:
            now = self.env.now
            if kind == "start":
                self._iteration[rank] = i
                self._it_start[rank] = now
                self._compute_acc[rank] = 0.0
                self._comm_acc[rank] = 0.0
                self._samples_acc[rank] = 0
            else:
                start = self._it_start[rank]
                compute = self._compute_acc[rank]
                self.iteration_rows.append(
                    (rank, i, start, now, now - start, compute, self._comm_acc[rank], now - start - compute,
                     self._samples_acc[rank])
                )

        return hook

    def _drive(self, rank: int, program):
        env = self.env
        timer = self.timer
        spans = self.spans
        value = None
        while True:
            try:
                op = program.send(value)
            except StopIteration:
                self._finished[rank] = True
                return
            except Exception as exc:
                raise RuntimeError(f"role program of rank {rank} failed: {exc!r}") from exc
            self._blocked_on[rank] = op
            self.ops_done += 1
            value = None
            kind = _COMPUTE_KIND.get(type(op))
            if kind is not None:
                it = self._iteration[rank]
                if kind == "optimizer_step":
                    dur = timer.time(rank, kind, op.layers, 0, op.fraction, now=env.now, iteration=it)
                    name = kind
                    cancel = ()
                else:
                    tp = 1 if op.tp_group is None else len(op.tp_group)
                    dur = timer.time(rank, kind, op.segment, op.samples, now=env.now, iteration=it, tp=tp,
                                     sequence_parallel=op.sequence_parallel)
                    name = f"{'recompute' if kind == 'forward' and op.recompute else kind}[{op.segment[0]}:{op.segment[1]}]"
                    cancel = op.cancel_on
                start = env.now
                if cancel:
                    events = [self._handle_event(rank, h) for h in cancel]
                    if any(e.triggered for e in events):
                        value = False  # abandoned before it began
                        continue
                    timeout = self._busy(dur)
                    yield env.any_of([timeout, *events])
                    value = (timeout.triggered if self.cores is not None
                             else timeout.processed or env.now >= start + dur)
                    if not value:
                        name += " (cancelled)"
                        if self.cores is not None:
                            self.cores.cancel(timeout)
                else:
                    yield self._busy(dur)
                    value = True
                spans.append(rank, "compute", name, start, env.now, it)
                self._compute_acc[rank] += env.now - start
                if value and kind == "forward":
                    self._samples_acc[rank] += counted_samples(op, rank)
            elif type(op) is Encode or type(op) is Decode:
                it = self._iteration[rank]
                start = env.now
                if not op.cost.zero:
                    kind = "encode" if type(op) is Encode else "decode"
                    base = timer.cost_time(rank, op.cost) * self._cost_scale.get(f"{op.compressor.name}.{kind}", 1.0)
                    yield self._busy(timer.scale(rank, base, now=start, iteration=it))
                    spans.append(rank, "compute", f"{kind}[{op.tensor.name}]", start, env.now, it)
                    self._compute_acc[rank] += env.now - start
            elif type(op) is Apply:
                value = yield from self._apply(rank, op)
            elif type(op) is Collective:
                handle = self._collective(rank, op)
                if op.async_op:
                    value = handle
                else:
                    yield handle.event
            elif type(op) is Wait:
                value = yield self._handle_event(rank, op.handle)
            elif type(op) is Send:
                handle = self._send(rank, op)
                if op.async_op:
                    value = handle
                else:
                    yield handle.event
            elif type(op) is Recv or type(op) is RecvAny:
                event = self._recv(rank, op)
                if getattr(op, "async_op", False):
                    value = Handle(event, op)
                else:
                    value = yield event
            else:
                raise RuntimeError(f"rank {rank} yielded {op!r}, which is not an op of strategies.ops")

    def _busy(self, seconds: float) -> simpy.Event:
        """The compute stream busy for ``seconds`` of its own time (longer on shared cores)."""
        if self.cores is None:
            return self.env.timeout(seconds)
        return self.cores.run(seconds)

    @staticmethod
    def _handle_event(rank: int, handle) -> simpy.Event:
        if not isinstance(handle, Handle):
            raise RuntimeError(f"rank {rank} waited on {handle!r}, which no async op returned")
        return handle.event

    # bookkeeping
    def _apply(self, rank: int, op: Apply):
        env = self.env
        tensor = op.tensor
        elements = tensor.num_elements
        if elements is None:
            elements = tensor.nbytes / 4
        layers = tensor.layers
        kernels = max(1, layers[1] - layers[0]) if layers else 1
        start = env.now
        if op.grads:
            base = self.timer.apply_time(rank, elements, len(op.grads), kernels)
            dur = self.timer.scale(rank, base, now=start)
            yield self._busy(dur)
            self.spans.append(rank, "compute", f"apply[shard {op.shard}]", start, env.now, self._iteration[rank])
        version = self._versions.get(op.shard, 0)
        now = env.now
        for applied, messages in ((True, op.grads), (False, op.dropped)):
            for m in messages:
                read = m.get("version")
                if read is None:
                    raise RuntimeError(
                        f"rank {rank} applied a gradient from rank {m.src} whose meta has no 'version' "
                        "(the shard version its sender read); staleness needs it"
                    )
                self.update_rows.append((
                    m.src, rank, op.shard, int(m.get("clock", -1)), int(m.get("samples", 0)), int(read),
                    version, version - int(read), float(m.get("read_time", float("nan"))), now, applied,
                ))
        if op.grads:
            version += 1
            self._versions[op.shard] = version
        return version

    # collectives
    def _group_id(self, group: tuple[int, ...] | None) -> int:
        """A small integer per distinct group: keys stay cheap (a tuple's hash is O(len))."""
        if group is None:
            return 0
        hit = self._group_by_object.get(id(group))
        if hit is not None and hit[0] is group:
            return hit[1]
        gid = self._group_ids.setdefault(group, len(self._group_ids) + 1)
        self._group_by_object[id(group)] = (group, gid)  # holds group, so its id stays unique
        return gid

    def _collective(self, rank: int, op: Collective) -> Handle:
        gid = self._group_id(op.group)
        group = self.everyone if op.group is None else op.group
        index = self._group_index.get(gid)
        if index is None:
            index = self._group_index[gid] = {r: i for i, r in enumerate(group)}
        local = index.get(rank)
        if local is None:
            raise RuntimeError(f"rank {rank} issued {op.op} on group {group[:16]} it is not in")
        key = (rank, gid)
        seq = self._coll_seq.get(key, 0)
        self._coll_seq[key] = seq + 1
        inst = self._instances.get((gid, seq))
        if inst is None:
            view = None if self.symmetry is None else self.symmetry.group_view(gid, group)
            inst = self._instances[(gid, seq)] = _Instance(op, group, gid, seq, self.env, view)
        elif (inst.op.op, inst.op.algorithm, inst.op.tensor.nbytes, inst.op.root) != (
            op.op, op.algorithm, op.tensor.nbytes, op.root
        ):
            raise RuntimeError(
                f"collective mismatch on group {group[:8]}: rank {rank} issued {op.op}/{op.algorithm} "
                f"of {op.tensor.nbytes} bytes, another member issued {inst.op.op}/{inst.op.algorithm} "
                f"of {inst.op.tensor.nbytes} bytes"
            )
        event = inst.events[local]
        prev = self._comm_tail.get(key)
        self._comm_tail[key] = event
        if prev is None or prev.processed:
            self._arrive(inst)
        else:
            prev.callbacks.append(lambda _e: self._arrive(inst))
        return Handle(event, op)

    def _arrive(self, inst: _Instance) -> None:
        inst.arrived += 1
        if inst.arrived < len(inst.members):
            return
        del self._instances[(inst.gid, inst.seq)]
        inst.start = self.env.now
        op = inst.op
        sched = self.collectives.start(
            op.op, op.algorithm, inst.group, op.tensor.nbytes, root=op.root,
            on_rank_done=lambda i: self._member_done(inst, i), view=inst.view,
        )
        hit = self._sent_by_schedule.get(id(sched))
        if hit is None or hit[0] is not sched:  # holds sched, so its id stays unique
            hit = self._sent_by_schedule[id(sched)] = (sched, sched.bytes_sent())
        sent = hit[1]
        for local in inst.members:
            self.bytes_sent[inst.group[local]] += float(sent[local])

    def _member_done(self, inst: _Instance, local: int) -> None:
        rank = inst.group[local]
        now = self.env.now
        op = inst.op
        self.spans.append(rank, "comm", f"{op.op}:{op.tensor.name}", inst.start, now, self._iteration[rank])
        self._comm_acc[rank] += now - inst.start
        inst.events[local].succeed()

    # point-to-point
    def _send(self, rank: int, op: Send) -> Handle:
        if not 0 <= op.dst < self.world or op.dst == rank:
            raise RuntimeError(f"rank {rank} sends to rank {op.dst}: not another rank in [0, {self.world})")
        start = self.env.now
        cluster = self.cluster
        route, latency = cluster.route(rank, op.dst), cluster.path_latency(rank, op.dst)
        nbytes = op.tensor.nbytes
        self.bytes_sent[rank] += nbytes
        limit = self.exp.eager_limit
        if limit is not None and nbytes > limit:
            return self._rendezvous(rank, op, route, latency, limit, start)
        dst, src = op.dst, rank
        sym = self.symmetry
        if sym is not None:  # the receiver's representative gets it from the sender's image
            route, dst, src = sym.path(route), int(sym.rep[dst]), sym.seen_from(rank, dst)
        done = self.network.transfer(route, nbytes, latency)

        def delivered(_e):
            now = self.env.now
            self._sent(rank, op, start, now)
            self._deliver(dst, Message(src, op.tensor, op.tag, op.meta, now))

        done.callbacks.append(delivered)
        return Handle(done, op)

    def _sent(self, rank: int, op: Send, start: float, now: float) -> None:
        self.spans.append(rank, "comm", f"send:{op.tensor.name}->{op.dst}", start, now, self._iteration[rank])
        self._comm_acc[rank] += now - start

    def _rendezvous(self, rank, op, route, latency, limit, start) -> Handle:
        """A message larger than the eager limit (gloo's TCP transport: every message): its
        first ``limit`` bytes flow now and its envelope (the send notification) reaches the
        receiver after the path latency, behind the bytes queued on the path. When a
        receive takes it, the receiver's ready notification travels back (latency and
        queue of the reverse path) and the rest flows. The sender is done once the rest is
        handed to the transport, as a gloo send completes once it is written out."""
        env = self.env
        eager = self.network.transfer(route, limit, latency) if limit > 0 else None
        handed = env.event()
        envelope = _Envelope(rank, op.tag, op, route, latency, eager, start, handed)
        delay = latency + self.network.backlog(route)
        env.timeout(delay).callbacks.append(lambda _e: self._deliver(op.dst, envelope))
        done = handed if eager is None else env.all_of([handed, eager])
        return Handle(done, op)

    def _matched(self, envelope: _Envelope, event: simpy.Event) -> None:
        """A receive took ``envelope``: once the ready notification is back at the sender the
        rest of the message flows; ``event`` (the receive) fires when its last byte has arrived."""
        op = envelope.op
        back = self.cluster.route(op.dst, envelope.src)
        notify = self.cluster.path_latency(op.dst, envelope.src) + self.network.backlog(back)
        self.env.timeout(notify).callbacks.append(lambda _e: self._flow_rest(envelope, event))

    def _flow_rest(self, envelope: _Envelope, event: simpy.Event) -> None:
        op = envelope.op
        rest = self.network.transfer(envelope.route, op.tensor.nbytes - (self.exp.eager_limit or 0.0),
                                     envelope.latency)
        envelope.handed.succeed()
        parts = [rest] if envelope.eager is None else [rest, envelope.eager]

        def arrived(_e):
            now = self.env.now
            self._sent(envelope.src, op, envelope.start, now)
            event.succeed(Message(envelope.src, op.tensor, op.tag, op.meta, now))

        self.env.all_of(parts).callbacks.append(arrived)

    def _deliver(self, dst: int, message) -> None:
        for i, (src, tag, event) in enumerate(self._waiting[dst]):
            if tag == message.tag and (src is None or src == message.src):
                del self._waiting[dst][i]
                if type(message) is _Envelope:
                    self._matched(message, event)
                else:
                    event.succeed(message)
                return
        self._mailbox[dst].append(message)

    def _recv(self, rank: int, op) -> simpy.Event:
        src = op.src if type(op) is Recv else None
        event = self.env.event()
        box = self._mailbox[rank]
        for i, message in enumerate(box):
            if message.tag == op.tag and (src is None or message.src == src):
                del box[i]
                if type(message) is _Envelope:
                    self._matched(message, event)
                else:
                    event.succeed(dataclasses.replace(message, time=self.env.now))  # read now, not on arrival
                return event
        self._waiting[rank].append((src, op.tag, event))
        return event


@dataclasses.dataclass(eq=False)
class _Envelope:
    """A rendezvous message waiting at its receiver for a matching receive."""

    src: int
    tag: int
    op: Send
    route: tuple
    latency: float
    eager: simpy.Event | None
    start: float
    handed: simpy.Event
    """Fires when the rest of the message is handed to the transport (the sender's send is done)."""


def simulate(experiment) -> RunResult:
    """Run ``experiment`` in the simulator and return its :class:`RunResult`.

    With ``experiment.fidelity == "auto"`` it simulates one representative per class of
    interchangeable ranks (:mod:`simulator.symmetry`) where that is exact; a symmetry that
    fails on the way is dropped and the run starts again without it."""
    cluster = experiment.run_cluster
    kinds = link_kinds(cluster.links) if experiment.fidelity == "auto" else None
    gens, reason = candidates(experiment, kinds)
    while gens:
        symmetry = Symmetry.find(cluster, gens, kinds)
        if symmetry is None:
            gens, reason = gens[:-1], "the strategy's symmetries together do not act freely on the cluster"
            continue
        try:
            return _Simulation(experiment, symmetry,
                               f"{len(symmetry.simulated)} representatives of {symmetry.order} ranks each").run()
        except Asymmetric as exc:
            drop = exc.drop or tuple(range(len(gens)))
            gens, reason = [g for i, g in enumerate(gens) if i not in drop], exc.reason
    return _Simulation(experiment, None, reason).run()
