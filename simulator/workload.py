"""Workloads: the per-layer cost table a simulated training step is made of.

A :class:`Workload` is an ordered tuple of :class:`Layer` records (parameters,
forward/backward FLOPs, activation sizes, kernel launches), all **per sample**.
It can be written by hand, loaded from JSON, taken from the model zoo
(:meth:`Workload.from_zoo`) or extracted from any ``torch.nn.Module``
(:meth:`Workload.from_module`).

Extraction runs one forward and one backward pass on the **meta device** (no
data, no memory: GPT-3 175B takes seconds) under
``torch.utils.flop_counter.FlopCounterMode``, so every FLOP is counted exactly
as torch counts it (FLOPs = 2 x multiply-accumulates). Each counted op is
charged to the innermost module running it: in forward, the module on top of
the call stack; in backward, the module that created the autograd node now
executing. A layer is every module that directly owns parameters or directly
runs ops, so functional compute in non-leaf modules (attention's
``scaled_dot_product_attention``, residual adds) is kept, and the layers'
FLOPs add up to FlopCounterMode's total exactly.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

ROOT_LAYER = "<root>"
"""Layer name for compute done directly in the top-level module's ``forward``."""

_NUMERIC_FIELDS = ("fwd_flops", "bwd_flops", "input_elems", "output_elems")


def _check_number(owner: str, name: str, value: Any, *, integral: bool = False) -> Any:
    """Return ``value`` as int/float, or raise ValueError saying what is allowed."""
    kind = "an integer" if integral else "a number"
    ok_type = numbers.Integral if integral else numbers.Real
    if isinstance(value, bool) or not isinstance(value, ok_type):
        raise ValueError(f"{owner}.{name} must be {kind} >= 0, got {value!r}")
    value = int(value) if integral else float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}.{name} must be {kind} >= 0, got {value!r}")
    return value


def _check_shapes(layer) -> tuple[tuple[int, ...], ...]:
    shapes = layer.param_shapes
    bad = ValueError(f"Layer.param_shapes must be a list of shapes (lists of integers >= 0) whose elements "
                     f"add up to params={layer.params}, got {shapes!r}")
    if isinstance(shapes, str | bytes) or not hasattr(shapes, "__iter__"):
        raise bad
    out = []
    for shape in shapes:
        if isinstance(shape, str | bytes) or not hasattr(shape, "__iter__"):
            raise bad
        dims = tuple(shape)
        if any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0 for d in dims):
            raise bad
        out.append(tuple(int(d) for d in dims))
    if out and sum(math.prod(d) for d in out) != layer.params:
        raise bad
    return tuple(out)


