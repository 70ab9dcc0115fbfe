"""How parameters and data are split: parameter-server shards and data shards.

Parameter shards are contiguous ranges of the model's flattened parameters
(all layers in forward order), so a shard is one buffer on both executors:

* ``partition="layer"``: whole layers, grouped into ``k`` contiguous shards so
  that the largest shard is as small as contiguous grouping allows (the
  linear-partition problem, solved exactly by bisection on the capacity).
  Needs at least ``k`` layers with parameters.
* ``partition="slice"``: the flattened vector cut into ``k`` slices of equal
  size (to one element), across layer boundaries, as MXNet's and BytePS's
  servers slice large tensors. Needs at least ``k`` parameters.

Data shards (distributed sampling) are the samples each worker processes per
iteration; :func:`split_batch` splits a global batch in proportion to worker
weights (their speeds, say) so that faster workers get more.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from itertools import accumulate

PARTITIONS = ("layer", "slice")


@dataclass(frozen=True, slots=True)
class ParamShard:
    """One shard: elements ``[start, stop)`` of the flattened parameters, in layers ``[first, last)``."""

    index: int
    elements: tuple[int, int]
    layers: tuple[int, int]

    @property
    def size(self) -> int:
        return self.elements[1] - self.elements[0]


def partition_params(layer_params, k: int, partition: str = "layer") -> tuple[ParamShard, ...]:
    """Split parameters into ``k`` contiguous shards (see the module docstring)."""
    sizes = [int(p) for p in layer_params]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"servers must be an integer >= 1, got {k!r}")
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    prefix = [0, *accumulate(sizes)]
    total = prefix[-1]
    if partition == "slice":
        if k > total:
            raise ValueError(f"servers={k} is more than the model's {total} parameters allow for partition='slice'")
        bounds = [total * j // k for j in range(k + 1)]
        return tuple(
            ParamShard(j, (bounds[j], bounds[j + 1]), (_layer_at(prefix, bounds[j]), _layer_at(prefix, bounds[j + 1] - 1) + 1))
            for j in range(k)
        )
    nonempty = [i for i, p in enumerate(sizes) if p > 0]
    if k > len(nonempty):
        raise ValueError(
            f"servers={k} is more than the {len(nonempty)} layers with parameters allow for partition='layer' "
            f"(each server needs at least one layer); use partition='slice' or fewer servers"
        )
    weights = [sizes[i] for i in nonempty]
    lo, hi = max(weights), sum(weights)
    while lo < hi:  # the smallest capacity with which greedy packing needs at most k groups
        mid = (lo + hi) // 2
        if len(_pack(weights, mid)) <= k:
            hi = mid
        else:
            lo = mid + 1
    groups = _pack(weights, lo)
    while len(groups) < k:  # split a multi-layer group: still within the capacity
        j = max((g for g in range(len(groups)) if len(groups[g]) > 1), key=lambda g: sum(weights[i] for i in groups[g]))
        groups[j:j + 1] = [groups[j][:1], groups[j][1:]]
    # Group g covers the layers from its first parameter layer up to the next group's first.
    starts = [0] + [nonempty[groups[g][0]] for g in range(1, k)] + [len(sizes)]
    return tuple(ParamShard(g, (prefix[starts[g]], prefix[starts[g + 1]]), (starts[g], starts[g + 1])) for g in range(k))


def _pack(weights: list[int], capacity: int) -> list[list[int]]:
    groups: list[list[int]] = [[]]
    load = 0
    for i, w in enumerate(weights):
        if groups[-1] and load + w > capacity:
            groups.append([])
            load = 0
        groups[-1].append(i)
        load += w
    return groups


def _layer_at(prefix: list[int], element: int) -> int:
    """The layer holding flattened element ``element``."""
    return bisect.bisect_right(prefix, element) - 1


def split_batch(total: int, weights) -> tuple[int, ...]:
    """``total`` samples split in proportion to ``weights`` (largest remainders), each >= 1."""
    weights = [float(w) for w in weights]
    if isinstance(total, bool) or not isinstance(total, int) or total < len(weights):
        raise ValueError(f"split_batch: total must be an integer >= the number of workers ({len(weights)}), got {total!r}")
    if not weights or any(not w > 0 for w in weights):
        raise ValueError(f"split_batch: weights must be positive numbers, got {weights!r}")
    scale = sum(weights)
    exact = [total * w / scale for w in weights]
    shares = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in order[: total - sum(shares)]:  # largest remainders
        shares[i] += 1
    for i in range(len(shares)):  # every worker gets at least one sample, from the most over-served
        if shares[i] == 0:
            j = max((m for m in range(len(shares)) if shares[m] > 1), key=lambda m: shares[m] - exact[m])
            shares[j] -= 1
            shares[i] = 1
    return tuple(shares)
