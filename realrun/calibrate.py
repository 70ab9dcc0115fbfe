"""Calibration: measure this machine and its links, so the simulator predicts runs on them.

:func:`calibrate` measures, on the machine at hand (CPU, or a GPU with ``device="cuda"``):

* **per-layer forward and backward seconds** of the experiment's model at the
  batch size its compute ops run at (a pipeline's micro-batch), by timing the
  real model: forward with module hooks (time between a layer's hooks, less its
  children's), backward with hooks on each layer's output gradient node (time
  from the moment backward reaches a layer to the moment it reaches the next);
  the per-layer shares are then scaled to the whole model's forward and
  backward time measured without hooks, medians over repeats;
* **the device**: dense fp32 matrix-multiply FLOP/s, streaming memory
  bandwidth (``a += b`` over buffers far larger than the caches), the fixed
  cost of one small op (framework dispatch, launch), and the optimizer step of
  the whole model as realrun's flat optimizer runs it (which fixes the memory
  bandwidth the optimizer and parameter-server updates are timed with);
* **links**, when a launcher is given: point-to-point messages (sent and
  acknowledged) and ring all-reduces at several sizes through realrun on that
  launcher, fitted by least squares to ``t = alpha + n / beta`` per message
  (and per ring step), as nccl-tests' bus bandwidth and ASTRA-sim's validation
  fit them.

The result is a :class:`Calibration`: a calibrated :class:`~simulator.Cluster`
(the measured device on every GPU rank, the measured inter-node link) and
:class:`~simulator.Workload` (measured ``fwd_time``/``bwd_time`` per layer), the
raw measurements, and :meth:`Calibration.apply` to rewrite any experiment on the
same model onto them. :meth:`Calibration.save` writes ``cluster.json``,
``workload.json`` and ``calibration.json``; :meth:`Calibration.load` reads them
back, and an experiment file can name ``workload.json`` with
``[workload] path = ...``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from simulator.cluster import Cluster
from simulator.compute import OPTIMIZERS, ComputeModel
from simulator.hardware import Device, LinkSpec
from simulator.workload import ROOT_LAYER, Workload

MEASUREMENT_COLUMNS = ["kind", "name", "size", "seconds", "predicted"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compute_batch(experiment) -> int:
    """Samples in one forward of the experiment's compute ops: the batch size, divided by
    the micro-batches of a pipeline (uneven batches: the most common size)."""
    batch = experiment.batch_size
    if isinstance(batch, tuple):
        batch = statistics.mode(batch)
    micro = getattr(experiment.strategy, "micro_batches", 1) or 1
    return max(1, batch // micro)


# ---------------------------------------------------------------------------------- compute


def profile_layers(module, workload: Workload, data, batch: int, device: torch.device, *,
                   repeats: int = 10) -> dict:
    """Forward and backward seconds per workload layer for a batch of ``batch`` samples.

    Returns ``fwd``/``bwd`` (arrays in layer order, summing to the whole model's measured
    forward and backward) and ``fwd_total``/``bwd_total`` (medians without hooks)."""
    names = [layer.name for layer in workload.layers]
    index = {name: i for i, name in enumerate(names)}
    n = len(names)
    x = data.inputs(0, 0, batch, 0, batch)

    def loss_of(out):
        return data.loss(out, 0, 0, batch, 0, batch)

    # forward with grad (what training runs) and the backward that follows, without hooks
    fwd_grad, bwd_times = [], []
    for _ in range(repeats + 2):
        module.zero_grad(set_to_none=False)
        _sync(device)
        t0 = time.perf_counter()
        loss = loss_of(module(x))
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        fwd_grad.append(t1 - t0)
        bwd_times.append(t2 - t1)
    fwd_total = statistics.median(fwd_grad[2:])
    bwd_total = statistics.median(bwd_times[2:])

    # per-layer shares, with hooks
    modules = {}
    for name in names:
        path = "" if name == ROOT_LAYER else name
        modules[name] = module.get_submodule(path)
    fwd_acc = np.zeros(n)
    fwd_runs: list[np.ndarray] = []
    bwd_runs: list[np.ndarray] = []
    stack: list[int] = []
    last = [0.0]
    events: list[tuple[float, int]] = []
    handles = []

    def charge_forward(now: float) -> None:
        if stack:
            fwd_acc[stack[-1]] += now - last[0]
        last[0] = now

    def pre(i):
        def hook(mod, args):
            _sync(device)
            charge_forward(time.perf_counter())
            stack.append(i)
        return hook

    def post(i):
        def hook(mod, args, out):
            _sync(device)
            charge_forward(time.perf_counter())
            if stack and stack[-1] == i:
                stack.pop()
            tensors = [out] if isinstance(out, torch.Tensor) else [
                t for t in (out if isinstance(out, (tuple, list)) else ()) if isinstance(t, torch.Tensor)]
            for t in tensors:
                if t.grad_fn is not None:
                    def reached(grad_outputs, i=i):
                        _sync(device)
                        events.append((time.perf_counter(), i))
                    t.grad_fn.register_prehook(reached)
                    break
        return hook

    for name, mod in modules.items():
        i = index[name]
        handles.append(mod.register_forward_pre_hook(pre(i)))
        handles.append(mod.register_forward_hook(post(i)))
    try:
        for r in range(repeats + 2):
            fwd_step = np.zeros(n)
            module.zero_grad(set_to_none=False)
            stack.clear()
            events.clear()
            fwd_acc[:] = 0
            _sync(device)
            last[0] = time.perf_counter()
            loss = loss_of(module(x))
            _sync(device)
            fwd_step[:] = fwd_acc
            t_bwd0 = time.perf_counter()
            loss.backward()
            _sync(device)
            t_end = time.perf_counter()
            per = np.zeros(n)
            marks = sorted(events)
            if marks:
                per[marks[0][1]] += marks[0][0] - t_bwd0  # the loss's backward, charged to the last layer
            for (t, i), (t_next, _) in zip(marks, marks[1:] + [(t_end, -1)]):
                per[i] += t_next - t
            if r >= 2:  # warm-up passes left out
                bwd_runs.append(per)
                fwd_runs.append(fwd_step)
    finally:
        for h in handles:
            h.remove()
    # medians per layer: a pass the scheduler interrupted inflates one layer of one pass only
    fwd_med = np.median(np.array(fwd_runs), axis=0)
    bwd_med = np.median(np.array(bwd_runs), axis=0)
    fwd_share = fwd_med / max(fwd_med.sum(), 1e-300)
    bwd_share = bwd_med / max(bwd_med.sum(), 1e-300)
    return {"fwd": fwd_share * fwd_total, "bwd": bwd_share * bwd_total,
            "fwd_total": fwd_total, "bwd_total": bwd_total}


IDLE_GAPS = (0.0, 0.002, 0.005, 0.01, 0.02, 0.05)
"""Idle seconds before a forward and backward at which :func:`measure_idle_slowdown` times them."""


def measure_idle_slowdown(module, data, batch: int, device: torch.device, *, gaps=IDLE_GAPS,
                          repeats: int = 10) -> tuple[tuple[float, float], ...]:
    """How much slower a forward and backward runs after the processor sat idle for a while
    (waiting on the network): ``(gap seconds, time after that gap / time with none)`` pairs,
    means over ``repeats`` passes. Caches go cold and cores clock down while a rank waits;
    on a CPU this costs tens of percent after tens of milliseconds.

    The gaps take turns, each pass starting one gap later than the one before, so a drift
    of the machine's speed while this runs falls on every gap alike (a linear drift cancels
    when ``repeats`` is a multiple of the gaps). Timed one gap after another, the
    matrix's MLP at 64 samples gave factors at 10 ms from 1.18 to 1.77 in three calls in a
    row; taking turns, 1.20 to 1.24."""
    gaps = tuple(gaps)
    if not gaps or any(isinstance(g, bool) or not isinstance(g, int | float) or not g >= 0 for g in gaps) \
            or gaps[0] != 0:
        raise ValueError(f"measure_idle_slowdown: gaps must be seconds >= 0 starting with 0 (the "
                         f"reference), got {gaps!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"measure_idle_slowdown: repeats must be an integer >= 1, got {repeats!r}")
    x = data.inputs(0, 0, batch, 0, batch)

    def step():
        module.zero_grad(set_to_none=False)
        data.loss(module(x), 0, 0, batch, 0, batch).backward()
        _sync(device)

    gaps = tuple(float(g) for g in gaps)
    times: list[list[float]] = [[] for _ in gaps]
    step()
    for r in range(repeats):
        for k in range(len(gaps)):
            i = (r + k) % len(gaps)
            if gaps[i]:
                time.sleep(gaps[i])
            t0 = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - t0)
    base = statistics.fmean(times[0])
    return tuple((g, statistics.fmean(t) / base) for g, t in zip(gaps, times))


def measure_device(device: torch.device, *, repeats: int = 10) -> dict:
    """fp32 matmul FLOP/s, streaming bandwidth (bytes/s) and seconds per small op."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    t_mm = _median_time(lambda: torch.mm(a, b), device, repeats)
    words = (64 << 20) // 4 if device.type == "cpu" else (1 << 30) // 4
    u = torch.zeros(words, device=device)
    v = torch.ones(words, device=device)
    t_add = _median_time(lambda: u.add_(v), device, repeats)
    small = torch.zeros(16, device=device)
    t_small = _median_time(lambda: [small.add_(1.0) for _ in range(100)], device, repeats) / 100
    return {"fp32_flops": 2 * n**3 / t_mm, "mem_bandwidth": 3 * 4 * words / t_add, "op_overhead": t_small}


