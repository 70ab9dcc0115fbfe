"""Model parallelism: pipeline, tensor and hybrid ``dp × pp × tp`` parallelism, and ZeRO.

The GPU ranks form a grid of ``dp`` data-parallel replicas, each a pipeline of
``pp`` stages, each stage a tensor-parallel group of ``tp`` ranks. ``order``
says how the grid is laid on the ranks, innermost first: the default
``"tp-pp-dp"`` puts a tensor-parallel group on consecutive ranks (one node's
NVLink), a pipeline's stages next, replicas outermost.

One iteration of a replica is ``batch_size`` samples cut into
``micro_batches`` micro-batches that flow through the stages in the order of
the pipeline ``schedule`` (:mod:`strategies.pipeline`): a stage receives a
micro-batch's activation from the previous stage, runs its layers' forward
(with the tensor-parallel collectives of :mod:`strategies.tensor_parallel`
between them, on the critical path) and sends the activation on; backward
runs the other way with activation gradients. Sends are asynchronous. The
layers are cut into ``pp × chunks`` contiguous virtual stages balanced by
compute time (or at given ``boundaries``); with the interleaved schedule
stage ``s`` holds chunks ``s, s + pp, ...``.

Gradients of a chunk are reduced across its data-parallel group once its last
micro-batch's backward has produced them, bucket by bucket (DDP buckets,
issued as backward goes, overlapping the rest of the pipeline), on their own
communication stream. Every schedule flushes: the optimizer step follows the
last backward, so updates are synchronous. ZeRO (Rajbhandari et al., SC 2020)
partitions what each data-parallel rank keeps:

* stage 1: optimizer state, 1/dp each. Gradients are reduce-scattered, each
  rank steps its shard and the updated parameters are all-gathered.
* stage 2: gradients too (reduce-scattered after every micro-batch's backward,
  as DeepSpeed does with gradient accumulation).
* stage 3: parameters too: each bucket's parameters are all-gathered before its
  forward and again before its backward (the next bucket's gather is
  prefetched), gradients reduce-scattered; no all-gather after the step.

Stages 2 and 3 need ``pp = 1``, as in DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from strategies.bucketing import MIB, assign_buckets
from strategies.context import Job, RankContext
from strategies.data_parallel import (
    DTYPE_BYTES,
    _check_algorithm,
    _check_bucket_caps,
    idle,
    strategy_dict,
)
from strategies.ops import TensorRef
from strategies.pipeline import SCHEDULES, balance, checkpoint_units, in_flight, schedule
from strategies.residency import Residency
from strategies.tensor_parallel import check_divisible, comm_points, local_params, split_factors

AXES = ("tp", "pp", "dp")


def _positive_int(owner: str, field: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None (the rest of the GPUs)" if allow_none else ""
        raise ValueError(f"{owner}.{field} must be an integer >= 1{extra}, got {value!r}")


@dataclass(frozen=True)
class _Layout:
    """Everything a rank's program needs, worked out once per job."""

    dp: int
    pp: int
    tp: int
    v: int
    bounds: tuple[int, ...]
    """Virtual stage ``j`` holds layers ``[bounds[j], bounds[j + 1])``; it runs on stage ``j % pp``."""
    coords: tuple[tuple[int, int, int], ...]
    """``(t, s, d)`` of each GPU rank."""
    rank_of: dict
    """``(t, s, d)`` -> rank."""
    passes: tuple
    """Per stage, the schedule's passes."""
    micro: int
    """Samples per micro-batch."""


