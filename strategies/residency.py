"""What each rank keeps in device memory, as a strategy states it.

A strategy says, per rank, how many parameter, gradient and optimizer-state
elements it holds, which layers' activations it keeps for how many samples at
its peak (micro-batches in flight), and the bytes of its communication
buffers. The simulator's memory model (:mod:`simulator.memory`) prices these
with the experiment's precision and optimizer. Strategies without a
``residency(job, rank)`` method get :func:`replicated`: every GPU rank holds
the whole model and its own batch's activations.
"""

from __future__ import annotations

from dataclasses import dataclass

from strategies.context import Job


@dataclass(frozen=True, slots=True)
class Residency:
    params: float = 0.0
    """Elements of the working weights (in the training precision's dtype)."""
    grads: float = 0.0
    """Elements of gradients."""
    optimizer: float = 0.0
    """Elements whose optimizer state (and, in mixed precision, fp32 master weights) this rank keeps."""
    activations: tuple[tuple[tuple[int, int], int], ...] = ()
    """``((first, stop), samples)``: activations of layers ``[first, stop)`` kept for ``samples`` samples."""
    activation_inputs: tuple[tuple[int, int], ...] = ()
    """``(layer, samples)``: the input of ``layer`` kept for ``samples`` samples (checkpoints)."""
    buffers: float = 0.0
    """Bytes of communication buffers (buckets, payloads, receive buffers, error-feedback residuals)."""
    fp32: bool = False
    """Weights and gradients held in fp32 whatever the precision (a parameter server's shard)."""
    tp: int = 1
    """Tensor-parallel degree: each kept layer's activations shrink by its role's split."""
    sequence_parallel: bool = False


def replicated(job: Job, rank: int, *, buffers: float = 0.0) -> Residency:
    """A data-parallel GPU rank: the whole model, its optimizer state, its batch's activations."""
    if rank >= job.accelerators:
        return Residency()
    total = float(sum(job.layer_params))
    return Residency(params=total, grads=total, optimizer=total,
                     activations=(((0, job.num_layers), job.samples(rank)),), buffers=buffers)