@dataclass(frozen=True, kw_only=True, slots=True)
class Layer:
    """Cost of one layer (module) for one sample; counts, not bytes or seconds."""

    name: str
    """Module path in the model, e.g. ``"layer1.0.conv1"``."""
    kind: str
    """Module class name, e.g. ``"Conv2d"``."""
    params: int
    """Parameter elements owned by this layer (a tied parameter counts at its first use)."""
    fwd_flops: float
    """Forward FLOPs per sample (2 x MACs, as ``FlopCounterMode`` counts)."""
    bwd_flops: float
    """Backward FLOPs per sample: input-grad + weight-grad."""
    input_elems: float
    """Activation elements read per sample (the layer's tensor inputs)."""
    output_elems: float
    """Activation elements produced per sample (saved, or sent at a stage boundary)."""
    kernels: int = 1
    """Kernels launched in forward (backward is taken as about twice as many)."""
    param_shapes: tuple[tuple[int, ...], ...] = ()
    """Shapes of the parameter tensors the layer owns (empty: not known). Their elements add
    up to ``params``; compressors that work on matrices (PowerSGD) need them."""
    tied_to: str = ""
    """Name of the earlier layer whose parameters this layer uses too (a tied output head uses
    the word embedding's weight); empty: none. A pipeline that puts the two on different
    stages keeps a copy on this layer's stage and sums their gradients (Megatron's
    embedding all-reduce)."""
    tp_role: str = ""
    """How tensor parallelism splits the layer: ``column``, ``row``, ``inner``, ``vocab``,
    ``head`` or ``replicated`` (see :mod:`strategies.tensor_parallel`); empty: inferred from
    the name and kind."""
    fwd_time: float | None = None
    """Measured forward seconds for the calibration batch, filled in by calibration."""
    bwd_time: float | None = None
    """Measured backward seconds for the calibration batch, filled in by calibration."""
    fwd_times: tuple[float, ...] = ()
    """Measured forward seconds at each of the workload's ``calibration_batches`` (empty:
    ``fwd_time`` alone, scaled linearly with the batch)."""
    bwd_times: tuple[float, ...] = ()
    """Measured backward seconds at each of the workload's ``calibration_batches``."""

    def __post_init__(self) -> None:
        for name in ("name", "kind"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"Layer.{name} must be a non-empty string, got {value!r}")
        object.__setattr__(self, "params", _check_number("Layer", "params", self.params, integral=True))
        object.__setattr__(self, "kernels", _check_number("Layer", "kernels", self.kernels, integral=True))
        for name in _NUMERIC_FIELDS:
            object.__setattr__(self, name, _check_number("Layer", name, getattr(self, name)))
        for name in ("fwd_time", "bwd_time"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _check_number("Layer", name, value))
        for name in ("fwd_times", "bwd_times"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ValueError(f"Layer.{name} must be a sequence of seconds >= 0, got {value!r}")
            object.__setattr__(self, name, tuple(_check_number("Layer", f"{name}[i]", v) for v in value))
        if (self.fwd_times or self.bwd_times) and (self.fwd_time is None or self.bwd_time is None):
            raise ValueError(f"Layer {self.name!r}: fwd_times/bwd_times need fwd_time and bwd_time too "
                             "(the times at the workload's calibration_batch)")
        object.__setattr__(self, "param_shapes", _check_shapes(self))
        if not isinstance(self.tied_to, str) or self.tied_to == self.name:
            raise ValueError(f"Layer.tied_to must be the name of another layer or '', got {self.tied_to!r}")
        from strategies.tensor_parallel import TP_ROLES

        if self.tp_role != "" and self.tp_role not in TP_ROLES:
            raise ValueError(f"Layer.tp_role must be one of {TP_ROLES} or '' (inferred), got {self.tp_role!r}")


@dataclass(frozen=True, kw_only=True)
class Workload:
    """A model as an ordered tuple of layers (forward execution order)."""

    name: str
    """Human-readable name, e.g. ``"resnet50"``."""
    layers: tuple[Layer, ...]
    """Layers in forward execution order; names are unique."""
    sample_shape: tuple[int, ...] = field(default=())
    """Shape of one input sample, e.g. ``(3, 224, 224)`` or ``(seq_len,)`` (informational)."""
    calibration_batch: int | None = None
    """Batch size at which layers' measured ``fwd_time``/``bwd_time`` were taken (None: none measured)."""
    calibration_batches: tuple[int, ...] = ()
    """Further batch sizes the layers' times were measured at (``Layer.fwd_times`` and
    ``bwd_times``, in this order). With them a layer's time at another batch is interpolated
    between the measured sizes instead of scaled linearly from ``calibration_batch``: a GPU
    is far from linear at small batches (ResNet-50 on an H200 took 31 ms an iteration at 32
    samples and 38 ms at 64)."""
    source: dict | None = None
    """``{"name": zoo model, **builder keywords}`` when the workload came from the zoo, so that
    realrun can build and train the very model that was simulated; ``None`` otherwise."""

    def __post_init__(self) -> None:
        if self.calibration_batch is not None and (
            isinstance(self.calibration_batch, bool) or not isinstance(self.calibration_batch, int)
            or self.calibration_batch < 1
        ):
            raise ValueError(
                f"Workload.calibration_batch must be None or an integer >= 1, got {self.calibration_batch!r}"
            )
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Workload.name must be a non-empty string, got {self.name!r}")
        batches = self.calibration_batches
        if isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
            raise ValueError(f"Workload.calibration_batches must be a sequence of integers >= 1, got {batches!r}")
        batches = tuple(batches)
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
            raise ValueError(f"Workload.calibration_batches must be integers >= 1, got {list(batches)!r}")
        if batches and self.calibration_batch is None:
            raise ValueError("Workload.calibration_batches needs calibration_batch (the size fwd_time/bwd_time "
                             "were measured at)")
        if len(set(batches) | {self.calibration_batch}) != len(batches) + 1 and batches:
            raise ValueError(f"Workload.calibration_batches must differ from each other and from calibration_batch="
                             f"{self.calibration_batch}, got {list(batches)!r}")
        object.__setattr__(self, "calibration_batches", batches)
        if self.source is not None and not (isinstance(self.source, dict) and isinstance(self.source.get("name"), str)):
            raise ValueError(f"Workload.source must be None or a table with a zoo model 'name', got {self.source!r}")
        if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
            raise ValueError(f"Workload.layers must be a sequence of Layer, got {self.layers!r}")
        layers = tuple(self.layers)
        if not layers:
            raise ValueError("Workload.layers must contain at least one Layer, got none")
        seen: set[str] = set()
        for layer in layers:
            if not isinstance(layer, Layer):
                raise ValueError(f"Workload.layers must contain only Layer, got {layer!r}")
            if layer.name in seen:
                raise ValueError(f"Workload.layers names must be unique, got {layer.name!r} twice")
            if layer.tied_to and layer.tied_to not in seen:
                raise ValueError(f"Layer {layer.name!r}: tied_to={layer.tied_to!r} must name an earlier layer of the "
                                 "workload (the first to use the shared parameters owns them)")
            seen.add(layer.name)
            n = len(batches) if layer.fwd_time is not None else 0
            if len(layer.fwd_times) != n or len(layer.bwd_times) != n:
                raise ValueError(f"Layer {layer.name!r}: fwd_times and bwd_times must hold one time per "
                                 f"Workload.calibration_batches ({n}), got {len(layer.fwd_times)} and "
                                 f"{len(layer.bwd_times)}")
        object.__setattr__(self, "layers", layers)
        shape = self.sample_shape
        if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
            raise ValueError(f"Workload.sample_shape must be a tuple of ints >= 0, got {shape!r}")
        shape = tuple(shape)
        for dim in shape:
            _check_number("Workload", "sample_shape[i]", dim, integral=True)
        object.__setattr__(self, "sample_shape", tuple(int(d) for d in shape))

    @property
    def tied(self) -> tuple[int, ...]:
        """Each layer's ``tied_to`` as a layer index (-1: none)."""
        index = {x.name: i for i, x in enumerate(self.layers)}
        return tuple(index[x.tied_to] if x.tied_to else -1 for x in self.layers)

    @property
    def params(self) -> int:
        """Parameter elements of the whole model."""
        return sum(layer.params for layer in self.layers)

    @property
    def tp_roles(self) -> tuple[str, ...]:
        """Each layer's tensor-parallel role: its ``tp_role``, or the one its name and kind imply."""
        cached = self.__dict__.get("_tp_roles")
        if cached is None:
            from strategies.tensor_parallel import infer_roles

            layers = self.layers
            cached = infer_roles([x.name for x in layers], [x.kind for x in layers],
                                 [x.params for x in layers], [x.tp_role for x in layers])
            object.__setattr__(self, "_tp_roles", cached)
        return cached

    @property
    def fwd_flops(self) -> float:
        """Forward FLOPs per sample."""
        return sum(layer.fwd_flops for layer in self.layers)

    @property
    def bwd_flops(self) -> float:
        """Backward FLOPs per sample."""
        return sum(layer.bwd_flops for layer in self.layers)

    # -- serialisation -------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-safe dict; :meth:`from_dict` gives back an equal Workload."""
        return {
            "name": self.name,
            "sample_shape": list(self.sample_shape),
            "layers": [{**asdict(layer), "param_shapes": [list(s) for s in layer.param_shapes],
                        "fwd_times": list(layer.fwd_times), "bwd_times": list(layer.bwd_times)}
                       for layer in self.layers],
            "calibration_batch": self.calibration_batch,
            **({"calibration_batches": list(self.calibration_batches)} if self.calibration_batches else {}),
            **({"source": dict(self.source)} if self.source is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Workload:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"Workload.from_dict needs a dict, got {type(d).__name__}")
        keys = {"name", "layers", "sample_shape", "calibration_batch", "calibration_batches", "source"}
        unknown = set(d) - keys
        if unknown:
            raise ValueError(f"Workload.from_dict: unknown keys {sorted(unknown)}, allowed: {sorted(keys)}")
        if "name" not in d or "layers" not in d:
            raise ValueError("Workload.from_dict: keys 'name' and 'layers' are required")
        allowed = {f.name for f in fields(Layer)}
        layers = []
        for i, item in enumerate(d["layers"]):
            if not isinstance(item, dict):
                raise ValueError(f"Workload.layers[{i}] must be a dict, got {item!r}")
            bad = set(item) - allowed
            if bad:
                raise ValueError(f"Workload.layers[{i}]: unknown keys {sorted(bad)}, "
                                 f"allowed: {sorted(allowed)}")
            try:
                layers.append(Layer(**item))
            except TypeError as err:  # a required field is missing
                raise ValueError(f"Workload.layers[{i}]: {err}") from None
        return cls(name=d["name"], layers=tuple(layers),
                   sample_shape=tuple(d.get("sample_shape", ())),
                   calibration_batch=d.get("calibration_batch"),
                   calibration_batches=tuple(d.get("calibration_batches", ())), source=d.get("source"))

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text of :meth:`to_dict`; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Workload:
        """Load from JSON text, or from a file path."""
        if isinstance(text_or_path, Path) or not str(text_or_path).lstrip().startswith("{"):
            path = Path(text_or_path)
            if not path.is_file():
                raise ValueError(f"Workload.from_json: {str(text_or_path)[:80]!r} is neither "
                                 "JSON text nor an existing file")
            text_or_path = path.read_text()
        try:
            data = json.loads(text_or_path)
        except json.JSONDecodeError as err:
            raise ValueError(f"Workload.from_json: invalid JSON ({err})") from None
        return cls.from_dict(data)

    # -- extraction ----------------------------------------------------------------

    @classmethod
    def from_module(cls, module: Any, example_input: Any, *, batch_size: int | None = None,
                    name: str | None = None) -> Workload:
        """Extract per-layer costs by running forward + backward once.

        ``example_input`` is one tensor or a tuple of tensors (positional
        arguments) holding a batch of ``batch_size`` samples (default: the
        first tensor's first dimension). The run is on the meta device, so
        the module's own parameters are neither touched nor copied; a module
        that cannot run on meta (e.g. it keeps plain CPU tensors as
        attributes) is run on its own device instead, without changing it.

        Layers come in the order their modules are first called (a parent
        before its children; modules never called last); compute in the
        top-level ``forward`` itself becomes layer :data:`ROOT_LAYER`. Kernel
        counts are the non-view aten ops the module runs itself, which can
        exceed a GPU's fused kernels (meta runs attention unfused).
        Raises ValueError if ``module`` is no Module or the run fails.
        """
        import torch

        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"Workload.from_module: module must be a torch.nn.Module, "
                             f"got {type(module).__name__}")
        args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not tensors:
            raise ValueError("Workload.from_module: example_input must be a tensor or a tuple "
                             f"of tensors, got {type(example_input).__name__}")
        if batch_size is None:
            if tensors[0].dim() == 0:
                raise ValueError("Workload.from_module: example_input has no batch dimension; "
                                 "pass batch_size")
            batch_size = int(tensors[0].shape[0])
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Workload.from_module: batch_size must be an integer >= 1, "
                             f"got {batch_size!r}")
        sample_shape = tuple(tensors[0].shape[1:])
        name = name or type(module).__name__

        try:
            stats = _trace(module, args, on_meta=True)
        except _RunFailed as meta_err:
            on_meta = any(p.is_meta for p in module.parameters()) or any(t.is_meta for t in tensors)
            if on_meta:
                raise ValueError(f"Workload.from_module: forward/backward of {name} failed on "
                                 f"the meta device: {meta_err}") from meta_err.__cause__
            try:
                stats = _trace(module, args, on_meta=False)
            except _RunFailed as err:
                raise ValueError(f"Workload.from_module: forward/backward of {name} failed: "
                                 f"{err}") from err.__cause__
        layers = tuple(
            Layer(name=s.name, kind=s.kind, params=s.params,
                  fwd_flops=s.fwd_flops / batch_size, bwd_flops=s.bwd_flops / batch_size,
                  input_elems=s.input_elems / batch_size, output_elems=s.output_elems / batch_size,
                  kernels=s.kernels, param_shapes=s.shapes, tied_to=s.tied_to)
            for s in stats
        )
        return cls(name=name, layers=layers, sample_shape=sample_shape)

    @classmethod
    def from_zoo(cls, name: str, **kwargs: Any) -> Workload:
        """Workload of a zoo model, e.g. ``from_zoo("gpt", size="gpt3-175b", seq_len=2048)``.

        Keyword arguments go to the zoo builder (see :mod:`simulator.zoo`).
        The model is built and traced on the meta device; values are per sample.
        """
        import torch

        from simulator import zoo

        module, make_input = zoo.build(name, device="meta", **kwargs)
        source = {"name": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}
        label = str(kwargs.pop("size", name))
        if kwargs:
            label += "(" + ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items())) + ")"
        # Batch of 2: batch norm in training mode refuses one value per channel.
        import dataclasses

        traced = cls.from_module(module, make_input(2, torch.device("meta")), name=label)
        return dataclasses.replace(traced, source=source)



