"""Gradient buckets assigned the way DistributedDataParallel assigns them.

DDP walks parameters in reverse registration order (roughly the order their
gradients become ready in backward), appends each to the open bucket, and
closes the bucket once its size reaches the cap; the first bucket's cap is
small (``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES`` = 1 MiB) so that
communication starts early. Here the unit is a workload layer, not a tensor:
a layer's parameters stay in one bucket, as they become ready together.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Bucket:
    index: int
    """0 is the first bucket to become ready (the last layers)."""
    layers: tuple[int, int]
    """Half-open range of layers whose gradients the bucket holds."""
    nbytes: float


def assign_buckets(
    layer_params: tuple[int, ...] | list[int],
    *,
    bytes_per_param: float,
    bucket_bytes: float,
    first_bucket_bytes: float = MIB,
) -> tuple[Bucket, ...]:
    """Partition layers into DDP-style buckets, in the order backward fills them.

    The buckets' layer ranges tile ``[0, len(layer_params))`` so that running
    backward bucket by bucket covers every layer once; layers without
    parameters ride with their neighbours. Returns an empty tuple when the
    workload has no parameters.
    """
    if not bucket_bytes > 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes!r}")
    if not first_bucket_bytes > 0:
        raise ValueError(f"first_bucket_bytes must be > 0, got {first_bucket_bytes!r}")
    n = len(layer_params)
    if sum(layer_params) == 0:
        return ()
    # Walk layers from the last; record closing points as (stop, start) pairs.
    spans: list[tuple[int, int, float]] = []
    stop = n
    size = 0.0
    limit = first_bucket_bytes
    for i in range(n - 1, -1, -1):
        size += layer_params[i] * bytes_per_param
        if size >= limit and layer_params[i] > 0:
            spans.append((i, stop, size))
            stop, size, limit = i, 0.0, bucket_bytes
    if size > 0:
        spans.append((0, stop, size))
    elif spans:  # trailing parameter-free layers at the front join the last bucket
        start, last_stop, last_size = spans[-1]
        spans[-1] = (0, last_stop, last_size)
    return tuple(Bucket(k, (a, b), s) for k, (a, b, s) in enumerate(spans))
