"""Units: exact parsing of human strings, fmt/parse round trips, error messages."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulator import units
from simulator.units import (
    fmt_bandwidth,
    fmt_bytes,
    fmt_flops,
    fmt_time,
    parse,
    parse_bandwidth,
    parse_bytes,
    parse_flops,
    parse_time,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("25Gbps", 25e9 / 8),
        ("25 Gbps", 25e9 / 8),
        ("25Gb/s", 25e9 / 8),
        ("25Gbit/s", 25e9 / 8),
        ("100Mbps", 100e6 / 8),
        ("1Tbps", 1e12 / 8),
        ("10Kbps", 10e3 / 8),
        ("12.5GB/s", 12.5e9),
        ("12.5GBps", 12.5e9),
        ("2TB/s", 2e12),
        ("300 MB/s", 300e6),
        ("1KB/s", 1e3),
        ("1KiB/s", 1024.0),
        ("10GiB/s", 10 * 2**30),
        ("1MiB/s", 2**20),
        ("5e9", 5e9),  # a bare number string is SI
        (3.125e9, 3.125e9),
        (7, 7.0),
    ],
)
def test_parse_bandwidth_exact(text, expected):
    assert parse_bandwidth(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5us", 5e-6),
        ("5 us", 5e-6),
        ("5\u00b5s", 5e-6),
        ("5\u03bcs", 5e-6),
        ("0.1us", 1e-7),
        ("500ns", 500e-9),
        ("1.5ms", 1.5e-3),
        ("2s", 2.0),
        ("2min", 120.0),
        ("0", 0.0),
        (0, 0.0),
        (1e-6, 1e-6),
    ],
)
def test_parse_time_exact(text, expected):
    assert parse_time(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16GiB", 16 * 2**30),
        ("16GB", 16e9),
        ("512MB", 512e6),
        ("4KiB", 4096.0),
        ("1TiB", 2.0**40),
        ("1TB", 1e12),
        ("100B", 100.0),
        ("1.5MiB", 1.5 * 2**20),
        (0, 0.0),
    ],
)
def test_parse_bytes_exact(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("312TFLOPS", 312e12),
        ("312 TFLOP/s", 312e12),
        ("19.5TFLOPS", 19.5e12),
        ("989.4 TFLOPs", 989.4e12),
        ("160GFLOPS", 160e9),
        ("1PFLOPS", 1e15),
        ("1e12", 1e12),
    ],
)
def test_parse_flops_exact(text, expected):
    assert parse_flops(text) == expected


def test_generic_parse_dispatches_by_kind():
    assert parse("bandwidth", "25Gbps") == 25e9 / 8
    assert parse("time", "5us") == 5e-6
    assert parse("bytes", "16GiB") == 16 * 2**30
    assert parse("flops", "1TFLOPS") == 1e12
    with pytest.raises(ValueError, match="unknown quantity kind 'speed'"):
        parse("speed", 1, field="x")


def test_unparsable_message_names_field_value_and_what_is_allowed():
    with pytest.raises(ValueError) as info:
        parse_bandwidth("25Gbsp", "inter.bandwidth")
    assert str(info.value) == (
        "inter.bandwidth: cannot parse '25Gbsp' as a bandwidth; "
        "use a number in bytes/s or a string like '25Gbps', '12.5GB/s'"
    )


@pytest.mark.parametrize(
    ("func", "value"),
    [
        (parse_bandwidth, "16GiB"),  # a size, not a rate
        (parse_time, "5 parsecs"),
        (parse_time, "5Us"),
        (parse_bytes, "16Gb"),  # gigabits are not a memory size
        (parse_bytes, "16 GiB/s"),
        (parse_flops, "312 TOPS"),
        (parse_flops, "fast"),
        (parse_time, ""),
        (parse_time, None),
        (parse_time, True),
        (parse_time, [1]),
    ],
)
def test_bad_strings_raise_value_error_naming_the_field(func, value):
    with pytest.raises(ValueError, match=r"^my\.field: "):
        func(value, "my.field")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "nan", "inf", "-inf", "1e999GB/s"])
def test_non_finite_rejected(value):
    with pytest.raises(ValueError, match="inter.bandwidth: bandwidth must be finite"):
        parse_bandwidth(value, "inter.bandwidth")


def test_signs():
    with pytest.raises(ValueError, match="bandwidth must be > 0, got 0"):
        parse_bandwidth(0, "b")
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        parse_bandwidth("-1Gbps", "b")
    with pytest.raises(ValueError, match="flops must be > 0"):
        parse_flops(0, "f")
    with pytest.raises(ValueError, match="lat: time must be >= 0, got '-5us'"):
        parse_time("-5us", "lat")
    with pytest.raises(ValueError, match="bytes must be >= 0"):
        parse_bytes(-1, "size")
    assert parse_time(0, "lat") == 0.0


def test_numpy_scalars_are_numbers():
    import numpy as np
    assert parse_time(np.float64(2e-6)) == 2e-6
    assert parse_bytes(np.int64(1024)) == 1024.0


def test_format_examples():
    assert fmt_bandwidth(3.125e9) == "3.125 GB/s"
    assert fmt_bandwidth(3.125e9, "bps") == "25 Gbps"
    assert fmt_time(5e-6) == "5 us"
    assert fmt_time(1.5e-3) == "1.5 ms"
    assert fmt_time(0) == "0 s"
    assert fmt_bytes(16 * 2**30) == "16 GiB"
    assert fmt_bytes(512e6, "decimal") == "512 MB"
    assert fmt_flops(312e12) == "312 TFLOPS"
    with pytest.raises(ValueError, match="unit must be"):
        fmt_bandwidth(1, "bits")


positive = st.floats(min_value=1e-12, max_value=1e18, allow_nan=False, allow_infinity=False)
FORMATTERS = [
    ("bandwidth", lambda x, d: fmt_bandwidth(x, digits=d)),
    ("bandwidth", lambda x, d: fmt_bandwidth(x, "bps", digits=d)),
    ("time", lambda x, d: fmt_time(x, digits=d)),
    ("bytes", lambda x, d: fmt_bytes(x, digits=d)),
    ("bytes", lambda x, d: fmt_bytes(x, "decimal", digits=d)),
    ("flops", lambda x, d: fmt_flops(x, digits=d)),
]


@pytest.mark.parametrize(("kind", "fmt"), FORMATTERS)
@given(x=positive)
def test_fmt_parse_round_trip_full_precision(kind, fmt, x):
    assert math.isclose(parse(kind, fmt(x, 17)), x, rel_tol=1e-14)


@pytest.mark.parametrize(("kind", "fmt"), FORMATTERS)
@given(x=positive)
def test_fmt_parse_round_trip_table_precision(kind, fmt, x):
    # 4 significant digits: within half a unit in the 4th digit.
    assert math.isclose(parse(kind, fmt(x, 4)), x, rel_tol=5e-4)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ns", "us", "ms", "s"]))
def test_integer_time_strings_equal_python_literals(n, unit):
    # "<n><unit>" must equal the float literal "<n>e<exp>": parsing rounds once.
    exp = {"ns": -9, "us": -6, "ms": -3, "s": 0}[unit]
    assert parse_time(f"{n}{unit}") == float(f"{n}e{exp}")


def test_kinds_listed():
    assert set(units.KINDS) == {"bandwidth", "time", "bytes", "flops"}
