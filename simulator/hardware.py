"""Hardware catalogue: real accelerators and links, every number overridable.

A :class:`Device` is what the compute model needs to turn a layer's FLOPs and
bytes into seconds (a roofline: peak FLOP/s per dtype, HBM bandwidth, two
efficiency factors and a per-kernel launch overhead). A :class:`LinkSpec` is a
kind of link (bandwidth per direction, latency per hop); ``simulator.cluster``
instantiates it into the directed links of a network graph.

Catalogue conventions, so that entries are comparable:

* FLOP/s are vendor datasheet peaks for *dense* math (the "with sparsity"
  figures are twice these). ``fp32`` is the non-tensor-core SIMT rate and
  ``tf32`` the tensor-core rate used when fp32 matmuls may use TF32; ``fp64``
  is the FP64 tensor-core rate where one exists (A100, H100), because DGEMM
  uses it.
* Memory capacities are the nominal sizes, in GiB (HBM stacks are power-of-two
  sized: an A100-80GB reports 81920 MiB); the usable share is a bit less.
* Link bandwidths are the theoretical data rates after line coding (PCIe
  128b/130b, Ethernet/IB 64b/66b), per direction. Achieved rates are lower
  (NCCL bus bandwidth ~80-90 % of NVLink peak; PCIe ~80 % after TLP
  headers); ``realrun.calibrate`` measures them and overrides these.
* Link latencies are one-way, end to end for one hop of that kind as a
  collective library sees it (not the bare wire).

``device("A100-80GB", mem_capacity="40GiB")`` and ``link("100GbE",
bandwidth="25Gbps")`` look entries up by name (case-insensitive) and override
fields; strings are parsed with :mod:`simulator.units`.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from simulator import units

__all__ = ["DTYPES", "PeakFlops", "Device", "LinkSpec", "DEVICES", "LINKS", "device", "link"]

DTYPES: tuple[str, ...] = ("fp64", "fp32", "tf32", "fp16", "bf16", "fp8", "int8")


class PeakFlops(Mapping[str, float]):
    """Read-only, hashable and picklable ``dtype -> dense FLOP/s`` table.

    (``types.MappingProxyType`` would make ``Device`` unhashable and
    unpicklable, which multiprocessing launchers need.)
    """

    __slots__ = ("_items",)

    def __init__(self, table: Mapping[str, float | str], field: str = "Device.peak_flops"):
        if not isinstance(table, Mapping):
            raise ValueError(f"{field} must be a mapping dtype -> FLOP/s, got {table!r}")
        if not table:
            raise ValueError(f"{field} must name at least one dtype out of {', '.join(DTYPES)}")
        items = []
        for dtype, value in table.items():
            if dtype not in DTYPES:
                raise ValueError(f"{field}: unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
            items.append((dtype, units.parse_flops(value, f"{field}[{dtype!r}]")))
        items.sort(key=lambda kv: DTYPES.index(kv[0]))
        self._items: tuple[tuple[str, float], ...] = tuple(items)

    def __getitem__(self, dtype: str) -> float:
        for key, value in self._items:
            if key == dtype:
                return value
        raise KeyError(dtype)

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"PeakFlops({dict(self._items)!r})"

    def __reduce__(self):
        return (PeakFlops, (dict(self._items),))


def _efficiency(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
        raise ValueError(f"{field} must be a fraction in (0, 1], got {value!r}")
    return float(value)


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclass: normalise once, at construction


def _check_name(name: Any, field: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{field} must be a non-empty string, got {name!r}")


@dataclass(frozen=True, kw_only=True)
class Device:
    """One accelerator (or CPU core) as the roofline compute model sees it."""

    name: str
    """Catalogue name, e.g. ``"A100-80GB"``."""
    peak_flops: Mapping[str, float]
    """dtype -> dense peak FLOP/s; keys among :data:`DTYPES`. Strings are parsed."""
    mem_bandwidth: float
    """Peak device-memory (HBM/DRAM) bandwidth, bytes/s."""
    mem_capacity: float
    """Device memory, bytes."""
    compute_efficiency: float = 0.6
    """Fraction of peak FLOP/s that large layers achieve. cuBLAS GEMMs reach
    70-80 % of dense peak on A100/H100, while whole-model training reaches
    40-55 % model FLOPs utilisation (Megatron-LM, PaLM reports); 0.6 sits between
    them. Calibration replaces it with a measurement."""
    memory_efficiency: float = 0.8
    """Fraction of peak memory bandwidth achieved by streaming kernels (STREAM/
    BabelStream reach 80-90 % of HBM peak)."""
    kernel_overhead: float = 5e-6
    """Seconds of fixed cost per kernel: CUDA launch plus framework dispatch
    (~3-10 us in PyTorch eager)."""

    def __post_init__(self) -> None:
        _check_name(self.name, "Device.name")
        if not isinstance(self.peak_flops, PeakFlops):
            _set(self, "peak_flops", PeakFlops(self.peak_flops))
        _set(self, "mem_bandwidth", units.parse_bandwidth(self.mem_bandwidth, "Device.mem_bandwidth"))
        capacity = units.parse_bytes(self.mem_capacity, "Device.mem_capacity")
        if capacity <= 0:
            raise ValueError(f"Device.mem_capacity must be > 0, got {self.mem_capacity!r}")
        _set(self, "mem_capacity", capacity)
        for name in ("compute_efficiency", "memory_efficiency"):
            _set(self, name, _efficiency(getattr(self, name), f"Device.{name}"))
        _set(self, "kernel_overhead", units.parse_time(self.kernel_overhead, "Device.kernel_overhead"))

    def flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype``; ``ValueError`` if this device lacks it."""
        try:
            return self.peak_flops[dtype]
        except KeyError:
            raise ValueError(
                f"device {self.name} has no peak FLOP/s for dtype {dtype!r}; "
                f"it has {', '.join(self.peak_flops)}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; ``Device.from_dict`` inverts it."""
        d = dataclasses.asdict(self)
        d["peak_flops"] = dict(self.peak_flops)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Device:
        return cls(**_known_fields(cls, d, "Device"))


@dataclass(frozen=True, kw_only=True)
class LinkSpec:
    """A kind of link: one direction's bandwidth and one hop's latency."""

    name: str
    """Catalogue name, e.g. ``"nvlink3"``, ``"100GbE"``."""
    bandwidth: float
    """Bytes/s per direction (full duplex: each direction has all of it)."""
    latency: float
    """Seconds, one way, end to end for one hop of this kind."""
    flow_window: float = 0.0
    """Bytes each flow keeps queued in this link's first-in-first-out queue (a TCP window in
    a deep buffer): a message starting on the link waits behind ``min(flow_window, bytes
    left)`` of every flow already on it (:mod:`simulator.network`). 0: no queue, max-min
    sharing from the first byte (the default; right for credit-based fabrics such as
    NVLink and InfiniBand, and for shallow switch buffers)."""
    burst: float = 0.0
    """Bytes of a token bucket that shapes the link to ``bandwidth`` (a rate limiter such as
    ``tc tbf``, or a cloud instance's network allowance): tokens accrue at ``bandwidth`` up
    to ``burst``, and while the bucket holds any the link runs at ``burst_bandwidth``
    (:mod:`simulator.network`). A message after an idle spell therefore beats the rate. 0:
    no bucket, ``bandwidth`` always (the default; a plain wire)."""
    burst_bandwidth: float = 0.0
    """Bytes/s the link runs at while its bucket holds tokens; must exceed ``bandwidth``
    when ``burst`` > 0 (the line rate behind the shaper)."""

    def __post_init__(self) -> None:
        _check_name(self.name, "LinkSpec.name")
        _set(self, "bandwidth", units.parse_bandwidth(self.bandwidth, "LinkSpec.bandwidth"))
        _set(self, "latency", units.parse_time(self.latency, "LinkSpec.latency"))
        _set(self, "flow_window", units.parse_bytes(self.flow_window, "LinkSpec.flow_window"))
        _set(self, "burst", units.parse_bytes(self.burst, "LinkSpec.burst"))
        if not (isinstance(self.burst_bandwidth, int | float) and self.burst_bandwidth == 0):
            _set(self, "burst_bandwidth", units.parse_bandwidth(self.burst_bandwidth, "LinkSpec.burst_bandwidth"))
        if self.burst > 0 and not self.burst_bandwidth > self.bandwidth:
            raise ValueError(f"LinkSpec.burst_bandwidth must exceed bandwidth ({self.bandwidth!r} B/s) when burst > 0, "
                             f"got {self.burst_bandwidth!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LinkSpec:
        return cls(**_known_fields(cls, d, "LinkSpec"))


def _known_fields(cls: type, d: Mapping[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(d, Mapping):
        raise ValueError(f"{what}: expected a mapping of fields, got {d!r}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.name not in d]
    if missing:
        raise ValueError(f"{what}: missing field(s) {', '.join(missing)}")
    return dict(d)


# --------------------------------------------------------------------------- catalogue

_GiB = 2**30
_A100 = {"fp64": 19.5e12, "fp32": 19.5e12, "tf32": 156e12, "fp16": 312e12,
         "bf16": 312e12, "int8": 624e12}


def _devices() -> dict[str, Device]:
    entries = [
        # NVIDIA Tesla P100 (SXM2/NVLink) datasheet, 2016: FP64 5.3, FP32 10.6, FP16 21.2 TFLOPS,
        # 16 GB CoWoS HBM2 at 732 GB/s.
        Device(name="P100", peak_flops={"fp64": 5.3e12, "fp32": 10.6e12, "fp16": 21.2e12},
               mem_bandwidth=732e9, mem_capacity=16 * _GiB),
        # NVIDIA Tesla V100 datasheet (SXM2), 2020: FP64 7.8, FP32 15.7, Tensor (fp16) 125 TFLOPS,
        # HBM2 900 GB/s, 16 or 32 GB. No bf16/int8 tensor cores on Volta.
        Device(name="V100-16GB", peak_flops={"fp64": 7.8e12, "fp32": 15.7e12, "fp16": 125e12},
               mem_bandwidth=900e9, mem_capacity=16 * _GiB),
        Device(name="V100-32GB", peak_flops={"fp64": 7.8e12, "fp32": 15.7e12, "fp16": 125e12},
               mem_bandwidth=900e9, mem_capacity=32 * _GiB),
        # NVIDIA A100 Tensor Core GPU datasheet (SXM), 2021: FP64 Tensor 19.5, FP32 19.5,
        # TF32 156, BF16/FP16 312, INT8 624 (dense); HBM2 1,555 GB/s (40GB), HBM2e 2,039 GB/s (80GB).
        Device(name="A100-40GB", peak_flops=_A100, mem_bandwidth=1555e9, mem_capacity=40 * _GiB),
        Device(name="A100-80GB", peak_flops=_A100, mem_bandwidth=2039e9, mem_capacity=80 * _GiB),
        # NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022), Table 3, H100 SXM5 dense:
        # FP64 Tensor 66.9, FP32 66.9, TF32 494.7, BF16/FP16 989.4, FP8 1978.9, INT8 1978.9;
        # H100 datasheet: 80 GB HBM3 at 3.35 TB/s.
        Device(name="H100-SXM",
               peak_flops={"fp64": 66.9e12, "fp32": 66.9e12, "tf32": 494.7e12,
                           "fp16": 989.4e12, "bf16": 989.4e12, "fp8": 1978.9e12,
                           "int8": 1978.9e12},
               mem_bandwidth=3.35e12, mem_capacity=80 * _GiB),
        # NVIDIA H200 Tensor Core GPU datasheet (SXM), 2024: the H100 SXM5's compute (FP64 Tensor
        # and FP32 67, TF32 495, BF16/FP16 989, FP8/INT8 1979 TFLOPS dense), HBM3e 4.8 TB/s;
        # 141 GB, of which nvidia-smi reports 143771 MiB.
        Device(name="H200-SXM",
               peak_flops={"fp64": 66.9e12, "fp32": 66.9e12, "tf32": 494.7e12,
                           "fp16": 989.4e12, "bf16": 989.4e12, "fp8": 1978.9e12,
                           "int8": 1978.9e12},
               mem_bandwidth=4.8e12, mem_capacity=143771 * 2**20),
        # One server x86 core (assumption, to be replaced by realrun.calibrate): two AVX-512 FMA
        # ports x 16 fp32 lanes x 2 FLOP x 2.5 GHz all-core AVX-512 clock = 160 GFLOP/s fp32,
        # half that for fp64 (Intel Ice Lake-SP / Sapphire Rapids class). Memory: its share of an
        # 8-channel DDR4-3200 socket (204.8 GB/s) across 32 cores = 6.4 GB/s, and of 256 GiB = 8 GiB.
        Device(name="cpu-core", peak_flops={"fp64": 80e9, "fp32": 160e9},
               mem_bandwidth=6.4e9, mem_capacity=8 * _GiB),
        # The whole socket of the same class, as a parameter-server process with one thread per
        # core uses it: 32 x 160 GFLOP/s fp32, all 8 channels of DDR4-3200 (204.8 GB/s), 256 GiB.
        # Streaming optimizer updates reach ~80 % of that bandwidth (STREAM triad on such parts).
        Device(name="cpu-socket", peak_flops={"fp64": 2.56e12, "fp32": 5.12e12},
               mem_bandwidth=204.8e9, mem_capacity=256 * _GiB, kernel_overhead=2e-6),
    ]
    return {d.name: d for d in entries}


def _pcie_x16(gigatransfers: float) -> float:
    # PCI-SIG base specs: gen3 8 GT/s, gen4 16, gen5 32 per lane, 128b/130b coding, 16 lanes.
    return gigatransfers * 1e9 * 16 * 128 / 130 / 8


def _links() -> dict[str, LinkSpec]:
    entries = [
        # NVLink totals per GPU, per direction (NVIDIA P100/V100/A100/H100 datasheets and
        # whitepapers: 4/6/12/18 links x 20/25/25/25 GB/s). Latency 1 us: NCCL's tuning model
        # (src/graph/tuning.cc hwLat) charges ~0.5-1.9 us per NVLink hop for LL/LL128.
        LinkSpec(name="nvlink1", bandwidth=80e9, latency=1e-6),
        LinkSpec(name="nvlink2", bandwidth=150e9, latency=1e-6),
        LinkSpec(name="nvlink3", bandwidth=300e9, latency=1e-6),
        LinkSpec(name="nvlink4", bandwidth=450e9, latency=1e-6),
        # PCIe x16 theoretical after coding: 15.75 / 31.5 / 63.0 GB/s per direction (effective
        # ~12-13 / 25-26 / 50-52 after TLP overhead). 2 us: a GPU-to-GPU copy through the root
        # complex or a PCIe switch as NCCL's PCI hop model has it (~1-2 us).
        LinkSpec(name="pcie3", bandwidth=_pcie_x16(8), latency=2e-6),
        LinkSpec(name="pcie4", bandwidth=_pcie_x16(16), latency=2e-6),
        LinkSpec(name="pcie5", bandwidth=_pcie_x16(32), latency=2e-6),
        # InfiniBand (IBTA): EDR 100, HDR 200, NDR 400 Gb/s per 4x port. Adapter-to-adapter
        # verbs latency is ~0.6-1 us (ConnectX-5/6/7 briefs) plus ~0.1-0.2 us per switch;
        # 2 us is the one-hop figure as NCCL's net transport sees it (GPUDirect RDMA, proxy).
        LinkSpec(name="IB-EDR", bandwidth=100e9 / 8, latency=2e-6),
        LinkSpec(name="IB-HDR", bandwidth=200e9 / 8, latency=2e-6),
        LinkSpec(name="IB-NDR", bandwidth=400e9 / 8, latency=2e-6),
    ]
    # Ethernet (IEEE 802.3) line rates. Kernel TCP: 20 us one way (netperf TCP_RR round trips
    # of ~30-50 us on 10-100 GbE through one switch). RoCE v2 bypasses the kernel: 3 us.
    for gbit in (10, 25, 40, 100, 200, 400):
        entries.append(LinkSpec(name=f"{gbit}GbE", bandwidth=gbit * 1e9 / 8, latency=20e-6))
    for gbit in (25, 100, 200, 400):
        entries.append(LinkSpec(name=f"{gbit}GbE-RoCE", bandwidth=gbit * 1e9 / 8, latency=3e-6))
    return {s.name: s for s in entries}


_DEVICE_ALIASES = {"V100": "V100-32GB", "H100": "H100-SXM", "H200": "H200-SXM"}
_LINK_ALIASES = {"EDR": "IB-EDR", "HDR": "IB-HDR", "NDR": "IB-NDR"}


def _with_aliases(table: dict, aliases: dict[str, str]) -> Mapping:
    return MappingProxyType({**table, **{a: table[t] for a, t in aliases.items()}})


DEVICES: Mapping[str, Device] = _with_aliases(_devices(), _DEVICE_ALIASES)
"""Catalogue of devices by name (aliases ``V100`` = V100-32GB, ``H100`` = H100-SXM, ``H200`` = H200-SXM)."""
LINKS: Mapping[str, LinkSpec] = _with_aliases(_links(), _LINK_ALIASES)
"""Catalogue of link kinds by name (aliases ``EDR``/``HDR``/``NDR`` = IB-*)."""


def _lookup(table: Mapping[str, Any], name: str, what: str, field: str) -> Any:
    by_lower = {k.lower(): v for k, v in table.items()}
    try:
        return by_lower[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"{field}: unknown {what} {name!r}; known {what}s: {', '.join(table)}"
        ) from None


def _resolve(cls, table, spec, overrides, what, field):
    if isinstance(spec, cls):
        base = spec
    elif isinstance(spec, str):
        base = _lookup(table, spec, what, field)
    elif isinstance(spec, Mapping):
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if required <= set(spec):  # a full specification: no catalogue involved
            base = cls.from_dict(spec)
        elif "name" in spec:  # a catalogue name plus overrides
            base = _lookup(table, spec["name"], what, field)
            overrides = {**{k: v for k, v in spec.items() if k != "name"}, **overrides}
        else:
            raise ValueError(
                f"{field}: a {what} mapping needs either all of {', '.join(sorted(required))} "
                f"or the 'name' of a catalogue {what}; got keys {', '.join(spec) or 'none'}"
            )
    else:
        raise ValueError(
            f"{field}: expected a {what} name, a {cls.__name__} or a mapping, got {spec!r}"
        )
    if not overrides:
        return base
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(
            f"{field}: cannot override {', '.join(unknown)}; {cls.__name__} fields: {', '.join(allowed)}"
        )
    if "peak_flops" in overrides:  # merge per dtype, so calibrating bf16 keeps the rest
        pf = overrides["peak_flops"]
        if not isinstance(pf, Mapping):
            raise ValueError(f"{field}.peak_flops must be a mapping dtype -> FLOP/s, got {pf!r}")
        overrides = {**overrides, "peak_flops": {**base.peak_flops, **pf}}
    return dataclasses.replace(base, **overrides)


def device(spec: str | Device | Mapping[str, Any], **overrides: Any) -> Device:
    """A device by catalogue name (case-insensitive), object or mapping, with overrides.

    A mapping is either a full specification (all required fields) or a
    catalogue ``name`` plus fields to override. ``peak_flops`` overrides are
    merged per dtype into the base table. Strings are parsed with units.
    """
    return _resolve(Device, DEVICES, spec, overrides, "device", "device")


def link(spec: str | LinkSpec | Mapping[str, Any], **overrides: Any) -> LinkSpec:
    """A link kind by catalogue name (case-insensitive), object or mapping, with overrides."""
    return _resolve(LinkSpec, LINKS, spec, overrides, "link", "link")


def _device_for(spec: Any, field: str, **overrides: Any) -> Device:
    """``device`` with errors prefixed by the caller's field name (for Cluster)."""
    return _resolve(Device, DEVICES, spec, overrides, "device", field)


def _link_for(spec: Any, field: str, **overrides: Any) -> LinkSpec:
    return _resolve(LinkSpec, LINKS, spec, overrides, "link", field)
