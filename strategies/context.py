"""What a role program sees: the job it is part of and a per-rank context.

The context builds ops (``ctx.forward(...)``, ``ctx.all_reduce(...)``) and
tells the program who it is. It holds no executor state: an executor passes an
``on_iteration`` callback to learn where iterations begin and end, and
interprets the ops the program yields.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

from strategies import ops

Program = Callable[["RankContext"], Generator[Any, Any, None]]
IterationHook = Callable[[str, int], None]


@dataclass(frozen=True, kw_only=True)
class Job:
    """The facts about a run that role programs need (sizes, not devices)."""

    world_size: int
    """Every rank: GPU ranks ``0 .. accelerators - 1``, then host processes."""
    iterations: int
    batch_size: int
    """Samples each worker processes per iteration (unless ``batch_sizes`` says otherwise)."""
    layer_params: tuple[int, ...]
    """Parameter elements of each workload layer, in forward order."""
    node_of: tuple[int, ...]
    """Node index of each rank."""
    accelerators: int | None = None
    """GPU ranks (the rest are host processes); ``None`` = every rank."""
    batch_sizes: tuple[int, ...] | None = None
    """Samples per iteration of each GPU rank (uneven data shards); ``None`` = ``batch_size`` each."""
    layer_shapes: tuple[tuple[tuple[int, ...], ...], ...] | None = None
    """Shapes of each layer's parameter tensors (``None`` or an empty entry: not known)."""
    param_dtype: str = "fp32"
    """Element type of parameters and gradients on the GPUs: ``fp32``, or ``fp16``/``bf16``
    in mixed precision (with fp32 master weights)."""
    layer_names: tuple[str, ...] | None = None
    """Each layer's name (for messages and checkpoint units); ``None``: ``"layer i"``."""
    layer_tp: tuple[str, ...] | None = None
    """Each layer's tensor-parallel role (:mod:`strategies.tensor_parallel`); ``None``: all replicated."""
    layer_inputs: tuple[float, ...] | None = None
    """Activation elements each layer reads per sample; ``None``: not known (0)."""
    layer_outputs: tuple[float, ...] | None = None
    """Activation elements each layer produces per sample (what crosses a pipeline cut after it);
    ``None``: not known (0)."""
    layer_tied: tuple[int, ...] | None = None
    """For each layer, the index of the earlier layer whose parameters it uses too (a tied
    output head's word embedding), or -1; ``None``: no ties."""
    layer_costs: tuple[float, ...] | None = None
    """Relative compute cost of each layer (forward plus backward seconds per sample on the
    first GPU), what pipeline stages are balanced by; ``None``: balance by parameters."""

    def __post_init__(self) -> None:
        for field in ("world_size", "iterations", "batch_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Job.{field} must be an integer >= 1, got {value!r}")
        if len(self.node_of) != self.world_size:
            raise ValueError(
                f"Job.node_of must have world_size={self.world_size} entries, got {len(self.node_of)}"
            )
        if self.accelerators is None:
            object.__setattr__(self, "accelerators", self.world_size)
        if not 1 <= self.accelerators <= self.world_size:
            raise ValueError(f"Job.accelerators must be in [1, {self.world_size}], got {self.accelerators!r}")
        if self.batch_sizes is None:
            object.__setattr__(self, "batch_sizes", (self.batch_size,) * self.accelerators)
        if len(self.batch_sizes) != self.accelerators or any(
            not isinstance(b, int) or b < 1 for b in self.batch_sizes
        ):
            raise ValueError(
                f"Job.batch_sizes must be {self.accelerators} integers >= 1 (one per GPU rank), "
                f"got {self.batch_sizes!r}"
            )
        if self.param_dtype not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"Job.param_dtype must be one of ('fp32', 'fp16', 'bf16'), got {self.param_dtype!r}")
        n = len(self.layer_params)
        for field, default in (("layer_names", tuple(f"layer {i}" for i in range(n))),
                               ("layer_tp", ("replicated",) * n), ("layer_inputs", (0.0,) * n),
                               ("layer_outputs", (0.0,) * n)):
            if getattr(self, field) is None:
                object.__setattr__(self, field, default)
        for field in ("layer_shapes", "layer_names", "layer_tp", "layer_inputs", "layer_outputs", "layer_costs",
                      "layer_tied"):
            value = getattr(self, field)
            if value is not None and len(value) != len(self.layer_params):
                raise ValueError(
                    f"Job.{field} must have one entry per layer ({len(self.layer_params)}), got {len(value)}"
                )

    @property
    def num_layers(self) -> int:
        return len(self.layer_params)

    def shapes(self, layers: tuple[int, int]) -> list[tuple[int, ...]]:
        """Parameter shapes of layers ``[start, stop)``; a layer whose shapes are not known
        counts as one vector of its parameters."""
        known = self.layer_shapes
        out = []
        for i in range(*layers):
            if known is not None and known[i]:
                out.extend(known[i])
            elif self.layer_params[i]:
                out.append((self.layer_params[i],))
        return out

    def shapes_known(self, layers: tuple[int, int] | None = None) -> bool:
        """Whether every layer with parameters in ``layers`` (default: all) has its shapes."""
        a, b = layers or (0, self.num_layers)
        known = self.layer_shapes
        return all(not self.layer_params[i] or (known is not None and known[i]) for i in range(a, b))

    @property
    def hosts(self) -> range:
        """Host-process ranks (after the GPU ranks)."""
        return range(self.accelerators, self.world_size)

    def samples(self, rank: int) -> int:
        """Samples ``rank`` processes per iteration (0 for a host process)."""
        return self.batch_sizes[rank] if rank < self.accelerators else 0


