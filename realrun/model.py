"""The real model behind a workload: its layers' parameters in flat buffers, its pipeline
units, and the seeded synthetic data every rank trains on.

A workload's layers are modules of the model in forward order (see
:meth:`simulator.Workload.from_module`); a parameter belongs to the first layer
that owns it. :class:`ModelState` lays every parameter out in one flat fp32
buffer in that order, each ``Parameter`` a view into it, and the gradients in
a second flat buffer the same way (DDP's ``gradient_as_bucket_view``). So the
tensor an op names by layers ``[a, b)`` or by elements ``[e0, e1)`` of the
flattened parameters is a slice of a buffer, never a copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from simulator.workload import ROOT_LAYER, Workload

_SEED_MIX = 0x9E3779B97F4A7C15


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (the experiment's seed, a shard, an iteration...)."""
    h = 0
    for p in parts:
        h = (h * _SEED_MIX + int(p) + 1) % (2**63 - 1)
    return h


def build_model(workload: Workload, seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """The zoo model a workload was taken from, initialised from ``seed`` (the same on every rank)."""
    from simulator import zoo

    if workload.source is None:
        raise ValueError(
            f"workload {workload.name!r} was not taken from the zoo, so realrun cannot build its model; "
            "pass the torch module with realrun.run(experiment, model=...)"
        )
    spec = dict(workload.source)
    name = spec.pop("name")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module, _ = zoo.build(name, **spec)
    return module.to(device)


class ModelState:
    """A module with its parameters and gradients as views into two flat buffers, in the
    workload's layer order."""

    def __init__(self, module: nn.Module, workload: Workload, device: torch.device,
                 owned: list[int] | None = None):
        """``owned``: the parameters each layer holds when they differ from the workload's
        (a tensor-parallel rank's slices, :func:`realrun.tensor_parallel.shard_module`)."""
        self.module = module
        self.workload = workload
        self.device = device
        n = len(workload.layers)
        counted: set[int] = set()
        self.layer_params: list[list[nn.Parameter]] = []
        self.layer_modules: list[nn.Module] = []
        for k, layer in enumerate(workload.layers):
            path = "" if layer.name == ROOT_LAYER else layer.name
            try:
                sub = module.get_submodule(path)
            except AttributeError:
                raise ValueError(
                    f"realrun: the model has no module {layer.name!r}, a layer of workload {workload.name!r}; "
                    "the workload was not extracted from this model"
                ) from None
            own = [p for p in sub.parameters(recurse=False) if id(p) not in counted]
            counted.update(id(p) for p in sub.parameters(recurse=False))
            size = sum(p.numel() for p in own)
            expected = layer.params if owned is None else owned[k]
            if size != expected:
                raise ValueError(
                    f"realrun: module {layer.name!r} owns {size} parameters but the workload's layer says "
                    f"{expected}; the workload was not extracted from this model"
                )
            self.layer_modules.append(sub)
            self.layer_params.append(own)
        stray = [name for name, p in module.named_parameters() if id(p) not in counted and p.requires_grad]
        if stray:
            raise ValueError(f"realrun: parameters {stray[:4]} belong to no layer of workload {workload.name!r}")
        self.offsets = [0] * (n + 1)
        for i, ps in enumerate(self.layer_params):
            self.offsets[i + 1] = self.offsets[i] + sum(p.numel() for p in ps)
        total = self.offsets[-1]
        self.params = torch.zeros(total, dtype=torch.float32, device=device)
        self.grads = torch.zeros(total, dtype=torch.float32, device=device)
        self.param_list: list[nn.Parameter] = []
        self.layer_of: dict[int, int] = {}
        for i, ps in enumerate(self.layer_params):
            o = self.offsets[i]
            for p in ps:
                m = p.numel()
                view = self.params[o:o + m].view_as(p)
                view.copy_(p.detach())
                p.data = view
                p.grad = self.grads[o:o + m].view_as(p)
                self.layer_of[id(p)] = i
                self.param_list.append(p)
                o += m
        self._units: list[tuple[str, Callable, tuple[int, int]]] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layer_params)

    def span(self, layers: tuple[int, int] | None, elements: tuple[int, int] | None) -> tuple[int, int]:
        """Element range of the flat buffers a tensor of ``layers``/``elements`` is."""
        if elements is not None:
            return elements
        if layers is None:
            return 0, self.offsets[-1]
        return self.offsets[layers[0]], self.offsets[layers[1]]

    def zero_grads(self) -> None:
        self.grads.zero_()

    # pipeline units
    def units(self) -> list[tuple[str, Callable, tuple[int, int]]]:
        """The forward as a chain of units ``(name, callable, layers [a, b))`` (see
        ``pipeline_units`` of the zoo models; an ``nn.Sequential``'s children)."""
        if self._units is None:
            self._units = self._find_units()
        return self._units

    def _find_units(self):
        module = self.module
        if hasattr(module, "pipeline_units"):
            chain = list(module.pipeline_units())
        elif isinstance(module, nn.Sequential):
            chain = list(module.named_children())
        else:
            raise ValueError(
                f"realrun: {type(module).__name__} cannot be cut into pipeline stages: give it a method "
                "pipeline_units() returning its forward as a chain of (module name, callable), "
                "or make it an nn.Sequential"
            )
        names = [layer.name for layer in self.workload.layers]
        units, i = [], 0
        for name, fn in chain:
            start = i
            while i < len(names) and (names[i] == name or names[i].startswith(name + ".")):
                i += 1
            units.append((name, fn, (start, i)))
        if i != len(names):
            raise ValueError(
                f"realrun: layer {names[i]!r} of the workload is in no pipeline unit of "
                f"{type(module).__name__} (units: {[u[0] for u in units][:8]}...)"
            )
        return units

    def unit_starts(self) -> list[int]:
        """Layer indices where a pipeline stage may begin."""
        return sorted({a for _, _, (a, b) in self.units() if b > a} | {self.num_layers})

    def run_segment(self, segment: tuple[int, int], x):
        """Forward of layers ``[a, b)`` on ``x``: the whole module, or the units that make them up."""
        n = self.num_layers
        if segment == (0, n):
            return self.module(x)
        a, b = segment
        chosen = [fn for _, fn, (u0, u1) in self.units() if u1 <= b and (a <= u0 < b or u0 == u1 == b == n)]
        starts = self.unit_starts()
        if a not in starts or b not in starts:
            raise ValueError(
                f"realrun: a forward of layers [{a}, {b}) does not start and end between the model's pipeline "
                f"units; stages may begin at layers {starts[:-1]} (give the strategy boundaries among them)"
            )
        for fn in chosen:
            x = fn(x)
        return x


