"""Hardware catalogue: published figures, lookups, overrides, validation."""

import dataclasses
import json
import pickle

import pytest

from simulator.hardware import DEVICES, DTYPES, LINKS, Device, LinkSpec, PeakFlops, device, link

GiB = 2**30


def test_published_gpu_figures():
    # Vendor datasheets / whitepapers, dense tensor-core math.
    a100 = DEVICES["A100-80GB"]
    assert a100.flops("bf16") == 312e12
    assert a100.flops("tf32") == 156e12
    assert a100.flops("fp32") == 19.5e12
    assert a100.mem_bandwidth == 2.039e12
    assert a100.mem_capacity == 80 * GiB
    assert DEVICES["A100-40GB"].mem_bandwidth == 1555e9
    assert DEVICES["A100-40GB"].mem_capacity == 40 * GiB
    h100 = DEVICES["H100-SXM"]
    assert h100.flops("bf16") == pytest.approx(989e12, rel=1e-3)
    assert h100.flops("fp8") == pytest.approx(2 * h100.flops("bf16"), rel=1e-4)
    assert h100.mem_bandwidth == 3.35e12
    h200 = DEVICES["H200"]  # H200 datasheet: the H100's compute, 4.8 TB/s, 141 GB
    assert h200.flops("bf16") == h100.flops("bf16") and h200.flops("fp32") == pytest.approx(67e12, rel=1e-2)
    assert h200.mem_bandwidth == 4.8e12 and h200.mem_capacity == pytest.approx(141e9, rel=0.075)
    v100 = DEVICES["V100"]
    assert v100.flops("fp16") == 125e12
    assert v100.mem_bandwidth == 900e9
    assert v100.mem_capacity == 32 * GiB
    assert DEVICES["V100-16GB"].mem_capacity == 16 * GiB
    p100 = DEVICES["P100"]
    assert p100.flops("fp16") == 21.2e12 and p100.mem_bandwidth == 732e9


def test_generations_are_ordered():
    h100, a100, v100, p100 = (DEVICES[n] for n in ("H100-SXM", "A100-80GB", "V100", "P100"))
    assert h100.flops("bf16") > a100.flops("bf16") > v100.flops("fp16") > p100.flops("fp16")
    assert h100.mem_bandwidth > a100.mem_bandwidth > v100.mem_bandwidth > p100.mem_bandwidth
    gpu_fp32 = min(d.flops("fp32") for d in (h100, a100, v100, p100))
    assert DEVICES["cpu-core"].flops("fp32") < gpu_fp32 / 10


@pytest.mark.parametrize("name", list(DEVICES))
def test_every_device_is_sane(name):
    d = DEVICES[name]
    assert set(d.peak_flops) <= set(DTYPES) and "fp32" in d.peak_flops
    # Tensor-core dtypes are never slower than fp32 SIMT.
    for dtype in d.peak_flops:
        if dtype not in ("fp64", "fp32"):
            assert d.flops(dtype) >= d.flops("fp32")
    assert 0 < d.compute_efficiency <= 1 and 0 < d.memory_efficiency <= 1
    assert d.mem_capacity > 0 and d.mem_bandwidth > 0 and d.kernel_overhead >= 0


def test_published_link_figures():
    assert LINKS["nvlink2"].bandwidth == 150e9
    assert LINKS["nvlink3"].bandwidth == 300e9
    assert LINKS["nvlink4"].bandwidth == 450e9
    assert LINKS["pcie3"].bandwidth == pytest.approx(15.75e9, rel=1e-3)
    assert LINKS["pcie4"].bandwidth == pytest.approx(2 * LINKS["pcie3"].bandwidth)
    assert LINKS["pcie5"].bandwidth == pytest.approx(4 * LINKS["pcie3"].bandwidth)
    for gbit in (10, 25, 40, 100, 200, 400):
        assert LINKS[f"{gbit}GbE"].bandwidth == gbit * 1e9 / 8
    assert LINKS["IB-EDR"].bandwidth == 100e9 / 8
    assert LINKS["IB-HDR"].bandwidth == 200e9 / 8
    assert LINKS["IB-NDR"].bandwidth == 400e9 / 8
    assert LINKS["HDR"] is LINKS["IB-HDR"]
    # Kernel TCP is slower to start than RDMA, which is slower than NVLink.
    assert LINKS["100GbE"].latency > LINKS["100GbE-RoCE"].latency > LINKS["nvlink3"].latency
    assert LINKS["IB-HDR"].latency <= 2e-6


def test_flops_error_lists_the_dtypes():
    with pytest.raises(ValueError, match=r"device V100-32GB has no peak FLOP/s for dtype 'bf16'; it has fp64, fp32, fp16"):
        DEVICES["V100"].flops("bf16")


def test_lookup_is_case_insensitive_and_unknown_names_list_the_known():
    assert device("a100-80gb") is DEVICES["A100-80GB"]
    assert device("h100") is DEVICES["H100-SXM"]
    assert link("NVLink3") is LINKS["nvlink3"]
    assert link("100gbe") is LINKS["100GbE"]
    with pytest.raises(ValueError, match=r"unknown device 'Z100'; known devices: P100, .*A100-80GB.*cpu-core"):
        device("Z100")
    with pytest.raises(ValueError, match=r"unknown link '1GbE'; known links: nvlink1, .*100GbE"):
        link("1GbE")
    with pytest.raises(ValueError, match="expected a device name"):
        device(42)


