"""Parameter servers: synchronous, asynchronous, stale-synchronous, backup workers.

The GPU ranks are workers; the strategy adds ``servers`` host processes
(:meth:`ParameterServer.hosts`), each owning one contiguous shard of the
parameters (:mod:`strategies.sharding`). A worker computes forward and
backward, pushes each shard's gradient to its server as soon as backward has
produced it (``overlap``), and receives fresh parameters; a server applies
gradients to its shard with the experiment's optimizer, on its own device.

Protocol (tags): a worker sends ``PUSH`` messages (the gradient shard; meta:
the shard ``version`` it read, its ``clock`` = iteration, ``read_time``,
``samples``) and, when it stops, a zero-byte ``PUSH`` with meta ``done`` and
the number of pushes it made; a server answers with ``PARAMS`` (meta: the new
``version``; ``stop`` in async mode). A server ends once every worker is done
and all their pushes are in, so nothing is left unreceived.

Modes:

* ``sync``: a server waits for a gradient from every worker (``wait_for=K``:
  the first K of this iteration), applies their sum as one update and sends the
  new shard to every worker. With ``wait_for < N`` (backup workers, Chen et
  al. 2016) a worker still computing when new parameters arrive abandons the
  iteration (before its first push; after that it completes it, so every
  server receives the same gradients), and gradients of closed iterations are
  dropped and recorded as such. Every iteration then lasts the K-th order
  statistic of the workers' times. Each server takes the first K gradients
  that reach *it*, as TensorFlow's SyncReplicasOptimizer does per variable, so
  where pushes reach servers in different orders (a colocated server hears its
  own node's worker first) two shards may apply different sets of K workers.
* ``async``: a server applies each gradient on arrival and answers its sender
  at once with the new shard (Hogwild-style PS). Training stops at a global
  step count, as asynchronous trainers do: once a shard has applied
  ``iterations x workers`` gradients its answers say ``stop``, so every worker
  is busy to the end and throughput is not diluted by a ragged finish.
* ``ssp``: stale-synchronous parallel (Ho et al., NIPS 2013): updates are
  applied on arrival, but a server answers a worker that has finished clock
  ``c`` only once every worker has pushed at least ``c - staleness_bound``
  times, so no worker runs more than ``staleness_bound`` clocks ahead of the
  slowest. ``staleness_bound=0`` is a barrier every iteration.

With ``compression`` a worker encodes each shard's gradient before pushing it
(its payload is what travels) and the server decodes the gradients it applies
on its own device before the update; parameters travel uncompressed.
Compressors with more than one round (PowerSGD) need all-reduce between their
rounds and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from strategies.compression import Compressor
from strategies.context import Job, RankContext
from strategies.data_parallel import DTYPE_BYTES, _check_dtype, _set_compression, strategy_dict
from strategies.ops import TensorRef
from strategies.sharding import PARTITIONS, ParamShard, partition_params

MODES = ("sync", "async", "ssp")
PLACEMENTS = ("dedicated", "colocated")
PUSH, PARAMS = 1, 2


@dataclass(frozen=True, kw_only=True)
class ParameterServer:
    """Workers push gradients to sharded servers and pull parameters back."""

    name: ClassVar[str] = "parameter_server"

    servers: int | None = None
    """Parameter shards, one server process each. Default: 1 dedicated, or one per node colocated."""
    placement: str = "dedicated"
    """``dedicated``: each server on a node of its own (one NIC); ``colocated``: server j on
    worker node ``j % nodes``, sharing that node's NICs."""
    mode: str = "sync"
    """``sync``, ``async`` or ``ssp``."""
    staleness_bound: int = 0
    """SSP: how many clocks a worker may run ahead of the slowest."""
    wait_for: int | None = None
    """Sync: gradients a server waits for per iteration (K of N workers; None = all)."""
    partition: str = "layer"
    """``layer`` (whole layers, balanced by bytes) or ``slice`` (equal slices of the flat parameters)."""
    server_device: str | dict = "cpu-socket"
    """Device the servers run on (their optimizer step is charged there): a catalogue
    name, or a table of a name plus overrides (``{"name": "cpu-socket", "mem_bandwidth": 400e9}``)."""
    grad_dtype: str | None = None
    """Element type of pushed gradients (``None``: the training precision's)."""
    param_dtype: str | None = None
    """Element type of pulled parameters (``None``: the training precision's)."""
    compression: Compressor | str | dict | None = None
    """Compress pushed gradients (a compressor, its name or a table)."""
    overlap: bool = True
    """Push each shard as soon as backward has produced its gradients."""

    def __post_init__(self) -> None:
        if self.servers is not None and (isinstance(self.servers, bool) or not isinstance(self.servers, int)
                                         or self.servers < 1):
            raise ValueError(f"ParameterServer.servers must be an integer >= 1, got {self.servers!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"ParameterServer.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.mode not in MODES:
            raise ValueError(f"ParameterServer.mode must be one of {MODES}, got {self.mode!r}")
        s = self.staleness_bound
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"ParameterServer.staleness_bound must be an integer >= 0, got {s!r}")
        if s and self.mode != "ssp":
            raise ValueError(f"ParameterServer.staleness_bound applies to mode='ssp' only (mode is {self.mode!r})")
        k = self.wait_for
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"ParameterServer.wait_for must be an integer >= 1 or None, got {k!r}")
            if self.mode != "sync":
                raise ValueError(f"ParameterServer.wait_for applies to mode='sync' only (mode is {self.mode!r})")
        if self.partition not in PARTITIONS:
            raise ValueError(f"ParameterServer.partition must be one of {PARTITIONS}, got {self.partition!r}")
        for field in ("grad_dtype", "param_dtype"):
            _check_dtype(self, field)
        _set_compression(self)
        if self.compression is not None and self.compression.rounds > 1:
            raise ValueError(
                f"ParameterServer.compression {self.compression.name!r} needs an all-reduce between its "
                f"{self.compression.rounds} rounds; use it with AllReduceSGD or LocalSGD"
            )
        if not (isinstance(self.server_device, str) and self.server_device) and not isinstance(self.server_device, dict):
            raise ValueError(
                f"ParameterServer.server_device must be a catalogue device name or a table, got {self.server_device!r}"
            )
        if not isinstance(self.overlap, bool):
            raise ValueError(f"ParameterServer.overlap must be true or false, got {self.overlap!r}")

    # placement
    def num_servers(self, nodes: int) -> int:
        if self.servers is not None:
            return self.servers
        return nodes if self.placement == "colocated" else 1

    def hosts(self, cluster) -> list[dict]:
        """The server processes this strategy adds to ``cluster``: ``{"node", "device"}`` each."""
        k = self.num_servers(cluster.nodes)
        if self.placement == "dedicated":
            return [{"node": cluster.nodes + j, "device": self.server_device} for j in range(k)]
        return [{"node": j % cluster.nodes, "device": self.server_device} for j in range(k)]

    def shards(self, job: Job) -> tuple[ParamShard, ...]:
        return partition_params(job.layer_params, len(job.hosts), self.partition)

    def check(self, job: Job) -> None:
        """Raise ``ValueError`` if this strategy cannot run ``job``."""
        workers = job.accelerators
        if not job.hosts:
            raise ValueError("ParameterServer needs server processes; build the run with Experiment, which adds them")
        if self.wait_for is not None and self.wait_for > workers:
            raise ValueError(f"ParameterServer.wait_for must be at most the {workers} workers, got {self.wait_for}")
        try:
            self.shards(job)
        except ValueError as exc:
            raise ValueError(f"ParameterServer: {exc}") from None

    def residency(self, job: Job, rank: int):
        """Workers: weights, gradients, activations and a receive buffer for pulled parameters
        (no optimizer state: the servers step); with compression, each push's payload and
        residual. Servers: their fp32 shard, its optimizer state, a gradient sum and a
        receive buffer for one push from every worker."""
        from strategies.residency import Residency

        shards = self.shards(job)
        g = DTYPE_BYTES[self.grad_dtype or job.param_dtype]
        p = DTYPE_BYTES[self.param_dtype or job.param_dtype]
        total = float(sum(job.layer_params))
        if rank < job.accelerators:
            buffers = total * p
            if self.compression is not None:
                codec = _Codec(self.compression, shards, [None] * len(shards), job, g)
                buffers += sum(self.compression.memory_bytes(s, g, 1) for s in codec.shapes)
            return Residency(params=total, grads=total, activations=(((0, job.num_layers), job.samples(rank)),),
                             buffers=buffers)
        shard = shards[rank - job.accelerators]
        if self.compression is not None:
            codec = _Codec(self.compression, [shard], [None], job, g)
            push = codec.payloads[0].nbytes
        else:
            push = shard.size * g
        return Residency(params=shard.size, grads=shard.size, optimizer=shard.size,
                         buffers=job.accelerators * push, fp32=True)

    # programs
    def programs(self, job: Job) -> list:
        self.check(job)
        shards = self.shards(job)
        servers = tuple(job.hosts)
        g = DTYPE_BYTES[self.grad_dtype or job.param_dtype]
        p = DTYPE_BYTES[self.param_dtype or job.param_dtype]
        grads = [TensorRef(f"grads/shard{s.index}", s.size * g, "grads", s.layers, s.elements) for s in shards]
        params = [TensorRef(f"params/shard{s.index}", s.size * p, "params", s.layers, s.elements) for s in shards]
        codec = None if self.compression is None else _Codec(self.compression, shards, grads, job, g)
        pushed = grads if codec is None else codec.payloads
        worker = self._worker(shards, servers, pushed, params, codec)
        server = {"sync": self._sync_server, "async": self._async_server, "ssp": self._ssp_server}[self.mode]
        return [worker] * job.accelerators + [server(j, params[j], codec) for j in range(len(servers))]

    def _worker(self, shards, servers, grads, params, codec=None):
        mode, overlap = self.mode, self.overlap
        backup = mode == "sync" and self.wait_for is not None
        # Push order: the shard whose first layer backward reaches first.
        order = sorted(range(len(shards)), key=lambda j: shards[j].layers[0], reverse=True)
        done_tensor = TensorRef("done", 0, "custom")

        def worker(ctx: RankContext):
            n = ctx.job.num_layers
            versions = [0] * len(shards)
            read_times = [0.0] * len(shards)
            pushes = 0
            pending = []  # async sends still in flight
            count = -1 if mode == "async" else None
            for i in ctx.iterations(count):
                fresh = []  # backup workers: the next parameters, posted now, abandon a late iteration
                if backup:
                    for j in order:
                        fresh.append((yield ctx.recv(servers[j], params[j], tag=PARAMS, async_op=True)))
                cancel = fresh if backup else None
                completed = yield ctx.forward((0, n), cancel_on=cancel)
                pos = n
                pushed = False
                if completed and not overlap:
                    completed = yield ctx.backward((0, n), cancel_on=cancel)
                    pos = 0
                for j in order:
                    if not completed:
                        break
                    first = shards[j].layers[0]
                    if first < pos:  # backward down to the shard's first layer: its gradients are ready
                        # Once a shard is pushed the iteration is finished, so every server sees it.
                        completed = yield ctx.backward((first, pos), cancel_on=None if pushed else cancel)
                        pos = first
                        if not completed:
                            break
                    meta = {"version": versions[j], "clock": i, "read_time": read_times[j], "samples": ctx.samples}
                    if codec is not None:
                        yield codec.encode(ctx, j)
                    pending.append((yield ctx.send(servers[j], grads[j], tag=PUSH, async_op=True, meta=meta)))
                    pushed = True
                if pushed and pos > 0:  # layers before the first with parameters
                    yield ctx.backward((0, pos))
                if pushed:
                    pushes += 1
                stop = False
                replies = []
                if backup:
                    for handle in fresh:
                        replies.append((yield ctx.wait(handle)))
                    replies = [replies[order.index(j)] for j in range(len(shards))]
                else:
                    for j in range(len(shards)):
                        replies.append((yield ctx.recv(servers[j], params[j], tag=PARAMS)))
                for j, reply in enumerate(replies):
                    versions[j] = int(reply.get("version"))
                    read_times[j] = reply.time
                    stop = stop or bool(reply.get("stop", 0))
                if stop:
                    break
            for handle in pending:
                yield ctx.wait(handle)
            for server in servers:
                yield ctx.send(server, done_tensor, tag=PUSH, meta={"done": 1, "pushes": pushes})

        return worker

    def _sync_server(self, j: int, params: TensorRef, codec=None):
        def server(ctx: RankContext):
            workers = ctx.job.accelerators
            k = self.wait_for or workers
            ledger = _Ledger(workers)
            dropped = []
            for it in range(ctx.job.iterations):
                accepted = []
                while len(accepted) < k:
                    msg = yield from ledger.next_push(ctx, params)
                    (accepted if int(msg.get("clock")) == it else dropped).append(msg)
                if codec is not None:
                    yield codec.decode(ctx, j, len(accepted))
                version = yield ctx.apply(j, params, accepted, dropped=dropped)
                dropped = []
                handles = []
                for w in range(workers):
                    handles.append((yield ctx.send(w, params, tag=PARAMS, async_op=True, meta={"version": version})))
                for handle in handles:
                    yield ctx.wait(handle)
            while True:  # late gradients of the last iterations, then the goodbyes
                msg = yield from ledger.next_push(ctx, params)
                if msg is None:
                    break
                dropped.append(msg)
            if dropped:
                yield ctx.apply(j, params, (), dropped=dropped)

        return server

    def _async_server(self, j: int, params: TensorRef, codec=None):
        def server(ctx: RankContext):
            workers = ctx.job.accelerators
            target = ctx.job.iterations * workers
            ledger = _Ledger(workers)
            applied = 0
            pending = []
            while (msg := (yield from ledger.next_push(ctx, params))) is not None:
                if codec is not None:
                    yield codec.decode(ctx, j, 1)
                version = yield ctx.apply(j, params, (msg,))
                applied += 1
                meta = {"version": version, "stop": int(applied >= target)}
                pending.append((yield ctx.send(msg.src, params, tag=PARAMS, async_op=True, meta=meta)))
            for handle in pending:
                yield ctx.wait(handle)

        return server

    def _ssp_server(self, j: int, params: TensorRef, codec=None):
        bound = self.staleness_bound

        def server(ctx: RankContext):
            ledger = _Ledger(ctx.job.accelerators)
            clock = ledger.received  # pushes received per worker = clocks it has finished
            waiting: list[tuple[int, int]] = []  # (worker, the slowest clock it needs)
            sends = []
            while (msg := (yield from ledger.next_push(ctx, params))) is not None:
                if codec is not None:
                    yield codec.decode(ctx, j, 1)
                version = yield ctx.apply(j, params, (msg,))
                waiting.append((msg.src, clock[msg.src] - bound))  # the final read too: s = 0 ends on a barrier
                slowest = min(clock)
                still = []
                for w, need in waiting:
                    if slowest >= need:
                        sends.append((yield ctx.send(w, params, tag=PARAMS, async_op=True, meta={"version": version})))
                    else:
                        still.append((w, need))
                waiting = still
            for handle in sends:
                yield ctx.wait(handle)

        return server

    def to_dict(self) -> dict:
        return strategy_dict(self)


