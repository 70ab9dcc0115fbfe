"""The candidates of a strategy search: knobs, default spaces, validity, memory and bounds.

A candidate is a dict of knobs (JSON values). Two families, chosen from the workload:

* ``"llm"`` (a transformer whose layers tensor parallelism splits by rows and columns):
  the Megatron/DeepSpeed space of :class:`strategies.Hybrid`: ``tp``, ``pp``,
  ``micro_batch_size``, ``schedule``, ``chunks``, ``zero``, ``recompute``,
  ``sequence_parallel``; ``dp`` and ``micro_batches`` follow from the GPUs and the global batch.
* ``"data_parallel"`` (every other model): ``strategy`` (``allreduce``,
  ``parameter_server``, ``local_sgd``) with ``algorithm``, ``compression``, ``bucket_mb``,
  ``servers``, ``placement``, ``mode`` and ``period``.

Both take ``nodes`` too (the cluster's node count; default: the cluster's own).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

SCHEDULES = ("gpipe", "1f1b", "interleaved")
STRATEGIES = ("allreduce", "parameter_server", "local_sgd")
ALGORITHMS = ("ring", "tree", "halving_doubling", "hierarchical")
COMPRESSIONS = (None, "qsgd", "topk", "powersgd")

LLM_SPACE = {
    "tp": [1, 2, 4, 8], "pp": [1, 2, 4, 8, 16, 32], "micro_batch_size": [1, 2, 4, 8],
    "schedule": list(SCHEDULES), "chunks": [2], "zero": [0, 1], "recompute": [False, True],
    "sequence_parallel": [False, True],
}
"""The default space of the ``llm`` family (Megatron-LM's knobs)."""

DP_SPACE = {
    "strategy": list(STRATEGIES), "algorithm": list(ALGORITHMS), "compression": list(COMPRESSIONS),
    "bucket_mb": [25.0], "servers": [1, "nodes"], "placement": ["dedicated", "colocated"],
    "mode": ["sync", "ssp", "async"], "period": [4, 16],
}
"""The default space of the ``data_parallel`` family (``servers="nodes"``: one per worker node)."""

_TYPES = {
    "tp": int, "pp": int, "micro_batch_size": int, "chunks": int, "zero": int, "nodes": int, "period": int,
    "schedule": str, "recompute": bool, "sequence_parallel": bool, "strategy": str, "algorithm": str,
    "placement": str, "mode": str, "bucket_mb": float, "compression": (str, type(None)), "servers": (int, str),
}
_CHOICES = {"schedule": SCHEDULES, "strategy": STRATEGIES, "algorithm": ALGORITHMS + ("direct",),
            "placement": ("dedicated", "colocated"), "mode": ("sync", "ssp", "async"), "zero": (0, 1, 2, 3)}


def family(workload) -> str:
    """``llm`` when tensor parallelism splits the workload's layers by rows (a transformer), else
    ``data_parallel``."""
    return "llm" if "row" in workload.tp_roles else "data_parallel"


def check_space(space, fam: str) -> dict:
    """The family's default space with ``space``'s entries in place of its own; a clear error
    naming a bad knob or value."""
    default = LLM_SPACE if fam == "llm" else DP_SPACE
    if space is None:
        space = {}
    if not isinstance(space, dict):
        raise ValueError(f"search: space must be a dict of knob -> list of values, got {type(space).__name__}")
    allowed = sorted(set(default) | {"nodes"})
    out = {k: list(v) for k, v in default.items()}
    for key, values in space.items():
        if key not in allowed:
            raise ValueError(f"search: unknown knob {key!r} for a {fam} model; knobs: {allowed}")
        if isinstance(values, (str, bytes)) or not isinstance(values, list | tuple | range):
            values = [values]
        values = list(values)
        if not values:
            raise ValueError(f"search: knob {key!r} has an empty list of values")
        for v in values:
            _check_value(key, v)
        out[key] = values
    return out


def _check_value(key: str, v) -> None:
    kind = _TYPES[key]
    if key == "compression" and v is not None:
        from strategies.compression import COMPRESSORS

        if v not in COMPRESSORS:
            raise ValueError(f"search: knob 'compression' value {v!r} is not a compressor; "
                             f"allowed: None, {sorted(COMPRESSORS)}")
        return
    if key == "servers" and isinstance(v, str):
        if v != "nodes":
            raise ValueError(f"search: knob 'servers' value {v!r} must be an integer >= 1 or 'nodes'")
        return
    if kind is int and (isinstance(v, bool) or not isinstance(v, int | np.integer) or v < (0 if key == "zero" else 1)):
        raise ValueError(f"search: knob {key!r} value {v!r} must be an integer >= {0 if key == 'zero' else 1}")
    if kind is float and (isinstance(v, bool) or not isinstance(v, int | float) or not v > 0):
        raise ValueError(f"search: knob {key!r} value {v!r} must be a number > 0")
    if kind is bool and not isinstance(v, bool):
        raise ValueError(f"search: knob {key!r} value {v!r} must be True or False")
    if kind is str and not isinstance(v, str):
        raise ValueError(f"search: knob {key!r} value {v!r} must be a string")
    if key in _CHOICES and v not in _CHOICES[key]:
        raise ValueError(f"search: knob {key!r} value {v!r} is not one of {list(_CHOICES[key])}")


# -------------------------------------------------------------------------------- candidates


def candidates(fam: str, space: dict, cluster, global_batch: int, workload) -> list[dict]:
    """Every valid combination of the space's knobs, in a fixed order. Combinations that
    cannot run (a degree that does not divide the GPUs or the batch, a schedule that needs
    more micro-batches) are not generated; knobs that do not apply to a candidate are not set."""
    out = []
    for nodes in space.get("nodes", [cluster.nodes]):
        gpus = int(nodes) * cluster.gpus_per_node
        gen = _llm(space, cluster, gpus, global_batch, workload) if fam == "llm" else _dp(space, gpus, global_batch,
                                                                                          int(nodes))
        for knobs in gen:
            out.append({"nodes": int(nodes), **knobs} if "nodes" in space else knobs)
    seen, unique = set(), []
    for c in out:
        key = candidate_key(c)
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


def _llm(space, cluster, gpus, global_batch, workload):
    blocks = sum(1 for r in workload.tp_roles if r == "row") // 2 or len(workload.layers)
    for tp, pp, mbs in itertools.product(space["tp"], space["pp"], space["micro_batch_size"]):
        if cluster.gpus_per_node % tp or gpus % (tp * pp) or pp > blocks:
            continue
        dp = gpus // (tp * pp)
        if global_batch % dp or (global_batch // dp) % mbs:
            continue
        m = global_batch // dp // mbs
        for sched, chunks, zero, recompute, sp in itertools.product(
                space["schedule"], space["chunks"], space["zero"], space["recompute"], space["sequence_parallel"]):
            if pp == 1 and sched != "1f1b" or pp > 1 and sched != "gpipe" and m < pp:
                continue  # one stage has no schedule to choose; 1F1B needs a micro-batch per stage
            if sched == "interleaved" and (chunks < 2 or m % pp or pp * chunks > blocks):
                continue
            if sp and tp == 1 or zero and dp == 1 or zero >= 2 and pp > 1:
                continue
            yield {"tp": tp, "pp": pp, "dp": dp, "micro_batch_size": mbs, "micro_batches": m, "schedule": sched,
                   "chunks": chunks if sched == "interleaved" else 1, "zero": zero, "recompute": recompute,
                   "sequence_parallel": sp}


def _dp(space, gpus, global_batch, nodes):
    if global_batch % gpus:
        return
    for strat in space["strategy"]:
        if strat == "allreduce":
            for algo, comp, bucket in itertools.product(space["algorithm"], space["compression"], space["bucket_mb"]):
                yield {"strategy": strat, "algorithm": algo, "compression": comp, "bucket_mb": float(bucket)}
        elif strat == "local_sgd":
            for algo, comp, period in itertools.product(space["algorithm"], space["compression"], space["period"]):
                yield {"strategy": strat, "algorithm": algo, "compression": comp, "period": period}
        else:
            for servers, placement, mode, comp in itertools.product(space["servers"], space["placement"],
                                                                    space["mode"], space["compression"]):
                if comp == "powersgd":
                    continue  # PowerSGD's two rounds need an all-reduce between them
                s = nodes if servers == "nodes" else servers
                yield {"strategy": strat, "servers": s, "placement": placement, "mode": mode, "compression": comp}


def candidate_key(knobs: dict) -> str:
    return ",".join(f"{k}={knobs[k]}" for k in sorted(knobs))


def lossy(knobs: dict) -> bool:
    """Whether the candidate changes what training computes (compression, asynchrony, local
    SGD), so its throughput buys less progress per sample than synchronous SGD's."""
    return bool(knobs.get("compression")) or knobs.get("mode", "sync") != "sync" \
        or knobs.get("strategy") == "local_sgd"


def build(knobs: dict, workload, cluster, global_batch: int, settings: dict):
    """The Experiment of a candidate (``settings``: precision, optimizer, iterations, seed)."""
    from simulator.experiment import Experiment
    from strategies import AllReduceSGD, Hybrid, LocalSGD, ParameterServer

    if "nodes" in knobs and knobs["nodes"] != cluster.nodes:
        cluster = dataclasses.replace(cluster, nodes=knobs["nodes"])
    if "tp" in knobs:
        strategy = Hybrid(tp=knobs["tp"], pp=knobs["pp"], micro_batches=knobs["micro_batches"],
                          schedule=knobs["schedule"], chunks=knobs["chunks"], zero=knobs["zero"],
                          recompute=knobs["recompute"], sequence_parallel=knobs["sequence_parallel"])
        batch = global_batch // knobs["dp"]
    else:
        comp = knobs.get("compression")
        if knobs["strategy"] == "allreduce":
            strategy = AllReduceSGD(algorithm=knobs["algorithm"], compression=comp, bucket_mb=knobs["bucket_mb"])
        elif knobs["strategy"] == "local_sgd":
            strategy = LocalSGD(period=knobs["period"], algorithm=knobs["algorithm"], compression=comp)
        else:
            strategy = ParameterServer(servers=knobs["servers"], placement=knobs["placement"], mode=knobs["mode"],
                                       staleness_bound=2 if knobs["mode"] == "ssp" else 0, compression=comp)
        batch = global_batch // cluster.num_gpus
        if knobs["strategy"] == "local_sgd":  # whole periods, so that the averaging is in the mean
            settings = {**settings, "iterations": max(settings["iterations"], 2 * knobs["period"])}
    return Experiment(workload=workload, cluster=cluster, strategy=strategy, batch_size=batch,
                      out_of_memory="report", name=candidate_key(knobs), **settings)


# -------------------------------------------------------------------------- memory and bounds


def peak_memory(exp) -> tuple[float, float]:
    """(peak bytes on a GPU, its share of that GPU's capacity), analytically: one rank per class
    of ranks whose needs are equal (:mod:`simulator.symmetry`), no simulation."""
    from simulator.memory import memory_table
    from simulator.symmetry import Symmetry, link_kinds
    from simulator.symmetry import candidates as generators

    cluster = exp.run_cluster
    kinds = link_kinds(cluster.links)
    gens, _ = generators(exp, kinds)
    sym = Symmetry.find(cluster, gens, kinds) if gens else None
    table = memory_table(exp, None if sym is None else sym.rep)
    gpu = table[table["kind"] == "gpu"]
    frac = gpu["total"] / gpu["capacity"]
    return float(gpu["total"].max()), float(frac.max())


def lower_bound(knobs: dict, exp) -> float:
    """Seconds no iteration of the candidate can beat, from the simulator's own per-layer times
    (communication taken as free unless said otherwise, the optimizer step left out).

    Pipelines (``llm``): each device computes its virtual stages' forwards, backwards and
    recomputed forwards for every micro-batch one after another, its first forward cannot
    start before one micro-batch has passed a virtual stage on every device before it, and
    after its last backward one virtual stage on every device before it still has a backward
    to run: ``max over devices s of (sum over j < s of min F_j) + W_s + (sum over j < s of min
    B_j)``. Data parallel: the forward and backward, and for uncompressed synchronous
    all-reduce the bytes every node must send, 2 (n - 1) / n of the gradients (the bandwidth
    bound of any all-reduce; Patarasuk and Yuan 2009), over its NICs."""
    from simulator.compute import layer_times
    from simulator.memory import MIXED

    cluster = exp.run_cluster
    device = cluster.device_of(0)
    wl = exp.workload
    if "tp" in knobs:
        return _pipeline_bound(knobs, exp, *layer_times(wl, device, exp.precision, knobs["micro_batch_size"],
                                                        knobs["tp"], knobs["sequence_parallel"]))
    fwd, bwd = layer_times(wl, device, exp.precision, exp.batch_size)
    compute = float(fwd.sum() + bwd.sum())
    nodes = cluster.nodes
    if knobs["strategy"] == "parameter_server" or knobs.get("compression") or nodes < 2:
        return compute
    grad = wl.params * (2 if exp.precision in MIXED else 4)
    comm = 2 * (nodes - 1) / nodes * grad / (cluster.nics_per_node * cluster.inter.bandwidth)
    if knobs["strategy"] == "local_sgd":
        comm /= knobs["period"]
    return max(compute, comm)


def _pipeline_bound(knobs: dict, exp, fwd, bwd) -> float:
    from strategies.pipeline import checkpoint_units

    job = exp.job()
    names = [layer.name for layer in exp.workload.layers]
    pp, m = knobs["pp"], knobs["micro_batches"]
    f_pre = np.concatenate(([0.0], np.cumsum(fwd)))
    b_pre = np.concatenate(([0.0], np.cumsum(bwd)))
    F, B = [], []  # per virtual stage, one micro-batch; B holds the recomputed forwards too
    for a, b in exp.strategy.stages(job):
        F.append(f_pre[b] - f_pre[a])
        redo = sum(f_pre[y] - f_pre[x] for x, y in checkpoint_units(names, a, b)) if knobs["recompute"] else 0.0
        B.append(b_pre[b] - b_pre[a] + redo)
    work = [m * sum(F[j] + B[j] for j in range(s, len(F), pp)) for s in range(pp)]
    f_min = [min(F[j] for j in range(s, len(F), pp)) for s in range(pp)]
    b_min = [min(B[j] for j in range(s, len(B), pp)) for s in range(pp)]
    return float(max(sum(f_min[:s]) + work[s] + sum(b_min[:s]) for s in range(pp)))


def shortfall(rows: list[dict]) -> str:
    """The smallest memory shortfall among candidates that do not fit, as a sentence."""
    best = min(rows, key=lambda r: r["peak_memory_gb"] / max(r["memory_fraction"], 1e-300) * (r["memory_fraction"] - 1))
    over = best["peak_memory_gb"] * (1 - 1 / best["memory_fraction"])
    return (f"the closest, {best['candidate']}, needs {best['peak_memory_gb']:.1f} GB per GPU, "
            f"{over:.1f} GB more than the GPU has ({math.ceil(best['memory_fraction'] * 100)} % of it)")
