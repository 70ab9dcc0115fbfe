"""Messages and collectives over ``torch.distributed`` point-to-point calls.

* A point-to-point message is a fixed-size header (float64: the payload's
  tensors' dtypes and shapes, the sender's meta numbers) and, if it carries
  anything, one payload of bytes: the tensors back to back. Header and payload
  go on tags ``2·tag`` and ``2·tag + 1``; messages between two ranks on one tag
  arrive in the order they were sent, so a receiver that took a header from
  any source takes the payload that follows from the same one.
* A collective runs the step schedule of the algorithm the op names
  (:func:`strategies.collectives.schedule`) over ``isend``/``irecv``: in each
  step a rank posts its sends and receives, waits for them, then adds or
  copies what arrived into its chunks. ``native`` mode hands collectives over
  the whole world to the backend's own implementation instead.
* Each process group has its own communication stream: a thread that runs the
  group's collectives one after another in issue order, as NCCL's per-group
  streams do, so a program's async collective overlaps its compute and
  collectives of different groups overlap each other.
"""

from __future__ import annotations

import math
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from strategies.collectives import schedule

META_KEYS = ("version", "clock", "read_time", "samples", "done", "pushes", "stop", "weight")
"""Names a message's meta may use (they travel as numbers in the header)."""
MAX_TENSORS = 4
MAX_DIMS = 6
_SLOT = 2 + MAX_DIMS
HEADER_LEN = 2 + len(META_KEYS) + MAX_TENSORS * _SLOT
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8, torch.float64)
COLLECTIVE_TAG = 1 << 24
"""Collective messages use tags from here on; program tags must stay below ``COLLECTIVE_TAG // 2``."""


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous().view(-1)
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def pack_header(tensors: list[torch.Tensor], meta) -> torch.Tensor:
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"a message carries at most {MAX_TENSORS} tensors, got {len(tensors)}")
    h = torch.full((HEADER_LEN,), float("nan"), dtype=torch.float64)
    h[0] = len(tensors)
    h[1] = 0
    for key, value in (meta or {}).items():
        if key not in META_KEYS:
            raise ValueError(f"message meta key {key!r} is not one of {META_KEYS}")
        h[2 + META_KEYS.index(key)] = float(value)
    for k, t in enumerate(tensors):
        if t.dim() > MAX_DIMS:
            raise ValueError(f"a message tensor has at most {MAX_DIMS} dimensions, got {t.dim()}")
        o = 2 + len(META_KEYS) + k * _SLOT
        h[o] = DTYPES.index(t.dtype)
        h[o + 1] = t.dim()
        for d, size in enumerate(t.shape):
            h[o + 2 + d] = size
    return h


def unpack_header(h: torch.Tensor):
    """``(meta, [(dtype, shape)], payload bytes)``."""
    count = int(h[0])
    meta = {}
    for i, key in enumerate(META_KEYS):
        v = float(h[2 + i])
        if not math.isnan(v):
            meta[key] = v
    specs, total = [], 0
    for k in range(count):
        o = 2 + len(META_KEYS) + k * _SLOT
        dtype = DTYPES[int(h[o])]
        shape = tuple(int(h[o + 2 + d]) for d in range(int(h[o + 1])))
        specs.append((dtype, shape))
        total += math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return meta, specs, total


def split_payload(buf: torch.Tensor, specs) -> list[torch.Tensor]:
    out, i = [], 0
    for dtype, shape in specs:
        size = torch.empty((), dtype=dtype).element_size()
        part = buf[i:i + math.prod(shape) * size]
        if part.storage_offset() % size:  # a view needs aligned bytes
            part = part.clone()
        out.append(part.view(dtype).view(shape))
        i += part.numel()
    return out


