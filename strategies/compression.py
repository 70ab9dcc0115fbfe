"""Gradient compressors: their maths for the simulator, their torch code for realrun.

A compressor turns a rank's gradients (one communication bucket: a list of
tensors of known shapes, each ``elem_bytes`` per element) into the payloads
that cross the network, and the payloads every rank receives back into an
averaged gradient. Each compressor here declares, from the shapes alone:

* ``summable``: whether its payload can be summed inside an all-reduce (the
  strategy then all-reduces it) or must be all-gathered and decoded one
  payload per rank (top-k, QSGD, sign: sparse or quantised payloads do not
  add up element-wise), so their traffic and their decode grow with ``p``;
* ``wire_bytes(shapes, elem_bytes)``: the bytes of one rank's payloads;
* ``plan(shapes, elem_bytes, p)``: the rounds of encode work and collectives
  and the final decode work, as :class:`Cost` (FLOPs, bytes moved through
  device memory, kernel launches), which the simulator charges to the rank's
  compute stream (as a DDP communication hook's kernels run on it).

The torch side (``encode``/``decode``, in :mod:`strategies.codecs`) produces
payloads whose byte sizes are exactly ``wire_bytes``.

Cost figures count each pass over a buffer (read or write) once; they are
roofline inputs, not measurements, and ``realrun.calibrate`` can replace them.
Gradient memory is taken to be fp32 for the error-feedback residual (as the
reference implementations keep it) and ``elem_bytes`` for everything else.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

Shape = tuple[int, ...]

@dataclass(frozen=True, slots=True)
class Cost:
    """Work a sequence of kernels does: element-wise FLOPs (fp32), matrix-product FLOPs (in
    ``mm_dtype``, which picks the device's peak), bytes through device memory, launches."""

    flops: float = 0.0
    bytes: float = 0.0
    kernels: int = 0
    mm_flops: float = 0.0
    mm_dtype: str = "fp32"

    def __add__(self, other: Cost) -> Cost:
        if self.mm_flops and other.mm_flops and self.mm_dtype != other.mm_dtype:
            raise ValueError(f"cannot add matrix products in {self.mm_dtype} and {other.mm_dtype}")
        mm_dtype = self.mm_dtype if self.mm_flops else other.mm_dtype
        return Cost(self.flops + other.flops, self.bytes + other.bytes, self.kernels + other.kernels,
                    self.mm_flops + other.mm_flops, mm_dtype)

    @property
    def zero(self) -> bool:
        return self.kernels == 0 and self.flops == 0 and self.bytes == 0 and self.mm_flops == 0


NO_COST = Cost()


@dataclass(frozen=True, slots=True)
class Round:
    """Encode work on every rank, then collectives ``(op, buffer bytes)`` issued in order.

    The buffer of an ``all_gather`` is every rank's payload together (``p`` times one rank's).
    """

    encode: Cost
    collectives: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class Plan:
    rounds: tuple[Round, ...]
    decode: Cost
    wire_bytes: float
    """Bytes of one rank's payloads, over all rounds."""


def numel(shape: Shape) -> int:
    return math.prod(shape)


def _total(shapes) -> int:
    return sum(numel(s) for s in shapes)


def _check_elem_bytes(elem_bytes) -> None:
    if elem_bytes not in (2, 4):
        raise ValueError(f"elem_bytes must be 2 (fp16/bf16) or 4 (fp32), got {elem_bytes!r}")


def _check_ratio(owner: str, ratio) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
        raise ValueError(f"{owner}.ratio must be a fraction in (0, 1], got {ratio!r}")


def _check_bool(owner: str, field: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{field} must be true or false, got {value!r}")


def _check_int(owner: str, field: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}.{field} must be an integer >= {low}, got {value!r}")


def _error_feedback_add(n: int, e: int) -> Cost:
    """acc = grad + residual (fp32 residual): read both, write acc."""
    return Cost(n, (e + 4 + 4) * n, 1)


def _error_feedback_update(n: int) -> Cost:
    """residual = acc - what was sent: read acc, write the residual."""
    return Cost(n, 8 * n, 1)


def _average(n: int, e: int) -> Cost:
    """Divide the summed result by p in place."""
    return Cost(n, 2 * e * n, 1)


class Compressor:
    """Base of the compressors: naming, serialisation and the torch entry points."""

    name: ClassVar[str]
    summable: ClassVar[bool]
    """Payloads can be summed in an all-reduce (else: all-gather, decode each)."""
    lossless: ClassVar[bool] = False
    needs_shapes: ClassVar[bool] = False
    """Needs each tensor's matrix shape (PowerSGD), not only the element count."""

    def wire_bytes(self, shapes, elem_bytes: int = 4) -> float:
        raise NotImplementedError

    def plan(self, shapes, elem_bytes: int, p: int) -> Plan:
        raise NotImplementedError

    @property
    def rounds(self) -> int:
        """Collective rounds per step (encode work precedes each)."""
        return 1

    def memory_bytes(self, shapes, elem_bytes: int, p: int) -> float:
        """Device memory the compressor adds for one bucket: its payload buffer (all ``p``
        payloads, plus its own, when gathered) and the fp32 error-feedback residual."""
        wire = self.wire_bytes(shapes, elem_bytes)
        payload = wire if self.summable else (p + 1) * wire
        residual = 4.0 * _total(shapes) if getattr(self, "error_feedback", False) else 0.0
        return payload + residual

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}

    # realrun: the torch implementation (strategies.codecs, torch imported lazily)
    def new_state(self) -> dict:
        """Per-bucket, per-rank state: error-feedback residual, warm-start matrices, step."""
        return {"step": 0}

    def encode(self, round: int, tensors, state: dict, received=None) -> list:
        """Payload tensors of ``round`` for this rank's gradient ``tensors`` (round 0), or from
        the previous round's ``received`` result (later rounds)."""
        from strategies import codecs

        return codecs.encode(self, round, tensors, state, received)

    def decode(self, received, tensors, state: dict, world_size: int) -> list:
        """The averaged gradients (shapes of ``tensors``) from the last round's ``received``:
        the summed payloads (``summable``) or a list with every rank's payloads."""
        from strategies import codecs

        return codecs.decode(self, received, tensors, state, world_size)


@dataclass(frozen=True)
class Cast(Compressor):
    """Cast gradients to fp16 or bf16 for the wire, as DDP's ``fp16_compress_hook`` /
    ``bf16_compress_hook`` do; the sum is taken in that dtype and cast back."""

    name: ClassVar[str] = "cast"
    summable: ClassVar[bool] = True
    dtype: str = "fp16"

    def __post_init__(self) -> None:
        if self.dtype not in ("fp16", "bf16"):
            raise ValueError(f"Cast.dtype must be 'fp16' or 'bf16', got {self.dtype!r}")

    def wire_bytes(self, shapes, elem_bytes: int = 4) -> float:
        return 2.0 * _total(shapes)

    def plan(self, shapes, elem_bytes: int, p: int) -> Plan:
        _check_elem_bytes(elem_bytes)
        n = _total(shapes)
        wire = self.wire_bytes(shapes, elem_bytes)
        if elem_bytes == 2:  # already 16-bit: nothing to cast
            return Plan((Round(NO_COST, (("all_reduce", wire),)),), _average(n, 2), wire)
        encode = Cost(n, (elem_bytes + 2) * n, 1)
        decode = Cost(n, 2 * 2 * n, 1) + Cost(n, (2 + elem_bytes) * n, 1)  # divide by p, cast back
        return Plan((Round(encode, (("all_reduce", wire),)),), decode, wire)


@dataclass(frozen=True)
class TopK(Compressor):
    """Top-k sparsification (Aji & Heafield 2017; Stich et al. 2018 with memory): each rank
    sends its ``k = ceil(ratio * n)`` largest-magnitude entries as values plus int32
    indices; with ``error_feedback`` the rest is kept and added to the next gradient.

    Selection is a radix select on the magnitudes: ``select_passes`` reads of the
    whole buffer (4 for 8-bit digits of a 32-bit key), which is what makes top-k's
    encode costly on a GPU.
    """

    name: ClassVar[str] = "topk"
    summable: ClassVar[bool] = False
    ratio: float = 0.01
    error_feedback: bool = True
    select_passes: int = 4

    def __post_init__(self) -> None:
        _check_ratio("TopK", self.ratio)
        _check_bool("TopK", "error_feedback", self.error_feedback)
        _check_int("TopK", "select_passes", self.select_passes, 1)

    def k(self, n: int) -> int:
        return min(n, max(1, math.ceil(self.ratio * n))) if n else 0

    def wire_bytes(self, shapes, elem_bytes: int = 4) -> float:
        return float(self.k(_total(shapes)) * (elem_bytes + 4))

    def plan(self, shapes, elem_bytes: int, p: int) -> Plan:
        _check_elem_bytes(elem_bytes)
        n = _total(shapes)
        k, e = self.k(n), elem_bytes
        src = 4 if self.error_feedback else e  # what selection reads: the fp32 accumulator or the grads
        encode = Cost(n, (src + 4) * n, 1)  # |x|
        encode += Cost(n * self.select_passes, 4 * n * self.select_passes, self.select_passes)
        encode += Cost(0, k * (4 + src + e + 4), 1)  # gather the k values and indices
        if self.error_feedback:
            encode = _error_feedback_add(n, e) + encode + _error_feedback_update(n)
        wire = self.wire_bytes(shapes, e)
        # zero the output, scatter-add every rank's k entries, divide by p
        decode = Cost(0, e * n, 1) + Cost(p * k, p * k * (e + 4 + 2 * e), 1) + _average(n, e)
        return Plan((Round(encode, (("all_gather", p * wire),)),), decode, wire)


@dataclass(frozen=True)
class RandomK(Compressor):
    """Random-k sparsification with a seed shared by all ranks: every rank picks the same
    ``k`` indices at a step, so only values travel and they can be summed in an
    all-reduce; scaled by ``n / k``, the estimate is unbiased (Stich et al. 2018)."""

    name: ClassVar[str] = "randomk"
    summable: ClassVar[bool] = True
    ratio: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        _check_ratio("RandomK", self.ratio)
        _check_int("RandomK", "seed", self.seed, 0)

    def k(self, n: int) -> int:
        return min(n, max(1, math.ceil(self.ratio * n))) if n else 0

    def wire_bytes(self, shapes, elem_bytes: int = 4) -> float:
        return float(self.k(_total(shapes)) * elem_bytes)

    def plan(self, shapes, elem_bytes: int, p: int) -> Plan:
        _check_elem_bytes(elem_bytes)
        n = _total(shapes)
        k, e = self.k(n), elem_bytes
        indices = Cost(k, 4 * k, 1)  # draw k indices from the shared generator
        encode = indices + Cost(0, 2 * e * k, 1)  # gather
        decode = indices + Cost(0, e * n, 1) + Cost(k, k * (4 + 2 * e), 1)  # zero, scatter scaled values
        wire = self.wire_bytes(shapes, e)
        return Plan((Round(encode, (("all_reduce", wire),)),), decode, wire)


@dataclass(frozen=True)
class QSGD(Compressor):
    """QSGD (Alistarh et al., NeurIPS 2017): stochastic, unbiased quantisation of each
    bucket of ``bucket_size`` elements to ``levels`` (s) levels of its 2-norm, with a sign.

    Wire format: per bucket one fp32 norm, then every element as a signed level in
    ``[-s, s]`` bit-packed in ``ceil(log2(2s + 1))`` bits (s = 7: 4-bit gradients).
    Payloads of different ranks have different norms, so they are all-gathered.
    """

    name: ClassVar[str] = "qsgd"
    summable: ClassVar[bool] = False
    levels: int = 7
    bucket_size: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("QSGD", "levels", self.levels, 1)
        _check_int("QSGD", "bucket_size", self.bucket_size, 1)
        _check_int("QSGD", "seed", self.seed, 0)

    @property
    def bits(self) -> int:
        """Bits per element: a signed level in [-s, s]."""
        return math.ceil(math.log2(2 * self.levels + 1))

    def wire_bytes(self, shapes, elem_bytes: int = 4) -> float:
        n = _total(shapes)
        return float(4 * math.ceil(n / self.bucket_size) + math.ceil(n * self.bits / 8))

    def plan(self, shapes, elem_bytes: int, p: int) -> Plan:
        _check_elem_bytes(elem_bytes)
        n, e = _total(shapes), elem_bytes
        wire = self.wire_bytes(shapes, e)
        encode = Cost(2 * n, e * n, 1)  # bucket norms
        encode += Cost(n, 4 * n, 1)  # uniform draws
        encode += Cost(6 * n, (e + 4) * n + wire, 1)  # scale, floor + coin, sign, pack
        # one fused pass over the gathered payloads: unpack, scale by the norm, sum; then average
        decode = Cost(3 * p * n, p * wire + e * n, 1) + _average(n, e)
        return Plan((Round(encode, (("all_gather", p * wire),)),), decode, wire)


@dataclass(frozen=True)
class SignSGD(Compressor):
    """1-bit gradients. ``vote="majority"``: signSGD with majority vote (Bernstein et al.,
    ICLR 2019): each rank sends sign(g), the update is the sign of the sum of signs.
    ``vote="scaled"``: EF-signSGD (Karimireddy et al., ICML 2019): each rank sends
    sign(acc) and the scale ``||acc||_1 / n``, keeping the error for the next step.

    Wire: ``ceil(n / 8)`` bytes of packed signs, plus one fp32 scale when scaled.
    """

    name: ClassVar[str] = "sign"
    summable: ClassVar[bool] = False
    vote: str = "scaled"
    error_feedback: bool | None = None
    """Default: on for ``scaled``, off for ``majority``."""

    def __post_init__(self) -> None:
        if self.vote not in ("majority", "scaled"):
            raise ValueError(f"SignSGD.vote must be 'majority' or 'scaled', got {self.vote!r}")
        if self.error_feedback is None:
            object.__setattr__(self, "error_feedback", self.vote == "scaled")
        _check_bool("SignSGD", "error_feedback", self.error_feedback)

    def wire_bytes(self, shapes, elem_bytes: int = 4) -> float:
        n = _total(shapes)
        return float(math.ceil(n / 8) + (4 if self.vote == "scaled" else 0))

    def plan(self, shapes, elem_bytes: int, p: int) -> Plan:
        _check_elem_bytes(elem_bytes)
        n, e = _total(shapes), elem_bytes
        wire = self.wire_bytes(shapes, e)
        src = 4 if self.error_feedback else e
        encode = Cost(n, src * n + math.ceil(n / 8), 1)  # sign and pack
        if self.vote == "scaled":
            encode = Cost(n, src * n, 1) + encode  # l1 norm
        if self.error_feedback:
            encode = _error_feedback_add(n, e) + encode + Cost(2 * n, 8 * n, 1)  # residual = acc - scale*sign
        decode = Cost(2 * p * n, p * wire + e * n, 1)  # unpack every rank's signs, vote or average
        return Plan((Round(encode, (("all_gather", p * wire),)),), decode, wire)


@dataclass(frozen=True)
class PowerSGD(Compressor):
    """PowerSGD (Vogels et al., NeurIPS 2019) as PyTorch's ``powerSGD_hook`` runs it.

    Each gradient tensor is viewed as a matrix ``rows x cols`` (``shape[0]`` by the
    product of the rest). It is compressed when ``(rows + cols) * rank *
    min_compression_rate < rows * cols`` (PyTorch's ``_should_compress``; 1-D
    tensors never are); the others are all-reduced uncompressed. Per bucket:
    add the error; P = M Q (Q kept from the last step with ``warm_start``);
    all-reduce the uncompressed tensors, then P; orthogonalise P; Q = M^T P;
    all-reduce Q; M ~ P Q^T; keep M - P Q^T as the error. Wire elements:
    ``rank * (rows + cols)`` per compressed matrix plus the uncompressed ones.
    The matrix products run in the gradients' dtype.
    """

    name: ClassVar[str] = "powersgd"
    summable: ClassVar[bool] = True
    needs_shapes: ClassVar[bool] = True
    rank: int = 1
    warm_start: bool = True
    error_feedback: bool = True
    min_compression_rate: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("PowerSGD", "rank", self.rank, 1)
        _check_bool("PowerSGD", "warm_start", self.warm_start)
        _check_bool("PowerSGD", "error_feedback", self.error_feedback)
        r = self.min_compression_rate
        if isinstance(r, bool) or not isinstance(r, int | float) or not r >= 1:
            raise ValueError(f"PowerSGD.min_compression_rate must be a number >= 1, got {r!r}")
        _check_int("PowerSGD", "seed", self.seed, 0)

    @property
    def rounds(self) -> int:
        return 2

    @staticmethod
    def matrix(shape: Shape) -> tuple[int, int]:
        rows = shape[0] if shape else 1
        return rows, numel(shape) // rows if rows else 0

    def compressed(self, shape: Shape) -> bool:
        if len(shape) < 2:
            return False
        rows, cols = self.matrix(shape)
        return (rows + cols) * self.rank * self.min_compression_rate < rows * cols

    def split(self, shapes) -> tuple[list[tuple[int, int]], int]:
        """The compressed matrices (rows, cols) and the count of uncompressed elements."""
        mats, plain = [], 0
        for shape in shapes:
            if self.compressed(shape):
                mats.append(self.matrix(shape))
            else:
                plain += numel(shape)
        return mats, plain

    def wire_bytes(self, shapes, elem_bytes: int = 4) -> float:
        mats, plain = self.split(shapes)
        return float(elem_bytes * (plain + sum(self.rank * (m + c) for m, c in mats)))

    def plan(self, shapes, elem_bytes: int, p: int) -> Plan:
        _check_elem_bytes(elem_bytes)
        e, r = elem_bytes, self.rank
        mats, plain = self.split(shapes)
        n = _total(shapes)
        mm = "fp32" if e == 4 else "fp16"
        p_elems = sum(m * r for m, _ in mats)
        q_elems = sum(c * r for _, c in mats)
        encode0 = _error_feedback_add(n, e) if self.error_feedback else NO_COST
        if plain:
            encode0 += Cost(0, 2 * e * plain, 1)  # pack the uncompressed tensors
        for m, c in mats:
            if not self.warm_start:
                encode0 += Cost(c * r, 4 * c * r, 1)  # fresh random Q
            encode0 += Cost(0, e * (m * c + c * r + m * r), 1, 2 * m * c * r, mm)  # P = M Q
        encode1 = NO_COST
        for m, c in mats:
            encode1 += Cost(2 * m * r * r, e * m * r * (r + 1), 2 * r)  # Gram-Schmidt on P
            encode1 += Cost(0, e * (m * c + m * r + c * r), 1, 2 * m * c * r, mm)  # Q = M^T P
        decode = NO_COST
        for m, c in mats:
            decode += Cost(0, e * (m * r + c * r + m * c), 1, 2 * m * c * r, mm)  # M ~ P Q^T
        if self.error_feedback:
            decode += _error_feedback_update(n)
        if plain:
            decode += _average(plain, e) + Cost(0, 2 * e * plain, 1)  # unpack
        first = []
        if plain:
            first.append(("all_reduce", float(e * plain)))
        if mats:
            first.append(("all_reduce", float(e * p_elems)))
        second = (("all_reduce", float(e * q_elems)),) if mats else ()
        rounds = (Round(encode0, tuple(first)), Round(encode1, second))
        return Plan(rounds, decode, self.wire_bytes(shapes, e))


COMPRESSORS: dict[str, type[Compressor]] = {
    cls.name: cls for cls in (Cast, TopK, RandomK, QSGD, SignSGD, PowerSGD)
}
SHORT_NAMES = {"fp16": Cast("fp16"), "bf16": Cast("bf16")}


def compressor_from_spec(spec, field: str = "compression") -> Compressor | None:
    """A compressor from an instance, ``None``, a name (``"topk"``, ``"fp16"``) or a table
    ``{"name": "topk", "ratio": 0.001}``."""
    if spec is None or isinstance(spec, Compressor):
        return spec
    if isinstance(spec, str):
        if spec in SHORT_NAMES:
            return SHORT_NAMES[spec]
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise ValueError(f"{field} must be a compressor, a name or a table with 'name', got {spec!r}")
    spec = dict(spec)
    name = spec.pop("name", None)
    allowed = tuple(COMPRESSORS) + tuple(SHORT_NAMES)
    if not isinstance(name, str) or name not in COMPRESSORS and not (name in SHORT_NAMES and not spec):
        raise ValueError(f"{field}.name must be one of {allowed}, got {name!r}")
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]
    if name not in COMPRESSORS:
        raise ValueError(f"{field}.name must be one of {allowed}, got {name!r}")
    cls = COMPRESSORS[name]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"{field}: unknown field(s) {unknown} for {name!r}; allowed: {sorted(known)}")
    return cls(**spec)

