"""The torch executor: one rank's role program, its ops done for real.

* ``Forward`` runs the layers of a segment on the micro-batch (the shard's
  seeded data, or the activation a ``Recv`` brought); a segment that reaches the
  last layer ends in the loss, scaled by the micro-batch's share of the
  rank's samples so accumulated gradients are the mean over its batch.
* ``Backward`` of layers ``[a, b)`` lets autograd run until every parameter of
  those layers has its gradient (a hook after each accumulation), then goes on
  with the program from inside the hook: an async all-reduce a bucket issues
  there really overlaps the rest of backward, as DDP's hooks do. The backward
  that reaches the bottom of the forward's segment returns when autograd does,
  with the input's gradient ready to send.
* Consecutive ``Forward`` ops of one micro-batch make one autograd graph. An op
  that ends inside a pipeline unit (tensor-parallel cuts, ZeRO-3 buckets) ends
  in a layer hook (after the layer before the cut, or before the layer at it,
  whichever comes first); the program goes on from inside the hook, so the
  collectives it issues there work on the tensor at the cut, and any other op
  waits until the module's forward returns.
* Tensor parallelism (:mod:`realrun.tensor_parallel`): each rank holds its
  slices of the split layers. An all-reduce of ``activations`` of layer ``i``
  sums layer ``i``'s output (its gradient passes through: Megatron's ``g``);
  one of ``activation_grads`` of layer ``i`` sums the gradient of the column
  group's input (a view taken before layer ``i``: Megatron's ``f``). With
  sequence parallelism a reduce-scatter of layer ``i``'s output and an
  all-gather of column group ``i``'s input split and join the sequence
  (dimension 1), each backed by the program's collective of the gradient there.
  A vocabulary-split head's loss is taken over the group.
* Activation recomputation: with a strategy's ``recompute`` the first forward
  runs without a graph and keeps each pipeline unit's input and random-number
  state; a ``Forward(recompute=True)`` runs the unit again from them, and its
  backward runs on its own, from the gradient of the unit above.
* ``Collective`` runs on the communication stream of its group
  (:class:`realrun.comm.Comm`); ``async_op`` answers a handle for ``Wait``.
  Gradients are averaged weighted by samples (each rank scales its part before
  the sum); parameters (local SGD) by the strategy's ``weight``.
* ``Send``/``Recv``/``RecvAny`` move the tensor the ref names (gradients,
  parameters, an encoded payload, an activation) with its meta in a header.
* ``Encode``/``Decode`` run the compressor's torch code (:mod:`strategies.codecs`).
* ``Apply`` averages the received gradients (decoding payloads first), steps the
  shard with the optimizer, counts its version and records the staleness.
* ``cancel_on`` is checked before every module's forward and after every
  gradient: a cancelled op stops there and answers ``False``.
"""

from __future__ import annotations

import math
import threading
import time
import traceback
from collections import defaultdict, deque
from contextlib import contextmanager, nullcontext
from functools import partial

import torch

from realrun.comm import Comm
from realrun.optim import FlatOptimizer
from strategies import codecs
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

_SUSPEND = object()


class _Cancelled(Exception):
    pass


class Handle:
    """What an async op answers; ``Wait`` on it blocks until it is done."""

    __slots__ = ("future", "works", "finish", "result")

    def __init__(self, future=None, works=(), finish=None):
        self.future = future
        self.works = list(works)
        self.finish = finish
        self.result = None

    def is_completed(self) -> bool:
        if self.future is not None:
            return self.future.done()
        return all(w.is_completed() for w in self.works)

    def wait(self):
        if self.future is not None:
            return self.future.result()
        for w in self.works:
            w.wait()
        if self.finish is not None:
            self.result, self.finish = self.finish(), None
        return self.result


class _Record:
    """A micro-batch's forward through layers ``seg``, kept until its backward is done.

    Consecutive ``Forward`` ops of one micro-batch extend one record (``seg`` grows), so
    one autograd graph covers them. ``target`` is the forward op in flight and ``start``
    when it began. With activation recomputation the first forward keeps only each unit's
    input (``saved``: layer -> (input, RNG state)) and a recompute forward makes a record of
    its own (``parent``: the checkpointed one), whose backward runs on its own.
    """

    __slots__ = ("mb", "seg", "x", "out", "root", "left", "state", "iteration", "target", "start", "key",
                 "recompute", "saved", "grads", "parent", "rng")

    def __init__(self, mb, seg, x, iteration, key, recompute=False, parent=None):
        self.mb, self.seg, self.x, self.out, self.root = mb, seg, x, x, None
        self.left: dict[int, int] = {}
        self.state = "forward"
        self.iteration = iteration
        self.target = None
        self.start = 0.0
        self.key = key
        self.recompute = recompute
        self.saved: dict[int, tuple] | None = None
        self.grads: dict[int, torch.Tensor] = {}
        self.parent = parent
        self.rng = None  # a recompute's random-number state: where its first forward's stood


