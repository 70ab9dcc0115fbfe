"""Tree schedules: NCCL's double binary tree all-reduce, binomial broadcast and reduce.

Double binary tree (Sanders, Speck and Träff 2009; NCCL 2.4). Tree A is NCCL's
binary tree over ranks 0..p-1 rooted at 0 (leaves are the odd ranks); tree B
is its mirror ``r -> p-1-r`` for even ``p`` and its shift ``r -> r+1`` for odd
``p``, so for even ``p`` every rank is a leaf in one of the two trees. Each
tree carries half the buffer in ``k`` pipelined chunks: chunk ``c`` goes up
from a rank whose subtree is ``h`` levels tall at step ``h + c``, and down from
a rank at depth ``d`` at step ``H + d + c`` (``H`` the tree's height), so
reduction and broadcast overlap as in NCCL's TreeUpDown. Steps: ``k + 2H - 1``.

Binomial trees (MPICH): broadcast in ``ceil(log2 p)`` rounds, the set of
ranks holding the data doubling each round; reduce is its mirror.
"""

from __future__ import annotations

from strategies.collectives._core import Explicit, Message, Segment, Stream, Streams


def btree_parent(p: int, rank: int) -> int:
    """Parent of ``rank`` in NCCL's binary tree over 0..p-1 (``-1`` for the root, 0).

    A rank's lowest set bit ``b`` gives its level; its parent is
    ``(rank ^ b) | 2b``, or ``rank ^ b`` where that is out of range. Rank 0 has
    one child, the largest power of two below ``p``.
    """
    if rank == 0:
        return -1
    bit = rank & -rank
    up = (rank ^ bit) | (bit << 1)
    return up if up < p else rank ^ bit


def _tree_streams(parent: list[int], first_chunk: int, k: int) -> list[Stream]:
    p = len(parent)
    children: list[list[int]] = [[] for _ in range(p)]
    root = -1
    for v, u in enumerate(parent):
        if u < 0:
            root = v
        else:
            children[u].append(v)
    depth = [0] * p
    order = [root]  # breadth first, so parents come before children
    for v in order:
        for c in children[v]:
            depth[c] = depth[v] + 1
            order.append(c)
    height = [0] * p
    for v in reversed(order):
        for c in children[v]:
            height[v] = max(height[v], height[c] + 1)
    tall = height[root]
    streams = []
    for v in order[1:]:
        u = parent[v]
        streams.append(Stream(v, u, height[v], first_chunk, k, True))
        streams.append(Stream(u, v, tall + depth[u], first_chunk, k, False))
    return streams


def double_tree_parents(p: int) -> tuple[list[int], list[int]]:
    """Parents of every rank in tree A and tree B."""
    a = [btree_parent(p, r) for r in range(p)]
    if p % 2 == 0:
        b = [-1 if (u := btree_parent(p, p - 1 - r)) < 0 else p - 1 - u for r in range(p)]
    else:
        b = [-1 if (u := btree_parent(p, (r - 1) % p)) < 0 else (u + 1) % p for r in range(p)]
    return a, b


def double_tree_all_reduce(p: int, nbytes: float, k: int) -> tuple[int, float, list[Segment]]:
    """Tree A reduces and broadcasts chunks 0..k-1, tree B chunks k..2k-1."""
    cb = nbytes / (2 * k)
    if p == 1:
        return 2 * k, cb, []
    a, b = double_tree_parents(p)
    streams = _tree_streams(a, 0, k) + _tree_streams(b, k, k)
    return 2 * k, cb, [Streams(streams=tuple(streams), chunk_bytes=cb)]


def _rounds(p: int) -> int:
    return (p - 1).bit_length()  # ceil(log2 p)


def binomial_broadcast(p: int, nbytes: float, root: int) -> tuple[int, float, list[Segment]]:
    """Round ``s`` (mask ``2^(R-1-s)``): relative ranks ``0, 2·mask, 4·mask, ...``
    send the whole buffer to ``rel + mask``."""
    steps = []
    rounds = _rounds(p)
    for s in range(rounds):
        mask = 1 << (rounds - 1 - s)
        steps.append(
            tuple(
                Message((root + rel) % p, (root + rel + mask) % p, (0,), False)
                for rel in range(0, p - mask, 2 * mask)
            )
        )
    return 1, float(nbytes), [Explicit(messages=tuple(steps), chunk_bytes=float(nbytes))]


def binomial_reduce(p: int, nbytes: float, root: int) -> tuple[int, float, list[Segment]]:
    """Round ``s`` (mask ``2^s``): relative ranks ``mask, 3·mask, ...`` send
    their partial sum to ``rel - mask``."""
    steps = []
    for s in range(_rounds(p)):
        mask = 1 << s
        steps.append(
            tuple(
                Message((root + rel) % p, (root + rel - mask) % p, (0,), True)
                for rel in range(mask, p, 2 * mask)
            )
        )
    return 1, float(nbytes), [Explicit(messages=tuple(steps), chunk_bytes=float(nbytes))]
