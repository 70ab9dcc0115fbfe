"""Device memory per rank: weights, gradients, optimizer state, master weights, activations, buffers.

Each strategy states what a rank holds (:mod:`strategies.residency`); this
module prices it with the experiment's precision and optimizer:

* weights and gradients: 4 bytes per element in fp32/tf32; 2 in mixed
  precision (``fp16``/``bf16``), which also keeps 4-byte fp32 master weights
  for the elements the rank steps; a parameter server's shard is fp32;
* optimizer state per stepped element: SGD none, momentum 4 bytes, Adam 8
  (two fp32 moments), AdaGrad and RMSprop 4. Mixed-precision Adam is then
  2 + 2 + 4 + 8 = 16 bytes per parameter (Micikevicius et al. 2018; Rajbhandari
  et al., "ZeRO", SC 2020, section 3.1);
* activations: every kept layer's output (what backward reads back: the next
  layer's input), plus the input of the first kept layer, for the samples in
  flight, in the compute dtype (2 bytes in mixed precision); with tensor
  parallelism each layer's share by its role (and sequence parallelism's split
  of the replicated layers); with recomputation, each checkpoint's input for
  the samples in flight;
* buffers: as the strategy states them.

The peak is taken as the sum of these (all live at the start of backward),
the same accounting as the ZeRO paper's. Allocator fragmentation, the CUDA
context and workspace memory are not counted.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from simulator import units
from simulator.compute import MIXED

OPTIMIZER_STATE_BYTES = {"sgd": 0, "momentum": 4, "adam": 8, "adagrad": 4, "rmsprop": 4}
"""Bytes of optimizer state per parameter (fp32): momentum buffer, Adam's two moments, accumulators."""

MEMORY_COLUMNS = ["rank", "kind", "device", "params", "grads", "optimizer_state", "master_weights",
                  "activations", "buffers", "total", "capacity", "fits"]
OUT_OF_MEMORY = ("raise", "report")


class OutOfMemoryError(ValueError):
    """An experiment needs more memory on a device than it has."""


def memory_table(experiment, representatives=None) -> pd.DataFrame:
    """Bytes each rank needs at its peak, by component, against its device's capacity.

    ``representatives``: ``representatives[r]`` is a rank whose needs ``r``'s equal (the
    strategy's symmetries map one onto the other; :mod:`simulator.symmetry`); each is
    worked out once."""
    from strategies.residency import replicated

    cluster = experiment.run_cluster
    job = experiment.job()
    strategy = experiment.strategy
    state = getattr(strategy, "residency", None)
    precision = experiment.precision
    mixed = precision in MIXED
    e = 2 if mixed else 4
    opt_bytes = OPTIMIZER_STATE_BYTES[experiment.optimizer]
    layers = experiment.workload.layers
    prefixes: dict = {}

    def kept(a: int, b: int, tp: int, sp: bool) -> float:
        """Activation elements per sample kept for layers [a, b): outputs and the first input."""
        key = (tp, sp)
        if key not in prefixes:
            if tp > 1:
                from strategies.tensor_parallel import split_factors

                f = [split_factors(role, tp, sp) for role in experiment.workload.tp_roles]
            else:
                f = [(1.0, 1.0, 1.0, 1.0)] * len(layers)
            outs = [layer.output_elems * f[i][3] for i, layer in enumerate(layers)]
            prefixes[key] = (np.concatenate(([0.0], np.cumsum(outs))),
                             [layer.input_elems * f[i][2] for i, layer in enumerate(layers)])
        out_prefix, first_input = prefixes[key]
        return out_prefix[b] - out_prefix[a] + first_input[a]

    rows = []
    worked: dict[int, dict] = {}
    for rank in range(cluster.world_size):
        rep = rank if representatives is None else int(representatives[rank])
        if rep in worked:
            rows.append({**worked[rep], "rank": rank})
            continue
        held = state(job, rank) if callable(state) else replicated(job, rank)
        w = 4 if held.fp32 else e
        acts = 0.0
        for (a, b), samples in held.activations:
            if b > a:
                acts += samples * kept(a, b, held.tp, held.sequence_parallel)
        for layer, samples in held.activation_inputs:
            acts += samples * kept(layer, layer, held.tp, held.sequence_parallel)
        device = cluster.device_of(rank)
        row = {
            "rank": rank,
            "kind": "host" if cluster.is_host(rank) else "gpu",
            "device": device.name,
            "params": held.params * w,
            "grads": held.grads * w,
            "optimizer_state": held.optimizer * opt_bytes,
            "master_weights": held.optimizer * 4 if (mixed and not held.fp32) else 0.0,
            "activations": acts * e,
            "buffers": float(held.buffers),
        }
        row["total"] = sum(row[k] for k in ("params", "grads", "optimizer_state", "master_weights",
                                            "activations", "buffers"))
        row["capacity"] = float(device.mem_capacity)
        row["fits"] = row["total"] <= row["capacity"]
        rows.append(row)
        worked[rank] = row
    return pd.DataFrame(rows, columns=MEMORY_COLUMNS)


def _describe(row) -> str:
    parts = ", ".join(
        f"{name.replace('_', ' ')} {units.fmt_bytes(row[name])}"
        for name in ("params", "grads", "optimizer_state", "master_weights", "activations", "buffers")
        if row[name] > 0
    )
    return (f"rank {row['rank']} ({row['device']}) needs {units.fmt_bytes(row['total'])} "
            f"({parts}) but has {units.fmt_bytes(row['capacity'])}")


def check_memory(table: pd.DataFrame, policy: str, name: str = "") -> None:
    """Raise :class:`OutOfMemoryError` (``policy="raise"``) or warn (``"report"``) when a rank
    does not fit; the message names the device, the need by component and the capacity."""
    over = table[~table["fits"]]
    if over.empty:
        return
    worst = over.loc[(over["total"] / over["capacity"]).idxmax()]
    label = f"experiment {name!r}: " if name else ""
    others = f"; {len(over)} of {len(table)} ranks do not fit" if len(over) > 1 else ""
    message = f"{label}out of memory: {_describe(worst)}{others}"
    if policy == "raise":
        raise OutOfMemoryError(message + " (Experiment.out_of_memory='report' simulates it anyway)")
    warnings.warn(message, RuntimeWarning, stacklevel=4)  # at the caller of simulate()
