"""Torch implementations of the compressors in :mod:`strategies.compression`.

The executor drives one bucket (a list of gradient tensors of one dtype) per call::

    state = comp.new_state()
    payload = comp.encode(0, grads, state)
    for r in range(1, comp.rounds):
        received = collective(payload)
        payload = comp.encode(r, grads, state, received)
    received = collective(payload)
    avg = comp.decode(received, grads, state, world_size)

For a ``summable`` compressor the collective all-reduces (sums) each payload tensor and
``received`` is the list of sums; otherwise it all-gathers and ``received`` is a list over
ranks of that rank's payload list. The bytes of one rank's payload tensors, over all
rounds, equal ``comp.wire_bytes(shapes, elem_bytes)`` exactly.

Wire formats (``n``: elements of the bucket flattened in order):

* ``cast``: ``[flat in fp16/bf16]``.
* ``topk``: ``[values (k, grad dtype), indices (k, int32)]``.
* ``randomk``: ``[values (k, grad dtype)]`` at indices drawn identically on every rank.
* ``qsgd``: ``[norms (ceil(n/d), fp32), codes (ceil(n*bits/8), uint8)]``; each code is the
  signed level plus ``s`` (in ``[0, 2s]``), ``bits`` bits, packed little-endian: element
  ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``, least significant first, and stream
  bit ``j`` is bit ``j % 8`` of byte ``j // 8``.
* ``sign``: ``[bits (ceil(n/8), uint8)]`` (+ ``[scale (1, fp32)]`` when scaled), bit set for
  ``x >= 0``, packed as above with one bit per element.
* ``powersgd``: round 0 ``[uncompressed flat, all P flat]``, round 1 ``[all Q flat]``, in the
  gradient dtype, each list without the entries that would be empty.

State keys (per bucket and rank): ``step`` (counted by :func:`decode`), ``rank`` (read by
QSGD's generator, set by the executor), ``world_size`` (set by the executor: the cast then
divides before the sum, as DDP's ``fp16_compress_hook`` does, so fp16 sums cannot overflow), ``residual`` (fp32 error feedback), ``q`` (PowerSGD's
warm-start matrices) and, between rounds of one step, ``_pending``.
"""

from __future__ import annotations

import math

import torch

_SEED_MUL = 1_000_003
_RANK_MUL = 1_000_033
_SEED_MOD = 2**63 - 1

_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------
# helpers


def _flatten(tensors) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0)
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _unflatten(flat: torch.Tensor, tensors) -> list:
    out, i = [], 0
    for t in tensors:
        m = t.numel()
        out.append(flat[i : i + m].view(t.shape))
        i += m
    return out


def _dtype(tensors) -> torch.dtype:
    if not tensors:
        return torch.float32
    dtype = tensors[0].dtype
    for t in tensors:
        if t.dtype != dtype:
            raise ValueError(
                f"a bucket's gradients must share one dtype, got {dtype} and {t.dtype}"
            )
    return dtype


def _device(tensors) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


def _generator(seed: int, device=None) -> torch.Generator:
    g = torch.Generator(device=device) if device is not None else torch.Generator()
    g.manual_seed(seed % _SEED_MOD)
    return g


def _step_seed(comp, state: dict) -> int:
    return comp.seed * _SEED_MUL + int(state["step"])


def _accumulate(flat: torch.Tensor, state: dict, error_feedback: bool) -> torch.Tensor:
    """The fp32 accumulator: the gradients plus the fp32 residual when error feedback is on."""
    acc = flat.to(torch.float32)
    if error_feedback:
        residual = state.get("residual")
        if residual is None or residual.shape != acc.shape or residual.device != acc.device:
            residual = torch.zeros_like(acc)
            state["residual"] = residual
        acc = acc + residual
    return acc


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Little-endian bit packing of non-negative integer ``codes`` (``bits`` bits each) into
    ``ceil(len(codes) * bits / 8)`` bytes (uint8). Temporaries: ``bits`` bytes per code."""
    n = codes.numel()
    nbytes = math.ceil(n * bits / 8)
    device = codes.device
    stream = torch.zeros(nbytes * 8, dtype=torch.uint8, device=device)
    if n == 0:
        return stream[:nbytes]
    codes = codes.reshape(-1).to(torch.int64 if bits > 30 else torch.int32)
    view = stream[: n * bits].view(n, bits)
    for j in range(bits):
        view[:, j] = ((codes >> j) & 1).to(torch.uint8)
    octets = stream.view(nbytes, 8)
    packed = octets[:, 0].clone()
    for j in range(1, 8):
        packed |= octets[:, j] << j
    return packed


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` codes (int64)."""
    device = packed.device
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    packed = packed.reshape(-1).to(torch.uint8)
    stream = torch.empty(packed.numel(), 8, dtype=torch.uint8, device=device)
    for j in range(8):
        stream[:, j] = (packed >> j) & 1
    view = stream.view(-1)[: n * bits].view(n, bits)
    codes = torch.zeros(n, dtype=torch.int64, device=device)
    for j in range(bits):
        codes |= view[:, j].to(torch.int64) << j
    return codes


