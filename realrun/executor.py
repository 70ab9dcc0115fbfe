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
    """A micro-batch's forward through a segment, kept until its backward is done."""

    __slots__ = ("mb", "seg", "x", "out", "root", "left", "state", "iteration")

    def __init__(self, mb, seg, x, out, root, left, iteration):
        self.mb, self.seg, self.x, self.out, self.root = mb, seg, x, out, root
        self.left = left
        self.state = "forward"
        self.iteration = iteration


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
        self.iteration = -1
        self.losses: dict[int, float] = {}
        if state is not None:
            self._layer_counts = [len(ps) for ps in state.layer_params]
            for p in state.param_list:
                p.register_post_accumulate_grad_hook(self._grad_ready)
            for _, mod in state.module.named_modules():
                mod.register_forward_pre_hook(self._check_cancel)
            comp = getattr(strategy, "compression", None)
            if comp is not None and getattr(strategy, "role", "") == "params":
                self._anchor = state.params.clone()  # compressed local SGD sends the change from here

    def now(self) -> float:
        return time.monotonic() - self.clock0

    # driving the program
    def run(self) -> None:
        self._drive(inside=False)

    def on_iteration(self, kind: str, i: int) -> None:
        if kind == "start":
            self.iteration = i
            self.rec.iteration_start(i, self.now())
        else:
            self.rec.iteration_end(i, self.now())

    def _drive(self, inside: bool) -> None:
        while True:
            try:
                op = self.program.send(self._value)
            except StopIteration:
                self._done = True
                return
            self._value = None
            if type(op) is Backward:
                result = self._backward(op, inside)
                if result is _SUSPEND:
                    return
                self._value = result
            else:
                if inside and type(op) is Forward:
                    raise RuntimeError(
                        f"rank {self.rank}: the program started a forward while a backward was in flight "
                        "(a backward must cover the layers its forward ran before the next forward)"
                    )
                self._value = self._execute(op)

    _HANDLERS = {
        Forward: "_forward", OptimizerStep: "_optimizer_step", Collective: "_collective", Send: "_send",
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
        if op.tp_group is not None and len(op.tp_group) > 1:
            raise ValueError("realrun does not run tensor parallelism yet (tp > 1)")
        if getattr(op, "recompute", False):
            raise ValueError("realrun does not run activation recomputation yet (recompute=True)")

    def _cancelled(self) -> bool:
        return any(h.is_completed() for h in self._cancel)

    def _check_cancel(self, module, args):
        if self._cancel and self._cancelled():
            raise _Cancelled

    def _forward(self, op: Forward):
        self._check_model_parallel(op)
        state = self.state
        it = self.iteration
        if it != self._zeroed_for:  # gradients accumulate over an iteration's micro-batches
            state.zero_grads()
            self._zeroed_for = it
        a, b = op.segment
        n = state.num_layers
        size = self.job.samples(self.rank)
        lo = op.micro_batch * op.samples
        start = self.now()
        if op.cancel_on and any(h.is_completed() for h in op.cancel_on):
            return False
        if a == 0:
            x = self.data.inputs(self.shard, it, size, lo, lo + op.samples)
        else:
            queue = self._act_in[a]
            if not queue:
                raise RuntimeError(f"rank {self.rank}: forward of layers [{a}, {b}) without a received activation")
            x = queue.popleft()
        self._cancel = op.cancel_on
        try:
            out = state.run_segment((a, b), x)
            if b == n:
                loss = self.data.loss(out, self.shard, it, size, lo, lo + op.samples)
                self.losses[it] = self.losses.get(it, 0.0) + float(loss) * op.samples / size
                root = loss * (op.samples / size)
            else:
                root = out
        except _Cancelled:
            self.rec.span("compute", f"forward[{a}:{b}] (cancelled)", start, self.now(), it)
            return False
        finally:
            self._cancel = ()
        left = {i: self._layer_counts[i] for i in range(a, b) if self._layer_counts[i]}
        self._records[(op.micro_batch, a)] = _Record(op.micro_batch, (a, b), x, out, root, left, it)
        if b < n:
            self._last_out[b] = out.detach()
        end = self.now()
        self.rec.span("compute", f"forward[{a}:{b}]", start, end, it)
        self.rec.compute(end - start)
        if a == 0:
            self.rec.samples(op.samples)
        return True

    def _record_for(self, op: Backward) -> _Record:
        a, b = op.segment
        for (mb, _), rec in self._records.items():
            if mb == op.micro_batch and rec.seg[0] <= a and b <= rec.seg[1]:
                return rec
        raise RuntimeError(f"rank {self.rank}: backward of layers [{a}, {b}), micro-batch {op.micro_batch}, "
                           "without its forward")

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
        grad = None
        if rec.seg[1] < self.state.num_layers:
            queue = self._grad_in[rec.seg[0]]
            if not queue:
                raise RuntimeError(f"rank {self.rank}: backward of layers {rec.seg} without a received gradient")
            grad = queue.popleft()
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
        del self._records[(rec.mb, rec.seg[0])]
        if isinstance(rec.x, torch.Tensor) and rec.x.requires_grad and rec.x.grad is not None:
            self._last_in_grad[rec.seg[0]] = rec.x.grad
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
            self._drive(inside=True)

    def _optimizer_step(self, op: OptimizerStep):
        start = self.now()
        a, b = self.state.span(op.layers, None)
        if op.fraction < 1.0:  # ZeRO: step the parts reduce-scatter left here
            with self._lock:
                mine = sorted(r for r in self._shards if a <= r[0] and r[1] <= b)
                parts = [(r, self._shards.pop(r)) for r in mine]
            if not parts and b > a:
                raise ValueError("realrun: a sharded optimizer step (fraction < 1) without reduce-scattered "
                                 "gradients; tensor parallelism is not run yet")
            for (x, y), grad in parts:
                self.opt.step((x, y), self.state.params[x:y], grad)
        else:
            self.opt.step((a, b), self.state.params[a:b], self.state.grads[a:b])
        end = self.now()
        self.rec.span("compute", "optimizer_step", start, end, self.iteration)
        self.rec.compute(end - start)

    # tensors named by ops
    def _key(self, tensor):
        return tensor.layers, tensor.elements

    def _flat(self, tensor, which: str) -> torch.Tensor:
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
            buf = self._flat(op.tensor, role)
            scale = self._weight(role, group) if op.op == "all_reduce" else 1.0

            def task():
                if scale != 1.0:
                    buf.mul_(scale)
                t0, t1 = comm.collective(op.op, op.algorithm, group, buf, op.root, node_of)
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
        elif role == "custom":
            buf = torch.zeros(int(op.tensor.nbytes), dtype=torch.uint8)

            def task():
                t0, t1 = comm.collective(op.op, op.algorithm, group, buf, op.root, node_of)
                self._comm_span(name, t0, t1, it)
        else:
            raise ValueError(f"realrun does not run collectives of {role} yet (tensor parallelism)")
        future = comm.submit(group, task)
        handle = Handle(future)
        if role == "payload":
            entry.setdefault("handles", []).append(handle)
        if op.async_op:
            return handle
        handle.wait()
        return None

    def _weight(self, role: str, group) -> float:
        job = self.job
        if role == "grads":
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
