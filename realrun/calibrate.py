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
  fit them, and the link's queue (:mod:`realrun.linkcal`).

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

from realrun.linkcal import calibrate_link, calibrate_message_delay
from simulator.cluster import Cluster
from simulator.compute import OPTIMIZERS
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
            layers = tuple(dataclasses.replace(layer, fwd_time=layer.fwd_time * factor, bwd_time=layer.bwd_time * factor,
                                               fwd_times=tuple(t * factor for t in layer.fwd_times),
                                               bwd_times=tuple(t * factor for t in layer.bwd_times))
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
              batch: int | None = None, batches=None, repeats: int = 10, link_sizes=(65536, 262144, 1 << 20, 4 << 20), link_repeats: int = 4,
              shared_cores: int | None = None, message_delay: bool = False, model=None, data=None, loss=None,
              out: str | Path | None = None) -> Calibration:
    """Measure this machine (and ``launcher``'s links) for ``experiment``'s model and strategy.

    ``batch``: samples per forward to time (default: the experiment's compute batch, see
    :func:`compute_batch`). ``batches``: further batch sizes to time the layers at, so that
    the simulator interpolates between them (``Workload.calibration_batches``) rather than
    scaling the times at ``batch`` linearly; default: none on a CPU (whose compute is close
    to linear in the batch), a quarter, half and twice ``batch`` on a GPU (which is not:
    small batches leave it idle). ``threads``: intra-op threads per rank, as realrun's ranks use
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
    if batches is None:
        batches = sorted({b for b in (batch // 4, batch // 2, 2 * batch) if b >= 1} - {batch}) \
            if device == "cuda" else ()
    if isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__") or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 1 or b == batch for b in batches) \
            or len(set(batches)) != len(batches):
        raise ValueError(f"calibrate: batches must be distinct integers >= 1 other than batch={batch}, "
                         f"got {batches!r}")
    batches = tuple(batches)
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
        more = [profile_layers(module, workload, feed, b, dev, repeats=repeats) for b in batches]
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
    # At other batch sizes, the hooks' times scaled by the same factor (what the executor adds).
    f_scale = solo["forward"] / max(prof["fwd"].sum(), 1e-300)
    b_scale = solo["backward"] / max(prof["bwd"].sum(), 1e-300)
    fwd, bwd = prof["fwd"] * f_scale, prof["bwd"] * b_scale
    f_more = np.array([p["fwd"] * f_scale for p in more]).reshape(len(more), len(fwd))
    b_more = np.array([p["bwd"] * b_scale for p in more]).reshape(len(more), len(bwd))
    layers = tuple(dataclasses.replace(layer, fwd_time=float(fwd[i]), bwd_time=float(bwd[i]),
                                       fwd_times=tuple(float(t) for t in f_more[:, i]),
                                       bwd_times=tuple(float(t) for t in b_more[:, i]))
                   for i, layer in enumerate(workload.layers))
    measured = dataclasses.replace(workload, layers=layers, calibration_batch=batch, calibration_batches=batches)
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
    rows += [(f"{kind}_total", "model", size, p[{"forward": "fwd_total", "backward": "bwd_total"}[kind]], float("nan"))
             for size, p in zip((batch, *batches), (prof, *more)) for kind in ("forward", "backward")]
    rows += [("executor_forward", "model", batch, solo["forward"], float("nan")),
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
