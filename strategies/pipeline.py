"""Pipeline schedules and stage partitions, backend-neutral.

A schedule is, for each of ``p`` stages, the order in which it runs the
forward (``"F"``) and backward (``"B"``) passes of ``m`` micro-batches on each
of its ``v`` model chunks. Both executors follow it; a pass waits for its
input (the previous stage's activation, the next stage's gradient) to arrive.

* ``gpipe`` (Huang et al., 2019): all ``m`` forwards, then all ``m``
  backwards. Every micro-batch's activations are alive at once.
* ``1f1b`` (PipeDream-Flush; Narayanan et al., 2021): stage ``s`` runs
  ``p - s - 1`` warm-up forwards, then alternates one forward and one
  backward, then drains the remaining backwards. The same bubble as GPipe,
  ``(p - 1)/(m + p - 1)`` of the iteration, but at most ``p - s`` micro-batches
  in flight on stage ``s``.
* ``interleaved`` (Narayanan et al., SC 2021, section 2.2): each device holds
  ``v`` chunks of layers (stage ``s`` chunk ``c`` is virtual stage
  ``c·p + s``); 1F1B over the ``m·v`` (micro-batch, chunk) pairs in
  Megatron-LM's order, which cuts the bubble to ``(p - 1)/v`` micro-batch
  times. Needs ``m`` a multiple of ``p``, as Megatron-LM does.

Every schedule here flushes: all backwards finish before the optimizer step,
so the weights stay consistent (synchronous semantics; no weight stashing).
"""

from __future__ import annotations

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def schedule(name: str, p: int, m: int, v: int = 1) -> list[list[tuple[str, int, int]]]:
    """Per stage, the ordered passes ``(kind, micro_batch, chunk)``; ``kind`` is ``"F"`` or ``"B"``."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    if name != "interleaved" and v != 1:
        raise ValueError(f"chunks={v} needs schedule='interleaved' (gpipe and 1f1b hold one chunk per stage)")
    if name == "interleaved" and m % p:
        raise ValueError(
            f"micro_batches={m} must be a multiple of the pipeline depth {p} for the interleaved schedule"
        )
    out = []
    for s in range(p):
        if name == "gpipe":
            out.append([("F", k, 0) for k in range(m)] + [("B", k, 0) for k in range(m)])
        elif name == "1f1b":
            out.append(_one_f_one_b(m, min(p - s - 1, m), lambda k, kind: (k, 0)))
        else:
            total = m * v

            def ids(k: int, kind: str, p=p, v=v) -> tuple[int, int]:
                group, within = divmod(k, p * v)
                chunk = within // p
                return group * p + k % p, (v - 1 - chunk if kind == "B" else chunk)

            warmup = total if m == p else min((p - s - 1) * 2 + (v - 1) * p, total)
            out.append(_one_f_one_b(total, warmup, ids))
    return out


def _one_f_one_b(total: int, warmup: int, ids) -> list[tuple[str, int, int]]:
    passes = [("F", *ids(k, "F")) for k in range(warmup)]
    remaining = total - warmup
    for k in range(remaining):
        passes.append(("F", *ids(warmup + k, "F")))
        passes.append(("B", *ids(k, "B")))
    passes.extend(("B", *ids(k, "B")) for k in range(remaining, total))
    return passes


def in_flight(passes) -> int:
    """The most micro-batches (of any chunk) whose forward has run and backward has not."""
    live = peak = 0
    for kind, _, _ in passes:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def balance(costs, parts: int, cuts_allowed=None) -> list[int]:
    """Contiguous partition of layers into ``parts`` stages minimising the costliest stage.

    ``costs`` are per-layer costs; ``cuts_allowed[i]`` says whether a stage may
    start at layer ``i`` (default: anywhere). Returns the ``parts + 1`` boundaries
    ``0 = b0 < b1 < ... < b_parts = n``. Bisection on the capacity with greedy
    packing, which is exact for the min-max contiguous partition.
    """
    costs = [float(c) for c in costs]
    n = len(costs)
    allowed = [True] * n if cuts_allowed is None else list(cuts_allowed)
    starts = [i for i in range(1, n) if allowed[i]]
    if len(starts) + 1 < parts:
        raise ValueError(
            f"cannot cut {n} layers into {parts} stages: only {len(starts) + 1} stages are possible "
            "(too few layers, or cuts only where tensor-parallel activations are whole)"
        )
    # Blocks between allowed cut points are indivisible.
    edges = [0, *starts, n]
    blocks = [sum(costs[edges[j]:edges[j + 1]]) for j in range(len(edges) - 1)]

    def pack(capacity: float) -> list[int] | None:
        cuts = [0]
        load = 0.0
        for j, c in enumerate(blocks):
            if load > 0 and load + c > capacity:
                cuts.append(j)
                load = 0.0
            load += c
        return cuts if len(cuts) <= parts else None

    lo, hi = max(blocks), sum(blocks)
    for _ in range(100):
        if hi - lo <= 1e-12 * max(hi, 1e-300):
            break
        mid = (lo + hi) / 2
        if pack(mid) is None:
            lo = mid
        else:
            hi = mid
    cuts = pack(hi)
    while len(cuts) < parts:  # split the costliest multi-block stage: stays within the capacity
        bounds = [*cuts, len(blocks)]
        j = max((g for g in range(len(cuts)) if bounds[g + 1] - bounds[g] > 1),
                key=lambda g: sum(blocks[bounds[g]:bounds[g + 1]]))
        cuts.insert(j + 1, bounds[j] + 1)
    return [edges[j] for j in cuts] + [n]


def checkpoint_units(names, a: int, b: int) -> list[tuple[int, int]]:
    """Layers ``[a, b)`` cut into activation-checkpoint units: runs of layers under the same
    top-level module, counting a numbered child as its own module (``blocks.3.attn.qkv`` is in
    unit ``blocks.3``, ``ln_f`` in ``ln_f``), as Megatron-LM checkpoints each transformer layer."""

    def key(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]

    units, start = [], a
    for i in range(a + 1, b):
        if key(names[i]) != key(names[i - 1]):
            units.append((start, i))
            start = i
    if b > a:
        units.append((start, b))
    return units