# ---------------------------------------------------------------------------------- links


def fit_alpha_beta(rows) -> tuple[float, float]:
    """Least-squares ``(alpha, beta)`` of ``seconds = messages * alpha + wire_bytes / beta`` over
    rows of ``(messages, wire_bytes, seconds)`` (alpha clipped at 0).

    The squares are of seconds, not of relative errors: the long transfers, which take most of
    a run's communication time, fix the bandwidth. Weighting rows by ``1/seconds`` let the
    smallest messages decide it: on a token-bucket-shaped link a 256 KiB all-reduce beat the
    line rate (the bucket's burst) and a 64 KiB one waited on the scheduler, and the fit came
    out 9 % above the rate every transfer of 1 MiB and more measured."""
    a = np.array([[m, w] for m, w, _ in rows], dtype=float)
    y = np.array([s for _, _, s in rows], dtype=float)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    alpha, inv_beta = float(coef[0]), float(coef[1])
    if inv_beta <= 0:
        raise ValueError(f"link fit gave a non-positive 1/bandwidth ({inv_beta}); the measurements are noise")
    if alpha < 0:  # refit bandwidth alone through the origin
        alpha = 0.0
        inv_beta = float(np.sum(a[:, 1] * y) / np.sum(a[:, 1] ** 2))
    return alpha, 1.0 / inv_beta


def _probe_experiment(experiment, probe, nodes: int, iterations: int, name: str, **changes):
    """An experiment that runs the :class:`~realrun.linkbench.LinkProbe` ``probe`` between
    ``nodes`` single-rank nodes of ``experiment``'s cluster (``changes``: more fields)."""
    from simulator import Experiment

    cluster = dataclasses.replace(experiment.cluster, nodes=nodes, gpus_per_node=1, hosts=(), devices=None,
                                  nics_per_node=1)
    return Experiment(workload=Workload.from_zoo("mlp", in_features=4, hidden=[4], out_features=2),
                      cluster=cluster, strategy=probe, batch_size=1, iterations=iterations, name=name, **changes)