# ---------------------------------------------------------------------------------------
# cast


def _cast_encode(comp, round, tensors, state, received):
    flat = _flatten(tensors).to(_TORCH_DTYPES[comp.dtype])
    if "world_size" in state:  # divide before the sum, as fp16_compress_hook does: no fp16 overflow
        flat = flat.div_(state["world_size"])
    return [flat]


def _cast_decode(comp, received, tensors, state, world_size):
    summed = received[0].to(torch.float32)
    avg = summed if "world_size" in state else summed / world_size
    return _unflatten(avg.to(_dtype(tensors)), tensors)


# ---------------------------------------------------------------------------------------
# top-k


def _topk_encode(comp, round, tensors, state, received):
    flat = _flatten(tensors)
    dtype = flat.dtype
    k = comp.k(flat.numel())
    if comp.error_feedback:
        acc = _accumulate(flat, state, True)
        idx = torch.topk(acc.abs(), k, sorted=False).indices
        values = acc[idx].to(dtype)
        residual = acc.clone()
        residual[idx] = acc[idx] - values.to(torch.float32)  # what was not sent
        state["residual"] = residual
    else:
        idx = torch.topk(flat.abs(), k, sorted=False).indices
        values = flat[idx]
    return [values, idx.to(torch.int32)]


def _topk_decode(comp, received, tensors, state, world_size):
    flat_like = _flatten(tensors)
    out = torch.zeros(flat_like.numel(), dtype=torch.float32, device=flat_like.device)
    for values, idx in received:
        out.index_add_(0, idx.to(torch.int64), values.to(torch.float32))
    out /= world_size
    return _unflatten(out.to(flat_like.dtype), tensors)


# ---------------------------------------------------------------------------------------
# random-k


def randomk_indices(comp, n: int, step: int, device=None) -> torch.Tensor:
    """The ``k`` indices every rank uses at ``step`` (a CPU generator, so identical everywhere)."""
    g = _generator(comp.seed * _SEED_MUL + step)
    idx = torch.randperm(n, generator=g)[: comp.k(n)]
    return idx.to(device) if device is not None else idx


def _randomk_encode(comp, round, tensors, state, received):
    flat = _flatten(tensors)
    idx = randomk_indices(comp, flat.numel(), int(state["step"]), flat.device)
    return [flat[idx]]


def _randomk_decode(comp, received, tensors, state, world_size):
    flat_like = _flatten(tensors)
    n = flat_like.numel()
    k = comp.k(n)
    idx = randomk_indices(comp, n, int(state["step"]), flat_like.device)
    out = torch.zeros(n, dtype=torch.float32, device=flat_like.device)
    if k:
        out[idx] = received[0].to(torch.float32) * (n / k / world_size)
    return _unflatten(out.to(flat_like.dtype), tensors)


# ---------------------------------------------------------------------------------------
# QSGD


