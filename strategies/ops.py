"""The op vocabulary: what a role program may yield.

A strategy's role programs are generators that yield these ops and receive
each op's result back from ``yield``. Two executors interpret them: the
simulator (ops take simulated time) and realrun (ops do real torch work). The
set is small and closed, and the names follow ``torch.distributed``:

* compute: :class:`Forward`, :class:`Backward`, :class:`OptimizerStep`
* point-to-point: :class:`Send`, :class:`Recv`, :class:`RecvAny`
* collectives: :class:`Collective` (``all_reduce``, ``reduce_scatter``,
  ``all_gather``, ``broadcast``, ``reduce``, ``all_to_all``) with an
  algorithm and an optional async handle
* synchronisation: :class:`Wait` on a handle an async op returned

Ops name *logical* tensors (:class:`TensorRef`): the simulator needs only
their size; realrun maps ``(role, layers)`` to real tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TensorRole = Literal["grads", "params", "activations", "activation_grads", "custom"]
TENSOR_ROLES = ("grads", "params", "activations", "activation_grads", "custom")

COLLECTIVE_OPS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all")


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A logical tensor an op moves.

    ``layers`` is the half-open range ``[start, stop)`` of workload layers whose
    parameters (or gradients) the tensor holds, so realrun can flatten the
    same parameters into a real buffer.
    """

    name: str
    nbytes: float
    """Size on the wire, bytes."""
    role: TensorRole = "custom"
    layers: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.nbytes >= 0:
            raise ValueError(f"TensorRef.nbytes must be >= 0, got {self.nbytes!r}")
        if self.role not in TENSOR_ROLES:
            raise ValueError(f"TensorRef.role must be one of {TENSOR_ROLES}, got {self.role!r}")


@dataclass(frozen=True, slots=True)
class Forward:
    """Forward pass of layers ``segment = [start, stop)`` for one micro-batch."""

    segment: tuple[int, int]
    samples: int
    micro_batch: int = 0


@dataclass(frozen=True, slots=True)
class Backward:
    """Backward pass of layers ``segment = [start, stop)`` for one micro-batch."""

    segment: tuple[int, int]
    samples: int
    micro_batch: int = 0


@dataclass(frozen=True, slots=True)
class OptimizerStep:
    """Optimizer update of the parameters of layers ``[start, stop)``.

    ``fraction`` is the share of those parameters this rank updates (a shard).
    """

    layers: tuple[int, int]
    fraction: float = 1.0


@dataclass(frozen=True, slots=True)
class Send:
    dst: int
    tensor: TensorRef
    tag: int = 0
    async_op: bool = False


@dataclass(frozen=True, slots=True)
class Recv:
    src: int
    tensor: TensorRef
    tag: int = 0
    async_op: bool = False


@dataclass(frozen=True, slots=True)
class RecvAny:
    """Receive the next message with ``tag`` from whichever rank sends first.

    The executor answers with a :class:`Message`.
    """

    tensor: TensorRef
    tag: int = 0


@dataclass(frozen=True, slots=True)
class Message:
    src: int
    tensor: TensorRef
    tag: int


@dataclass(frozen=True, slots=True)
class Collective:
    """A collective over ``group`` (global ranks, ``None`` = every rank)."""

    op: str
    tensor: TensorRef
    algorithm: str
    group: tuple[int, ...] | None = None
    root: int = 0
    """Group-local index of the root (broadcast, reduce)."""
    async_op: bool = False

    def __post_init__(self) -> None:
        if self.op not in COLLECTIVE_OPS:
            raise ValueError(f"Collective.op must be one of {COLLECTIVE_OPS}, got {self.op!r}")


@dataclass(frozen=True, slots=True)
class Wait:
    """Block until the async op behind ``handle`` is complete."""

    handle: object


Op = Forward | Backward | OptimizerStep | Send | Recv | RecvAny | Collective | Wait
COMPUTE_OPS = (Forward, Backward, OptimizerStep)
