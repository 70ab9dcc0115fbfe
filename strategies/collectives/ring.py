"""Ring and chain schedules: ring reduce-scatter/all-gather/all-reduce, the
two-level hierarchical all-reduce built from rings, and pipelined chains for
broadcast and reduce.

A ring over ``p`` ranks cuts the buffer into ``p`` chunks; every step each
rank sends one chunk to its successor, so each rank sends ``(p-1)/p·n`` per
reduce-scatter or all-gather, the bandwidth optimum (Patarasuk and Yuan 2009).
"""

from __future__ import annotations

from collections.abc import Sequence

from strategies.collectives._core import Rings, Segment, Stream, Streams


def _flat_ring(p: int, chunk_bytes: float, *, reduce: bool) -> Rings:
    return Rings(
        rings=(tuple(range(p)),),
        blocks=(tuple(range(c, c + 1) for c in range(p)),),
        reduce=reduce,
        chunk_bytes=chunk_bytes,
    )


def reduce_scatter(p: int, nbytes: float) -> tuple[int, float, list[Segment]]:
    """p - 1 steps; rank i ends with chunk i summed."""
    return p, nbytes / p, [_flat_ring(p, nbytes / p, reduce=True)]


def all_gather(p: int, nbytes: float) -> tuple[int, float, list[Segment]]:
    """p - 1 steps; rank i contributes chunk i."""
    return p, nbytes / p, [_flat_ring(p, nbytes / p, reduce=False)]


def all_reduce(p: int, nbytes: float) -> tuple[int, float, list[Segment]]:
    """Reduce-scatter then all-gather: 2(p - 1) steps of n/p."""
    cb = nbytes / p
    return p, cb, [_flat_ring(p, cb, reduce=True), _flat_ring(p, cb, reduce=False)]


def nodes_of(node_of: Sequence[int]) -> list[list[int]]:
    """Ranks grouped by node, nodes in order of their ids, ranks ascending within a node."""
    by_node: dict = {}
    for rank, node in enumerate(node_of):
        by_node.setdefault(node, []).append(rank)
    return [by_node[k] for k in sorted(by_node)]


def hierarchical_all_reduce(
    nodes: list[list[int]], nbytes: float
) -> tuple[int, float, list[Segment]]:
    """Two-level all-reduce over ``N`` nodes of ``L`` ranks each (``p = N·L``).

    The buffer is ``L`` shards of ``N`` chunks: shard ``j`` is chunks
    ``j·N .. j·N + N - 1``. (1) a ring reduce-scatter inside every node leaves
    the rank at position ``j`` of its node with shard ``j`` summed over the node;
    (2) the ``N`` ranks at position ``j`` (one per node) ring-all-reduce shard
    ``j``, chunk ``j·N + m`` starting at node ``m``; (3) a ring all-gather
    inside every node spreads the shards. Steps: ``2(L - 1) + 2(N - 1)``. Only
    ``1/L`` of the data crosses between nodes, which is the point.
    """
    n_nodes, local = len(nodes), len(nodes[0])
    p = n_nodes * local
    cb = nbytes / p
    intra_rings = tuple(tuple(node) for node in nodes)
    shards = tuple(range(j * n_nodes, (j + 1) * n_nodes) for j in range(local))
    intra_blocks = (shards,) * n_nodes
    inter_rings = tuple(tuple(node[j] for node in nodes) for j in range(local))
    inter_blocks = tuple(
        tuple(range(j * n_nodes + m, j * n_nodes + m + 1) for m in range(n_nodes))
        for j in range(local)
    )
    return (
        p,
        cb,
        [
            Rings(rings=intra_rings, blocks=intra_blocks, reduce=True, chunk_bytes=cb),
            Rings(rings=inter_rings, blocks=inter_blocks, reduce=True, chunk_bytes=cb),
            Rings(rings=inter_rings, blocks=inter_blocks, reduce=False, chunk_bytes=cb),
            Rings(rings=intra_rings, blocks=intra_blocks, reduce=False, chunk_bytes=cb),
        ],
    )


def chain_broadcast(p: int, nbytes: float, root: int, k: int) -> tuple[int, float, list[Segment]]:
    """Pipelined chain root, root+1, ...: the rank at distance q forwards chunk c
    at step c + q. ``k + p - 2`` steps (none for p = 1)."""
    order = [(root + q) % p for q in range(p)]
    streams = tuple(Stream(order[q], order[q + 1], q, 0, k, False) for q in range(p - 1))
    return k, nbytes / k, [Streams(streams=streams, chunk_bytes=nbytes / k)]


def chain_reduce(p: int, nbytes: float, root: int, k: int) -> tuple[int, float, list[Segment]]:
    """Pipelined chain root+1, root+2, ..., root: partial sums flow towards the
    root, chunk c leaving the q-th rank of the chain at step c + q."""
    order = [(root + 1 + q) % p for q in range(p)]
    streams = tuple(Stream(order[q], order[q + 1], q, 0, k, True) for q in range(p - 1))
    return k, nbytes / k, [Streams(streams=streams, chunk_bytes=nbytes / k)]