def test_overrides_are_parsed_and_validated():
    d = device("A100-80GB", mem_capacity="40GiB", mem_bandwidth="1.555TB/s", kernel_overhead="3us")
    assert d.mem_capacity == 40 * GiB and d.mem_bandwidth == 1.555e12 and d.kernel_overhead == 3e-6
    assert d.name == "A100-80GB" and d.flops("bf16") == 312e12
    lk = link("100GbE", bandwidth="25Gbps", latency="5us")
    assert lk == LinkSpec(name="100GbE", bandwidth=25e9 / 8, latency=5e-6)
    with pytest.raises(ValueError, match="cannot override speed; Device fields: name, peak_flops"):
        device("P100", speed=1)
    with pytest.raises(ValueError, match=r"^LinkSpec\.latency: time must be >= 0"):
        link("100GbE", latency=-1)


def test_peak_flops_override_merges_per_dtype():
    d = device("A100-80GB", peak_flops={"bf16": "250TFLOPS"})
    assert d.flops("bf16") == 250e12
    assert d.flops("fp16") == 312e12  # untouched


def test_mapping_specs():
    # catalogue name plus overrides
    d = device({"name": "h100-sxm", "compute_efficiency": 0.45})
    assert d.name == "H100-SXM" and d.compute_efficiency == 0.45
    # full specification, no catalogue
    custom = device({"name": "TPUish", "peak_flops": {"bf16": "275TFLOPS"},
                     "mem_bandwidth": "1.2TB/s", "mem_capacity": "32GiB"})
    assert custom.flops("bf16") == 275e12 and custom.mem_capacity == 32 * GiB
    assert link({"name": "lo", "bandwidth": "10GB/s", "latency": "10us"}).latency == 10e-6
    with pytest.raises(ValueError, match="needs either all of"):
        device({"mem_bandwidth": 1})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mem_bandwidth", 0, "Device.mem_bandwidth: bandwidth must be > 0"),
        ("mem_bandwidth", "fast", "Device.mem_bandwidth: cannot parse 'fast' as a bandwidth"),
        ("mem_capacity", 0, "Device.mem_capacity must be > 0"),
        ("compute_efficiency", 0, r"Device.compute_efficiency must be a fraction in \(0, 1\], got 0"),
        ("compute_efficiency", 1.5, "Device.compute_efficiency must be a fraction"),
        ("memory_efficiency", float("nan"), "Device.memory_efficiency must be a fraction"),
        ("kernel_overhead", -1e-6, "Device.kernel_overhead: time must be >= 0"),
        ("name", "", "Device.name must be a non-empty string"),
        ("peak_flops", {}, "Device.peak_flops must name at least one dtype"),
        ("peak_flops", {"fp4": 1e15}, "Device.peak_flops: unknown dtype 'fp4'; use one of fp64"),
        ("peak_flops", {"bf16": -1}, r"Device.peak_flops\['bf16'\]: flops must be > 0"),
    ],
)
def test_device_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(DEVICES["A100-80GB"], **{field: value})


def test_link_validation_names_the_field():
    with pytest.raises(ValueError, match="LinkSpec.bandwidth: bandwidth must be > 0"):
        LinkSpec(name="x", bandwidth=0, latency=0)
    with pytest.raises(ValueError, match="LinkSpec.latency: time must be finite"):
        LinkSpec(name="x", bandwidth=1, latency=float("inf"))
    with pytest.raises(ValueError, match="LinkSpec.flow_window"):
        LinkSpec(name="x", bandwidth=1, latency=0, flow_window=-1)
    assert LinkSpec(name="x", bandwidth=1, latency=0, flow_window="512KB").flow_window == 512e3
    with pytest.raises(ValueError, match="LinkSpec.burst"):
        LinkSpec(name="x", bandwidth=1, latency=0, burst=-1)
    with pytest.raises(ValueError, match="LinkSpec.burst_bandwidth must exceed bandwidth"):
        LinkSpec(name="x", bandwidth="400Mbps", latency=0, burst="200KB")
    with pytest.raises(ValueError, match="LinkSpec.burst_bandwidth must exceed bandwidth"):
        LinkSpec(name="x", bandwidth="400Mbps", latency=0, burst="200KB", burst_bandwidth="300Mbps")
    shaped = LinkSpec(name="x", bandwidth="400Mbps", latency=0, burst="200KB", burst_bandwidth="10Gbps")
    assert (shaped.burst, shaped.burst_bandwidth) == (200e3, 1.25e9)
    assert LinkSpec.from_dict(shaped.to_dict()) == shaped


def test_devices_are_immutable_hashable_picklable_and_round_trip():
    d = DEVICES["H100-SXM"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.mem_capacity = 1
    with pytest.raises(TypeError):
        d.peak_flops["bf16"] = 1.0
    assert isinstance(d.peak_flops, PeakFlops)
    assert len({d, device("H100")}) == 1
    assert pickle.loads(pickle.dumps(d)) == d
    assert Device.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    lk = LINKS["IB-NDR"]
    assert LinkSpec.from_dict(json.loads(json.dumps(lk.to_dict()))) == lk
    with pytest.raises(ValueError, match="unknown field"):
        Device.from_dict({**d.to_dict(), "tdp": 700})
    assert d.peak_flops == dict(d.peak_flops)  # compares like a dict
