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
    iterations: int
    batch_size: int
    """Samples each rank processes per iteration."""
    layer_params: tuple[int, ...]
    """Parameter elements of each workload layer, in forward order."""
    node_of: tuple[int, ...]
    """Node index of each rank."""

    def __post_init__(self) -> None:
        for field in ("world_size", "iterations", "batch_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Job.{field} must be an integer >= 1, got {value!r}")
        if len(self.node_of) != self.world_size:
            raise ValueError(
                f"Job.node_of must have world_size={self.world_size} entries, got {len(self.node_of)}"
            )

    @property
    def num_layers(self) -> int:
        return len(self.layer_params)


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

    def iterations(self) -> Iterator[int]:
        """Iteration indices; tells the executor where each one starts and ends."""
        hook = self._on_iteration
        for i in range(self.job.iterations):
            if hook is not None:
                hook("start", i)
            yield i
            if hook is not None:
                hook("end", i)

    # compute
    def forward(self, segment: tuple[int, int], *, samples: int | None = None, micro_batch: int = 0):
        return ops.Forward(segment, self.job.batch_size if samples is None else samples, micro_batch)

    def backward(self, segment: tuple[int, int], *, samples: int | None = None, micro_batch: int = 0):
        return ops.Backward(segment, self.job.batch_size if samples is None else samples, micro_batch)

    def optimizer_step(self, layers: tuple[int, int], *, fraction: float = 1.0):
        return ops.OptimizerStep(layers, fraction)

    # point-to-point
    def send(self, dst: int, tensor: ops.TensorRef, *, tag: int = 0, async_op: bool = False):
        return ops.Send(dst, tensor, tag, async_op)

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