def measure_links(experiment, launcher, *, sizes=(65536, 262144, 1 << 20, 4 << 20), repeats: int = 4,
                  nodes: int | None = None, bucket: bool = False, timeout: float = 300) -> pd.DataFrame:
    """Point-to-point (sent and acknowledged) and ring all-reduce times at ``sizes`` bytes over
    ``launcher``'s links between single-rank nodes of the experiment's cluster, and the delay
    of an empty message sent behind a message of each size on the same link (pattern
    ``queue``, :class:`~realrun.linkbench.LinkProbe`): rows of pattern, size, nodes,
    messages, wire_bytes, seconds (medians over ``repeats``). With ``bucket``, also each
    size's time after an idle spell (pattern ``burst``), for :func:`fit_burst`."""
    from realrun.linkbench import LinkProbe
    from realrun.run import run

    p = nodes or max(3, min(4, experiment.cluster.nodes))
    rows = []
    patterns = (("send", 2), ("all_reduce", p), ("queue", 3)) + ((("burst", 3),) if bucket else ())
    for pattern, world in patterns:
        probe = LinkProbe(nbytes=float(sizes[0]), pattern=pattern, sizes=tuple(float(s) for s in sizes))
        exp = _probe_experiment(experiment, probe, world, len(sizes) * (repeats + 1), f"calibrate-{pattern}")
        result = run(exp, launcher=launcher, threads=1, timeout=timeout)
        it = result.iterations
        if pattern == "queue":
            durations = queue_delays(result)
        elif pattern == "burst":
            durations = burst_delays(result)
        else:
            durations = it[it["rank"] == 0].set_index("iteration")["duration"]
        for k, size in enumerate(sizes):
            # iterations k, k + len(sizes), ...; the first round (connection set-up) is left out
            times = [d for i, d in durations.items() if i % len(sizes) == k and i >= len(sizes)]
            if pattern == "send":
                messages, wire = 2, size  # the message and its empty acknowledgement
            elif pattern == "queue":
                messages, wire = 2, 0.0  # an empty message (and what it waits behind) and its answer
            elif pattern == "burst":
                messages, wire = 2, size  # one message after an idle spell, and the answer
            else:
                messages, wire = 2 * (world - 1), 2 * (world - 1) / world * size
            rows.append((pattern, float(size), world, messages, wire, statistics.median(times)))
    return pd.DataFrame(rows, columns=["pattern", "size", "nodes", "messages", "wire_bytes", "seconds"])


def queue_delays(result) -> pd.Series:
    """Per iteration of a :class:`~realrun.linkbench.LinkProbe` ``queue`` run (real or
    simulated), the round trip of the empty message sent behind the bulk one and its answer,
    on rank 0's clock: from its send to the send that follows the answer's arrival. (Timed
    from the send on rank 0 to its arrival on rank 2, it mixed two clocks: realrun's ranks
    leave the barrier that starts their clocks up to milliseconds apart, and the window fitted
    at 400 Mbit/s moved between 0.13 and 0.42 MB from one calibration to the next.)"""
    tl = result.timeline
    sends = tl[tl["rank"] == 0].groupby(["iteration", "name"])["start"].min().unstack()
    return (sends["send:queue-mark->2"] - sends["send:queue-token->2"]).dropna()


def burst_delays(result) -> pd.Series:
    """Per iteration of a :class:`~realrun.linkbench.LinkProbe` ``burst`` run (real or
    simulated), seconds from the message's send on rank 0 to the end of rank 0's
    iteration, when rank 1's empty answer to its arrival is in: one rank's clock (realrun's
    ranks start their clocks at a barrier, which they leave up to milliseconds apart)."""
    tl, it = result.timeline, result.iterations
    sent = np.sort(tl[(tl["rank"] == 0) & (tl["name"] == "send:probe->1")]["start"].to_numpy())
    ends = np.sort(it[it["rank"] == 0]["end"].to_numpy())
    at = np.searchsorted(ends, sent)
    ok = at < len(ends)
    return pd.Series(ends[at[ok]] - sent[ok], index=pd.RangeIndex(int(ok.sum()), name="iteration"))


def bucket_time(size, alpha: float, beta: float, burst: float, peak: float):
    """Seconds for ``size`` bytes to cross an idle link of latency ``alpha`` and rate ``beta``
    whose token bucket of ``burst`` bytes is full and lets it run at ``peak`` (the closed
    form in :mod:`simulator.network`); arrays broadcast."""
    size, burst, peak = (np.asarray(x, dtype=float) for x in (size, burst, peak))  # any broadcastable shapes
    with np.errstate(divide="ignore", invalid="ignore"):
        reach = burst * peak / (peak - beta)  # bytes sent by the time the bucket is dry
        shaped = np.where(size <= reach, size / peak, (size - burst) / beta)
    return alpha + np.where(burst > 0, shaped, size / beta)


def fit_burst(burst_rows, alpha: float, beta: float) -> tuple[float, float]:
    """A link's token bucket ``(burst bytes, peak bytes/s)`` (:attr:`simulator.LinkSpec.burst`,
    ``burst_bandwidth``) from the times of messages of several sizes sent on an idle link
    (``(size, seconds)`` pairs), given its latency ``alpha`` and rate ``beta``: least squares
    of the relative error of :func:`bucket_time` over a grid of buckets (0 to the largest
    message) and peaks (1.25 to 1000 times the rate). ``(0, 0)``: no message beat the rate
    by more than 5 %, no bucket."""
    rows = [(float(s), float(t)) for s, t in burst_rows]
    if not rows:
        raise ValueError("fit_burst: no burst measurements")
    sizes = np.array([s for s, _ in rows])
    seconds = np.array([t for _, t in rows])
    if not np.all(seconds > 0):
        raise ValueError(f"fit_burst: every message's seconds must be > 0, got {seconds.tolist()}")
    if np.all(seconds >= 0.95 * (alpha + sizes / beta)):
        return 0.0, 0.0
    bursts = np.linspace(0.0, sizes.max(), 401)[1:, None, None]
    peaks = beta * np.geomspace(1.25, 1000.0, 121)[None, :, None]
    err = np.sum(np.log(bucket_time(sizes, alpha, beta, bursts, peaks) / seconds) ** 2, axis=2)
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    return float(bursts[i, 0, 0]), float(peaks[0, j, 0])