class Data:
    """Seeded synthetic batches: shard ``d``'s samples of iteration ``i`` are the same on every
    rank that asks (a pipeline's first stage takes the inputs, its last the targets)."""

    def __init__(self, module: nn.Module, seed: int, device: torch.device,
                 make_input: Callable | None = None, loss: Callable | None = None):
        self.seed = seed
        self.device = device
        if make_input is None:
            make_input = getattr(module, "example_input", None)
            if make_input is None:
                raise ValueError(
                    f"realrun: {type(module).__name__} has no example_input(batch_size, device); pass data= to "
                    "realrun.run (a function of (batch_size, generator) giving an input batch)"
                )
            self._make = lambda b, g: make_input(b, device)
        else:
            self._make = make_input
        self.loss_fn = loss
        self.vocab_parallel: tuple | None = None
        """``(lo, hi, vocabulary, group_max, group_sum)`` when the output holds vocabulary
        ``[lo, hi)`` of a tensor-parallel head: the loss is taken over the group."""
        # keyed by size too: a batch of another size is another batch (calibration times several)
        self._inputs: dict[tuple[int, int, int], torch.Tensor] = {}
        self._targets: dict[tuple[int, int, int], torch.Tensor] = {}

    def inputs(self, shard: int, iteration: int, size: int, lo: int, hi: int):
        key = (shard, iteration, size)
        batch = self._inputs.get(key)
        if batch is None:
            self._inputs.clear()
            s = derived_seed(self.seed, shard, iteration, 1)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                g = torch.Generator().manual_seed(s)
                batch = self._make(size, g)
            self._inputs[key] = batch = batch.to(self.device)
        return batch[lo:hi]

    def loss(self, output: torch.Tensor, shard: int, iteration: int, size: int, lo: int, hi: int):
        """Mean loss of samples ``[lo, hi)`` of the shard's batch."""
        key = (shard, iteration, size)
        target = self._targets.get(key)
        if target is None:
            self._targets.clear()
            g = torch.Generator().manual_seed(derived_seed(self.seed, shard, iteration, 2))
            rest = tuple(output.shape[1:])
            if output.is_floating_point() and output.dim() >= 2 and self.loss_fn is None:
                classes = output.shape[-1] if self.vocab_parallel is None else self.vocab_parallel[2]
                target = torch.randint(0, classes, (size, *rest[:-1]), generator=g)
            else:
                target = torch.randn((size, *rest), generator=g)
            self._targets[key] = target = target.to(self.device)
        t = target[lo:hi]
        if self.vocab_parallel is not None:
            if self.loss_fn is not None:
                raise ValueError("realrun: a loss function of your own cannot take a tensor-parallel output head's "
                                 "vocabulary-split logits; leave loss=None (cross-entropy over the group)")
            from realrun.tensor_parallel import vocab_parallel_cross_entropy

            lo_v, hi_v, _, group_max, group_sum = self.vocab_parallel
            return vocab_parallel_cross_entropy(output, t, lo_v, hi_v, group_max, group_sum)
        if self.loss_fn is not None:
            return self.loss_fn(output, t)
        if t.dtype == torch.int64:
            return F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), t.reshape(-1))
        return F.mse_loss(output.float(), t)