class _Replace(torch.autograd.Function):
    """Forward: ``value`` (what a collective made of ``x``); backward: ``x``'s gradient passes
    through unchanged (Megatron's ``g`` operator after a row-parallel layer)."""

    @staticmethod
    def forward(ctx, x, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Through(torch.autograd.Function):
    """Forward: ``fn(x)``, a collective over the group (sequence parallelism's reduce-scatter
    after a row layer or all-gather before a column group); backward: ``back(grad)``, the
    collective the program issues for the gradient there (the other one of the pair)."""

    @staticmethod
    def forward(ctx, x, fn, back):
        ctx.back = back
        return fn(x.detach())

    @staticmethod
    def backward(ctx, grad):
        return ctx.back(grad), None, None


class TorchExecutor:
    def __init__(self, rank, job, strategy, program, state, data, comm: Comm, recorder, *,
                 optimizer: FlatOptimizer, shard: int, clock0: float):
        self.rank = rank
        self.job = job
        self.strategy = strategy
        self.program = program
        self.state = state
        self.data = data
        self.comm = comm
        self.rec = recorder
        self.opt = optimizer
        self.shard = shard
        self.clock0 = clock0
        device = getattr(state, "device", None)
        self._cuda = device if device is not None and device.type == "cuda" else None
        self._value = None
        self._done = False
        self._target = None  # (op, record, start) of the Backward autograd is running towards
        self._active: _Record | None = None
        self._records: dict[tuple[int, int], _Record] = {}
        self._act_in: dict[int, deque] = defaultdict(deque)
        self._grad_in: dict[int, deque] = defaultdict(deque)
        self._last_out: dict[int, torch.Tensor] = {}
        self._last_in_grad: dict[int, torch.Tensor] = {}
        self._enc: dict = {}
        self._codec_states: dict = {}
        self._decode_for: dict = {}
        self._msg_data: dict[int, list] = {}
        self._versions: dict[int, int] = {}
        self._cancel: tuple = ()
        self._zeroed_for = -1
        self._anchor = None
        self._shards: dict[tuple[int, int], torch.Tensor] = {}  # ZeRO: reduced gradient parts this rank steps
        self._lock = threading.Lock()
        self._fwd: _Record | None = None  # the record whose forward is running (layer hooks act)
        self._open: _Record | None = None  # the record the next forward op may go on with
        self._cut: list | None = None  # [layer, tensor] where a forward op ended inside the module
        self._deferred = None  # an op the program issued there that must wait for the module to return
        self._grad_at: list | None = None  # [(op, layer), gradient] at a tensor-parallel cut, in its hook
        self._pending_grad: dict[tuple, tuple] = {}  # collectives asked for before their gradient came
        self._partial: dict[tuple, torch.Tensor] = {}  # gradients at a record's bottom, for the collective after
        self._later: dict[tuple, deque] = defaultdict(deque)  # gradient collectives for a backward to come
        self._at_start: dict[int, list] = {}  # collectives of the input of the forward that begins at a layer
        self._ungathered: dict[int, torch.Tensor] = {}  # a unit's input before the gather of its column group
        self._in_grad: tuple = (-1, None)  # (layer, gradient) of the input of the last backward's record
        self._f_views: dict = {}
        self._tp: dict | None = None
        self._recompute = bool(getattr(strategy, "recompute", False))
        self._unit_starts: set[int] = set()
        self.iteration = -1
        self.losses: dict[int, float] = {}
        if state is not None:
            self._layer_counts = [len(ps) for ps in state.layer_params]
            for p in state.param_list:
                p.register_post_accumulate_grad_hook(self._grad_ready)
            for _, mod in state.module.named_modules():
                mod.register_forward_pre_hook(self._check_cancel)
            for i, mod in enumerate(state.layer_modules):
                mod.register_forward_pre_hook(partial(self._pre_hook, i))
                mod.register_forward_hook(partial(self._post_hook, i))
            if hasattr(state.module, "pipeline_units") or isinstance(state.module, torch.nn.Sequential):
                self._unit_starts = set(state.unit_starts())
            comp = getattr(strategy, "compression", None)
            if comp is not None and getattr(strategy, "role", "") == "params":
                self._anchor = state.params.clone()  # compressed local SGD sends the change from here

    def now(self) -> float:
        """Seconds since the run's clock started. On a GPU the device's queued work is waited
        for first, so that a span ends when its kernels have, as on a CPU (where ops are
        synchronous) and as the simulator counts it; without it a span would time the host's
        launches, and a calibration built from spans would be off by the device's queue."""
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)
        return time.monotonic() - self.clock0

    # driving the program
    def run(self) -> None:
        self._drive(None)

    def on_iteration(self, kind: str, i: int) -> None:
        if kind == "start":  # what a tensor-parallel cut kept is an iteration's own
            self._later.clear()
            self._at_start.clear()
            self._ungathered.clear()
            self._partial.clear()
            self.iteration = i
            self.rec.iteration_start(i, self.now())
        else:
            self.rec.iteration_end(i, self.now())

    def _drive(self, inside: str | None) -> None:
        """Run the program until it ends or an op suspends it. ``inside`` is ``"backward"`` or
        ``"forward"`` when called from a hook of a backward or forward in flight."""
        while True:
            if self._deferred is not None and inside is None:
                op, self._deferred = self._deferred, None
            else:
                try:
                    op = self.program.send(self._value)
                except StopIteration:
                    self._done = True
                    return
            self._value = None
            kind = type(op)
            if inside == "forward" and (kind is Backward or kind is Forward and not self._continues(op, self._fwd)
                                        or kind not in (Forward, Collective, Wait)):
                self._deferred = op  # it runs once the module's forward has returned
                return
            if kind is Backward:
                result = self._backward(op, inside == "backward")
            elif kind is Forward:
                if inside == "backward":
                    raise RuntimeError(
                        f"rank {self.rank}: the program started a forward while a backward was in flight "
                        "(a backward must cover the layers its forward ran before the next forward)"
                    )
                result = self._forward(op, inside == "forward")
            else:
                result = self._execute(op)
            if result is _SUSPEND:
                return
            self._value = result

    _HANDLERS = {
        OptimizerStep: "_optimizer_step", Collective: "_collective", Send: "_send",
        Recv: "_recv", RecvAny: "_recv_any", Encode: "_encode", Decode: "_decode", Apply: "_apply",
    }

    def _execute(self, op):
        if type(op) is Wait:
            return self._wait(op.handle)
        name = self._HANDLERS.get(type(op))
        if name is None:
            raise RuntimeError(f"rank {self.rank} yielded {op!r}, which is not an op of strategies.ops")
        return getattr(self, name)(op)

    # compute
    def _check_model_parallel(self, op) -> None:
        if op.tp_group is not None and len(op.tp_group) > 1 and self._tp is None:
            self._tp_setup(op.tp_group, op.sequence_parallel)

    def _tp_setup(self, group, sequence_parallel: bool) -> None:
        """Tensor parallelism: a view at the input of every column group, whose gradient the
        program's backward all-reduce sums (Megatron's ``f``), and the vocabulary-split loss.
        With sequence parallelism the program's all-gather before a column group replaces its
        input instead (no view), and its backward reduce-scatters the gradient."""
        from realrun.tensor_parallel import head_slice
        from strategies.tensor_parallel import comm_points

        roles = self.job.layer_tp
        self._tp = {"group": tuple(group), "starts": set(comm_points(roles, (0, len(roles)))[1]),
                    "sp": bool(sequence_parallel)}
        members = {}
        for i in sorted(self._tp["starts"]):
            j = i
            while j < len(roles) and roles[j] in ("column", "head", "inner"):
                if roles[j] in ("column", "head"):
                    members[j] = i
                j += 1
        self._tp["members"] = members  # column layer -> the first of its group
        head = head_slice(self.state.module)
        if head is not None:  # the output holds the head's vocabulary slice: the loss is the group's
            self.data.vocab_parallel = (*head, self._group_max, self._group_sum)

    def _sync_collective(self, op: str, algorithm: str, group, buf: torch.Tensor, name: str) -> None:
        """``op`` in place on ``buf`` over ``group``, on the group's stream, waited for."""
        it = self.iteration

        def task():
            t0, t1 = self.comm.collective(op, algorithm, group, buf)
            self._comm_span(name, t0, t1, it)

        self.comm.submit(group, task).result()

    def _group_sum(self, t: torch.Tensor) -> torch.Tensor:
        buf = t.detach().reshape(-1).clone()
        self._sync_collective("all_reduce", "ring", self._tp["group"], buf, "all_reduce:loss")
        return buf.view_as(t)

    def _group_max(self, t: torch.Tensor) -> torch.Tensor:
        group = self._tp["group"]
        n, me = t.numel(), group.index(self.rank)
        buf = torch.zeros(n * len(group), dtype=t.dtype, device=t.device)
        buf[me * n:(me + 1) * n] = t.detach().reshape(-1)
        self._sync_collective("all_gather", "ring", group, buf, "all_gather:loss")
        return buf.view(len(group), n).max(dim=0).values.view_as(t)

    def _cancelled(self) -> bool:
        return any(h.is_completed() for h in self._cancel)

    def _check_cancel(self, module, args):
        if self._cancel and self._cancelled():
            raise _Cancelled

    # layer hooks: where a forward op that ends inside a pipeline unit ends
    def _pre_hook(self, i: int, module, args):
        if self._fwd is None:
            return None
        new = None
        tp = self._tp
        x = args[0] if args else None
        if tp is not None and i in tp["members"] and isinstance(x, torch.Tensor):
            view = self._f_views.get(id(x))
            if tp["sp"]:  # a later member of a group: the input the first one's all-gather made
                if view is not None and view[2] is x and view[0] == tp["members"][i] != i:
                    new = (view[1], *args[1:])
            elif torch.is_grad_enabled() and x.requires_grad:
                if view is None or i in tp["starts"] and view[0] != i:
                    view = (i, x.view_as(x), x)  # x kept alive: its id is not reused meanwhile
                    view[1].register_hook(lambda g, i=i: self._tp_grad(i, g))
                    self._f_views[id(x)] = view
                    self._f_views[id(view[1])] = view
                new = (view[1], *args[1:])
        out = self._at_cut(i, (new or args)[0] if args else None)
        if out is not None and args and out is not (new or args)[0]:
            if tp is not None and tp["sp"]:
                self._f_views[id(x)] = (i, out, x)  # x kept alive: its id is not reused meanwhile
            new = (out, *(new or args)[1:])
        return new

    def _post_hook(self, i: int, module, args, output):
        if self._fwd is None:
            return None
        out = self._at_cut(i + 1, output)
        return out if out is not output else None

    def _at_cut(self, cut: int, tensor):
        """A layer hook reached ``cut``: if the forward op in flight ends here, it is done, and the
        program goes on from here until its next forward; collectives it issues meanwhile work on
        ``tensor`` (answered back to the module)."""
        rec = self._fwd
        if rec is None or rec.seg[1] != cut or rec.target is None or cut == self.state.num_layers:
            return tensor
        self._piece_done(rec)
        self._cut = [cut, tensor]
        self._value = True
        self._drive("forward")
        out = self._cut[1]
        self._cut = None
        return out

    def _continues(self, op: Forward, rec: _Record | None) -> bool:
        """Whether forward ``op`` goes on with ``rec``'s forward (the same graph): the same
        micro-batch and iteration, from where it stopped, and no activation received for it."""
        return (rec is not None and op.micro_batch == rec.mb and op.segment[0] == rec.seg[1]
                and op.recompute == rec.recompute and rec.iteration == self.iteration
                and rec.seg[1] < self.state.num_layers and not op.cancel_on and not self._act_in[op.segment[0]])

    def _piece_done(self, rec: _Record) -> None:
        op, rec.target = rec.target, None
        end = self.now()
        a, b = op.segment
        kind = "recompute" if rec.recompute else "forward"
        self.rec.span("compute", f"{kind}[{a}:{b}]", rec.start, end, rec.iteration)
        self.rec.compute(end - rec.start)

    def _extend(self, rec: _Record, op: Forward) -> None:
        a, b = op.segment
        counts = self._layer_counts
        for i in range(rec.seg[1], b):
            if counts[i]:
                rec.left[i] = counts[i]
        rec.seg = (rec.seg[0], b)
        rec.target = op
        rec.start = self.now()

    def _forward(self, op: Forward, inside: bool = False):
        self._check_model_parallel(op)
        if inside:  # from a layer hook: the forward in flight goes on
            self._extend(self._fwd, op)
            return _SUSPEND
        state = self.state
        it = self.iteration
        if it != self._zeroed_for:  # gradients accumulate over an iteration's micro-batches
            state.zero_grads()
            self._zeroed_for = it
        a, b = op.segment
        n = state.num_layers
        size = self.job.samples(self.rank)
        lo = op.micro_batch * op.samples
        if op.cancel_on and any(h.is_completed() for h in op.cancel_on):
            return False
        begun = self.now()  # a forward's span includes making its input (the data, for the first layer)
        rec = self._open if self._continues(op, self._open) else self._new_record(op, size, lo)
        self._open = None
        self._extend(rec, op)
        rec.start = begun
        self._fwd = rec
        self._cancel = op.cancel_on
        self._f_views = {}
        try:
            with torch.no_grad() if rec.saved is not None else nullcontext(), self._rng(rec):
                out = self._run_units(rec, rec.out)
            if rec.seg[1] == n:
                loss = self.data.loss(out, self.shard, it, size, lo, lo + op.samples)
                if not rec.recompute:
                    self.losses[it] = self.losses.get(it, 0.0) + float(loss) * op.samples / size
                rec.root = loss * (op.samples / size)
            else:
                rec.root = out
        except _Cancelled:
            self.rec.span("compute", f"forward[{a}:{rec.seg[1]}] (cancelled)", rec.start, self.now(), it)
            self._records.pop(rec.key, None)
            return False
        finally:
            self._fwd = None
            self._cancel = ()
            self._f_views = {}
        rec.out = out
        self._open = rec
        if rec.seg[1] < n and not rec.recompute:
            self._last_out[rec.seg[1]] = out.detach()
        if rec.target is not None:  # else a layer hook ended it, and the program went on from there
            self._piece_done(rec)
        self.rec.samples(counted_samples(op, self.rank))
        return True

    def _new_record(self, op: Forward, size: int, lo: int) -> _Record:
        a = op.segment[0]
        it = self.iteration
        if op.recompute:  # a checkpointed unit, again: from the input its first forward kept
            parent = next((r for r in self._records.values() if r.mb == op.micro_batch and r.saved is not None
                           and r.seg[0] <= a < r.seg[1]), None)
            if parent is None or a not in parent.saved:
                raise RuntimeError(f"rank {self.rank}: recompute of layers from {a} (micro-batch {op.micro_batch}) "
                                   "without a checkpointed forward that kept its input; a recompute unit must "
                                   f"begin where one of the model's pipeline units does ({self._unit_list()})")
            x, rng = parent.saved.pop(a)
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                x = x.detach().requires_grad_(True)
            rec = _Record(op.micro_batch, (a, a), x, it, (op.micro_batch, a, "recompute"), True, parent)
            rec.rng = rng
        else:
            if a == 0:
                x = self.data.inputs(self.shard, it, size, lo, lo + op.samples)
            else:
                queue = self._act_in[a]
                if not queue:
                    raise RuntimeError(f"rank {self.rank}: forward of layers {op.segment} without a received activation")
                x = queue.popleft()
            rec = _Record(op.micro_batch, (a, a), x, it, (op.micro_batch, a))
            if self._recompute:
                rec.saved = {}
        start = self._at_start.pop(a, ())
        if start and rec.saved is not None:
            self._ungathered[a] = rec.x  # the unit's recompute gathers it again
        for fn in start:  # collectives the program issued on this input (a column group's gather)
            with torch.no_grad() if rec.saved is not None else nullcontext():
                rec.out = fn(rec.out)
        self._records[rec.key] = rec
        return rec

    @contextmanager
    def _rng(self, rec: _Record):
        """A recompute draws the random numbers (dropout) its unit's first forward drew, from the
        state kept then, apart from the run's own stream (as ``torch.utils.checkpoint`` does)."""
        if not rec.recompute:
            yield
            return
        cuda = [self.state.device] if self.state.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            cpu, gpu = rec.rng
            torch.set_rng_state(cpu)
            if gpu is not None:
                torch.cuda.set_rng_state(gpu, self.state.device)
            yield
            rec.rng = self._rng_state()

    def _rng_state(self):
        gpu = torch.cuda.get_rng_state(self.state.device) if self.state.device.type == "cuda" else None
        return torch.get_rng_state(), gpu

    def _unit_list(self) -> str:
        return ", ".join(str(u) for u in sorted(self._unit_starts)[:8])

    def _run_units(self, rec: _Record, x):
        """Run the model from layer ``rec.seg[0]`` (or where the record's forward stopped) until the
        forward op in flight ends, at a pipeline unit's boundary; hooks end ops inside units."""
        state = self.state
        n = state.num_layers
        pos = rec.target.segment[0]
        if pos == 0 and rec.saved is None and (rec.seg[1] == n or not self._unit_starts):
            x = state.module(x)  # the whole model; layer hooks end the ops inside it
            if rec.seg[1] != n:
                raise RuntimeError(f"rank {self.rank}: the forward op of layers {rec.target.segment} did not end "
                                   "where a layer of the model began or ended")
            return x
        if not self._unit_starts:
            raise ValueError(f"realrun: {type(state.module).__name__} cannot be cut into pipeline units (give it "
                             "pipeline_units() or make it an nn.Sequential), which activation recomputation "
                             "and forwards from a layer other than the first need")
        units = state.units()
        k = next((j for j, (_, _, (u0, _)) in enumerate(units) if u0 == pos), None)
        if k is None:
            raise ValueError(
                f"realrun: a forward from layer {pos} does not start between the model's pipeline units; "
                f"stages may begin at layers {state.unit_starts()[:-1]} (give the strategy boundaries among them)")
        while k < len(units):
            _, fn, (u0, u1) = units[k]
            end = rec.seg[1]
            if not (u0 < end or u0 == u1 == end == n):
                break
            if rec.saved is not None and u0 not in rec.saved:
                kept = self._ungathered.pop(u0, x)
                rec.saved[u0] = (kept.detach() if isinstance(kept, torch.Tensor) else kept, self._rng_state())
            x = fn(x)
            pos = u1
            k += 1
        if pos != rec.seg[1]:
            raise ValueError(
                f"realrun: a forward of layers [{rec.seg[0]}, {rec.seg[1]}) ends inside a pipeline unit of the model, "
                f"which ran on to layer {pos}; stages may end at layers {state.unit_starts()[1:]} (give the "
                "strategy boundaries among them)")
        return x

    def _record_for(self, op: Backward) -> _Record:
        a, b = op.segment
        found = None
        for rec in self._records.values():
            if rec.mb == op.micro_batch and rec.seg[0] <= a and b <= rec.seg[1] and rec.saved is None:
                if found is None or rec.recompute:
                    found = rec
        if found is None:
            raise RuntimeError(f"rank {self.rank}: backward of layers [{a}, {b}), micro-batch {op.micro_batch}, "
                               "without its forward (or, with recomputation, without its recompute)")
        return found

    def _ready(self, rec: _Record, seg) -> bool:
        left = rec.left
        return all(left.get(i, 0) == 0 for i in range(*seg))

    def _backward(self, op: Backward, inside: bool):
        self._check_model_parallel(op)
        rec = self._record_for(op)
        start = self.now()
        bottom = op.segment[0] <= rec.seg[0]
        if rec.state == "running":
            if not bottom and self._ready(rec, op.segment):
                self._backward_span(op, start)
                return True
            self._target = (op, rec, start)
            return _SUSPEND
        if rec.state == "done":
            self._backward_span(op, start)
            return True
        if inside:
            raise RuntimeError(f"rank {self.rank}: a second backward began while one was in flight")
        if self._open is rec:
            self._open = None
        grad = self._output_grad(rec)
        self._target = (op, rec, start)
        self._active = rec
        rec.state = "running"
        self._cancel = op.cancel_on
        cancelled = False
        try:
            torch.autograd.backward(rec.root, grad)
        except _Cancelled:
            cancelled = True
        finally:
            self._active = None
            self._cancel = ()
        rec.state = "done"
        del self._records[rec.key]
        self._pending_grad.clear()
        x_grad = rec.x.grad if isinstance(rec.x, torch.Tensor) and rec.x.requires_grad else None
        self._in_grad = (rec.seg[0], x_grad)
        parent = rec.parent
        if parent is not None and rec.seg[0] > parent.seg[0]:
            parent.grads[rec.seg[0]] = x_grad  # the output gradient of the unit below
        else:
            if parent is not None:
                self._records.pop(parent.key, None)
            if x_grad is not None:
                self._last_in_grad[rec.seg[0]] = x_grad
        target, self._target = self._target, None
        if cancelled:
            self.state.zero_grads()
            op2, _, t0 = target if target is not None else (op, rec, start)
            self.rec.span("compute", f"backward[{op2.segment[0]}:{op2.segment[1]}] (cancelled)", t0, self.now(),
                          self.iteration)
            return False
        if target is not None:
            self._backward_span(target[0], target[2])
        return True

    def _output_grad(self, rec: _Record):
        """The gradient backward starts from: none at the loss, the unit above's input gradient
        for a recomputed unit, else what the next stage sent."""
        top = rec.parent.seg[1] if rec.parent is not None else rec.seg[1]
        if rec.seg[1] < top:
            grad = rec.parent.grads.pop(rec.seg[1], None)
            if grad is None:
                raise RuntimeError(f"rank {self.rank}: backward of recomputed layers {rec.seg} before the "
                                   f"layers above them ({rec.seg[1]} on)")
            return grad
        if top < self.state.num_layers:
            start = rec.parent.seg[0] if rec.parent is not None else rec.seg[0]
            queue = self._grad_in[start]
            if not queue:
                raise RuntimeError(f"rank {self.rank}: backward of layers {rec.seg} without a received gradient")
            return queue.popleft()
        return None

    def _backward_span(self, op, start) -> None:
        end = self.now()
        self.rec.span("compute", f"backward[{op.segment[0]}:{op.segment[1]}]", start, end, self.iteration)
        self.rec.compute(end - start)

    def _grad_ready(self, p) -> None:
        rec = self._active
        if rec is None:
            return
        i = self.state.layer_of[id(p)]
        if i in rec.left:
            rec.left[i] -= 1
        if self._cancel and self._cancelled():
            raise _Cancelled
        target = self._target
        if target is None or target[1] is not rec:
            return
        op, _, start = target
        if op.segment[0] > rec.seg[0] and self._ready(rec, op.segment):
            self._target = None
            self._backward_span(op, start)
            self._value = True
            self._drive("backward")

    def _tp_grad(self, i: int, grad: torch.Tensor):
        """The gradient of column group ``i``'s input (each rank's part of the sum) is complete."""
        rec = self._active
        if rec is None:
            return None
        if i <= rec.seg[0] and ("all_reduce", i) not in self._pending_grad:
            # the bottom of the record: fixed on the input's gradient afterwards
            self._partial[("all_reduce", i)] = grad.detach().clone()
            return None
        return self._grad_collective(("all_reduce", i), i, grad)

    def _seq_grad(self, key, shape, grad: torch.Tensor) -> torch.Tensor:
        """Sequence parallelism: the gradient at a reduce-scatter's output (``key`` is
        ``("all_gather", i)``, after row layer ``i``) or at an all-gather's (``("reduce_scatter",
        i)``, column group ``i``'s input) is complete; the program's collective makes the
        gradient of the other side (of ``shape``). At a record's bottom the program asks for it
        after the backward: zeros flow on, and the result is added to the input's gradient then."""
        rec = self._active
        cut = key[1] + 1 if key[0] == "all_gather" else key[1]
        if rec is None:
            raise RuntimeError(f"rank {self.rank}: a gradient at tensor-parallel layer {key[1]} outside a backward")
        if cut <= rec.seg[0] and key not in self._pending_grad:
            self._partial[key] = grad.detach().clone()
            return grad.new_zeros(shape)
        return self._grad_collective(key, cut, grad)

    def _grad_collective(self, key, cut: int, grad: torch.Tensor) -> torch.Tensor:
        """The program's backward reaches ``cut``, where ``grad`` is complete: its collective
        ``key`` there works on it (done now if the program asked for it already)."""
        pending = self._pending_grad.pop(key, None)
        if pending is None and self._later[key]:
            pending = self._later[key].popleft()
        if pending is not None:  # the program asked already (its backward op ended on a parameter, or
            return self._group_op(*pending, grad)  # the gradient is the top one of this backward)
        rec, target = self._active, self._target
        if target is None or target[1] is not rec or target[0].segment[0] != cut or not self._ready(
                rec, target[0].segment):
            raise RuntimeError(f"rank {self.rank}: the gradient at tensor-parallel layer {key[1]} was complete "
                               "before the program's backward reached it")
        self._target = None
        self._backward_span(target[0], target[2])
        self._grad_at = [key, grad]
        self._value = True
        self._drive("backward")
        out = self._grad_at[1]
        self._grad_at = None
        return out

    def _optimizer_step(self, op: OptimizerStep):
        start = self.now()
        a, b = self.state.span(op.layers, None)
        with self._lock:
            mine = sorted(r for r in self._shards if a <= r[0] and r[1] <= b)
            parts = [(r, self._shards.pop(r)) for r in mine]
        if parts:  # ZeRO: step the parts reduce-scatter left here
            for (x, y), grad in parts:
                self.opt.step((x, y), self.state.params[x:y], grad)
        elif op.fraction < 1.0 and self._tp is None and b > a:
            raise ValueError("realrun: a sharded optimizer step (fraction < 1) without reduce-scattered gradients")
        else:  # the whole range this rank holds (with tensor parallelism, its slices)
            self.opt.step((a, b), self.state.params[a:b], self.state.grads[a:b])
        end = self.now()
        self.rec.span("compute", "optimizer_step", start, end, self.iteration)
        self.rec.compute(end - start)

    # tensors named by ops
    def _key(self, tensor):
        return tensor.layers, tensor.elements

    def _flat(self, tensor, which: str) -> torch.Tensor:
        if tensor.only:
            raise ValueError(f"realrun moves the scattered layers of {tensor.name} (TensorRef.only) with "
                             "all_reduce or broadcast only")
        a, b = self.state.span(tensor.layers, tensor.elements)
        return (self.state.grads if which == "grads" else self.state.params)[a:b]

    def _wire_dtype(self, tensor, numel: int):
        if numel and tensor.nbytes and round(tensor.nbytes / numel) == 2:
            return torch.bfloat16 if self.job.param_dtype == "bf16" else torch.float16
        return torch.float32

    def _grad_tensors(self, tensor) -> list[torch.Tensor]:
        """The gradient (or parameter) tensors a compressor works on: each parameter's, when the
        ref is whole layers, so matrix shapes are kept; else one flat slice."""
        which = "params" if tensor.role == "params" else "grads"
        if tensor.elements is None and tensor.layers is not None:
            a, b = tensor.layers
            ps = [p for i in range(a, b) for p in self.state.layer_params[i]]
            return [p.grad if which == "grads" else p.data for p in ps]
        return [self._flat(tensor, which)]

    # compression
    def _codec_state(self, key, comp) -> dict:
        st = self._codec_states.get((key, comp.name))
        if st is None:
            st = self._codec_states[(key, comp.name)] = {"rank": self.rank, "step": 0}
        return st

    def _encode(self, op: Encode):
        start = self.now()
        comp, key = op.compressor, self._key(op.tensor)
        st = self._codec_state(key, comp)
        tensors = self._grad_tensors(op.tensor)
        if op.tensor.role == "params":  # local SGD: the change since the last average
            a, b = self.state.span(op.tensor.layers, op.tensor.elements)
            tensors = [self.state.params[a:b] - self._anchor[a:b]]
        entry = self._enc.get(key)
        received = None
        if op.round > 0:
            if entry is None or entry["round"] != op.round - 1:
                raise RuntimeError(f"rank {self.rank}: round {op.round} of {comp.name} before round {op.round - 1}")
            received = self._received(entry)
        payload = codecs.encode(comp, op.round, tensors, st, received)
        self._enc[key] = {"payload": payload, "cursor": 0, "round": op.round, "comp": comp, "tensors": tensors,
                          "results": [None] * len(payload), "p": 1}
        end = self.now()
        self.rec.span("compute", f"encode[{op.tensor.name}]", start, end, self.iteration)
        self.rec.compute(end - start)

    @staticmethod
    def _received(entry):
        return entry["results"] if entry["comp"].summable else entry["gathered"]

    def _decode(self, op: Decode):
        key = self._key(op.tensor)
        entry = self._enc.get(key)
        if entry is None:  # a server: the payloads come with the messages Apply gets
            self._decode_for[key] = op.compressor
            return None
        for h in entry.get("handles", ()):  # the program waited already; this only guards the order
            h.wait()
        start = self.now()
        comp = op.compressor
        st = self._codec_state(key, comp)
        out = codecs.decode(comp, self._received(entry), entry["tensors"], st, entry["p"])
        if op.tensor.role == "params":
            a, b = self.state.span(op.tensor.layers, op.tensor.elements)
            self._anchor[a:b].add_(out[0].reshape(-1))
            self.state.params[a:b].copy_(self._anchor[a:b])
        else:
            with torch.no_grad():
                for dst, src in zip(entry["tensors"], out, strict=True):
                    dst.copy_(src)
        del self._enc[key]
        end = self.now()
        self.rec.span("compute", f"decode[{op.tensor.name}]", start, end, self.iteration)
        self.rec.compute(end - start)

    # collectives
    def _collective(self, op: Collective):
        group = op.group if op.group is not None else tuple(range(self.job.world_size))
        if self.rank not in group:
            raise RuntimeError(f"rank {self.rank} issued {op.op} on group {group[:16]} it is not in")
        role, name, it = op.tensor.role, f"{op.op}:{op.tensor.name}", self.iteration
        node_of = [self.job.node_of[r] for r in group] if op.algorithm == "hierarchical" else None
        comm = self.comm
        if role == "grads" and op.op == "reduce_scatter":  # ZeRO: this rank keeps its part, summed
            buf = self._flat(op.tensor, "grads")
            lo, _ = self.state.span(op.tensor.layers, op.tensor.elements)
            grads = buf.clone()  # later micro-batches accumulate into the buffer meanwhile
            buf.zero_()
            scale = self._weight("grads", group)
            me = group.index(self.rank)

            def task():
                grads.mul_(scale)
                t0, t1 = comm.collective("reduce_scatter", op.algorithm, group, grads, 0, node_of)
                part = torch.tensor_split(grads, len(group))[me]
                a = lo + sum(c.numel() for c in torch.tensor_split(grads, len(group))[:me])
                with self._lock:
                    acc = self._shards.get((a, a + part.numel()))
                    self._shards[(a, a + part.numel())] = part.clone() if acc is None else acc.add_(part)
                self._comm_span(name, t0, t1, it)
        elif role == "params" and op.op == "all_gather":  # ZeRO: every rank's updated part, to everyone
            buf = self._flat(op.tensor, "params")

            def task():
                t0, t1 = comm.collective("all_gather", op.algorithm, group, buf, 0, node_of)
                self._comm_span(name, t0, t1, it)
        elif role in ("grads", "params"):
            if op.op not in ("all_reduce", "broadcast"):
                raise ValueError(f"realrun does not run {op.op} of {role}")
            scale = self._weight(role, group) if op.op == "all_reduce" else 1.0
            flat = self.state.grads if role == "grads" else self.state.params
            spans = [self.state.span((i, i + 1), None) for i in op.tensor.only] if op.tensor.only else None
            buf = torch.cat([flat[a:b] for a, b in spans]) if spans else self._flat(op.tensor, role)

            def task():
                if scale != 1.0:
                    buf.mul_(scale)
                t0, t1 = comm.collective(op.op, op.algorithm, group, buf, op.root, node_of)
                if spans:  # back into the layers' places
                    at = 0
                    for a, b in spans:
                        flat[a:b].copy_(buf[at:at + b - a])
                        at += b - a
                self._comm_span(name, t0, t1, it)
        elif role == "payload":
            entry = self._enc.get(self._key(op.tensor))
            if entry is None:
                raise RuntimeError(f"rank {self.rank}: {op.op} of payload {op.tensor.name} before its encode")
            j = entry["cursor"]
            entry["p"] = len(group)
            if op.op == "all_reduce":  # one collective per payload tensor, summed
                entry["cursor"] = j + 1
                payload = entry["payload"][j]

                def task(entry=entry, j=j, payload=payload):
                    buf = payload.clone()
                    t0, t1 = comm.collective("all_reduce", op.algorithm, group, buf, 0, node_of)
                    entry["results"][j] = buf
                    self._comm_span(name, t0, t1, it)
            elif op.op == "all_gather":  # one collective gathers every payload tensor, as bytes
                entry["cursor"] = len(entry["payload"])
                payload = list(entry["payload"][j:])

                def task(entry=entry, payload=payload):
                    raw = torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in payload])
                    size, p = raw.numel(), len(group)
                    buf = torch.empty(size * p, dtype=torch.uint8, device=raw.device)
                    me = group.index(self.rank)
                    buf[me * size:(me + 1) * size] = raw
                    t0, t1 = comm.collective("all_gather", op.algorithm, group, buf, 0, node_of)
                    entry["gathered"] = [_split_like(buf[r * size:(r + 1) * size], payload) for r in range(p)]
                    self._comm_span(name, t0, t1, it)
            else:
                raise ValueError(f"realrun: {op.op} of a compressed payload is not defined")
        elif role in ("activations", "activation_grads"):
            return self._activation_collective(op, group)
        elif role == "custom":
            buf = torch.zeros(int(op.tensor.nbytes), dtype=torch.uint8)

            def task():
                t0, t1 = comm.collective(op.op, op.algorithm, group, buf, op.root, node_of)
                self._comm_span(name, t0, t1, it)
        else:
            raise ValueError(f"realrun does not run collectives of {role}")
        future = comm.submit(group, task)
        handle = Handle(future)
        if role == "payload":
            entry.setdefault("handles", []).append(handle)
        if op.async_op:
            return handle
        handle.wait()
        return None

    def _activation_collective(self, op: Collective, group):
        """Tensor parallelism. ``activations``: an all-reduce (or, with sequence parallelism, a
        reduce-scatter) of the output of layer ``layers[0]``, at the cut after it, or an
        all-gather of the input of column group ``layers[0]``, at the cut before it.
        ``activation_grads``: the collective of the gradient there (all-reduce or
        reduce-scatter of a column group's input gradient, all-gather of a row layer's output
        gradient). It works on the tensor at the cut: in a layer hook, or the record's output
        between pipeline units; a gradient whose hook has not come yet is done when it comes
        (nothing else can use it before)."""
        if op.op not in ("all_reduce", "reduce_scatter", "all_gather"):
            raise ValueError(f"realrun runs tensor-parallel activations with all_reduce, reduce_scatter or "
                             f"all_gather, not {op.op}")
        i = op.tensor.layers[0] if op.tensor.layers else -1
        gather = op.op == "all_gather"
        if op.tensor.role == "activations":
            cut = i if gather else i + 1
            if op.op == "all_reduce":
                fn = partial(self._reduce_activation, op, group)
            else:  # its backward is the program's collective of the gradient there, the other of the pair
                fn = partial(self._seq_activation, op, group, ("reduce_scatter" if gather else "all_gather", i))
            if self._cut is not None and self._cut[0] == cut:
                if gather and self._fwd is not None and self._fwd.saved is not None and cut in self._unit_starts:
                    self._ungathered[cut] = self._cut[1]  # a recompute of the unit gathers it again
                self._cut[1] = fn(self._cut[1])
                return None
            rec = self._open
            if (rec is None or rec.seg[1] != cut) and gather:  # the input of the forward that begins here
                self._at_start.setdefault(cut, []).append(fn)
                return None
            if rec is None or rec.seg[1] != cut:
                raise RuntimeError(f"rank {self.rank}: {op.op} of the output of layer {i}, but no forward has "
                                   "just ended after that layer")
            rec.out = fn(rec.out)
            if rec.root is not None and rec.seg[1] < self.state.num_layers:
                rec.root = rec.out
            if rec.seg[1] in self._last_out:
                self._last_out[rec.seg[1]] = rec.out.detach()
            return None
        key = (op.op, i)
        cut = i + 1 if gather else i
        if self._grad_at is not None and self._grad_at[0] == key:
            self._grad_at[1] = self._group_op(op, group, self._grad_at[1])
            return None
        rec = self._active
        if rec is not None and cut > rec.seg[0]:  # its gradient is still to come in this backward
            self._pending_grad[key] = (op, group)
            return None
        part = self._partial.pop(key, None)
        if part is None and gather:
            # a row layer's output gradient, at the top of a backward still to come (a stage's, or a
            # recomputed unit's): done when that backward reaches it
            self._later[key].append((op, group))
            return None
        if part is None:  # no gradient flows there (the model's input): the bytes move all the same
            buf = torch.zeros(max(len(group), int(op.tensor.nbytes) // 4 // len(group) * len(group)))
            self._sync_collective(op.op, op.algorithm, group, buf, f"{op.op}:{op.tensor.name}")
            return None
        at, grad = self._in_grad
        if at != cut or grad is None:
            raise RuntimeError(f"rank {self.rank}: {op.op} of the gradient at layer {cut}, whose backward "
                               "was not the last one to end")
        if op.op == "all_reduce":  # this rank's part flowed on already
            grad.add_(self._reduce_tensor(op, group, part) - part)
        else:  # zeros flowed on
            grad.add_(self._group_op(op, group, part))
        return None

    def _reduce_tensor(self, op: Collective, group, tensor: torch.Tensor) -> torch.Tensor:
        buf = tensor.detach().contiguous().view(-1).clone()
        self._sync_collective("all_reduce", op.algorithm, group, buf, f"{op.op}:{op.tensor.name}")
        return buf.view_as(tensor)

    def _reduce_activation(self, op: Collective, group, tensor: torch.Tensor) -> torch.Tensor:
        value = self._reduce_tensor(op, group, tensor)
        return _Replace.apply(tensor, value) if tensor.requires_grad else value

    def _seq_activation(self, op: Collective, group, key, tensor: torch.Tensor) -> torch.Tensor:
        back = partial(self._seq_grad, key, tensor.shape)
        return _Through.apply(tensor, partial(self._group_op, op, group), back)

    def _group_op(self, op: Collective, group, tensor: torch.Tensor) -> torch.Tensor:
        """``op`` over ``group`` on a batch-first tensor: an all-reduce, or a reduce-scatter /
        all-gather along the sequence (dimension 1), rank ``r`` of the group keeping slice ``r``."""
        if op.op == "all_reduce":
            return self._reduce_tensor(op, group, tensor)
        t, me = len(group), group.index(self.rank)
        name = f"{op.op}:{op.tensor.name}"
        if tensor.dim() < 2:
            raise ValueError(f"realrun: sequence parallelism needs batch-first activations (batch, sequence, ...), "
                             f"got shape {tuple(tensor.shape)} at {op.tensor.name}")
        seq_first = tensor.detach().transpose(0, 1)  # slices of the sequence are then contiguous
        if op.op == "reduce_scatter":
            s = seq_first.shape[0]
            if s % t:
                raise ValueError(f"realrun: sequence parallelism splits the sequence of {s} tokens {t} ways; "
                                 f"choose seq_len divisible by tp={t}")
            buf = seq_first.contiguous().view(-1).clone()
            self._sync_collective("reduce_scatter", op.algorithm, group, buf, name)
            part = torch.tensor_split(buf, t)[me].view(s // t, *seq_first.shape[1:])
            return part.transpose(0, 1).contiguous()
        part = seq_first.contiguous().view(-1)
        buf = torch.zeros(part.numel() * t, dtype=part.dtype, device=part.device)
        buf[me * part.numel():(me + 1) * part.numel()] = part
        self._sync_collective("all_gather", op.algorithm, group, buf, name)
        return buf.view(t * seq_first.shape[0], *seq_first.shape[1:]).transpose(0, 1).contiguous()

    def _weight(self, role: str, group) -> float:
        job = self.job
        if role == "grads":  # a mean over the batches the group's ranks train on
            shard_of = getattr(self.strategy, "data_shard", None)
            if callable(shard_of):  # ranks on one batch (a tensor-parallel group) hold parts of one sum
                sizes = list({shard_of(job, r): job.samples(r) for r in group}.values())
            else:
                sizes = [job.samples(r) for r in group]
            return job.samples(self.rank) / sum(sizes) if sum(sizes) else 1.0 / len(group)
        weight = getattr(self.strategy, "weight", None)
        return float(weight(job, self.rank)) if callable(weight) else 1.0 / len(group)

    def _comm_span(self, name, t0, t1, it) -> None:
        self.rec.span("comm", name, t0 - self.clock0, t1 - self.clock0, it)
        self.rec.comm(t1 - t0)

    def _wait(self, handle):
        if not isinstance(handle, Handle):
            raise RuntimeError(f"rank {self.rank} waited on {handle!r}, which no async op returned")
        return handle.wait()

    # point-to-point
    def _payload_of(self, tensor, asynchronous: bool) -> list[torch.Tensor]:
        role = tensor.role
        if role in ("grads", "params"):
            flat = self._flat(tensor, role)
            dtype = self._wire_dtype(tensor, flat.numel())
            t = flat.to(dtype) if dtype != flat.dtype else (flat.clone() if asynchronous else flat)
            return [t]
        if role == "payload":
            entry = self._enc.get(self._key(tensor))
            if entry is None:
                raise RuntimeError(f"rank {self.rank}: sent payload {tensor.name} before its encode")
            return list(entry["payload"])
        if role == "activations":
            return [self._last_out.pop(tensor.layers[1])]
        if role == "activation_grads":
            return [self._last_in_grad.pop(tensor.layers[0])]
        return [torch.zeros(int(tensor.nbytes), dtype=torch.uint8)] if tensor.nbytes else []

    def _send(self, op: Send):
        if not 0 <= op.dst < self.job.world_size or op.dst == self.rank:
            raise RuntimeError(f"rank {self.rank} sends to rank {op.dst}: not another rank")
        start = self.now()
        works = self.comm.isend(op.dst, self._payload_of(op.tensor, op.async_op), op.meta, op.tag)
        name, it = f"send:{op.tensor.name}->{op.dst}", self.iteration

        def finish():
            self.rec.span("comm", name, start, self.now(), it)
            return None

        handle = Handle(works=works, finish=finish)
        if op.async_op:
            return handle
        handle.wait()
        return None

    def _deliver(self, tensor, src, meta, tensors, tag) -> Message:
        role = tensor.role
        msg = Message(src, tensor, tag, meta or None, self.now())
        if role == "params" and tensors and self.state is not None and self.rank < self.job.accelerators:
            self._flat(tensor, "params").copy_(tensors[0].reshape(-1))
        elif role == "activations":
            self._act_in[tensor.layers[0]].append(tensors[0].detach().float().requires_grad_(True))
        elif role == "activation_grads":
            self._grad_in[tensor.layers[0]].append(tensors[0])
        elif tensors:
            self._msg_data[id(msg)] = tensors
        return msg

    def _recv(self, op: Recv):
        if op.async_op:
            header, work = self.comm.irecv_header(op.src, op.tag)

            def finish():
                src, meta, tensors = self.comm.finish_recv(op.src, header, op.tag)
                return self._deliver(op.tensor, src, meta, tensors, op.tag)

            return Handle(works=[work], finish=finish)
        start = self.now()
        src, meta, tensors = self.comm.recv(op.src, op.tag)
        self.rec.comm(self.now() - start)
        return self._deliver(op.tensor, src, meta, tensors, op.tag)

    def _recv_any(self, op: RecvAny):
        src, meta, tensors = self.comm.recv(None, op.tag)
        return self._deliver(op.tensor, src, meta, tensors, op.tag)

    # bookkeeping
    def _apply(self, op: Apply):
        start = self.now()
        key = self._key(op.tensor)
        a, b = self.state.span(op.tensor.layers, op.tensor.elements)
        datas = [self._msg_data.pop(id(m), None) for m in op.grads]
        for m in op.dropped:
            self._msg_data.pop(id(m), None)
        if op.grads:
            if any(d is None for d in datas):
                raise RuntimeError(f"rank {self.rank}: applied a gradient message that carried no tensor")
            comp = self._decode_for.pop(key, None)
            if comp is not None:
                grad = self._decode_messages(comp, key, datas, b - a)
            else:
                weights = [float(m.get("samples", 1.0) or 1.0) for m in op.grads]
                total = sum(weights)
                grad = torch.zeros(b - a, dtype=torch.float32)
                for w, d in zip(weights, datas, strict=True):
                    grad.add_(d[0].reshape(-1).float(), alpha=w / total)
            self.opt.step(("shard", op.shard), self.state.params[a:b], grad)
            self.rec.span("compute", f"apply[shard {op.shard}]", start, self.now(), self.iteration)
        version = self._versions.get(op.shard, 0)
        now = self.now()
        for applied, messages in ((True, op.grads), (False, op.dropped)):
            for m in messages:
                read = m.get("version")
                if read is None:
                    raise RuntimeError(f"rank {self.rank} applied a gradient from rank {m.src} without a 'version'")
                self.rec.update((m.src, self.rank, op.shard, int(m.get("clock", -1)), int(m.get("samples", 0)),
                                 int(read), version, version - int(read), float(m.get("read_time", math.nan)),
                                 now, applied))
        if op.grads:
            version += 1
            self._versions[op.shard] = version
        return version

    def _decode_messages(self, comp, key, datas, n: int) -> torch.Tensor:
        st = self._codec_state(key, comp)
        template = [torch.zeros(n, dtype=torch.float32)]
        if comp.summable:
            received = [sum(d[j].float() for d in datas).to(datas[0][j].dtype) for j in range(len(datas[0]))]
        else:
            received = datas
        return codecs.decode(comp, received, template, st, len(datas))[0]


def _split_like(raw: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Bytes ``raw`` cut back into tensors shaped and typed as ``like``."""
    from realrun.comm import split_payload

    return split_payload(raw, [(t.dtype, tuple(t.shape)) for t in like])


def format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))