def fit_flow_window(queue_rows, alpha: float, beta: float, min_size: float = 1 << 20) -> float:
    """A link's flow window (bytes, :attr:`simulator.LinkSpec.flow_window`) from the round
    trips of empty messages sent behind messages of several sizes and answered at once
    (``(size, seconds)`` pairs, :func:`queue_delays`): what each took beyond two latencies
    ``alpha``, at bandwidth ``beta``, is the bytes of the message before it still queued,
    ``min(window, size)``. The window is the median over the messages of at least
    ``min_size`` bytes (all of them if none is that large): a smaller one has partly left
    the sender's queue by the time the empty one is sent."""
    queued = [(size, max(0.0, seconds - 2 * alpha) * beta) for size, seconds in queue_rows]
    if not queued:
        raise ValueError("fit_flow_window: no queue measurements")
    big = [q for size, q in queued if size >= min_size] or [q for _, q in queued]
    return float(statistics.median(big))


def calibrate_link(experiment, launcher, *, sizes=(65536, 262144, 1 << 20, 4 << 20),
                   repeats: int = 4, bucket: bool = False) -> tuple[LinkSpec, pd.DataFrame]:
    """``launcher``'s link between nodes: latency and bandwidth fitted (:func:`fit_alpha_beta`)
    to :func:`measure_links`' message and all-reduce timings, the flow window
    (:func:`fit_flow_window`) to its queue delays, with ``bucket`` the token bucket
    (:func:`fit_burst`) to its messages after an idle spell; and those timings, with the
    fit's ``predicted`` seconds.

    ``bucket`` is off by default: a real link has no bucket, and the emulated cluster keeps
    tbf's small (:attr:`~realrun.EmulatedCluster.burst_seconds`, 2 ms of the rate). With
    that bucket this probe fitted 10 KB at 400 Mbit/s (tbf holds 100 KB) and 31 KB at
    100 Mbit/s (25 KB): a few per cent of a message's time. With the 4 ms bucket used before,
    it fitted 84-126 KB at 400 Mbit/s, a lone gloo message after 5 ms idle beat the rate by
    175 KB's worth, and the matrix's pipelines ran 20-50 % faster than a plain link gives
    (see the README, Validate)."""
    if not isinstance(bucket, bool):
        raise ValueError(f"calibrate_link: bucket must be True or False, got {bucket!r}")
    table = measure_links(experiment, launcher, sizes=sizes, repeats=repeats, bucket=bucket)
    timed = table[table["pattern"].isin(["send", "all_reduce"])]
    alpha, beta = fit_alpha_beta(list(zip(timed["messages"], timed["wire_bytes"], timed["seconds"])))
    queue = table["pattern"] == "queue"
    window = fit_flow_window(list(zip(table.loc[queue, "size"], table.loc[queue, "seconds"])), alpha, beta)
    bursty = table["pattern"] == "burst"
    burst, peak = fit_burst(list(zip(table.loc[bursty, "size"], table.loc[bursty, "seconds"])), 2 * alpha,
                            beta) if bucket else (0.0, 0.0)
    table["predicted"] = table["messages"] * alpha + table["wire_bytes"] / beta
    table.loc[queue, "predicted"] = 2 * alpha + np.minimum(window, table.loc[queue, "size"]) / beta
    table.loc[bursty, "predicted"] = bucket_time(table.loc[bursty, "size"], 2 * alpha, beta, burst, peak)
    return LinkSpec(name="measured-link", bandwidth=beta, latency=alpha, flow_window=window, burst=burst,
                    burst_bandwidth=peak), table


_SPINNER = (
    "import sys, torch\n"
    "torch.set_num_threads(1)\n"
    "a = torch.randn(256, 256)\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    a @ a\n"
)


def _spinners(n: int) -> list:
    """``n`` processes that each keep a core busy with single-threaded matrix products (as a
    rank's compute does), started and running when this returns."""
    import subprocess
    import sys

    procs = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", _SPINNER], stdout=subprocess.PIPE, text=True,
                                          start_new_session=True))
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a core-busying process failed to start")
    except BaseException:
        _stop(procs)
        raise
    return procs


def _stop(procs) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()
        proc.stdout.close()


def measure_round_trips(experiment, launcher, *, busy=(0, 1, 2), size: float = 4096, repeats: int = 60,
                        timeout: float = 300) -> pd.DataFrame:
    """Round trips of a ``size``-byte message and its empty answer between two single-rank
    nodes of the experiment's cluster on ``launcher`` (:class:`~realrun.linkbench.LinkProbe`
    ``send``), while ``b`` other processes keep ``b`` cores busy computing, for each ``b`` in
    ``busy``: rows of busy, size, seconds (the mean over ``repeats`` round trips after the
    first: a run's mean iteration time sums mean delays, and these have a long tail)."""
    from realrun.linkbench import LinkProbe
    from realrun.run import run

    exp = _probe_experiment(experiment, LinkProbe(nbytes=float(size)), 2, repeats + 1, "calibrate-round-trip")
    rows = []
    for b in busy:
        procs = _spinners(b)
        try:
            result = run(exp, launcher=launcher, threads=1, timeout=timeout)
        finally:
            _stop(procs)
        it = result.iterations
        times = it[(it["rank"] == 0) & (it["iteration"] > 0)]["duration"]
        rows.append((int(b), float(size), float(times.mean())))
    return pd.DataFrame(rows, columns=["busy", "size", "seconds"])