# -- tracing (torch is imported lazily: the rest of the simulator does not need it) --


class _RunFailed(Exception):
    """The model's forward or backward raised; the original error is ``__cause__``."""


@dataclass
class _Stat:
    """Mutable per-module accumulator, whole batch."""

    name: str
    kind: str
    fwd_flops: float = 0.0
    bwd_flops: float = 0.0
    input_elems: float = 0.0
    output_elems: float = 0.0
    kernels: int = 0
    params: int = 0
    shapes: tuple = ()
    computes: bool = False
    tied_to: str = ""


# Ops that launch no kernel (views, aliases, allocation without a fill).
_FREE_OPS = {"detach", "_unsafe_view", "alias", "lift_fresh", "empty", "empty_like",
             "empty_strided", "_reshape_alias"}


def _numel(*trees: Any) -> int:
    from torch import Tensor
    from torch.utils._pytree import tree_flatten

    return sum(t.numel() for t in tree_flatten(trees)[0] if isinstance(t, Tensor))


def _trace(module: Any, args: tuple, *, on_meta: bool) -> list[_Stat]:
    """Run forward + backward once; return per-layer stats in forward order.

    ``on_meta``: run with meta stand-ins for parameters, buffers and inputs;
    otherwise on the module's own device with detached parameters and cloned
    buffers, so the module itself is never changed.
    """
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import FlopCounterMode

    paths: dict[Any, str] = {}
    for path, sub in module.named_modules():  # first name of a shared module wins
        paths.setdefault(sub, path)
    stats: dict[str, _Stat] = {}  # insertion order = first forward call
    stack: list[str] = []  # module paths of the forward call stack
    node_owner: dict[Any, str] = {}  # autograd node -> module path that created it

    def stat(path: str) -> _Stat:
        if path not in stats:
            mod = module.get_submodule(path)
            stats[path] = _Stat(name=path or ROOT_LAYER, kind=type(mod).__name__)
        return stats[path]

    def owner() -> str:
        node = torch._C._current_autograd_node()
        if node is not None:  # in backward: whoever created this node
            return node_owner.get(node, "")
        return stack[-1] if stack else ""

    def pre_hook(mod, a, kw):
        path = paths[mod]
        stat(path).input_elems += _numel(a, kw)
        stack.append(path)

    def post_hook(mod, a, kw, out):
        stack.pop()
        stats[paths[mod]].output_elems += _numel(out)

    class ClaimNodes(TorchFunctionMode):
        """Records which module created each autograd node (a call may create several)."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            who = stack[-1] if stack else ""
            todo = [t.grad_fn for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            while todo:
                node = todo.pop()
                if node is not None and node not in node_owner:
                    node_owner[node] = who
                    todo.extend(nxt for nxt, _ in node.next_functions)
            return out

    class CountKernels(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view and func._overloadpacket.__name__ not in _FREE_OPS:
                s = stat(owner())
                s.kernels += 1
                s.computes = True
            return out

    class Owner:
        """Stands in for FlopCounterMode's ModuleTracker: every counted op goes to
        "Global" and to exactly one module, so per-module counts are own counts."""

        @property
        def parents(self) -> set[str]:
            return {"Global", "m:" + owner()}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    if on_meta:
        def stand_in(t):
            return torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
        subs = {n: stand_in(p) for n, p in module.named_parameters()}
        subs.update({n: torch.empty_like(b, device="meta") for n, b in module.named_buffers()})
        args = tuple(stand_in(a) if isinstance(a, torch.Tensor) else a for a in args)
    else:
        subs = {n: p.detach().requires_grad_(p.requires_grad) for n, p in module.named_parameters()}
        subs.update({n: b.clone() for n, b in module.named_buffers()})
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)

    counter = FlopCounterMode(display=False)
    if not hasattr(counter, "mod_tracker"):
        raise RuntimeError("this torch version's FlopCounterMode has no mod_tracker to replace")
    counter.mod_tracker = Owner()
    handles = []
    try:
        for sub in paths:
            handles.append(sub.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(sub.register_forward_hook(post_hook, with_kwargs=True))
        with counter:
            with ClaimNodes(), CountKernels():
                out = torch.func.functional_call(module, subs, args, tie_weights=True)
            fwd = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
            outs = [t for t in tree_flatten(out)[0]
                    if isinstance(t, torch.Tensor) and t.requires_grad]
            if outs:
                torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
        total = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    except Exception as err:  # whatever the user's model raises
        raise _RunFailed(f"{type(err).__name__}: {err}") from err
    finally:
        for handle in handles:
            handle.remove()

    for key, flops in total.items():
        if key.startswith("m:"):
            s = stat(key[2:])
            s.fwd_flops = fwd.get(key, 0)
            s.bwd_flops = flops - s.fwd_flops
            s.computes = s.computes or flops > 0
    assert total.get("Global", 0) == sum(v for k, v in total.items() if k.startswith("m:"))

    # Parameters: each tensor counted once, by the first layer in forward order
    # that owns it; modules never called come last, in definition order.
    counted: dict[int, str] = {}  # parameter id -> the layer that owns it
    layers = []
    for path in list(stats) + [p for p in paths.values() if p not in stats]:
        own = list(module.get_submodule(path).parameters(recurse=False))
        s = stat(path)
        s.params = sum(p.numel() for p in own if id(p) not in counted)
        s.shapes = tuple(tuple(p.shape) for p in own if id(p) not in counted)
        s.tied_to = next((counted[id(p)] for p in own if id(p) in counted), "")  # the first shared one's owner
        for p in own:
            counted.setdefault(id(p), s.name)
        if own or s.computes:
            layers.append(s)
    return layers