class _Codec:
    """A compressor applied to pushes: the payload each shard's push carries, the encode
    work on the worker and the decode work on the server (for K gradients at once)."""

    def __init__(self, compressor: Compressor, shards, grads, job: Job, elem_bytes: int):
        self.compressor = compressor
        self.grads = grads
        self.elem_bytes = elem_bytes
        self.shapes = []
        for shard in shards:
            a, b = shard.layers
            whole = sum(job.layer_params[:a]) == shard.elements[0] and sum(job.layer_params[a:b]) == shard.size
            self.shapes.append(job.shapes(shard.layers) if whole else [(shard.size,)])
        self.plans = [compressor.plan(shapes, elem_bytes, 1) for shapes in self.shapes]
        self.payloads = [
            TensorRef(f"grads/shard{s.index}:payload", plan.wire_bytes, "payload", s.layers, s.elements)
            for s, plan in zip(shards, self.plans, strict=True)
        ]
        self._decodes: dict[tuple[int, int], object] = {}

    def encode(self, ctx: RankContext, j: int):
        return ctx.encode(self.grads[j], self.compressor, 0, self.plans[j].rounds[0].encode)

    def decode(self, ctx: RankContext, j: int, count: int):
        cost = self._decodes.get((j, count))
        if cost is None:
            cost = self._decodes[(j, count)] = self.compressor.plan(self.shapes[j], self.elem_bytes, count).decode
        return ctx.decode(self.grads[j], self.compressor, cost, payloads=count)


class _Ledger:
    """A server's count of each worker's pushes, and of the pushes each worker says it made."""

    def __init__(self, workers: int):
        self.received = [0] * workers
        self.announced: list[int | None] = [None] * workers

    def finished(self) -> bool:
        return all(a is not None and a == r for a, r in zip(self.announced, self.received, strict=True))

    def next_push(self, ctx: RankContext, params: TensorRef):
        """Receive until the next gradient push and answer it; answer ``None`` once every
        worker has said goodbye and all its pushes are in."""
        while not self.finished():
            msg = yield ctx.recv_any(params, tag=PUSH)
            if msg.get("done"):
                self.announced[msg.src] = int(msg.get("pushes"))
                continue
            self.received[msg.src] += 1
            return msg
        return None