def fit_message_delay(round_trips, baseline: float) -> tuple[float, ...]:
    """Seconds each message spends in its hosts' software (:attr:`simulator.ComputeModel.
    message_delay`), by busy cores, from :func:`measure_round_trips`' table: a round trip is
    two messages, so half of its excess over ``baseline``, the same round trip simulated on
    the calibrated link without delay (clipped at 0). Rows must cover busy = 0, 1, ..."""
    missing = {"busy", "seconds"} - set(getattr(round_trips, "columns", ()))
    if missing:
        raise ValueError(f"fit_message_delay: round_trips must be a table with columns busy and seconds, "
                         f"missing {sorted(missing)}")
    table = round_trips.sort_values("busy")
    if list(table["busy"]) != list(range(len(table))):
        raise ValueError(f"fit_message_delay: round trips must be measured at busy = 0, 1, ..., got "
                         f"{list(table['busy'])}")
    if not baseline >= 0:
        raise ValueError(f"fit_message_delay: baseline must be seconds >= 0, got {baseline!r}")
    return tuple(max(0.0, (float(s) - baseline) / 2) for s in table["seconds"])


def simulated_round_trip(experiment, link: LinkSpec, size: float = 4096, *, eager_limit: float | None = 0.0,
                         message_delay: tuple = ()) -> float:
    """The :class:`~realrun.linkbench.LinkProbe` ``send`` round trip of ``size`` bytes, simulated
    between two nodes joined by ``link`` (messages by rendezvous, as realrun moves them),
    each message delayed by ``message_delay`` (:attr:`simulator.ComputeModel.message_delay`)."""
    from realrun.linkbench import LinkProbe
    from simulator.executor import simulate

    exp = _probe_experiment(experiment.replace(cluster=dataclasses.replace(experiment.cluster, inter=link)),
                            LinkProbe(nbytes=float(size)), 2, 2, "round-trip", eager_limit=eager_limit,
                            compute=ComputeModel(message_delay=message_delay))
    it = simulate(exp).iterations
    return float(it[(it["rank"] == 0) & (it["iteration"] == 1)]["duration"].iloc[0])


def calibrate_message_delay(experiment, launcher, link: LinkSpec, *, cores: int, size: float = 4096,
                            repeats: int = 60) -> tuple[tuple[float, ...], pd.DataFrame]:
    """Each message's time in its hosts' software beyond ``link``'s latency, with 0 to
    ``cores`` cores busy (:func:`measure_round_trips`, :func:`fit_message_delay`): the
    :attr:`simulator.ComputeModel.message_delay` table, and the round trips with their
    ``predicted`` seconds.

    On the 2-core machine the emulated cluster runs on, this probe's 4 KiB round trip took
    a mean of 0.6-0.9 ms with both cores idle (a raw gloo ping-pong: median 0.23 ms, a long
    tail), 2.3-6.6 ms with one busy and 1.0-4.9 ms with two (three calibrations), against
    about 0.2 ms on the fitted link alone: the thread a message wakes waits on the
    scheduler, for a tick when one core spins (the raw round trips ended on 4 ms
    boundaries). The matrix's PowerSGD spent 1-4 ms in each of its all-reduces of a
    few KiB, where the link predicts 0.1-0.4 ms. But these busy cores are other
    processes, and they delay messages more than a run's own compute does: with the
    delays fitted here the matrix's PowerSGD went from -50 % to +39 % and its 400 Mbit/s
    all-reduces and pipelines from within 8 % to +19 to +95 %, which is why
    :func:`calibrate` measures it only when asked (see the README, Validate)."""
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 0:
        raise ValueError(f"calibrate_message_delay: cores must be an integer >= 0, got {cores!r}")
    table = measure_round_trips(experiment, launcher, busy=tuple(range(cores + 1)), size=size, repeats=repeats)
    baseline = simulated_round_trip(experiment, link, size)
    delays = fit_message_delay(table, baseline)
    table["predicted"] = [baseline + 2 * d for d in delays]
    return delays, table


# ---------------------------------------------------------------------------------- result


