"""Calibration of the links between nodes: what :func:`realrun.calibrate` measures of a
launcher's network, and the fits that turn the timings into a :class:`~simulator.LinkSpec`.

* :func:`calibrate_link`: point-to-point messages (sent and acknowledged) and ring
  all-reduces at several sizes through realrun on the launcher, fitted by least squares to
  ``t = alpha + n / beta`` per message and ring step (:func:`fit_alpha_beta`), as
  nccl-tests' bus bandwidth and ASTRA-sim's validation fit them; the link's queue
  (:func:`fit_flow_window`); optionally its token bucket (:func:`fit_burst`).
* :func:`calibrate_message_delay`: small round trips while other processes keep cores
  busy, the host's time per message (:attr:`simulator.ComputeModel.message_delay`).

The probes are :class:`~realrun.linkbench.LinkProbe` role programs, which the simulator
runs too: the tests check each fit on the simulated probe against a link of known shape.
"""

from __future__ import annotations

import dataclasses
import statistics

import numpy as np
import pandas as pd

from simulator.compute import ComputeModel
from simulator.hardware import LinkSpec
from simulator.workload import Workload


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