class RankContext:
    """One rank's view of the job; op constructors named after torch.distributed."""

    __slots__ = ("rank", "job", "_on_iteration")

    def __init__(self, rank: int, job: Job, *, on_iteration: IterationHook | None = None):
        if not 0 <= rank < job.world_size:
            raise ValueError(f"rank must be in [0, {job.world_size}), got {rank}")
        self.rank = rank
        self.job = job
        self._on_iteration = on_iteration

    @property
    def world_size(self) -> int:
        return self.job.world_size

    def iterations(self, count: int | None = None) -> Iterator[int]:
        """Iteration indices ``0 .. count - 1`` (``job.iterations`` by default; ``-1`` for
        no end); tells the executor where each one starts and ends. Leaving the
        loop with ``break`` ends the current iteration there.
        """
        hook = self._on_iteration
        n = self.job.iterations if count is None else count
        i = 0
        while n < 0 or i < n:
            if hook is not None:
                hook("start", i)
            try:
                yield i
            except GeneratorExit:  # the program broke out of its loop: this iteration ends now
                if hook is not None:
                    hook("end", i)
                raise
            if hook is not None:
                hook("end", i)
            i += 1

    @property
    def samples(self) -> int:
        """Samples this rank processes per iteration (its data shard's batch)."""
        return self.job.samples(self.rank)

    # compute
    @staticmethod
    def _handles(cancel_on) -> tuple:
        if cancel_on is None:
            return ()
        return tuple(cancel_on) if isinstance(cancel_on, list | tuple) else (cancel_on,)

    def forward(self, segment: tuple[int, int], *, samples: int | None = None, micro_batch: int = 0,
                cancel_on=None, tp_group=None, sequence_parallel: bool = False, recompute: bool = False):
        return ops.Forward(segment, self.samples if samples is None else samples, micro_batch,
                           self._handles(cancel_on), tp_group, sequence_parallel, recompute)

    def backward(self, segment: tuple[int, int], *, samples: int | None = None, micro_batch: int = 0,
                 cancel_on=None, tp_group=None, sequence_parallel: bool = False):
        return ops.Backward(segment, self.samples if samples is None else samples, micro_batch,
                            self._handles(cancel_on), tp_group, sequence_parallel)

    def optimizer_step(self, layers: tuple[int, int], *, fraction: float = 1.0):
        return ops.OptimizerStep(layers, fraction)

    def encode(self, tensor: ops.TensorRef, compressor, round: int, cost):
        return ops.Encode(tensor, compressor, round, cost)

    def decode(self, tensor: ops.TensorRef, compressor, cost, *, payloads: int = 1):
        return ops.Decode(tensor, compressor, cost, payloads)

    # point-to-point
    def send(self, dst: int, tensor: ops.TensorRef, *, tag: int = 0, async_op: bool = False,
             meta: dict | None = None):
        return ops.Send(dst, tensor, tag, async_op, meta)

    def recv(self, src: int, tensor: ops.TensorRef, *, tag: int = 0, async_op: bool = False):
        return ops.Recv(src, tensor, tag, async_op)

    def recv_any(self, tensor: ops.TensorRef, *, tag: int = 0):
        return ops.RecvAny(tensor, tag)

    # collectives
    def _collective(self, op, tensor, algorithm, group, root, async_op):
        return ops.Collective(op, tensor, algorithm, None if group is None else tuple(group), root, async_op)

    def all_reduce(self, tensor, *, algorithm="ring", group=None, async_op=False):
        return self._collective("all_reduce", tensor, algorithm, group, 0, async_op)

    def reduce_scatter(self, tensor, *, algorithm="ring", group=None, async_op=False):
        return self._collective("reduce_scatter", tensor, algorithm, group, 0, async_op)

    def all_gather(self, tensor, *, algorithm="ring", group=None, async_op=False):
        return self._collective("all_gather", tensor, algorithm, group, 0, async_op)

    def broadcast(self, tensor, *, root=0, algorithm="tree", group=None, async_op=False):
        return self._collective("broadcast", tensor, algorithm, group, root, async_op)

    def reduce(self, tensor, *, root=0, algorithm="tree", group=None, async_op=False):
        return self._collective("reduce", tensor, algorithm, group, root, async_op)

    def all_to_all(self, tensor, *, algorithm="direct", group=None, async_op=False):
        return self._collective("all_to_all", tensor, algorithm, group, 0, async_op)

    def wait(self, handle):
        return ops.Wait(handle)

    # bookkeeping
    def apply(self, shard: int, tensor: ops.TensorRef, grads, *, dropped=()):
        """Apply received gradients to a shard this rank owns; answers the new version."""
        return ops.Apply(shard, tensor, tuple(grads), tuple(dropped))