@dataclass
class Calibration:
    """What :func:`calibrate` measured: a device, a link (if links were measured), the workload
    with per-layer measured times, and every raw measurement."""

    device: Device
    workload: Workload
    link: LinkSpec | None = None
    shared_cores: int = 0
    """Cores the ranks of a run on the calibrated machine share (0: a device per rank)."""
    cost_scale: dict = field(default_factory=dict)
    """Measured over modelled compressor work (see :attr:`simulator.ComputeModel.cost_scale`)."""
    idle_slowdown: tuple = ()
    """``(idle seconds, slowdown)`` pairs from :func:`measure_idle_slowdown`: compute after a
    rank waited that long runs that many times slower. Empty: no such effect."""
    optimizer_seconds: dict = field(default_factory=dict)
    """Measured seconds of one optimizer step over the whole model, per optimizer."""
    message_delay: tuple = ()
    """Each message's seconds in its hosts' software by busy cores
    (:func:`calibrate_message_delay`, :attr:`simulator.ComputeModel.message_delay`). Empty:
    not measured; the experiment's own stays."""
    eager_limit: float | None = None
    """The transport's eager limit (:attr:`simulator.Experiment.eager_limit`), applied to the
    experiment; None leaves the experiment's. :func:`calibrate` sets 0: realrun's transports
    move every message by rendezvous. gloo's TCP pair sends a message only once the
    receiver's ready notification for it has come (``NOTIFY_RECV_READY``, whatever the
    size), and NCCL's send completes only against a posted receive."""
    measurements: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=MEASUREMENT_COLUMNS))
    machine: dict = field(default_factory=dict)

    def cluster_for(self, cluster: Cluster) -> Cluster:
        """``cluster`` with the measured device on every GPU rank and, if links were measured,
        the measured link between nodes."""
        changes = {"device": self.device, "devices": None}
        if self.link is not None:
            changes["inter"] = self.link
        return dataclasses.replace(cluster, **changes)

    def apply(self, experiment):
        """The experiment on the measured device, link and per-layer times (same model)."""
        mine = [(layer.name, layer.params) for layer in self.workload.layers]
        theirs = [(layer.name, layer.params) for layer in experiment.workload.layers]
        if mine != theirs:
            raise ValueError(
                f"Calibration.apply: the experiment's workload {experiment.workload.name!r} is not the calibrated "
                f"model {self.workload.name!r} (layers differ); calibrate this experiment's model"
            )
        compute = dataclasses.replace(experiment.compute, shared_cores=self.shared_cores,
                                      cost_scale={**experiment.compute.cost_scale, **self.cost_scale},
                                      message_delay=self.message_delay or experiment.compute.message_delay)
        strategy = experiment.strategy
        if isinstance(getattr(strategy, "server_device", None), str | dict):  # servers run here too
            strategy = dataclasses.replace(strategy, server_device=self.device.to_dict())
        calibrated = experiment.replace(workload=self.workload, cluster=self.cluster_for(experiment.cluster),
                                        compute=compute, strategy=strategy)
        if self.eager_limit is not None:
            calibrated = calibrated.replace(eager_limit=self.eager_limit)
        factor = self.idle_factor(calibrated)
        if factor != 1.0:
            layers = tuple(dataclasses.replace(layer, fwd_time=layer.fwd_time * factor, bwd_time=layer.bwd_time * factor)
                           for layer in self.workload.layers)
            calibrated = calibrated.replace(workload=dataclasses.replace(self.workload, layers=layers))
        return calibrated

    def idle_factor(self, calibrated) -> float:
        """The slowdown of compute in ``calibrated`` (this calibration applied, hot compute).

        Simulated, each forward and backward of a GPU rank follows some idle time: the gaps
        in the rank's compute since its previous forward or backward (an optimizer step
        between them does not warm the caches the layers use). :attr:`idle_slowdown` gives
        the slowdown after that much idle (linear between the gaps measured, the last beyond
        them); the result is the ops' slowdowns averaged weighted by their times."""
        if len(self.idle_slowdown) < 2:
            return 1.0
        from simulator.executor import simulate

        gaps, factors = zip(*self.idle_slowdown)
        tl = simulate(calibrated).timeline
        tl = tl[(tl["stream"] == "compute") & tl["rank"].between(0, calibrated.cluster.num_gpus - 1)]
        weighted = total = 0.0
        for _, spans in tl.sort_values(["start", "end"]).groupby("rank"):
            idle, last_end, seen = 0.0, None, False
            for name, start, end in zip(spans["name"], spans["start"], spans["end"]):
                if last_end is not None:
                    idle += max(start - last_end, 0.0)
                last_end = max(end, last_end) if last_end is not None else end
                if name.startswith(("forward", "backward")):
                    if seen:  # the run's very first op has nothing before it
                        weighted += float(np.interp(idle, gaps, factors)) * (end - start)
                        total += end - start
                    seen, idle = True, 0.0
        return weighted / total if total > 0 else 1.0

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "workload.json").write_text(self.workload.to_json())
        spec = {
            "device": self.device.to_dict(),
            "link": None if self.link is None else self.link.to_dict(),
            "shared_cores": self.shared_cores,
            "cost_scale": self.cost_scale,
            "idle_slowdown": [list(p) for p in self.idle_slowdown],
            "optimizer_seconds": self.optimizer_seconds,
            "message_delay": list(self.message_delay),
            "eager_limit": self.eager_limit,
            "machine": self.machine,
            "measurements": json.loads(self.measurements.to_json(orient="records")),
        }
        (folder / "calibration.json").write_text(json.dumps(spec, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Calibration:
        folder = Path(folder)
        for name in ("calibration.json", "workload.json"):
            if not (folder / name).is_file():
                raise ValueError(f"Calibration.load: {str(folder)!r} has no {name} (write one with calibrate(..., out=))")
        spec = json.loads((folder / "calibration.json").read_text())
        return cls(
            device=Device.from_dict(spec["device"]),
            workload=Workload.from_json(folder / "workload.json"),
            link=None if spec.get("link") is None else LinkSpec.from_dict(spec["link"]),
            shared_cores=int(spec.get("shared_cores", 0)),
            cost_scale=dict(spec.get("cost_scale", {})),
            idle_slowdown=tuple(tuple(p) for p in spec.get("idle_slowdown", [])),
            optimizer_seconds=spec.get("optimizer_seconds", {}),
            message_delay=tuple(spec.get("message_delay", [])),
            eager_limit=spec.get("eager_limit"),
            measurements=pd.DataFrame(spec.get("measurements", []), columns=MEASUREMENT_COLUMNS),
            machine=spec.get("machine", {}),
        )


def _timelines(experiment, launches: int, *, field: str, launcher, **run_args) -> pd.DataFrame:
    """The timelines of ``launches`` realrun launches of ``experiment`` on ``launcher``
    (default ``Local()``), in one table with a ``launch`` column."""
    from realrun.launch import Local
    from realrun.run import run

    if isinstance(launches, bool) or not isinstance(launches, int) or launches < 1:
        raise ValueError(f"{field}: launches must be an integer >= 1, got {launches!r}")
    launcher = launcher if launcher is not None else Local()
    return pd.concat([run(experiment, launcher=launcher, **run_args).timeline.assign(launch=k)
                      for k in range(launches)], ignore_index=True)


def measure_executor(experiment, batch: int, *, threads: int, device: str, ranks: int = 1, iterations: int = 20,
                     launches: int = 3, launcher=None, model=None, data=None, loss=None, timeout: float = 300) -> dict:
    """Forward, backward and optimizer-step seconds per iteration of the experiment's model
    trained by realrun (``Local``) on ``ranks`` ranks that compute side by side and never
    communicate (local SGD that never averages), on ``launcher`` (default ``Local()``), means
    over ``launches`` launches, their ranks and their iterations after the first two (means:
    they predict mean iteration times, hiccups included): what the executor's own compute
    costs, hooks, data and loss included, with as many ranks busy as in the run (caches,
    memory bandwidth and the scheduler are shared as they will be).

    Several launches, because a launch's speed is a draw of its own: the mean forward of
    the validation matrix's MLP at 64 samples over one launch's 34 ops moved from 1.44 to
    1.96 ms across eight launches in a row on this 2-core machine, with no trend."""
    from simulator import Experiment
    from strategies import LocalSGD

    cluster = dataclasses.replace(experiment.cluster, nodes=ranks, gpus_per_node=1, hosts=(), devices=None,
                                  nics_per_node=1)
    solo = Experiment(workload=experiment.workload, cluster=cluster,
                      strategy=LocalSGD(period=iterations + 1, bucket_mb=1e6),
                      batch_size=batch, iterations=iterations, seed=experiment.seed,
                      optimizer=experiment.optimizer, name="calibrate-compute")
    tl = _timelines(solo, launches, field="measure_executor", launcher=launcher, threads=threads, device=device,
                    model=model, data=data, loss=loss, timeout=timeout)
    tl = tl[(tl["stream"] == "compute") & (tl["iteration"] >= 2) & (tl["iteration"] < iterations - 1)]
    kind = tl["name"].str.extract(r"^(\w+)", expand=False)
    per = (tl["end"] - tl["start"]).groupby([kind, tl["launch"], tl["rank"], tl["iteration"]]).sum()
    return {k: float(per[k].mean()) for k in ("forward", "backward", "optimizer_step")}


def measure_codecs(experiment, calibration: Calibration, *, threads: int, device: str, iterations: int = 8,
                   launches: int = 3, launcher=None, timeout: float = 300) -> tuple[dict, list]:
    """Measured over modelled time of the experiment's compressor's encode and decode: the
    experiment on two single-rank nodes run by realrun on ``launcher`` (default ``Local()``)
    ``launches`` times against the simulator's roofline of the same ops on the calibrated
    device, means per launch, rank and iteration from the third on (several launches: see
    :func:`measure_executor`; QSGD's decode took 18 to 24 ms per iteration in five launches
    of the validation matrix's case).
    Returns the factors (``{"<name>.encode": f, "<name>.decode": f}``) and measurement rows."""
    from simulator.executor import simulate

    comp = getattr(experiment.strategy, "compression", None)
    if comp is None or not hasattr(comp, "name"):
        return {}, []
    cluster = dataclasses.replace(experiment.cluster, nodes=2, gpus_per_node=1, devices=None, nics_per_node=1)
    two = experiment.replace(cluster=cluster, iterations=iterations, name="calibrate-codec",
                             batch_size=compute_batch(experiment) * getattr(experiment.strategy, "micro_batches", 1))
    real = _timelines(two, launches, field="measure_codecs", launcher=launcher, threads=threads, device=device,
                      timeout=timeout)
    model = calibration.apply(two)
    model = model.replace(compute=dataclasses.replace(model.compute, shared_cores=0, cost_scale={}))
    sim = simulate(model).timeline.assign(launch=0)
    factors, rows = {}, []
    for kind in ("encode", "decode"):
        seconds = []
        for tl in (real, sim):
            tl = tl[(tl["stream"] == "compute") & (tl["iteration"] >= 2) & tl["name"].str.startswith(kind + "[")]
            per = (tl["end"] - tl["start"]).groupby([tl["launch"], tl["rank"], tl["iteration"]]).sum()
            seconds.append(float(per.mean()) if len(per) else 0.0)
        measured, modelled = seconds
        if measured > 0 and modelled > 0:
            factors[f"{comp.name}.{kind}"] = measured / modelled
            rows.append((f"codec_{kind}", comp.name, float(experiment.workload.params), measured, modelled))
    return factors, rows


def calibrate(experiment, *, launcher=None, links: bool | None = None, device: str = "cpu", threads: int = 1,
              batch: int | None = None, repeats: int = 10, link_sizes=(65536, 262144, 1 << 20, 4 << 20), link_repeats: int = 4,
              shared_cores: int | None = None, message_delay: bool = False, model=None, data=None, loss=None,
              out: str | Path | None = None) -> Calibration:
    """Measure this machine (and ``launcher``'s links) for ``experiment``'s model and strategy.

    ``batch``: samples per forward to time (default: the experiment's compute batch, see
    :func:`compute_batch`). ``threads``: intra-op threads per rank, as realrun's ranks use
    them. ``launcher``: where the runs to predict will go (``EmulatedCluster()`` for the
    emulated cluster; default ``Local()``): the executor's compute is measured there, and
    with ``links`` (default: yes for ``EmulatedCluster``; ``Local`` has loopback) its links are
    measured and fitted; without, the experiment's catalogue link stays.
    ``shared_cores``: the cores all ranks of a run on this machine share (default: this
    machine's core count when ``device="cpu"``, none on a GPU); see
    :attr:`simulator.ComputeModel.shared_cores`. ``message_delay``: with ``links``, also
    measure each message's time in the hosts' software with 0 to ``shared_cores`` cores busy
    (:func:`calibrate_message_delay`); off by default, see there. ``out``: a folder to save
    the calibration to.
    """
    from realrun.launch import EmulatedCluster, Local
    from realrun.model import Data, ModelState, build_model

    if launcher is not None and not isinstance(launcher, Local | EmulatedCluster):
        raise ValueError(f"calibrate: launcher must be None, realrun.Local() or realrun.EmulatedCluster(), got "
                         f"{type(launcher).__name__} (calibrate on one machine, then apply the calibration)")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"calibrate: device must be 'cpu' or 'cuda', got {device!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"calibrate: threads must be an integer >= 1, got {threads!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 3:
        raise ValueError(f"calibrate: repeats must be an integer >= 3, got {repeats!r}")
    if not isinstance(message_delay, bool):
        raise ValueError(f"calibrate: message_delay must be True or False, got {message_delay!r}")
    batch = compute_batch(experiment) if batch is None else batch
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"calibrate: batch must be an integer >= 1, got {batch!r}")
    if shared_cores is None:
        shared_cores = (os.cpu_count() or 1) if device == "cpu" else 0
    if isinstance(shared_cores, bool) or not isinstance(shared_cores, int) or shared_cores < 0:
        raise ValueError(f"calibrate: shared_cores must be an integer >= 0, got {shared_cores!r}")
    dev = torch.device(device)
    workload = experiment.workload
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        module = model if model is not None else build_model(workload, experiment.seed, dev)
        module = module.to(dev)
        ModelState(module, workload, dev)  # checks the model is the workload's
        feed = Data(module, experiment.seed, dev, make_input=data, loss=loss)
        prof = profile_layers(module, workload, feed, batch, dev, repeats=repeats)
        idle = measure_idle_slowdown(module, feed, batch, dev, repeats=repeats) if device == "cpu" else ()
        hw = measure_device(dev, repeats=repeats)
    finally:
        torch.set_num_threads(saved_threads)
    # as many ranks computing at once as the run has (on a CPU, at most one per core)
    busy = experiment.cluster.num_gpus
    if device == "cpu":
        busy = min(busy, shared_cores or busy, os.cpu_count() or 1)
    solo = measure_executor(experiment, batch, threads=threads, device=device, ranks=max(1, busy), model=model,
                            launcher=launcher, data=data, loss=loss)
    if links is None:
        links = isinstance(launcher, EmulatedCluster)
    # The layers' shares of the model's time, scaled to what the executor takes for the whole model.
    fwd = prof["fwd"] * (solo["forward"] / max(prof["fwd"].sum(), 1e-300))
    bwd = prof["bwd"] * (solo["backward"] / max(prof["bwd"].sum(), 1e-300))
    layers = tuple(dataclasses.replace(layer, fwd_time=float(f), bwd_time=float(b))
                   for layer, f, b in zip(workload.layers, fwd, bwd))
    measured = dataclasses.replace(workload, layers=layers, calibration_batch=batch)
    overhead = hw["op_overhead"]
    # The optimizer step fixes the memory bandwidth the simulator streams optimizer updates at:
    # optimizer_time(params) = moved bytes / bandwidth + one launch per layer with parameters.
    cost = OPTIMIZERS[experiment.optimizer]
    t_opt = solo["optimizer_step"]
    kernels = sum(1 for layer in workload.layers if layer.params)
    moved = 4 * cost.words_moved * workload.params
    bandwidth = moved / max(t_opt - kernels * overhead, 0.25 * t_opt)
    dev_spec = Device(
        name=f"measured-{device}", peak_flops={"fp32": hw["fp32_flops"], "tf32": hw["fp32_flops"]},
        mem_bandwidth=bandwidth, mem_capacity=experiment.cluster.device.mem_capacity,
        compute_efficiency=1.0, memory_efficiency=1.0, kernel_overhead=overhead,
    )
    rows = []
    for i, layer in enumerate(layers):
        rows.append(("forward", layer.name, batch, float(fwd[i]), float("nan")))
        rows.append(("backward", layer.name, batch, float(bwd[i]), float("nan")))
    rows += [("forward_total", "model", batch, prof["fwd_total"], float("nan")),
             ("backward_total", "model", batch, prof["bwd_total"], float("nan")),
             ("executor_forward", "model", batch, solo["forward"], float("nan")),
             ("executor_backward", "model", batch, solo["backward"], float("nan")),
             ("optimizer_step", experiment.optimizer, workload.params, t_opt, float("nan")),
             ("matmul_flops", "fp32", 1024, hw["fp32_flops"], float("nan")),
             ("stream_bandwidth", "add", 64 << 20, hw["mem_bandwidth"], float("nan")),
             ("op_overhead", "add", 16, overhead, float("nan"))]
    rows += [("idle_slowdown", f"after {gap * 1e3:g} ms idle", batch, factor, float("nan")) for gap, factor in idle]
    cal = Calibration(device=dev_spec, workload=measured, shared_cores=shared_cores, idle_slowdown=idle)
    cost_scale, codec_rows = measure_codecs(experiment, cal, threads=threads, device=device, launcher=launcher)
    rows += codec_rows
    link, delay = None, ()
    if links:
        if launcher is None:
            raise ValueError("calibrate: links=True needs a launcher whose links to measure")
        link, table = calibrate_link(experiment, launcher, sizes=link_sizes, repeats=link_repeats)
        rows += [(f"link_{r.pattern}", f"{r.nodes} nodes", r.size, r.seconds, r.predicted)
                 for r in table.itertuples()]
        if message_delay:
            delay, trips = calibrate_message_delay(experiment, launcher, link, cores=shared_cores)
            rows += [("round_trip", f"{r.busy} cores busy", r.size, r.seconds, r.predicted)
                     for r in trips.itertuples()]
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__, "device": device,
               "batch": batch, "date": time.strftime("%Y-%m-%d")}
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(dev)
    cal = Calibration(device=dev_spec, workload=measured, link=link, shared_cores=shared_cores,
                      cost_scale=cost_scale, idle_slowdown=idle, optimizer_seconds={experiment.optimizer: t_opt},
                      message_delay=delay, eager_limit=0.0, measurements=pd.DataFrame(rows, columns=MEASUREMENT_COLUMNS),
                      machine=machine)
    if out is not None:
        cal.save(out)
    return cal
