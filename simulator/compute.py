"""How long compute ops take on a device.

Per layer, a roofline: the larger of FLOPs at the device's peak for the
precision (times an efficiency) and bytes moved at its memory bandwidth (times
an efficiency), plus a launch overhead per kernel. Forward moves the weights
once and the activations of every sample in and out; backward moves weights
and weight gradients, and reads the saved input and the output gradient, and
writes the input gradient. The optimizer step is memory-bound: it streams the
fp32 parameters, gradients and optimizer state.

Noise multiplies each op's time (or, with ``scope="iteration"``, every op of
a rank's iteration alike) by a draw with mean 1 from the chosen distribution
(from the experiment's seeded generators); stragglers multiply every op of a
rank by a fixed slowdown, and transient slowdowns do so for a window of time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import numpy as np

Precision = Literal["fp32", "tf32", "fp16", "bf16"]
PRECISION_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2}
Optimizer = Literal["sgd", "momentum", "adam", "adagrad", "rmsprop"]


@dataclass(frozen=True, slots=True)
class OptimizerCost:
    words_moved: int
    """fp32 words read plus written per parameter."""
    flops: int
    """Floating-point operations per parameter."""


# SGD: read w, g, write w. Momentum: + read/write buffer. Adam: read w, g, m, v and
# write w, m, v; ~12 FLOPs for the moments, bias correction and the sqrt/divide.
OPTIMIZERS: Mapping[str, OptimizerCost] = MappingProxyType({
    "sgd": OptimizerCost(3, 2),
    "momentum": OptimizerCost(5, 4),
    "adam": OptimizerCost(7, 12),
    "adagrad": OptimizerCost(5, 6),
    "rmsprop": OptimizerCost(5, 7),
})


DISTRIBUTIONS = ("lognormal", "normal", "exponential", "deterministic")
SCOPES = ("op", "iteration")


@dataclass(frozen=True, kw_only=True)
class Slowdown:
    """A transient slowdown: compute ops that ``rank`` starts in ``[start, end)`` take ``factor`` x longer."""

    rank: int
    start: float
    """Seconds of simulated time."""
    end: float
    factor: float

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"Slowdown.rank must be an integer >= 0, got {self.rank!r}")
        for name in ("start", "end", "factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Slowdown.{name} must be a finite number >= 0, got {value!r}")
        if self.end <= self.start:
            raise ValueError(f"Slowdown.end must be after start ({self.start}), got {self.end!r}")
        if self.factor <= 0:
            raise ValueError(f"Slowdown.factor must be > 0, got {self.factor!r}")


@dataclass(frozen=True, kw_only=True)
class ComputeModel:
    """Variability of compute: per-op noise, stragglers, transient slowdowns.

    Each compute op's time is its model time times a draw with mean 1 from
    ``distribution``: ``lognormal`` or ``normal`` (truncated at zero) with
    coefficient of variation ``noise_cv``; ``exponential``: an op of model
    time ``t`` takes ``shift * t`` plus an exponential time of mean
    ``(1 - shift) * t`` (``shift = 0``: exponential of rate ``1/t``, the
    straggler analyses' model; ``shift > 0``: the shifted exponential of
    Dutta et al., AISTATS 2018); ``deterministic``. With ``scope="iteration"``
    one draw covers all the compute ops of a rank's iteration, so a worker's
    iteration time has the distribution itself (the form K-of-N analyses
    assume); with ``scope="op"`` each op draws. Draws come from one generator
    per rank, made from the experiment's seed.
    """

    distribution: str = "lognormal"
    noise_cv: float = 0.0
    """Coefficient of variation for ``lognormal``/``normal`` (0 = no noise); unused otherwise."""
    scope: str = "op"
    """``op``: a draw per compute op; ``iteration``: one draw per rank per iteration."""
    shift: float = 0.0
    """For ``exponential``: the deterministic share of the mean, in [0, 1)."""
    stragglers: Mapping[int, float] = field(default_factory=dict)
    """Rank -> slowdown factor (2.0 = every op of that rank takes twice as long)."""
    slowdowns: tuple[Slowdown, ...] = ()
    """Transient slowdowns (a rank slowed for a window of simulated time)."""
    shared_cores: int = 0
    """0: every rank computes on a device of its own. ``n >= 1``: all the run's ranks
    time-share ``n`` processor cores (an emulated cluster on one machine): while ``k``
    compute ops are in progress each advances at ``min(1, n / k)`` of its own speed, as
    an operating system's fair scheduler shares cores (processor sharing)."""
    message_delay: tuple[float, ...] = ()
    """Seconds each message spends in its hosts' software beyond its path's latency (a
    thread woken by the operating system, the copies in and out), by how many of the
    ``shared_cores`` are busy computing when it starts: entry ``b`` for ``b`` busy cores, the
    last entry for more (without ``shared_cores``, entry 0). On a machine whose cores the
    ranks oversubscribe a small message's round trip grows from a fraction of a
    millisecond to several; :func:`realrun.linkcal.calibrate_message_delay` measures it
    with ``b`` cores kept busy. Empty: no delay."""
    cost_scale: Mapping[str, float] = field(default_factory=dict)
    """Measured over modelled time of compressors' work, keyed ``"<compressor>.encode"`` or
    ``"<compressor>.decode"`` (e.g. ``{"topk.encode": 6.0}``): the roofline of a
    compressor's :class:`~strategies.compression.Cost` times this. Calibration fills it
    from the real encode and decode; missing keys are 1."""

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"compute.distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        if isinstance(self.noise_cv, bool) or not (isinstance(self.noise_cv, int | float) and 0 <= self.noise_cv < 10):
            raise ValueError(f"compute.noise_cv must be a number in [0, 10), got {self.noise_cv!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"compute.scope must be one of {SCOPES}, got {self.scope!r}")
        if isinstance(self.shift, bool) or not (isinstance(self.shift, int | float) and 0 <= self.shift < 1):
            raise ValueError(f"compute.shift must be a number in [0, 1), got {self.shift!r}")
        if not isinstance(self.stragglers, Mapping):
            raise ValueError(f"compute.stragglers must be a table of rank -> slowdown factor, got {self.stragglers!r}")
        if isinstance(self.slowdowns, str | Mapping) or not isinstance(self.slowdowns, tuple | list):
            raise ValueError(f"compute.slowdowns must be a list of windows, got {self.slowdowns!r}")
        clean = {}
        for rank, slowdown in dict(self.stragglers).items():
            try:
                r = int(rank)
            except (TypeError, ValueError):
                raise ValueError(f"compute.stragglers keys must be ranks (integers), got {rank!r}") from None
            if r < 0:
                raise ValueError(f"compute.stragglers rank must be >= 0, got {r}")
            if isinstance(slowdown, bool) or not (isinstance(slowdown, int | float) and slowdown > 0
                                                  and math.isfinite(slowdown)):
                raise ValueError(f"compute.stragglers[{r}] must be a slowdown factor > 0, got {slowdown!r}")
            clean[r] = float(slowdown)
        object.__setattr__(self, "stragglers", clean)  # a private copy; picklable for process pools
        windows = []
        for item in self.slowdowns:
            if isinstance(item, Mapping):
                try:
                    item = Slowdown(**item)
                except TypeError:
                    raise ValueError(
                        f"compute.slowdowns entries need rank, start, end, factor; got {dict(item)!r}"
                    ) from None
            if not isinstance(item, Slowdown):
                raise ValueError(f"compute.slowdowns entries must be Slowdown or tables, got {item!r}")
            windows.append(item)
        object.__setattr__(self, "slowdowns", tuple(windows))
        if not isinstance(self.cost_scale, Mapping):
            raise ValueError(f"compute.cost_scale must be a table of '<compressor>.encode|decode' -> factor, "
                             f"got {self.cost_scale!r}")
        scales = {}
        for key, factor in dict(self.cost_scale).items():
            name, _, kind = str(key).partition(".")
            if not name or kind not in ("encode", "decode"):
                raise ValueError(f"compute.cost_scale keys must be '<compressor>.encode' or '<compressor>.decode', "
                                 f"got {key!r}")
            if isinstance(factor, bool) or not (isinstance(factor, int | float) and factor > 0
                                                and math.isfinite(factor)):
                raise ValueError(f"compute.cost_scale[{key!r}] must be a factor > 0, got {factor!r}")
            scales[str(key)] = float(factor)
        object.__setattr__(self, "cost_scale", scales)
        if isinstance(self.shared_cores, bool) or not isinstance(self.shared_cores, int) or self.shared_cores < 0:
            raise ValueError(f"compute.shared_cores must be an integer >= 0 (0: no sharing), got {self.shared_cores!r}")
        if isinstance(self.message_delay, str | Mapping) or not isinstance(self.message_delay, tuple | list):
            raise ValueError(f"compute.message_delay must be a list of seconds by busy cores, got {self.message_delay!r}")
        for b, d in enumerate(self.message_delay):
            if isinstance(d, bool) or not (isinstance(d, int | float) and 0 <= d and math.isfinite(d)):
                raise ValueError(f"compute.message_delay[{b}] must be seconds >= 0, got {d!r}")
        object.__setattr__(self, "message_delay", tuple(float(d) for d in self.message_delay))

    def to_dict(self) -> dict:
        return {
            "distribution": self.distribution,
            "noise_cv": self.noise_cv,
            "scope": self.scope,
            "shift": self.shift,
            "stragglers": {str(k): v for k, v in self.stragglers.items()},
            "slowdowns": [dataclasses.asdict(w) for w in self.slowdowns],
            "shared_cores": self.shared_cores,
            "message_delay": list(self.message_delay),
            "cost_scale": dict(self.cost_scale),
        }

    def factor(self, rng: np.random.Generator) -> float:
        """One multiplicative draw with mean 1."""
        if self.distribution == "exponential":
            return self.shift + (1.0 - self.shift) * rng.exponential(1.0)
        cv = self.noise_cv
        if cv == 0 or self.distribution == "deterministic":
            return 1.0
        if self.distribution == "lognormal":
            sigma2 = math.log1p(cv * cv)
            return rng.lognormal(-0.5 * sigma2, math.sqrt(sigma2))
        for _ in range(1000):  # normal, truncated at zero by resampling
            x = rng.normal(1.0, cv)
            if x > 0:
                return x
        raise ValueError(f"compute.noise_cv={cv} leaves almost no positive normal draws; use lognormal")


def layer_times(workload, device, precision: str, samples: int, tp: int = 1,
                sequence_parallel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Forward and backward seconds of every layer for a batch of ``samples``.

    With tensor parallelism of degree ``tp`` each layer's FLOPs, parameters and activations
    shrink by its role's split (:func:`strategies.tensor_parallel.split_factors`); kernel
    launches stay as many.
    """
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision must be one of {tuple(PRECISION_BYTES)}, got {precision!r}")
    e = PRECISION_BYTES[precision]
    peak = device.flops(precision) * device.compute_efficiency
    bw = device.mem_bandwidth * device.memory_efficiency
    overhead = device.kernel_overhead
    n = len(workload.layers)
    fwd = np.empty(n)
    bwd = np.empty(n)
    if tp > 1:
        from strategies.tensor_parallel import split_factors

        splits = [split_factors(role, tp, sequence_parallel) for role in workload.tp_roles]
    for i, layer in enumerate(workload.layers):
        work, fpar, fin, fout = splits[i] if tp > 1 else (1.0, 1.0, 1.0, 1.0)
        if layer.fwd_time is not None and layer.bwd_time is not None:
            f, b = _measured(workload, layer, samples)
            fwd[i], bwd[i] = f * work, b * work
            continue
        params = layer.params * fpar
        inp = layer.input_elems * fin
        out = layer.output_elems * fout
        f_bytes = e * (params + samples * (inp + out))
        b_bytes = e * (2 * params + samples * (out + 2 * inp))
        fwd[i] = max(layer.fwd_flops * work * samples / peak, f_bytes / bw) + layer.kernels * overhead
        bwd[i] = max(layer.bwd_flops * work * samples / peak, b_bytes / bw) + 2 * layer.kernels * overhead
    return fwd, bwd


def _measured(workload, layer, samples: int) -> tuple[float, float]:
    """Measured per-layer times at ``samples``: scaled linearly from the one batch they were
    measured at, or, where they were measured at several (``Workload.calibration_batches``),
    interpolated between the two sizes around ``samples``. Beyond the largest size the last
    segment goes on; below the smallest the first segment goes on, but a layer takes no
    longer than at the smallest size and no less than that time scaled down linearly."""
    b0 = workload.calibration_batch
    if b0 is None:
        raise ValueError(
            f"layer {layer.name!r} has measured times but Workload.calibration_batch is None; "
            "set the batch size the times were measured at"
        )
    if not workload.calibration_batches:
        scale = samples / b0
        return layer.fwd_time * scale, layer.bwd_time * scale
    points = sorted(zip((b0, *workload.calibration_batches), (layer.fwd_time, *layer.fwd_times),
                        (layer.bwd_time, *layer.bwd_times)))
    return _along(points, 1, samples), _along(points, 2, samples)


def _along(points: list[tuple], k: int, samples: float) -> float:
    """Piecewise-linear time ``k`` of ``points`` (sorted (batch, fwd, bwd)) at ``samples``."""
    if samples <= points[0][0]:
        (b1, *t1), (b2, *t2) = points[0], points[1]
        slope = (t2[k - 1] - t1[k - 1]) / (b2 - b1)
        low = t1[k - 1]
        return min(low, max(low * samples / b1, low - slope * (b1 - samples)))
    for i in range(1, len(points)):
        if samples <= points[i][0] or i == len(points) - 1:
            (b1, *t1), (b2, *t2) = points[i - 1], points[i]
            return max(0.0, t1[k - 1] + (t2[k - 1] - t1[k - 1]) * (samples - b1) / (b2 - b1))
    raise AssertionError("unreachable")


MIXED = ("fp16", "bf16")
"""Precisions trained in mixed precision: 16-bit weights and gradients, fp32 master weights."""


def optimizer_time(params: float, device, optimizer: str, *, kernels: int = 1, precision: str = "fp32") -> float:
    """Seconds to update ``params`` parameters with ``optimizer``.

    fp32 (and tf32) training streams fp32 weights, gradients and state. Mixed
    precision (``fp16``/``bf16``) steps the fp32 master weights and state: it reads
    16-bit gradients (2 bytes less per parameter) and writes the 16-bit working copy
    of the weights (2 bytes more), one more FLOP for that cast; with ``fp16`` dynamic
    loss scaling also unscales the gradients and checks them for inf/NaN (a read and a
    write of each 16-bit gradient, 2 FLOPs, one fused kernel), as ``GradScaler`` does.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
    cost = OPTIMIZERS[optimizer]
    flops = cost.flops * params
    moved = 4 * cost.words_moved * params
    if precision in MIXED:
        flops += params
        if precision == "fp16":
            moved += 2 * 2 * params
            flops += 2 * params
            kernels += 1
    t_flops = flops / (device.flops("fp32") * device.compute_efficiency)
    t_mem = moved / (device.mem_bandwidth * device.memory_efficiency)
    return max(t_flops, t_mem) + kernels * device.kernel_overhead


class RankGenerators:
    """One generator per rank, made when first used: rank ``r``'s is the ``r``-th child of the
    experiment's seed sequence (``SeedSequence(seed).spawn(world)[r]``), whoever asks first."""

    def __init__(self, seed: int, world: int):
        self._seed = seed
        self._world = world
        self._made: dict[int, np.random.Generator] = {}

    def __len__(self) -> int:
        return self._world

    def __getitem__(self, rank: int) -> np.random.Generator:
        rng = self._made.get(rank)
        if rng is None:
            if not 0 <= rank < self._world:
                raise IndexError(rank)
            rng = self._made[rank] = np.random.default_rng(np.random.SeedSequence(self._seed, spawn_key=(rank,)))
        return rng


class ComputeTimer:
    """Per-simulation timing of compute ops: cached prefix sums per device and batch."""

    def __init__(self, workload, devices, precision: str, optimizer: str, model: ComputeModel, rngs):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
        self.workload = workload
        self.devices = devices
        self.precision = precision
        self.optimizer = optimizer
        self.model = model
        self.rngs = rngs
        """One generator per rank: a rank's draws don't depend on how events interleave."""
        self._prefix: dict = {}
        params = np.array([layer.params for layer in workload.layers], dtype=float)
        self._param_prefix = np.concatenate(([0.0], np.cumsum(params)))
        self._kernel_prefix = np.concatenate(([0], np.cumsum(params > 0)))
        self._noisy = model.distribution == "exponential" or (
            model.distribution != "deterministic" and model.noise_cv > 0
        )
        self._per_iteration = model.scope == "iteration"
        self._drawn: dict[int, tuple[int, float]] = {}  # rank -> (iteration, its draw)

    def _sums(self, device, samples: int, tp: int = 1, sequence_parallel: bool = False):
        key = (id(device), samples, tp, sequence_parallel)
        entry = self._prefix.get(key)
        if entry is None:
            fwd, bwd = layer_times(self.workload, device, self.precision, samples, tp, sequence_parallel)
            sums = (np.concatenate(([0.0], np.cumsum(fwd))), np.concatenate(([0.0], np.cumsum(bwd))))
            entry = self._prefix[key] = (device, sums)  # holds device, so its id() stays unique
        return entry[1]

    def base_time(self, rank: int, kind: str, span: tuple[int, int], samples: int, fraction: float = 1.0,
                  tp: int = 1, sequence_parallel: bool = False) -> float:
        """Noise-free seconds of a compute op on ``rank``'s device (``tp``: the tensor-parallel
        degree its layers are split by)."""
        device = self.devices[rank]
        a, b = span
        if kind == "optimizer_step":
            params = (self._param_prefix[b] - self._param_prefix[a]) * fraction
            kernels = int(self._kernel_prefix[b] - self._kernel_prefix[a])
            if not params:
                return 0.0
            return optimizer_time(params, device, self.optimizer, kernels=kernels, precision=self.precision)
        fwd, bwd = self._sums(device, samples, tp, sequence_parallel)
        sums = fwd if kind == "forward" else bwd
        return float(sums[b] - sums[a])

    def apply_time(self, rank: int, elements: float, gradients: int, kernels: int = 1) -> float:
        """Noise-free seconds for a parameter-shard owner to apply ``gradients`` received
        gradients to ``elements`` fp32 parameters: summing them (streaming ``gradients + 1``
        buffers through memory when there is more than one), then the optimizer step."""
        device = self.devices[rank]
        t = optimizer_time(elements, device, self.optimizer, kernels=kernels) if elements else 0.0
        if gradients > 1 and elements:
            t += 4 * (gradients + 1) * elements / (device.mem_bandwidth * device.memory_efficiency)
            t += device.kernel_overhead * (gradients - 1)
        return t

    def cost_time(self, rank: int, cost) -> float:
        """Noise-free seconds of a :class:`strategies.compression.Cost` on ``rank``'s device: a
        roofline of its FLOPs (element-wise at the fp32 peak, matrix products at their dtype's,
        fp32 where the device has none) and its bytes, plus its kernel launches."""
        device = self.devices[rank]
        eff = device.compute_efficiency
        mm = cost.mm_dtype if cost.mm_dtype in device.peak_flops else "fp32"
        flops = cost.flops / (device.flops("fp32") * eff)
        if cost.mm_flops:
            flops += cost.mm_flops / (device.flops(mm) * eff)
        mem = cost.bytes / (device.mem_bandwidth * device.memory_efficiency)
        return max(flops, mem) + cost.kernels * device.kernel_overhead

    def time(self, rank: int, kind: str, span: tuple[int, int], samples: int, fraction: float = 1.0,
             *, now: float = 0.0, iteration: int = -1, tp: int = 1, sequence_parallel: bool = False) -> float:
        """Seconds a compute op that ``rank`` starts at ``now`` takes, noise and slowdowns included."""
        base = self.base_time(rank, kind, span, samples, fraction, tp, sequence_parallel)
        return self.scale(rank, base, now=now, iteration=iteration)

    def scale(self, rank: int, t: float, *, now: float = 0.0, iteration: int = -1) -> float:
        """``t`` model seconds on ``rank`` with its straggler factor, slowdowns and noise."""
        model = self.model
        slowdown = model.stragglers.get(rank)
        if slowdown is not None:
            t *= slowdown
        for window in model.slowdowns:
            if window.rank == rank and window.start <= now < window.end:
                t *= window.factor
        if self._noisy:
            if self._per_iteration and iteration >= 0:
                drawn = self._drawn.get(rank)
                if drawn is None or drawn[0] != iteration:
                    drawn = self._drawn[rank] = (iteration, model.factor(self.rngs[rank]))
                t *= drawn[1]
            else:
                t *= model.factor(self.rngs[rank])
        return t


class SharedCores:
    """``cores`` processor cores time-shared by compute ops (processor sharing).

    :meth:`run` starts an op of ``work`` seconds (its time alone on a core) and returns an
    event that fires when it is done; while ``k`` ops are in progress each advances at
    ``min(1, cores / k)`` seconds of work per second. :meth:`cancel` drops an op.
    """

    def __init__(self, env, cores: int):
        self.env = env
        self.cores = cores
        self._left: dict = {}  # event -> work seconds left
        self._since = 0.0
        self._token = 0

    @property
    def busy(self) -> int:
        """Cores busy now: ops in progress, at most ``cores``."""
        return min(len(self._left), self.cores)

    def _rate(self) -> float:
        return min(1.0, self.cores / len(self._left)) if self._left else 1.0

    def _advance(self) -> None:
        now = self.env.now
        done = (now - self._since) * self._rate()
        for event in self._left:
            self._left[event] -= done
        self._since = now

    def _schedule(self) -> None:
        self._token += 1
        if not self._left:
            return
        token = self._token
        wait = max(min(self._left.values()), 0.0) / self._rate()
        self.env.timeout(wait).callbacks.append(lambda _e: self._wake(token))

    def _wake(self, token: int) -> None:
        if token != self._token:
            return
        self._advance()
        eps = 1e-12 * max(1.0, self.env.now)
        for event in [e for e, left in self._left.items() if left <= eps]:
            del self._left[event]
            event.succeed()
        self._schedule()

    def run(self, work: float):
        event = self.env.event()
        if work <= 0:
            event.succeed()
            return event
        self._advance()
        self._left[event] = work
        self._schedule()
        return event

    def cancel(self, event) -> None:
        if event in self._left:
            self._advance()
            del self._left[event]
            self._schedule()