def _qsgd_encode(comp, round, tensors, state, received):
    flat = _flatten(tensors)
    n, d, s = flat.numel(), comp.bucket_size, comp.levels
    nb = math.ceil(n / d)
    x = flat.to(torch.float32)
    padded = torch.zeros(nb * d, dtype=torch.float32, device=x.device)
    padded[:n] = x
    padded = padded.view(nb, d)
    norms = torch.linalg.vector_norm(padded, dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    scaled = (padded.abs() / safe.unsqueeze(1) * s).reshape(-1)[:n]
    seed = (_step_seed(comp, state) * _RANK_MUL + int(state.get("rank", 0))) % _SEED_MOD
    gen = _generator(seed, x.device)
    u = torch.rand(n, generator=gen, dtype=torch.float32, device=x.device)
    level = torch.floor(scaled + u).clamp_(0, s)  # E[level] = scaled: unbiased
    code = (
        torch.where(x < 0, -level, level).to(torch.int64) + s
    )  # zero-norm buckets: x = 0, level 0
    return [norms, pack_bits(code, comp.bits)]


def _qsgd_decode(comp, received, tensors, state, world_size):
    flat_like = _flatten(tensors)
    n, d, s = flat_like.numel(), comp.bucket_size, comp.levels
    out = torch.zeros(n, dtype=torch.float32, device=flat_like.device)
    for norms, packed in received:
        code = unpack_bits(packed, comp.bits, n) - s
        scale = norms.to(torch.float32).repeat_interleave(d)[:n] / s
        out += code.to(torch.float32) * scale
    out /= world_size
    return _unflatten(out.to(flat_like.dtype), tensors)


# ---------------------------------------------------------------------------------------
# sign


def _sign_encode(comp, round, tensors, state, received):
    flat = _flatten(tensors)
    n = flat.numel()
    acc = _accumulate(flat, state, comp.error_feedback)
    positive = acc >= 0
    packed = pack_bits(positive.to(torch.int32), 1)
    signs = positive.to(torch.float32) * 2 - 1  # sign(0) = +1, as the bits say
    if comp.vote == "scaled":
        scale = acc.abs().sum() / n if n else acc.new_zeros(())
        scale = scale.reshape(1).to(torch.float32)
        if comp.error_feedback:
            state["residual"] = acc - scale * signs
        return [packed, scale]
    if comp.error_feedback:  # majority with memory: what was sent is the unscaled sign
        state["residual"] = acc - signs
    return [packed]


def _sign_decode(comp, received, tensors, state, world_size):
    flat_like = _flatten(tensors)
    n = flat_like.numel()
    total = torch.zeros(n, dtype=torch.float32, device=flat_like.device)
    for payload in received:
        signs = unpack_bits(payload[0], 1, n).to(torch.float32) * 2 - 1
        if comp.vote == "scaled":
            signs = signs * payload[1].to(torch.float32)
        total += signs
    out = torch.sign(total) if comp.vote == "majority" else total / world_size
    return _unflatten(out.to(flat_like.dtype), tensors)


# ---------------------------------------------------------------------------------------
# PowerSGD


def orthogonalize(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning those of ``p`` (rows x r), in fp32: Gram-Schmidt for
    r <= 2 (as PyTorch's hook), QR above; a zero column stays zero."""
    p = p.to(torch.float32)
    r = p.shape[1]
    if r > 2:
        return torch.linalg.qr(p, mode="reduced").Q
    p = p.clone()
    for i in range(r):
        col = p[:, i]
        norm = torch.linalg.vector_norm(col)
        col.copy_(torch.where(norm > 0, col / torch.where(norm > 0, norm, 1.0), 0.0))
        if i + 1 < r:
            rest = p[:, i + 1 :]
            rest -= col.unsqueeze(1) * (col @ rest).unsqueeze(0)
    return p


def _powersgd_layout(comp, tensors):
    """Per tensor: (offset, numel, compressed?, rows, cols)."""
    layout, off = [], 0
    for t in tensors:
        shape = tuple(t.shape)
        rows, cols = comp.matrix(shape)
        layout.append((off, t.numel(), comp.compressed(shape), rows, cols))
        off += t.numel()
    return layout


def _split_flat(flat: torch.Tensor, sizes) -> list:
    out, i = [], 0
    for m in sizes:
        out.append(flat[i : i + m])
        i += m
    return out


def _powersgd_encode0(comp, tensors, state):
    flat = _flatten(tensors)
    dtype, device, r = flat.dtype, flat.device, comp.rank
    acc = _accumulate(flat, state, comp.error_feedback)
    work = acc.to(dtype)  # the gradients with the error added, in their dtype
    layout = _powersgd_layout(comp, tensors)
    mats = [work[o : o + m].view(rows, cols) for o, m, c, rows, cols in layout if c]
    plain = [work[o : o + m] for o, m, c, _, _ in layout if not c]
    qs = state.get("q")
    fresh = (
        not comp.warm_start
        or qs is None
        or len(qs) != len(mats)
        or any(q.shape != (m.shape[1], r) for q, m in zip(qs, mats))
    )
    if fresh and mats:
        g = _generator(_step_seed(comp, state))  # the same on every rank
        qs = [
            orthogonalize(torch.randn(m.shape[1], r, generator=g)).to(device, dtype) for m in mats
        ]
    ps = [m @ q.to(device, dtype) for m, q in zip(mats, qs or [])]
    state["_pending"] = {"acc": acc, "mats": mats, "layout": layout, "qs": qs}
    payload = []
    if plain:
        payload.append(torch.cat(plain))
    if mats:
        payload.append(torch.cat([p.reshape(-1) for p in ps]))
    return payload


def _powersgd_encode1(comp, tensors, state, received):
    pending = state["_pending"]
    mats, layout = pending["mats"], pending["layout"]
    received = list(received)
    plain_n = sum(m for _, m, c, _, _ in layout if not c)
    if plain_n:
        pending["plain_sum"] = received.pop(0)
    if not mats:
        return []
    p_sum = received.pop(0)
    r = comp.rank
    ps = [orthogonalize(p.view(-1, r)) for p in _split_flat(p_sum, [m.shape[0] * r for m in mats])]
    ps = [p.to(p_sum.device, mats[0].dtype) for p in ps]
    qs = [m.t() @ p for m, p in zip(mats, ps)]
    pending["ps"] = ps  # P summed, not divided by p: orthogonalising makes it scale-free
    return [torch.cat([q.reshape(-1) for q in qs])]


def _powersgd_decode(comp, received, tensors, state, world_size):
    pending = state.pop("_pending")
    acc, mats, layout = pending["acc"], pending["mats"], pending["layout"]
    dtype = acc.dtype if not tensors else _dtype(tensors)
    out = torch.empty(acc.numel(), dtype=dtype, device=acc.device)
    if "plain_sum" in pending:
        plain = (pending["plain_sum"].to(torch.float32) / world_size).to(dtype)
        sizes = [m for _, m, c, _, _ in layout if not c]
        parts = iter(_split_flat(plain, sizes))
        for o, m, c, _, _ in layout:
            if not c:
                out[o : o + m] = next(parts)
    if mats:
        r = comp.rank
        q_sum = received[0]
        q_avg = (q_sum.to(torch.float32) / world_size).to(dtype)
        qs = [q.view(-1, r) for q in _split_flat(q_avg, [m.shape[1] * r for m in mats])]
        approx = iter(p @ q.t() for p, q in zip(pending["ps"], qs))
        for o, m, c, _, _ in layout:
            if c:
                out[o : o + m] = next(approx).reshape(-1)
        state["q"] = [q.clone() for q in qs]
    if comp.error_feedback:
        state["residual"] = acc - out.to(torch.float32)
    return _unflatten(out, tensors)


def _powersgd_encode(comp, round, tensors, state, received):
    if round == 0:
        return _powersgd_encode0(comp, tensors, state)
    if round == 1:
        if "_pending" not in state:
            raise RuntimeError("PowerSGD round 1 before round 0")
        return _powersgd_encode1(comp, tensors, state, received)
    raise ValueError(f"PowerSGD has rounds 0 and 1, got {round!r}")


# ---------------------------------------------------------------------------------------
# dispatch

_ENCODERS = {
    "cast": _cast_encode,
    "topk": _topk_encode,
    "randomk": _randomk_encode,
    "qsgd": _qsgd_encode,
    "sign": _sign_encode,
    "powersgd": _powersgd_encode,
}
_DECODERS = {
    "cast": _cast_decode,
    "topk": _topk_decode,
    "randomk": _randomk_decode,
    "qsgd": _qsgd_decode,
    "sign": _sign_decode,
    "powersgd": _powersgd_decode,
}


def encode(comp, round: int, tensors, state: dict, received=None) -> list:
    """Payload tensors of ``round`` for this rank's gradient ``tensors``."""
    try:
        fn = _ENCODERS[comp.name]
    except KeyError:
        raise ValueError(f"no codec for compressor {comp.name!r}") from None
    if round != 0 and comp.rounds == 1:
        raise ValueError(f"{comp.name} has one round, got round {round!r}")
    tensors = list(tensors)
    _dtype(tensors)
    with torch.no_grad():
        return fn(comp, round, tensors, state, received)


def decode(comp, received, tensors, state: dict, world_size: int) -> list:
    """The average over ranks (shapes and dtypes of ``tensors``) from the last round's
    ``received``; advances ``state["step"]``."""
    try:
        fn = _DECODERS[comp.name]
    except KeyError:
        raise ValueError(f"no codec for compressor {comp.name!r}") from None
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    tensors = list(tensors)
    with torch.no_grad():
        out = fn(comp, received, tensors, state, world_size)
    state["step"] = int(state.get("step", 0)) + 1
    return out
