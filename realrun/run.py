"""``realrun.run``: an experiment's role programs on real ``torch.distributed``."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

from realrun.launch import EmulatedCluster, Local, Torchrun, kill
from realrun.records import build_result, read_rows
from realrun.worker import SPEC, run_rank
from simulator.progress import ProgressBar

BACKENDS = ("gloo", "nccl")
DEVICES = ("cpu", "cuda")
COLLECTIVES = ("schedule", "native")


class RealRunError(RuntimeError):
    """A rank failed (or the run timed out). ``rank`` and ``traceback`` say which and why;
    ``partial`` holds what was measured before (a RunResult, or None); ``folder`` keeps the files."""

    def __init__(self, message: str, *, rank: int | None, traceback: str, partial, folder: Path):
        super().__init__(message)
        self.rank = rank
        self.traceback = traceback
        self.partial = partial
        self.folder = folder


def _check(backend, device, collectives, lr, timeout, collective_timeout) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if backend == "nccl" and device != "cuda":
        raise ValueError("backend 'nccl' needs device='cuda'")
    if collectives not in COLLECTIVES:
        raise ValueError(f"collectives must be one of {COLLECTIVES}, got {collectives!r}")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    for name, value in (("timeout", timeout), ("collective_timeout", collective_timeout)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not value > 0):
            raise ValueError(f"{name} must be a number of seconds > 0 or None, got {value!r}")


def run(experiment, *, launcher=None, backend: str = "gloo", device: str = "cpu", model=None, data=None,
        loss=None, lr: float = 0.01, collectives: str = "schedule", out: str | Path | None = None,
        timeout: float | None = None, collective_timeout: float = 120.0, threads: int | None = None,
        save_params: bool = False, progress=None):
    """Run ``experiment`` for real and return its :class:`simulator.RunResult`.

    The strategy's role programs run unchanged: each rank is a process whose
    ops do torch work (:mod:`realrun.executor`). The model is the workload's zoo
    model, or ``model`` (an ``nn.Module`` whose layers the workload was extracted
    from); data are seeded synthetic batches (``model.example_input``, or
    ``data(batch_size, generator)``), with cross-entropy against random classes
    (or ``loss(output, target)``). ``lr`` is the learning rate of the
    experiment's optimizer.

    ``launcher``: :class:`Local` (default), :class:`EmulatedCluster` or
    :class:`Torchrun`. ``collectives="schedule"`` runs every collective as the
    step schedule of the algorithm its op names, over point-to-point calls;
    ``"native"`` hands world-wide all-reduce/broadcast/reduce to the backend.
    Results are appended to files in ``out`` (a temporary folder if None, removed
    after a success) as they are measured. ``timeout`` bounds the whole run, and
    ``collective_timeout`` each communication; a failing rank ends the run at
    once with :class:`RealRunError`. ``progress``: True for a progress bar on
    stderr, or a function called with (iterations done, iterations expected).
    """
    from simulator.experiment import Experiment

    if not isinstance(experiment, Experiment):
        raise ValueError(f"experiment must be a simulator.Experiment, got {type(experiment).__name__}")
    _check(backend, device, collectives, lr, timeout, collective_timeout)
    import torch

    if model is not None and not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module or None (the workload's zoo model), got {type(model).__name__}")
    for what, fn in (("data", data), ("loss", loss)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{what} must be a function or None, got {fn!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1 or None (cores / ranks), got {threads!r}")
    defined_in = {"strategy": type(experiment.strategy).__module__, "model": type(model).__module__,
                  "data": getattr(data, "__module__", None), "loss": getattr(loss, "__module__", None)}
    for what, module in defined_in.items():
        if module == "__main__":
            raise ValueError(f"the {what} is defined in the script being run (__main__), where the ranks' "
                             "processes cannot import it; define it in a module of its own and import it")
    launcher = Local() if launcher is None else launcher
    if not isinstance(launcher, Local | EmulatedCluster | Torchrun):
        raise ValueError(f"launcher must be realrun.Local(), EmulatedCluster() or Torchrun(), got {launcher!r}")
    world = experiment.world_size
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world)
    spec = {
        "experiment": experiment,  # pickled whole: a strategy of the user's own travels too
        "model": model,
        "data": data,
        "loss": loss,
        "options": {"backend": backend, "device": device, "lr": lr, "collectives": collectives,
                    "collective_timeout": collective_timeout, "threads": threads, "save_params": save_params},
    }
    if isinstance(launcher, EmulatedCluster):
        launcher.check()
    keep = out is not None
    folder = Path(out) if keep else Path(tempfile.mkdtemp(prefix="realrun-"))
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("rank*.*"):
        old.unlink()
    torch.save(spec, folder / SPEC)
    stats = {"backend": backend, "device": device, "collectives": collectives,
             "launcher": type(launcher).__name__, "folder": str(folder), "lr": lr}
    if isinstance(launcher, Torchrun):
        return _torchrun(experiment, launcher, spec, folder, stats)
    result = _supervise(experiment, launcher, folder, stats, threads, timeout, progress)
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return result


def _torchrun(experiment, launcher: Torchrun, spec: dict, folder: Path, stats: dict):
    rank, world, local_rank = launcher.identity()
    if world != experiment.world_size:
        raise ValueError(f"torchrun started {world} processes but the experiment has {experiment.world_size} ranks")
    texts = run_rank(spec, rank, world, folder, local_rank=local_rank, gather=True)
    if rank != 0:
        return None
    for r, text in enumerate(texts):
        (folder / f"rank{r}.jsonl").write_text(text, encoding="utf-8")
    return build_result(experiment, read_rows(folder, world), stats)


class _Progress:
    def __init__(self, folder: Path, experiment, report):
        self.folder = folder
        self.report = report
        self.gpus = experiment.run_cluster.num_gpus
        self.total = experiment.iterations * self.gpus
        self.done = 0
        self._sizes: dict[int, int] = {}
        self._bar = ProgressBar(self.total, unit="iterations") if report is True else None

    def poll(self) -> None:
        if not self.report:
            return
        count = 0
        for rank in range(self.gpus):
            path = self.folder / f"rank{rank}.jsonl"
            try:
                count += path.read_bytes().count(b'"k": "it"')
            except OSError:
                pass
        if count != self.done:
            self.done = count
            self.show()

    def show(self) -> None:
        if self._bar is not None:
            self._bar.update(self.done)
        else:
            self.report(self.done, self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _supervise(experiment, launcher, folder: Path, stats: dict, threads: int, timeout, progress):
    world = experiment.world_size
    procs: list = []
    bar = _Progress(folder, experiment, progress)
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            raise KeyboardInterrupt
        previous = signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    failure = None
    try:
        procs = launcher.start(experiment, folder, threads)
        stats["world_size"] = world
        while True:
            codes = [p.poll() for p in procs]
            bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failure = _first_failure(folder, bad, codes)
                break
            if all(c == 0 for c in codes):
                break
            if timeout is not None and time.monotonic() - started > timeout:
                failure = (None, f"the run took longer than timeout={timeout} s", "")
                break
            bar.poll()
            time.sleep(0.05)
        bar.poll()
    finally:
        kill(procs)
        rows = read_rows(folder, world)
        try:
            result = build_result(experiment, rows, {**stats, "wall_seconds": time.monotonic() - started})
            links = launcher.links(experiment, result.stats["makespan"])
            if links is not None:
                result.links = links
        except Exception:  # noqa: BLE001 - a partial result is a courtesy; the failure is what matters
            result = None
        launcher.stop()
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if failure is not None:
        rank, message, tb = failure
        raise RealRunError(f"{message} (the files of the run are in {folder})", rank=rank, traceback=tb,
                           partial=result, folder=folder)
    return result


def _first_failure(folder: Path, bad: list[int], codes: list) -> tuple[int, str, str]:
    """The rank whose failure came first (by its error file's time) and its traceback."""
    errs = []
    for r in bad:
        path = folder / f"rank{r}.err"
        if path.exists():
            errs.append((path.stat().st_mtime, r, path.read_text(encoding="utf-8")))
    killed = [r for r in bad if codes[r] is not None and codes[r] < 0 and not (folder / f"rank{r}.err").exists()]
    if killed:  # a rank that died without a word (killed) is the cause; the others' errors follow from it
        r = killed[0]
        return r, f"rank {r} died (signal {-codes[r]})", ""
    if errs:
        errs.sort()
        _, r, tb = errs[0]
        last = tb.strip().splitlines()[-1] if tb.strip() else "failed"
        return r, f"rank {r} failed: {last}\n{tb}", tb
    r = bad[0]
    log = folder / f"rank{r}.log"
    tail = log.read_text(encoding="utf-8", errors="replace")[-2000:] if log.exists() else ""
    return r, f"rank {r} exited with status {codes[r]}\n{tail}", tail