@dataclass(frozen=True, kw_only=True)
class Hybrid:
    """Data × pipeline × tensor parallelism with optional ZeRO (see the module docstring)."""

    name: ClassVar[str] = "hybrid"

    dp: int | None = None
    """Data-parallel degree; ``None``: the GPUs left over (GPUs / (pp · tp))."""
    pp: int = 1
    """Pipeline stages."""
    tp: int = 1
    """Tensor-parallel degree (Megatron-style, within a node)."""
    micro_batches: int = 1
    """Micro-batches per iteration per replica; they divide ``batch_size``."""
    schedule: str = "1f1b"
    """``gpipe``, ``1f1b`` or ``interleaved``."""
    chunks: int = 1
    """Model chunks per stage (``interleaved`` only)."""
    boundaries: tuple[int, ...] | None = None
    """First layer of each virtual stage after the first (``pp · chunks - 1`` increasing
    indices); ``None``: balanced by compute time."""
    zero: int = 0
    """ZeRO stage for the data-parallel part: 0 (plain all-reduce), 1, 2 or 3."""
    sequence_parallel: bool = False
    """Split the replicated layers' tokens across the tensor-parallel group (reduce-scatter /
    all-gather instead of all-reduce), from the word embedding on (it must be the first split
    layer); the replicated layers' gradients, each rank's a sum over its tokens, are summed
    over the group once per iteration (with ZeRO, before each bucket's reduce-scatter: once
    per micro-batch under ZeRO-2/3, which reduce every micro-batch)."""
    recompute: bool = False
    """Full activation recomputation: keep only each checkpoint unit's input (a transformer
    layer's; :func:`strategies.pipeline.checkpoint_units`) and re-run the unit's forward, its
    tensor-parallel collectives included, just before its backward."""
    order: str = "tp-pp-dp"
    """How the grid maps onto ranks, innermost axis first."""
    algorithm: str = "ring"
    """Algorithm of the data-parallel collectives (and of tensor-parallel ones)."""
    bucket_mb: float = 25.0
    """Gradient bucket cap in MiB for the data-parallel reduction."""
    first_bucket_mb: float = 1.0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _positive_int(owner, "dp", self.dp, allow_none=True)
        for field in ("pp", "tp", "micro_batches", "chunks"):
            _positive_int(owner, field, getattr(self, field))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{owner}.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.chunks > 1 and self.schedule != "interleaved":
            raise ValueError(f"{owner}.chunks={self.chunks} needs schedule='interleaved', got {self.schedule!r}")
        if self.schedule == "interleaved" and self.pp < 2:
            raise ValueError(f"{owner}.schedule='interleaved' needs pp >= 2, got pp={self.pp}")
        if self.schedule == "interleaved" and self.micro_batches % self.pp:
            raise ValueError(
                f"{owner}.micro_batches={self.micro_batches} must be a multiple of pp={self.pp} "
                "for the interleaved schedule"
            )
        if self.zero not in (0, 1, 2, 3) or isinstance(self.zero, bool):
            raise ValueError(f"{owner}.zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.zero >= 2 and self.pp > 1:
            raise ValueError(f"{owner}.zero={self.zero} needs pp=1 (ZeRO-2/3 partition gradients across "
                             f"micro-batches, which pipelining cannot); got pp={self.pp}. Use zero=1.")
        for field in ("sequence_parallel", "recompute"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{owner}.{field} must be true or false, got {getattr(self, field)!r}")
        if not isinstance(self.order, str) or sorted(self.order.split("-")) != sorted(AXES):
            raise ValueError(f"{owner}.order must name tp, pp and dp once each, innermost first "
                             f"(e.g. 'tp-pp-dp'), got {self.order!r}")
        _check_algorithm("all_reduce", self.algorithm, f"{owner}.algorithm")
        if self.zero and self.algorithm not in ("ring", "halving_doubling", "direct"):
            raise ValueError(f"{owner}.algorithm={self.algorithm!r} has no reduce-scatter/all-gather for "
                             "ZeRO; use ring, halving_doubling or direct")
        _check_bucket_caps(self)
        if self.boundaries is not None:
            b = self.boundaries
            if isinstance(b, str) or not hasattr(b, "__iter__") or any(
                    isinstance(x, bool) or not isinstance(x, int) for x in b):
                raise ValueError(f"{owner}.boundaries must be a list of layer indices, got {b!r}")
            object.__setattr__(self, "boundaries", tuple(b))

    # -- layout ----------------------------------------------------------------------------
    def degrees(self, job: Job) -> tuple[int, int, int]:
        """``(dp, pp, tp)`` for this job, checked against its GPU count."""
        owner = type(self).__name__
        gpus = job.accelerators
        if self.dp is None:
            if gpus % (self.pp * self.tp):
                raise ValueError(f"{owner}: pp·tp = {self.pp}·{self.tp} = {self.pp * self.tp} does not divide "
                                 f"the {gpus} GPUs; choose degrees whose product divides them")
            dp = gpus // (self.pp * self.tp)
        else:
            dp = self.dp
        if dp * self.pp * self.tp != gpus:
            raise ValueError(f"{owner}: dp·pp·tp = {dp}·{self.pp}·{self.tp} = {dp * self.pp * self.tp} must equal "
                             f"the number of GPUs, {gpus}")
        return dp, self.pp, self.tp

    def check(self, job: Job) -> None:
        self._layout(job)

    def _layout(self, job: Job) -> _Layout:
        cache = self.__dict__.setdefault("_layouts", {})
        key = id(job)
        hit = cache.get(key)
        if hit is not None and hit[0] is job:
            return hit[1]
        layout = self._make_layout(job)
        cache.clear()
        cache[key] = (job, layout)
        return layout

    def _make_layout(self, job: Job) -> _Layout:
        owner = type(self).__name__
        dp, pp, tp = self.degrees(job)
        v = self.chunks
        roles = job.layer_tp
        names = job.layer_names
        if tp > 1:
            if not any(r != "replicated" for r in roles):
                raise ValueError(f"{owner}.tp={tp}, but no layer of this workload splits across tensor-parallel "
                                 "ranks (every tp_role is replicated); set Layer.tp_role or use tp=1")
            check_divisible(names, roles, job.layer_shapes or ((),) * job.num_layers, tp, owner)
            if self.sequence_parallel:
                _check_sequence_split(names, roles, job.layer_params, owner)
        # placement
        strides, size = {}, 1
        for axis in self.order.split("-"):
            strides[axis] = size
            size *= {"tp": tp, "pp": pp, "dp": dp}[axis]
        coords, rank_of = [], {}
        for rank in range(job.accelerators):
            c = tuple((rank // strides[a]) % {"tp": tp, "pp": pp, "dp": dp}[a] for a in AXES)
            coords.append(c)
            rank_of[c] = rank
        if tp > 1:
            for (_, s, d), rank in rank_of.items():
                if job.node_of[rank] != job.node_of[rank_of[(0, s, d)]]:
                    raise ValueError(
                        f"{owner}: tensor-parallel group of stage {s}, replica {d} spans nodes "
                        f"(ranks {rank_of[(0, s, d)]} and {rank}); tp={tp} must fit in a node and order must "
                        f"keep tp innermost within it (order={self.order!r})"
                    )
        # batch
        sizes = {job.samples(r) for r in range(job.accelerators)}
        if len(sizes) != 1:
            raise ValueError(f"{owner} needs the same batch_size on every GPU (the replica's batch), got {sorted(sizes)}")
        batch = sizes.pop()
        if batch % self.micro_batches:
            raise ValueError(f"{owner}.micro_batches={self.micro_batches} must divide the replica's batch_size {batch}")
        # stages
        parts = pp * v
        allowed = _cuts_allowed(roles) if tp > 1 else None
        if self.boundaries is not None:
            bounds = (0, *self.boundaries, job.num_layers)
            if len(self.boundaries) != parts - 1 or any(x >= y for x, y in zip(bounds, bounds[1:])):
                raise ValueError(f"{owner}.boundaries must be {parts - 1} increasing layer indices in "
                                 f"(0, {job.num_layers}) for pp·chunks = {parts} stages, got {list(self.boundaries)}")
            if allowed is not None:
                bad = [x for x in self.boundaries if not allowed[x]]
                if bad:
                    raise ValueError(f"{owner}.boundaries {bad} cut between a column- and a row-parallel layer, "
                                     "where tensor-parallel activations are split; cut elsewhere")
        else:
            costs = job.layer_costs or tuple(float(p) for p in job.layer_params)
            bounds = tuple(balance(costs, parts, allowed))
        passes = tuple(tuple(x) for x in schedule(self.schedule, pp, self.micro_batches, v))
        lay = _Layout(dp, pp, tp, v, bounds, tuple(coords), rank_of, passes, batch // self.micro_batches)
        if pp > 1:
            late = [names[j] for j, _, _ in _tie_pairs(job, lay) if j >= bounds[1]]  # checks the ties too
            if late and self.zero and dp > 1 and v > 1:
                # under ZeRO the owner sums before its bucket's reduce-scatter, inside its backward;
                # on a later virtual stage of an interleaved schedule it may still owe another stage
                # a gradient the copy's stage waits for
                raise ValueError(f"{owner}: {late} are tied across stages and owned after the first virtual stage; "
                                 f"with zero={self.zero} and the interleaved schedule that can deadlock; use zero=0, "
                                 "chunks=1, or boundaries that put them on the first stage")
        return lay

    def stages(self, job: Job) -> list[tuple[int, int]]:
        """Layers ``[start, stop)`` of each virtual stage (stage ``j`` runs on pipeline stage ``j % pp``)."""
        b = self._layout(job).bounds
        return [(b[j], b[j + 1]) for j in range(len(b) - 1)]

    # -- memory ----------------------------------------------------------------------------
    def residency(self, job: Job, rank: int) -> Residency:
        """Per rank: its chunks' parameters (1/tp of split layers), gradients and optimizer state,
        divided by dp as the ZeRO stage says; the activations its schedule keeps alive at its peak;
        gradient buckets, gathered ZeRO-3 buckets and pipeline receive buffers."""
        if rank >= job.accelerators:
            return Residency()
        lay = self._layout(job)
        t, s, _ = lay.coords[rank]
        roles = job.layer_tp
        chunks = [(lay.bounds[c * lay.pp + s], lay.bounds[c * lay.pp + s + 1]) for c in range(lay.v)]
        local = sum(local_params(job.layer_params[i], roles[i], lay.tp) for a, b in chunks for i in range(a, b))
        # a copy of parameters tied to another stage's: whole gradients and optimizer state
        copy = sum(local_params(job.layer_params[j], roles[j], lay.tp) for j, _ in _ties(job, lay, rank)[0])
        dp = lay.dp
        zero = self.zero if dp > 1 else 0
        e = DTYPE_BYTES[job.param_dtype]
        buckets = [b for a, z in chunks for b in self._buckets(job, lay, (a, z))]
        buffers = 0.0
        if dp > 1 and zero < 2:
            buffers += sum(b.nbytes for b in buckets)  # flat gradient buckets
        if zero == 3 and buckets:
            buffers += 2 * max(b.nbytes for b in buckets)  # the bucket in use and the prefetched one
        if lay.pp > 1:  # one receive buffer each way per chunk
            for _, z in chunks:
                buffers += 2 * self._boundary_elems(job, lay, z) * lay.micro * e
        return Residency(
            params=(local / dp if zero == 3 else local) + copy,
            grads=(local / dp if zero >= 2 else local) + copy,
            optimizer=(local / dp if zero >= 1 else local) + copy,
            **self._activations(job, lay, s, chunks),
            buffers=buffers,
            tp=lay.tp,
            sequence_parallel=self.sequence_parallel,
        )

    def _activations(self, job: Job, lay: _Layout, s: int, chunks) -> dict:
        """Activations kept at the point of stage ``s``'s schedule with the most micro-batches
        alive (forward run, backward not yet): every layer's per chunk, or with ``recompute``
        each checkpoint unit's input, plus one unit's whole activations while it is recomputed."""
        live = [0] * lay.v
        best, best_total = list(live), 0
        for kind, _, c in lay.passes[s]:
            live[c] += 1 if kind == "F" else -1
            if sum(live) > best_total:
                best_total, best = sum(live), list(live)
        if not self.recompute:
            return dict(activations=tuple((chunks[c], best[c] * lay.micro) for c in range(lay.v) if best[c]))
        names = job.layer_names
        units = [(c, u) for c in range(lay.v) for u in checkpoint_units(names, *chunks[c])]
        widest = max(units, key=lambda cu: sum(job.layer_outputs[cu[1][0]:cu[1][1]]))[1]
        return dict(activations=((widest, lay.micro),),
                    activation_inputs=tuple((u[0], best[c] * lay.micro) for c, u in units if best[c]))

    # -- programs --------------------------------------------------------------------------
    def programs(self, job: Job) -> list:
        lay = self._layout(job)
        return [self._worker(job, lay)] * job.accelerators + [idle] * len(job.hosts)

    def micro_batches_in_flight(self, job: Job, stage: int) -> int:
        """Most micro-batches whose activations stage ``stage`` keeps at once (its schedule's peak)."""
        return in_flight(self._layout(job).passes[stage])

    def _buckets(self, job: Job, lay: _Layout, chunk: tuple[int, int]):
        """DDP buckets of one chunk's local (tensor-split) gradients, layer indices absolute."""
        a, b = chunk
        roles = job.layer_tp
        local = [local_params(job.layer_params[i], roles[i], lay.tp) for i in range(a, b)]
        out = assign_buckets(local, bytes_per_param=DTYPE_BYTES[job.param_dtype], bucket_bytes=self.bucket_mb * MIB,
                             first_bucket_bytes=self.first_bucket_mb * MIB)
        return [type(x)(x.index, (x.layers[0] + a, x.layers[1] + a), x.nbytes) for x in out]

    def _boundary_elems(self, job: Job, lay: _Layout, cut: int) -> float:
        """Activation elements per sample one rank sends across a cut after layer ``cut - 1``."""
        outputs = job.layer_outputs
        roles = job.layer_tp
        role = roles[cut - 1]
        share = split_factors(role, lay.tp, self.sequence_parallel)[3] if lay.tp > 1 else 1.0
        if lay.tp > 1 and self.sequence_parallel and role in ("row", "vocab"):
            share = 1.0 / lay.tp  # reduce-scattered along the sequence before it leaves the stage
        return outputs[cut - 1] * share

    def _worker(self, job: Job, lay: _Layout):
        roles = job.layer_tp
        names = job.layer_names
        inputs = job.layer_inputs
        outputs = job.layer_outputs
        e = DTYPE_BYTES[job.param_dtype]
        sp = self.sequence_parallel
        zero = self.zero if lay.dp > 1 else 0  # one replica: nothing to partition
        algorithm = self.algorithm
        gather_algo = algorithm if algorithm in ("ring", "halving_doubling", "direct") else "ring"
        m, pp, v = self.micro_batches, lay.pp, lay.v
        nstages = pp * v
        micro = lay.micro

        def plan(rank: int) -> dict:
            t, s, d = lay.coords[rank]
            tp_group = tuple(lay.rank_of[(x, s, d)] for x in range(lay.tp)) if lay.tp > 1 else None
            dp_group = tuple(lay.rank_of[(t, s, y)] for y in range(lay.dp))
            chunks = {}
            for c in range(v):
                j = c * pp + s
                a, b = lay.bounds[j], lay.bounds[j + 1]
                fwd_tp, bwd_tp = comm_points(roles, (a, b)) if tp_group else ([], [])
                buckets = self._buckets(job, lay, (a, b)) if lay.dp > 1 else []
                local = sum(local_params(job.layer_params[i], roles[i], lay.tp) for i in range(a, b))
                full = sum(job.layer_params[a:b])
                chunks[c] = dict(
                    j=j, seg=(a, b), fwd_tp=fwd_tp, bwd_tp=bwd_tp, buckets=buckets,
                    fraction=(local / full if full else 1.0) / (lay.dp if zero else 1),
                    prev=lay.rank_of[(t, (j - 1) % pp, d)] if j > 0 else None,
                    next=lay.rank_of[(t, (j + 1) % pp, d)] if j < nstages - 1 else None,
                    out_bytes=self._boundary_elems(job, lay, b) * micro * e if j < nstages - 1 else 0.0,
                    in_bytes=self._boundary_elems(job, lay, a) * micro * e if j > 0 else 0.0,
                    # the micro-batch whose backward is the chunk's last in the schedule
                    last_b=[k for kind, k, cc in lay.passes[s] if kind == "B" and cc == c][-1],
                    units=checkpoint_units(names, a, b) if self.recompute else [],
                    # replicated layers with parameters run on a slice of the tokens: their
                    # gradients are partial sums over the group's slices
                    sp_grads=tuple(i for i in range(a, b) if roles[i] == "replicated" and job.layer_params[i])
                    if sp and tp_group else (),
                )
            copies, owned = _ties(job, lay, rank)
            for c in range(v):  # tied parameters this rank owns, summed with their copy's
                chunks[c]["tied"] = tuple((j, g) for j, g in owned if chunks[c]["seg"][0] <= j < chunks[c]["seg"][1])
            return dict(s=s, tp_group=tp_group, dp_group=dp_group, chunks=chunks, copies=copies)

        def tp_collective(ctx, op: str, elems: float, i: int, tp_group, tag: str):
            tensor = TensorRef(f"{tag}[{i}]", elems * micro * e, "activations" if tag[0] == "a" else "activation_grads",
                               (i, i + 1))
            if op == "all_reduce":
                return ctx.all_reduce(tensor, algorithm=algorithm, group=tp_group)
            if op == "reduce_scatter":
                return ctx.reduce_scatter(tensor, algorithm=gather_algo, group=tp_group)
            return ctx.all_gather(tensor, algorithm=gather_algo, group=tp_group)

        def worker(ctx: RankContext):
            me = plan(ctx.rank)
            tp_group, dp_group, chunks = me["tp_group"], me["dp_group"], me["chunks"]
            passes = lay.passes[me["s"]]
            dp = len(dp_group)
            reduce_op = "all_reduce" if zero == 0 else "reduce_scatter"

            def sequence_grads(layers):
                """Sum the sequence-parallel layers' gradients over the tensor-parallel group, in
                one buffer (Megatron all-reduces its layer norms' gradients so)."""
                if layers:
                    nbytes = sum(job.layer_params[i] for i in layers) * e
                    yield ctx.all_reduce(TensorRef(f"sp_grads[{layers[0]}:{layers[-1] + 1}]", nbytes, "grads",
                                                   (layers[0], layers[-1] + 1), only=layers),
                                         algorithm=algorithm, group=tp_group)

            def tied_grads(j, group):
                """Sum a tied parameter's gradients over the stages that use it (Megatron's
                embedding all-reduce): the owner's and the copy's."""
                nbytes = local_params(job.layer_params[j], roles[j], lay.tp) * e
                yield ctx.all_reduce(TensorRef(f"tied[{j}]", nbytes, "grads", (j, j + 1)), algorithm=algorithm,
                                     group=group)

            def grad_sync(ch, bucket):
                x, y = bucket.layers
                if zero:  # the gradients are partitioned next: sum the sequence-parallel ones first
                    yield from sequence_grads(tuple(i for i in ch["sp_grads"] if x <= i < y))
                for j, group in ch["tied"]:  # and the tied ones, before the data-parallel mean
                    if x <= j < y:
                        yield from tied_grads(j, group)
                tensor = TensorRef(f"grads[{x}:{y}]", bucket.nbytes, "grads", bucket.layers)
                if reduce_op == "all_reduce":
                    return (yield ctx.all_reduce(tensor, algorithm=algorithm, group=dp_group, async_op=True))
                return (yield ctx.reduce_scatter(tensor, algorithm=gather_algo, group=dp_group, async_op=True))

            def gather(bucket):
                tensor = TensorRef(f"params[{bucket.layers[0]}:{bucket.layers[1]}]", bucket.nbytes, "params",
                                   bucket.layers)
                return ctx.all_gather(tensor, algorithm=gather_algo, group=dp_group, async_op=True)

            def forward(ch, k, seg=None, recompute=False):
                a, b = seg or ch["seg"]
                events: dict[int, list] = {}
                for i in ch["fwd_tp"]:  # after row/vocab layer i (of these layers: a recompute unit redoes its own)
                    if a <= i < b:
                        events.setdefault(i + 1, []).append(("reduce_scatter" if sp else "all_reduce", outputs[i], i,
                                                             "act"))
                if sp:
                    for i in ch["bwd_tp"]:  # gather the sequence before a column group
                        if a <= i < b:
                            events.setdefault(i, []).append(("all_gather", inputs[i], i, "act"))
                gathered = zero == 3 and not recompute  # a recompute runs on the gathers backward made
                starts = {bk.layers[0]: n for n, bk in enumerate(ch["buckets"])} if gathered else {}
                cuts = sorted({x for x in (*events, *starts) if a <= x < b} | {a, b})
                ordered = sorted(ch["buckets"], key=lambda bk: bk.layers[0]) if gathered else []
                pending = {}
                if zero == 3 and ordered:
                    pending[ordered[0].layers[0]] = yield gather(ordered[0])
                for x, y in zip(cuts, cuts[1:]):
                    for op, elems, i, tag in events.get(x, ()):
                        yield tp_collective(ctx, op, elems, i, tp_group, tag)
                    if x in pending:
                        nxt = [bk for bk in ordered if bk.layers[0] > x]
                        if nxt:
                            pending[nxt[0].layers[0]] = yield gather(nxt[0])
                        yield ctx.wait(pending.pop(x))
                    yield ctx.forward((x, y), samples=micro, micro_batch=k, tp_group=tp_group, sequence_parallel=sp,
                                      recompute=recompute)
                for op, elems, i, tag in events.get(b, ()):
                    yield tp_collective(ctx, op, elems, i, tp_group, tag)

            def backward(ch, k, handles, sync):
                a, b = ch["seg"]
                events: dict[int, list] = {}
                for i in ch["bwd_tp"]:  # input gradient of a column group, once its backward is done
                    events.setdefault(i, []).append(("reduce_scatter" if sp else "all_reduce", inputs[i], i, "grad"))
                if sp:
                    for i in ch["fwd_tp"]:  # gather the output gradient before a row layer's backward
                        events.setdefault(i + 1, []).append(("all_gather", outputs[i], i, "grad"))
                ends = {bk.layers[1]: bk for bk in ch["buckets"]} if zero == 3 else {}
                starts = {bk.layers[0]: bk for bk in ch["buckets"]} if sync else {}
                units = {u1: u0 for u0, u1 in ch["units"]}
                cuts = sorted({x for x in (*events, *ends, *starts, *units, *units.values()) if a < x <= b} | {a, b},
                              reverse=True)
                pending = {}
                if zero == 3 and b in ends:
                    pending[b] = yield gather(ends[b])
                for y, x in zip(cuts, cuts[1:]):  # backward of [x, y)
                    if y in starts and y < b:
                        handles.append((yield from grad_sync(ch, starts[y])))
                    for op, elems, i, tag in events.get(y, ()):
                        yield tp_collective(ctx, op, elems, i, tp_group, tag)
                    if zero == 3 and y in ends:
                        nxt = ends.get(ends[y].layers[0])
                        if nxt is not None and nxt.layers[1] not in pending:
                            pending[nxt.layers[1]] = yield gather(nxt)
                        yield ctx.wait(pending.pop(y))
                    if y in units:  # re-run the unit's forward, then its backward
                        yield from forward(ch, k, (units[y], y), recompute=True)
                    yield ctx.backward((x, y), samples=micro, micro_batch=k, tp_group=tp_group, sequence_parallel=sp)
                if a in starts:
                    handles.append((yield from grad_sync(ch, starts[a])))
                for op, elems, i, tag in events.get(a, ()):
                    yield tp_collective(ctx, op, elems, i, tp_group, tag)

            for _ in ctx.iterations():
                handles, sends = [], []
                for kind, k, c in passes:
                    ch = chunks[c]
                    j = ch["j"]
                    if kind == "F":
                        if ch["prev"] is not None:
                            yield ctx.recv(ch["prev"], TensorRef(f"act[{j}]", ch["in_bytes"], "activations",
                                                                 ch["seg"]), tag=(j * m + k) * 2)
                        yield from forward(ch, k)
                        if ch["next"] is not None:
                            sends.append((yield ctx.send(ch["next"], TensorRef(f"act[{j + 1}]", ch["out_bytes"],
                                                                               "activations", ch["seg"]),
                                                         tag=((j + 1) * m + k) * 2, async_op=True)))
                    else:
                        if ch["next"] is not None:
                            yield ctx.recv(ch["next"], TensorRef(f"grad[{j}]", ch["out_bytes"], "activation_grads",
                                                                 ch["seg"]), tag=(j * m + k) * 2 + 1)
                        sync = dp > 1 and (zero >= 2 or k == ch["last_b"])
                        yield from backward(ch, k, handles, sync)
                        if ch["prev"] is not None:
                            sends.append((yield ctx.send(ch["prev"], TensorRef(f"grad[{j - 1}]", ch["in_bytes"],
                                                                               "activation_grads", ch["seg"]),
                                                         tag=((j - 1) * m + k) * 2 + 1, async_op=True)))
                for handle in handles:
                    yield ctx.wait(handle)
                if not zero:  # once per iteration, after the data-parallel sum (which it commutes with)
                    for c in range(v):
                        yield from sequence_grads(chunks[c]["sp_grads"])
                if dp == 1:  # no data-parallel reduction to go before
                    for c in range(v):
                        for j, group in chunks[c]["tied"]:
                            yield from tied_grads(j, group)
                for j, group in me["copies"]:  # the copy: summed with the owner's, then averaged over replicas
                    yield from tied_grads(j, group)
                    if dp > 1:
                        nbytes = local_params(job.layer_params[j], roles[j], lay.tp) * e
                        yield ctx.all_reduce(TensorRef(f"grads[{j}:{j + 1}]", nbytes, "grads", (j, j + 1)),
                                             algorithm=algorithm, group=dp_group)
                for c in range(v):
                    yield ctx.optimizer_step(chunks[c]["seg"], fraction=chunks[c]["fraction"])
                for j, _ in me["copies"]:
                    yield ctx.optimizer_step((j, j + 1), fraction=local_params(1.0, roles[j], lay.tp))
                if dp > 1 and zero in (1, 2):
                    gathers = []
                    for c in range(v):
                        for bk in chunks[c]["buckets"]:
                            gathers.append((yield gather(bk)))
                    for handle in gathers:
                        yield ctx.wait(handle)
                for handle in sends:
                    yield ctx.wait(handle)

        return worker

    def symmetries(self, job: Job) -> tuple[tuple[int, ...], ...]:
        """Rank permutations the programs respect: the data-parallel coordinate shifted by
        one replica, and the tensor-parallel one by one rank (every replica of a stage, and
        every tensor-parallel rank of it, runs the same program on its own groups)."""
        lay = self._layout(job)
        gens = []
        for axis, size in ((2, lay.dp), (0, lay.tp)):
            if size > 1:
                shifted = [tuple((x + 1) % size if i == axis else x for i, x in enumerate(c)) for c in lay.coords]
                gens.append(tuple(lay.rank_of[c] for c in shifted))
        return tuple(gens)

    def tensor_group(self, job: Job, rank: int) -> tuple[int, ...]:
        """The ranks of ``rank``'s tensor-parallel group, in split order (``(rank,)`` without
        tensor parallelism): realrun keeps rank ``i`` of the group's share ``i`` of each split layer."""
        lay = self._layout(job)
        if rank >= job.accelerators:
            return (rank,)
        _, s, d = lay.coords[rank]
        return tuple(lay.rank_of[(x, s, d)] for x in range(lay.tp))

    def data_shard(self, job: Job, rank: int) -> int:
        """Which replica's samples ``rank`` trains on: its data-parallel coordinate (every stage
        and tensor-parallel rank of a replica sees the same samples)."""
        return self._layout(job).coords[rank][2]

    def to_dict(self) -> dict:
        d = strategy_dict(self)
        d.pop("_layouts", None)
        if self.boundaries is not None:
            d["boundaries"] = list(self.boundaries)
        return d


def _tie_pairs(job: Job, lay: _Layout) -> list[tuple[int, int, int]]:
    """Parameters shared across pipeline stages (a tied embedding and output head), as
    ``(j, owner stage, user stage)``: layer ``j`` owns them, a layer on the user stage uses
    them too. Refused: a weight used on more than two stages, or two joining the same pair
    (only a pair's gradients are summed, once)."""
    tied = job.layer_tied
    if not tied or lay.pp == 1:
        return []
    bounds = lay.bounds

    def stage(x: int) -> int:
        return next(k for k in range(len(bounds) - 1) if bounds[k] <= x < bounds[k + 1]) % lay.pp

    users: dict[int, set] = {}
    for i, j in enumerate(tied):
        if j >= 0 and job.layer_params[j] and stage(i) != stage(j):
            users.setdefault(j, set()).add(stage(i))
    names = job.layer_names
    many = {names[j]: sorted(x) for j, x in users.items() if len(x) > 1}
    if many:
        raise ValueError(f"pipeline: the parameters of {many} are used on more than two stages; tied weights "
                         "are summed between two stages only; choose boundaries that keep their users together")
    pairs = [(j, stage(j), next(iter(x))) for j, x in sorted(users.items())]
    if len({(a, b) for _, a, b in pairs}) != len(pairs):
        raise ValueError(f"pipeline: two tied weights ({[names[j] for j in users]}) join the same two stages; "
                         "only one per pair of stages is summed; choose other boundaries")
    return pairs


def _ties(job: Job, lay: _Layout, rank: int) -> tuple[list, list]:
    """``rank``'s part in :func:`_tie_pairs`: ``(copies, owned)``, each a list of ``(j, group)``
    where ``group`` is the owner's rank and the user's (same tensor-parallel and data-parallel
    coordinates). ``copies``: this rank keeps a copy of ``j``'s parameters for a layer of its
    own; ``owned``: it owns ``j`` and another stage uses it."""
    t, s, d = lay.coords[rank]
    copies, owned = [], []
    for j, sj, si in _tie_pairs(job, lay):
        group = tuple(sorted((lay.rank_of[(t, sj, d)], lay.rank_of[(t, si, d)])))
        if s == si:
            copies.append((j, group))
        if s == sj:
            owned.append((j, group))
    return copies, owned


def _check_sequence_split(names, roles, params, owner: str) -> None:
    """Sequence parallelism splits the tokens where the word embedding's partial sums are
    reduce-scattered: the first split layer must be a vocabulary embedding, and no replicated
    layer with parameters may run before it (it would see the whole sequence)."""
    first = next((i for i, r in enumerate(roles) if r != "replicated"), None)
    last = max((i for i, r in enumerate(roles) if r in ("row", "vocab")), default=-1)
    if first is not None and roles[first] == "vocab" and not any(r in ("column", "head") for r in roles[last + 1:]):
        raise ValueError(f"{owner}.sequence_parallel=True leaves the output split along the sequence: after the last "
                         f"row-parallel layer {names[last]!r} comes no column group or head that gathers it; "
                         "use sequence_parallel=False")
    if first is None or roles[first] != "vocab":
        where = "none" if first is None else f"{names[first]!r} ({roles[first]})"
        raise ValueError(f"{owner}.sequence_parallel=True needs a vocabulary-parallel word embedding as the first "
                         f"tensor-parallel layer (its reduce-scatter splits the tokens), got {where}; "
                         "use sequence_parallel=False")
    before = [names[i] for i in range(first) if params[i]]
    if before:
        raise ValueError(f"{owner}.sequence_parallel=True: layers {before} have parameters and run before the "
                         f"word embedding {names[first]!r} splits the tokens; use sequence_parallel=False")


def _cuts_allowed(roles) -> list[bool]:
    """Where a pipeline stage may start: not between a column-parallel layer and its row layer."""
    allowed, open_pair = [], False
    for role in roles:
        allowed.append(not open_pair)
        if role == "column":
            open_pair = True
        elif role in ("row", "head", "vocab"):
            open_pair = False
    return allowed


@dataclass(frozen=True, kw_only=True)
class PipelineParallel(Hybrid):
    """Pipeline parallelism: ``pp`` stages of ``micro_batches`` micro-batches (GPipe, 1F1B,
    interleaved); replicas take the other GPUs (``dp``). See :class:`Hybrid`."""

    name: ClassVar[str] = "pipeline"
    pp: int = 2


@dataclass(frozen=True, kw_only=True)
class TensorParallel(Hybrid):
    """Megatron tensor parallelism of degree ``tp`` within a node; replicas take the other GPUs.
    See :class:`Hybrid`."""

    name: ClassVar[str] = "tensor"
    tp: int = 2


@dataclass(frozen=True, kw_only=True)
class ZeRO(Hybrid):
    """Data parallelism with ZeRO stage ``zero`` (1, 2 or 3) over every GPU. See :class:`Hybrid`."""

    name: ClassVar[str] = "zero"
    zero: int = 1
