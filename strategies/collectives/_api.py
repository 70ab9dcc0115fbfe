"""``schedule()``: argument checks in one place, then the algorithm's builder."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

from strategies.collectives import direct, halving_doubling, ring, tree
from strategies.collectives._core import Schedule

OPS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all")

ALGORITHMS: dict[str, tuple[str, ...]] = {
    "all_reduce": ("ring", "halving_doubling", "tree", "hierarchical", "direct"),
    "reduce_scatter": ("ring", "halving_doubling", "direct"),
    "all_gather": ("ring", "halving_doubling", "direct"),
    "broadcast": ("tree", "ring", "direct"),
    "reduce": ("tree", "ring", "direct"),
    "all_to_all": ("direct",),
}

PIPELINE_CHUNK_BYTES = 512 * 1024
"""Default pipeline chunk in bytes: NCCL's Simple-protocol step (4 MiB buffer / 8 steps)."""

_ROOTED = ("broadcast", "reduce")


def _is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _pipeline(pipeline_chunks: int | None, nbytes: float) -> int:
    if pipeline_chunks is not None:
        return int(pipeline_chunks)
    return max(1, math.ceil(nbytes / PIPELINE_CHUNK_BYTES))


def _check(op, algorithm, p, nbytes, root, node_of, pipeline_chunks) -> None:
    if op not in ALGORITHMS:
        raise ValueError(f"op {op!r} is not one of {OPS}")
    if algorithm not in ALGORITHMS[op]:
        raise ValueError(f"algorithm {algorithm!r} is not one of {ALGORITHMS[op]} for {op}")
    if not _is_int(p) or p < 1:
        raise ValueError(f"p must be an integer >= 1, got {p!r}")
    if not (
        isinstance(nbytes, Real)
        and not isinstance(nbytes, bool)
        and math.isfinite(nbytes)
        and nbytes >= 0
    ):
        raise ValueError(f"nbytes must be a finite number >= 0, got {nbytes!r}")
    if op in _ROOTED and not (_is_int(root) and 0 <= root < p):
        raise ValueError(
            f"root {root!r} is out of range for p={p}: must be an integer in 0..{p - 1}"
        )
    if pipeline_chunks is not None and not (_is_int(pipeline_chunks) and pipeline_chunks >= 1):
        raise ValueError(
            f"pipeline_chunks must be an integer >= 1 or None, got {pipeline_chunks!r}"
        )
    if node_of is not None and len(node_of) != p:
        raise ValueError(
            f"node_of has length {len(node_of)}, expected one node id per rank (p={p})"
        )
    if algorithm == "hierarchical":
        if node_of is None:
            raise ValueError(
                f"node_of is required for algorithm 'hierarchical': a node id for each of the p={p} ranks"
            )
        sizes = {len(ranks) for ranks in ring.nodes_of(node_of)}
        if len(sizes) != 1:
            counts = {node: list(node_of).count(node) for node in dict.fromkeys(node_of)}
            raise ValueError(
                f"node_of puts unequal rank counts on nodes {counts}; "
                "hierarchical needs the same number of ranks on every node"
            )


def schedule(
    op: str,
    algorithm: str,
    p: int,
    nbytes: float,
    *,
    root: int = 0,
    node_of: Sequence[int] | None = None,
    pipeline_chunks: int | None = None,
) -> Schedule:
    """The step schedule of collective ``op`` by ``algorithm`` over ``p`` ranks of a
    ``nbytes`` buffer.

    ``root`` is used by broadcast and reduce only. ``node_of`` (node id of each
    group-local rank) is required by hierarchical and otherwise only checked for
    length. ``pipeline_chunks`` is the chunk count of a pipeline (each tree of
    the double binary tree; the chain of ring broadcast/reduce), by default
    ``ceil(bytes through the pipeline / 512 KiB)``; other algorithms ignore it.
    Raises ``ValueError`` naming the bad argument.
    """
    _check(op, algorithm, p, nbytes, root, node_of, pipeline_chunks)
    nbytes = float(nbytes)
    match op, algorithm:
        case "all_reduce", "ring":
            plan = ring.all_reduce(p, nbytes)
        case "all_reduce", "halving_doubling":
            plan = halving_doubling.all_reduce(p, nbytes)
        case "all_reduce", "tree":
            plan = tree.double_tree_all_reduce(p, nbytes, _pipeline(pipeline_chunks, nbytes / 2))
        case "all_reduce", "hierarchical":
            plan = ring.hierarchical_all_reduce(ring.nodes_of(node_of), nbytes)
        case "all_reduce", "direct":
            plan = direct.all_reduce(p, nbytes)
        case "reduce_scatter", "ring":
            plan = ring.reduce_scatter(p, nbytes)
        case "reduce_scatter", "halving_doubling":
            plan = halving_doubling.reduce_scatter(p, nbytes)
        case "reduce_scatter", "direct":
            plan = direct.reduce_scatter(p, nbytes)
        case "all_gather", "ring":
            plan = ring.all_gather(p, nbytes)
        case "all_gather", "halving_doubling":
            plan = halving_doubling.all_gather(p, nbytes)
        case "all_gather", "direct":
            plan = direct.all_gather(p, nbytes)
        case "broadcast", "tree":
            plan = tree.binomial_broadcast(p, nbytes, root)
        case "broadcast", "ring":
            plan = ring.chain_broadcast(p, nbytes, root, _pipeline(pipeline_chunks, nbytes))
        case "broadcast", "direct":
            plan = direct.broadcast(p, nbytes, root)
        case "reduce", "tree":
            plan = tree.binomial_reduce(p, nbytes, root)
        case "reduce", "ring":
            plan = ring.chain_reduce(p, nbytes, root, _pipeline(pipeline_chunks, nbytes))
        case "reduce", "direct":
            plan = direct.reduce(p, nbytes, root)
        case "all_to_all", "direct":
            plan = direct.all_to_all(p, nbytes)
        case _:  # pragma: no cover - ALGORITHMS and this table disagree
            raise AssertionError(f"no builder for {op} {algorithm}")
    nchunks, chunk_bytes, segments = plan
    return Schedule(
        op=op,
        algorithm=algorithm,
        p=p,
        nbytes=nbytes,
        nchunks=nchunks,
        chunk_bytes=chunk_bytes,
        root=root if op in _ROOTED else None,
        segments=tuple(seg for seg in segments if seg.num_steps() > 0),
    )
