"""Collective step schedules: who sends which chunk to whom at each step.

Backend-neutral: the simulator turns transfers into network flows, realrun
into ``isend``/``irecv`` on real tensors. ``schedule(op, algorithm, p, nbytes)``
returns a :class:`Schedule`.

Semantics an executor follows
-----------------------------
* Every rank has a buffer of ``nbytes`` cut into ``nchunks`` chunks (equal
  parts; for a real tensor the parts ``tensor_split``/``array_split`` gives).
  ``nbytes`` is the full buffer: the gathered output of all_gather, the full
  input of reduce_scatter, each rank's whole send buffer of all_to_all.
* Steps run in order. A rank starts its sends of step ``k`` once its sends of
  earlier steps have left it and its receives of earlier steps have arrived;
  there is no global barrier, and a sender does not wait for its receiver:
  data that arrives before the receiver reaches that step waits in a receive
  buffer (as in NCCL's slots) and is applied in step order. (A rank's buffer
  changes only through its own transfers, so this gives the same result as
  running the steps in lockstep.)
* Within a step every send reads the sender's chunk as it was at the start of
  the step; then receives are applied: ``reduce`` adds into the receiver's copy,
  otherwise the copy is overwritten. A step never overwrites a chunk at a rank
  twice, nor both overwrites and adds into it.
* ``p = 1`` gives zero steps.

What each rank holds at the end
-------------------------------
* all_reduce: every rank, the elementwise sum.
* reduce_scatter (``nchunks = p``): rank ``i`` owns chunk ``i``, summed.
* all_gather (``nchunks = p``): rank ``i`` contributes chunk ``i``; all hold all.
* broadcast / reduce: everyone holds the root's buffer / the root holds the sum.
* all_to_all: ``nchunks = p²`` chunks of ``nbytes / p`` each (the one exception
  to equal parts of ``nbytes``). Chunk ``i·p + j`` is block ``j`` of rank
  ``i``'s send buffer and lands as block ``i`` of rank ``j``'s receive buffer.

Chunking per algorithm: ring, direct and hierarchical cut into ``p`` chunks
(hierarchical: ``L`` shards of ``N`` chunks, see ``ring.hierarchical_all_reduce``);
halving_doubling all_reduce into ``2^floor(log2 p)``; the double binary tree into
``2·pipeline_chunks`` (chunks ``0..k-1`` ride tree A, ``k..2k-1`` tree B);
binomial and direct broadcast/reduce send the whole buffer as one chunk; chain
(ring) broadcast/reduce pipeline ``pipeline_chunks`` chunks. ``pipeline_chunks``
defaults to ``ceil(bytes through one pipeline / 512 KiB)``, NCCL's chunk size.

Phases
------
:meth:`Schedule.phases` is the chunk-free view a fast path uses: a step's
transfers between the same ``(src, dst)`` form one message, and a phase is a
run of ``repeat`` steps with the same messages, all of ``nbytes``. It is None
when some step has messages of unequal size: non-power-of-two
halving_doubling reduce_scatter/all_gather (a folded pair's virtual rank
carries two chunks), and the double binary tree whenever both trees use one
(src, dst) in one step (an edge both trees contain carries one tree's
reduction and the other's broadcast at once; with ``pipeline_chunks`` >= 16
that is nearly every p).
"""

from strategies.collectives._api import ALGORITHMS, OPS, PIPELINE_CHUNK_BYTES, schedule
from strategies.collectives._core import Phase, Schedule, Step, Transfer

__all__ = [
    "ALGORITHMS",
    "OPS",
    "PIPELINE_CHUNK_BYTES",
    "Phase",
    "Schedule",
    "Step",
    "Transfer",
    "schedule",
]
