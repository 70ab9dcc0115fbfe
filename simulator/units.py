"""Units: SI floats inside, human strings at the edges.

Everything in the simulator is a plain ``float`` in SI units: seconds, bytes,
bytes/s and FLOP/s. People write "25Gbps", "12.5GB/s", "5us", "16GiB" or
"312TFLOPS"; those strings are parsed once, where a user value enters (a
dataclass field, a JSON file, a CLI flag), by the functions here.

A number (``int`` or ``float``) is taken to be SI already. A string is a number
with an optional unit; without a unit it is SI too. Parsing goes through
``fractions.Fraction`` so that "5us" is exactly the float ``5e-6`` and "25Gbps"
exactly ``25e9 / 8``: the only rounding is the final conversion to float.

Bits versus bytes is decided by the case of the ``b``: ``Gbps``, ``Gb/s`` and
``Gbit/s`` are bits, ``GB/s``, ``GBps`` and ``GiB/s`` bytes. Prefixes are
decimal (``K``/``k``, ``M``, ``G``, ``T``, ``P``) or binary (``Ki``, ``Mi``, ...).
"""

from __future__ import annotations

import math
import numbers
import re
from fractions import Fraction
from typing import Literal

__all__ = [
    "KINDS",
    "parse",
    "parse_bandwidth",
    "parse_time",
    "parse_bytes",
    "parse_flops",
    "fmt_bandwidth",
    "fmt_time",
    "fmt_bytes",
    "fmt_flops",
]

Kind = Literal["bandwidth", "time", "bytes", "flops"]
KINDS: tuple[str, ...] = ("bandwidth", "time", "bytes", "flops")

_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15, "e": 10**18}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50, "ei": 2**60}

# Exponent limited to three digits so that a hostile "1e999999999" cannot make
# Fraction build a gigantic integer.
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,3})?"
_QUANTITY = re.compile(rf"^\s*(?P<num>{_NUMBER})\s*(?P<unit>[^\s\d].*?)?\s*$")
_SPECIAL = re.compile(r"^\s*[+-]?(?:inf|infinity|nan)\s*$", re.IGNORECASE)


def _prefix_scale(prefix: str) -> Fraction | None:
    p = prefix.lower()
    if p in _DECIMAL:
        return Fraction(_DECIMAL[p])
    if p in _BINARY:
        return Fraction(_BINARY[p])
    return None


def _bandwidth_unit(unit: str) -> Fraction | None:
    # bits: b/s, bps, bit/s, bits/s; bytes: B/s, Bps, byte/s, bytes/s
    m = re.fullmatch(r"([kKmMgGtTpP]i?)?(b/s|bps|bit/s|bits/s|B/s|Bps|byte/s|bytes/s)", unit)
    if m is None:
        return None
    scale = _prefix_scale(m.group(1) or "")
    if scale is None:
        return None
    return scale / 8 if m.group(2) in ("b/s", "bps", "bit/s", "bits/s") else scale


_TIME_UNITS = {
    "ns": Fraction(1, 10**9),
    "us": Fraction(1, 10**6),
    "\u00b5s": Fraction(1, 10**6),  # micro sign
    "\u03bcs": Fraction(1, 10**6),  # Greek mu
    "ms": Fraction(1, 10**3),
    "s": Fraction(1),
    "sec": Fraction(1),
    "min": Fraction(60),
    "h": Fraction(3600),
}


def _time_unit(unit: str) -> Fraction | None:
    return _TIME_UNITS.get(unit)


def _bytes_unit(unit: str) -> Fraction | None:
    # The B must be upper case: "16Gb" is gigabits, not a memory size.
    m = re.fullmatch(r"([kKmMgGtTpP]i?)?(B|byte|bytes)", unit)
    if m is None:
        return None
    return _prefix_scale(m.group(1) or "")


def _flops_unit(unit: str) -> Fraction | None:
    m = re.fullmatch(r"([kmgtpe]?)(flops|flop/s)", unit.lower())
    return None if m is None else Fraction(_DECIMAL[m.group(1)])


_UNIT_PARSERS = {
    "bandwidth": _bandwidth_unit,
    "time": _time_unit,
    "bytes": _bytes_unit,
    "flops": _flops_unit,
}
_HINTS = {
    "bandwidth": "a number in bytes/s or a string like '25Gbps', '12.5GB/s'",
    "time": "a number in seconds or a string like '5us', '1.5ms', '2s'",
    "bytes": "a number of bytes or a string like '16GiB', '512MB'",
    "flops": "a number in FLOP/s or a string like '312TFLOPS', '19.5 TFLOP/s'",
}
# Bandwidth and FLOP/s are rates of something that must happen: zero would mean
# "never finishes". Times and sizes may be zero (a free link, an empty message).
_STRICTLY_POSITIVE = {"bandwidth": True, "time": False, "bytes": False, "flops": True}


