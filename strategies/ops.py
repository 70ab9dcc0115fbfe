"""The op vocabulary: what a role program may yield.

A strategy's role programs are generators that yield these ops and receive
each op's result back from ``yield``. Two executors interpret them: the
simulator (ops take simulated time) and realrun (ops do real torch work). The
set is small and closed, and the names follow ``torch.distributed``:

* compute: :class:`Forward`, :class:`Backward`, :class:`OptimizerStep`,
  :class:`Encode`/:class:`Decode` (a compressor's work on gradients)
* point-to-point: :class:`Send`, :class:`Recv`, :class:`RecvAny`
* collectives: :class:`Collective` (``all_reduce``, ``reduce_scatter``,
  ``all_gather``, ``broadcast``, ``reduce``, ``all_to_all``) with an
  algorithm and an optional async handle
* synchronisation: :class:`Wait` on a handle an async op returned
* bookkeeping: :class:`Apply` (a parameter shard's owner applies received
  gradients: one model update, its version counted and the staleness of every
  gradient in it recorded)

A compute op may name ``cancel_on`` handles: if one of them completes first,
the op stops there and answers ``False`` (it answers ``True`` when it ran to
the end). The simulator stops it at that instant; realrun checks between
layers. Backup workers use it to abandon an iteration the servers closed.

Ops name *logical* tensors (:class:`TensorRef`): the simulator needs only
their size; realrun maps ``(role, layers)`` to real tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

TensorRole = Literal["grads", "params", "activations", "activation_grads", "payload", "custom"]
TENSOR_ROLES = ("grads", "params", "activations", "activation_grads", "payload", "custom")
"""``payload``: what the last :class:`Encode` of the same ``layers`` produced (compressed gradients)."""

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
    elements: tuple[int, int] | None = None
    """Half-open range of elements of the model's flattened parameters (all
    layers, forward order) the tensor holds, when it is a slice of them."""
    only: tuple[int, ...] | None = None
    """The layers, in increasing order, whose parameters (or gradients) the tensor holds
    when they are not a range: one coalesced buffer of scattered layers (Megatron's
    all-reduce of the layer norms' gradients under sequence parallelism)."""

    def __post_init__(self) -> None:
        if not self.nbytes >= 0:
            raise ValueError(f"TensorRef.nbytes must be >= 0, got {self.nbytes!r}")
        if self.elements is not None and not 0 <= self.elements[0] <= self.elements[1]:
            raise ValueError(f"TensorRef.elements must be a range (start <= stop), got {self.elements!r}")
        if self.role not in TENSOR_ROLES:
            raise ValueError(f"TensorRef.role must be one of {TENSOR_ROLES}, got {self.role!r}")
        if self.only is not None:
            only = tuple(self.only)
            if not only or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in only) or list(
                    only) != sorted(set(only)):
                raise ValueError(f"TensorRef.only must be increasing layer indices >= 0, got {self.only!r}")
            if self.elements is not None:
                raise ValueError("TensorRef.only and TensorRef.elements cannot both be given")
            object.__setattr__(self, "only", only)

    @property
    def num_elements(self) -> int | None:
        return None if self.elements is None else self.elements[1] - self.elements[0]


@dataclass(frozen=True, slots=True)
class Forward:
    """Forward pass of layers ``segment = [start, stop)`` for one micro-batch.

    With ``tp_group`` the layers are split across those ranks, Megatron-style
    (:mod:`strategies.tensor_parallel`): this rank holds and computes its share
    (its index in the group) of each split layer; ``sequence_parallel`` splits the
    replicated layers' tokens too. The ranks of a group see the same samples,
    which count once (for the group's first rank) in throughput.
    """

    segment: tuple[int, int]
    samples: int
    micro_batch: int = 0
    cancel_on: tuple = ()
    """Handles whose completion abandons the op (see the module docstring)."""
    tp_group: tuple[int, ...] | None = None
    sequence_parallel: bool = False
    recompute: bool = False
    """Re-run for backward (activation checkpointing): keeps nothing, counts no samples."""


def counted_samples(op: Forward, rank: int) -> int:
    """Samples a completed forward adds to ``rank``'s throughput: its micro-batch when it
    starts the model (layer 0) and is not a recomputation, on the first rank of its
    tensor-parallel group only (the group's ranks see the same samples); else 0. Both
    executors count by this, so their throughputs compare."""
    if op.segment[0] != 0 or op.recompute or (op.tp_group is not None and op.tp_group[0] != rank):
        return 0
    return op.samples


@dataclass(frozen=True, slots=True)
class Backward:
    """Backward pass of layers ``segment = [start, stop)`` for one micro-batch."""

    segment: tuple[int, int]
    samples: int
    micro_batch: int = 0
    cancel_on: tuple = ()
    tp_group: tuple[int, ...] | None = None
    """As :class:`Forward`'s."""
    sequence_parallel: bool = False


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
    meta: Mapping[str, float] | None = None
    """A few named numbers that travel with the tensor (a version, a clock);
    realrun sends them as a small header."""


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
    """A received point-to-point message (what ``Recv``/``RecvAny`` answer)."""

    src: int
    tensor: TensorRef
    tag: int
    meta: Mapping[str, float] | None = None
    time: float = 0.0
    """When it was received, on the executor's clock (seconds)."""

    def get(self, key: str, default: float | None = None):
        """``meta[key]``, or ``default`` if absent."""
        return default if self.meta is None else self.meta.get(key, default)


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


@dataclass(frozen=True, slots=True)
class Apply:
    """Apply gradients to parameter shard ``shard``, which this rank owns: one model update.

    ``grads`` are received gradient messages, summed into one update; each
    carries in its meta the ``version`` of the shard its sender read (and may
    carry ``clock``, the sender's iteration, ``read_time``, when it read, and
    ``samples``). ``dropped`` are gradients discarded unapplied (late backups):
    recorded, not applied. The executor charges the aggregation and the
    optimizer step on this rank's device, records one row per gradient in
    ``RunResult.updates`` (staleness = the shard's version now minus the
    version read), and answers with the shard's new version. Apply with no
    ``grads`` only records ``dropped`` and leaves the version unchanged.
    """

    shard: int
    tensor: TensorRef
    """The shard's parameters (its ``elements`` give the optimizer's work)."""
    grads: tuple[Message, ...]
    dropped: tuple[Message, ...] = ()


@dataclass(frozen=True, slots=True)
class Encode:
    """Round ``round`` of compressing ``tensor`` (gradients of ``tensor.layers``) with ``compressor``
    (a :class:`strategies.compression.Compressor`), on this rank's compute stream.

    ``cost`` is the work the simulator charges (:class:`strategies.compression.Cost`);
    realrun runs ``compressor.encode`` instead. The payloads it makes are what the next
    collectives or sends of role ``payload`` for the same layers carry.
    """

    tensor: TensorRef
    compressor: object
    round: int
    cost: object


@dataclass(frozen=True, slots=True)
class Decode:
    """Turn the received payloads of ``tensor`` back into averaged gradients (``compressor.decode``).

    ``payloads`` is how many ranks' payloads are decoded (all-gather: the group size;
    a parameter server: the gradients it applies).
    """

    tensor: TensorRef
    compressor: object
    cost: object
    payloads: int = 1


Op = Forward | Backward | OptimizerStep | Encode | Decode | Send | Recv | RecvAny | Collective | Wait | Apply
COMPUTE_OPS = (Forward, Backward, OptimizerStep, Encode, Decode)