class Comm:
    """One rank's point-to-point messages and collectives (see the module docstring)."""

    def __init__(self, rank: int, world: int, *, native: bool, wire: torch.device):
        self.rank = rank
        self.world = world
        self.native = native
        self.wire = wire
        """Where tensors must be to cross the network: the GPU with NCCL, the CPU with gloo."""
        self.bytes_sent = 0.0
        self._lock = threading.Lock()
        self._streams: dict[tuple[int, ...], ThreadPoolExecutor] = {}

    # point-to-point
    def isend(self, dst: int, tensors: list[torch.Tensor], meta, tag: int):
        """Post a message; returns the list of works to wait on."""
        header = pack_header(tensors, meta).to(self.wire)
        works = [dist.isend(header, dst, tag=2 * tag)]
        if tensors:
            tensors = [t.to(self.wire) for t in tensors]
            payload = as_bytes(tensors[0]) if len(tensors) == 1 else torch.cat([as_bytes(t) for t in tensors])
            works.append(dist.isend(payload, dst, tag=2 * tag + 1))
            self._count(payload.numel())
        return works

    def recv(self, src: int | None, tag: int):
        """Receive a message (from ``src``, or any rank): ``(src, meta, tensors)``."""
        header = torch.empty(HEADER_LEN, dtype=torch.float64, device=self.wire)
        if src is None:
            src = dist.recv(header, None, tag=2 * tag)
        else:
            dist.recv(header, src, tag=2 * tag)
        return self._payload(src, header, tag)

    def irecv_header(self, src: int, tag: int):
        header = torch.empty(HEADER_LEN, dtype=torch.float64, device=self.wire)
        return header, dist.irecv(header, src, tag=2 * tag)

    def _payload(self, src: int, header: torch.Tensor, tag: int):
        meta, specs, total = unpack_header(header.cpu())
        tensors = []
        if specs:
            buf = torch.empty(total, dtype=torch.uint8, device=self.wire)
            dist.recv(buf, src, tag=2 * tag + 1)
            tensors = split_payload(buf, specs)
        return src, meta, tensors

    def finish_recv(self, src: int, header: torch.Tensor, tag: int):
        return self._payload(src, header, tag)

    def _count(self, nbytes: float) -> None:
        with self._lock:
            self.bytes_sent += nbytes

    # collectives
    def stream(self, group: tuple[int, ...]) -> ThreadPoolExecutor:
        s = self._streams.get(group)
        if s is None:
            s = self._streams[group] = ThreadPoolExecutor(1, thread_name_prefix=f"comm{len(self._streams)}")
        return s

    def submit(self, group: tuple[int, ...], fn, *args) -> Future:
        """Run ``fn(*args)`` on the group's communication stream, after its earlier work."""
        return self.stream(group).submit(fn, *args)

    def collective(self, op: str, algorithm: str, group: tuple[int, ...], buf: torch.Tensor, root: int = 0,
                   node_of=None):
        """Run collective ``op`` in place on the flat tensor ``buf`` (this thread); returns
        (start, end) monotonic times. all_gather: ``buf`` holds every rank's part, this rank's
        filled in; reduce_scatter: this rank's part of ``buf`` ends summed."""
        start = time.monotonic()
        p = len(group)
        if p > 1:
            work = buf if buf.device == self.wire else buf.to(self.wire)
            if self.native and p == self.world and op in ("all_reduce", "broadcast", "reduce"):
                self._native(op, work, group[root])
            else:
                self._scheduled(op, algorithm, group, work, root, node_of)
            if work is not buf:
                buf.copy_(work)
            if buf.device.type == "cuda":  # NCCL's wait only orders streams: end when the device has
                torch.cuda.synchronize(buf.device)
        return start, time.monotonic()

    def _native(self, op: str, buf: torch.Tensor, root: int) -> None:
        if op == "all_reduce":
            dist.all_reduce(buf)
        elif op == "broadcast":
            dist.broadcast(buf, root)
        else:
            dist.reduce(buf, root)
        p = self.world
        factor = 2 * (p - 1) / p if op == "all_reduce" else 1.0
        self._count(buf.numel() * buf.element_size() * factor)

    def _scheduled(self, op, algorithm, group, buf, root, node_of) -> None:
        p = len(group)
        me = group.index(self.rank)
        nbytes = buf.numel() * buf.element_size()
        sched = schedule(op, algorithm, p, nbytes, root=root, node_of=node_of)
        if op == "all_to_all":
            raise ValueError("realrun does not run all_to_all yet")
        chunks = list(torch.tensor_split(buf, sched.nchunks))
        tag = COLLECTIVE_TAG + zlib.crc32(repr(group).encode()) % (COLLECTIVE_TAG // 2)
        for step in sched.steps():
            sends: dict[int, list[int]] = {}
            recvs: dict[int, list[tuple[int, bool]]] = {}
            for tr in step.transfers:
                if tr.src == me:
                    sends.setdefault(tr.dst, []).append(tr.chunk)
                elif tr.dst == me:
                    recvs.setdefault(tr.src, []).append((tr.chunk, tr.reduce))
            if not sends and not recvs:
                continue
            works, inbox = [], []
            for src, items in recvs.items():
                size = sum(chunks[c].numel() for c, _ in items)
                tmp = torch.empty(size, dtype=buf.dtype, device=buf.device)
                works.append(dist.irecv(tmp, group[src], tag=tag))
                inbox.append((tmp, items))
            for dst, cs in sends.items():
                data = chunks[cs[0]] if len(cs) == 1 else torch.cat([chunks[c] for c in cs])
                works.append(dist.isend(data, group[dst], tag=tag))
                self._count(data.numel() * data.element_size())
            for w in works:
                w.wait()
            for tmp, items in inbox:
                i = 0
                for c, reduce in items:
                    m = chunks[c].numel()
                    if reduce:
                        chunks[c].add_(tmp[i:i + m])
                    else:
                        chunks[c].copy_(tmp[i:i + m])
                    i += m

    def close(self) -> None:
        for s in self._streams.values():
            s.shutdown(wait=True)