def parse(kind: Kind, value: str | int | float, field: str = "value") -> float:
    """Parse ``value`` as a quantity of ``kind`` and return SI float.

    Raises ``ValueError`` naming ``field``, the value and what is allowed.
    """
    if kind not in _UNIT_PARSERS:
        raise ValueError(f"{field}: unknown quantity kind {kind!r}; use one of {', '.join(KINDS)}")
    hint = _HINTS[kind]
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
        raise ValueError(
            f"{field}: cannot parse {value!r} (type {type(value).__name__}) as a {kind}; use {hint}"
        )
    if isinstance(value, str):
        if _SPECIAL.match(value):
            raise ValueError(f"{field}: {kind} must be finite, got {value!r}")
        m = _QUANTITY.match(value)
        scale = None
        if m is not None:
            unit = m.group("unit")
            scale = Fraction(1) if unit is None else _UNIT_PARSERS[kind](unit)
        if m is None or scale is None:
            raise ValueError(f"{field}: cannot parse {value!r} as a {kind}; use {hint}")
        try:
            result = float(Fraction(m.group("num")) * scale)
        except OverflowError:
            raise ValueError(f"{field}: {kind} must be finite, got {value!r}") from None
    else:
        result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{field}: {kind} must be finite, got {value!r}")
    if _STRICTLY_POSITIVE[kind] and result <= 0:
        raise ValueError(f"{field}: {kind} must be > 0, got {value!r}")
    if result < 0:
        raise ValueError(f"{field}: {kind} must be >= 0, got {value!r}")
    return result


def parse_bandwidth(value: str | int | float, field: str = "value") -> float:
    """Bytes/s from ``3.125e9``, ``"25Gbps"``, ``"12.5GB/s"``, ``"10GiB/s"``; must be > 0."""
    return parse("bandwidth", value, field)


def parse_time(value: str | int | float, field: str = "value") -> float:
    """Seconds from ``5e-6``, ``"5us"``, ``"5µs"``, ``"1.5ms"``, ``"2min"``; must be >= 0."""
    return parse("time", value, field)


def parse_bytes(value: str | int | float, field: str = "value") -> float:
    """Bytes from ``1024``, ``"16GiB"``, ``"512MB"``; must be >= 0."""
    return parse("bytes", value, field)


def parse_flops(value: str | int | float, field: str = "value") -> float:
    """FLOP/s from ``312e12``, ``"312TFLOPS"``, ``"19.5 TFLOP/s"``; must be > 0."""
    return parse("flops", value, field)


# --------------------------------------------------------------------------- formatting


def _fmt(value: float, steps: list[tuple[float, str]], digits: int) -> str:
    """Format with the largest unit whose scale is <= |value| (the smallest otherwise)."""
    if not math.isfinite(value):
        return f"{value} {steps[-1][1]}"
    scale, unit = steps[-1]
    for s, u in steps:
        if abs(value) >= s:
            scale, unit = s, u
            break
    return f"{value / scale:.{digits}g} {unit}"


def fmt_bandwidth(value: float, unit: Literal["B/s", "bps"] = "B/s", digits: int = 4) -> str:
    """``3.125e9`` -> ``'3.125 GB/s'``, or ``'25 Gbps'`` with ``unit="bps"`` (decimal)."""
    if unit == "bps":
        return _fmt(
            value * 8,
            [(1e12, "Tbps"), (1e9, "Gbps"), (1e6, "Mbps"), (1e3, "Kbps"), (1, "bps")],
            digits,
        )
    if unit == "B/s":
        return _fmt(
            value, [(1e12, "TB/s"), (1e9, "GB/s"), (1e6, "MB/s"), (1e3, "KB/s"), (1, "B/s")], digits
        )
    raise ValueError(f"fmt_bandwidth: unit must be 'B/s' or 'bps', got {unit!r}")


def fmt_time(value: float, digits: int = 4) -> str:
    """``5e-6`` -> ``'5 us'`` (ASCII ``us`` so tables stay plain text)."""
    if value == 0:
        return "0 s"
    return _fmt(value, [(1, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns")], digits)


def fmt_bytes(
    value: float, system: Literal["binary", "decimal"] = "binary", digits: int = 4
) -> str:
    """``16 * 2**30`` -> ``'16 GiB'``; ``system="decimal"`` gives ``'17.18 GB'``."""
    if system == "binary":
        steps = [(2.0**40, "TiB"), (2.0**30, "GiB"), (2.0**20, "MiB"), (2.0**10, "KiB"), (1, "B")]
    elif system == "decimal":
        steps = [(1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB"), (1, "B")]
    else:
        raise ValueError(f"fmt_bytes: system must be 'binary' or 'decimal', got {system!r}")
    return _fmt(value, steps, digits)


def fmt_flops(value: float, digits: int = 4) -> str:
    """``312e12`` -> ``'312 TFLOPS'``."""
    steps = [
        (1e15, "PFLOPS"),
        (1e12, "TFLOPS"),
        (1e9, "GFLOPS"),
        (1e6, "MFLOPS"),
        (1e3, "KFLOPS"),
        (1, "FLOPS"),
    ]
    return _fmt(value, steps, digits)
