"""Parameter sweeps: one base experiment, a grid of values, one table row per point.

What if the cluster had 1 to 16 nodes, on 10 or 100 Gb/s Ethernet, with ring
or tree all-reduce? ::

    table = sweep(base, {"cluster.nodes": [1, 4, 16],
                         "cluster.inter": ["10GbE", "100GbE"],
                         "strategy.algorithm": ["ring", "tree"]})

Grid keys are dotted paths into ``Experiment.to_dict()`` (``batch_size``,
``cluster.nodes``, ``cluster.inter.bandwidth``, ``strategy.bucket_mb``,
``compute.noise_cv``), plus the names a cluster or zoo file uses:
``cluster.gpu``, ``cluster.inter_bandwidth`` (``gpu_``/``intra_``/``inter_``
overrides), ``workload.zoo`` and the zoo model's options
(``workload.seq_len``). A point is the base experiment's dict with its values
set, rebuilt by ``Experiment.from_dict``: every value is checked as a file's
would be, and a point that fails (a strategy that does not divide the GPUs,
out of memory) is a row with an ``error``, not a failed sweep.

Points run on any ``concurrent.futures.Executor`` (processes by default, or a
Dask cluster's ``client.get_executor()``); each runs from its experiment's own
seed, so the table does not depend on where or in which order it ran. Rows are
appended to a JSON-lines file as they finish, and a sweep handed that file
again runs only the points it lacks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import pandas as pd

from simulator.experiment import Experiment
from simulator.progress import ProgressBar
from simulator.results import SUMMARY_KEYS

__all__ = ["sweep"]

FORMAT = 1
"""Version of the out file's layout, in its header line."""

_CLUSTER_PREFIXES = {"gpu": "device", "intra": "intra", "inter": "inter"}
"""``Cluster.homogeneous``'s override prefixes and the ``Cluster.to_dict`` entry each changes."""


@dataclasses.dataclass(frozen=True)
class _Axis:
    key: str
    """As the user wrote it: the column's name."""
    path: tuple[str, ...]
    """Where in the experiment dict the values go (``("workload", option)`` for a zoo axis)."""
    labels: tuple
    """What the column shows for each value."""
    values: tuple
    """JSON-safe values set at ``path``."""
    zoo: bool = False
    """The workload is rebuilt from the zoo: ``workload.zoo`` or a zoo model option."""


def sweep(base: Experiment, grid: dict, *, executor=None, out=None, progress=None, metrics=None,
          simulate_fn=None) -> pd.DataFrame:
    """Simulate ``base`` at every point of ``grid``; one row per point, in grid order.

    ``grid`` maps keys (dotted paths into ``base.to_dict()``, see the module
    docstring) to lists of values; the sweep runs their Cartesian product, the
    first key varying slowest. A value may be an object with ``to_dict()`` (a
    strategy, a workload, a link), and a list may be a dict ``{label: value}``
    for the column to show the labels. The table has one column per key, then
    the run's ``summary()`` metrics (only ``metrics``, a list of summary keys,
    if given), and an ``error`` column if a point raised.

    ``executor``: any ``concurrent.futures.Executor`` (default: a process per
    core). ``out``: a JSON-lines file rows are appended to as they finish; if it
    holds rows of this base experiment and grid keys already, only the missing
    points run (a different experiment or keys is a ``ValueError``).
    ``progress``: True for a bar on stderr, a function called with (points
    done, points in all), False for nothing; None: a bar if stderr is a
    terminal. ``simulate_fn``: what runs an ``Experiment`` (default
    ``simulator.simulate``); with a process executor it must be a module-level
    function.
    """
    from simulator.executor import simulate

    if not isinstance(base, Experiment):
        raise ValueError(f"sweep: base must be a simulator.Experiment, got {type(base).__name__}")
    if simulate_fn is not None and not callable(simulate_fn):
        raise ValueError(f"sweep: simulate_fn must be a function of an Experiment, got {simulate_fn!r}")
    if executor is not None and not callable(getattr(executor, "submit", None)):
        raise ValueError(f"sweep: executor must be a concurrent.futures.Executor, got {executor!r}")
    if progress is not None and not isinstance(progress, bool) and not callable(progress):
        raise ValueError(f"sweep: progress must be True, False, None or a function, got {progress!r}")
    if isinstance(executor, ProcessPoolExecutor) and simulate_fn is not None:
        _check_picklable(simulate_fn)
    base_dict = base.to_dict()
    axes = _axes(grid, base_dict)
    metrics = _check_metrics(metrics, axes)
    order = sorted(range(len(axes)), key=lambda a: (axes[a].zoo, len(axes[a].path)))  # parents first
    indices = list(itertools.product(*(range(len(axis.values)) for axis in axes)))
    specs = [_point(base_dict, axes, order, index) for index in indices]  # every key checked before running
    keys = [_point_key(axes, index) for index in indices]
    labels = [{axis.key: axis.labels[i] for axis, i in zip(axes, index)} for index in indices]

    runner = simulate_fn or simulate
    header = {
        "clustersim_sweep": FORMAT,
        "experiment": base.name,
        "fingerprint": _fingerprint(base_dict, runner),
        "grid_keys": [axis.key for axis in axes],
        "runner": _runner_name(runner),
    }
    log = _RowLog(Path(out), header) if out is not None else None
    report = None
    try:
        records: dict[int, dict] = {}
        if log is not None:
            records = {i: log.rows[key] for i, key in enumerate(keys) if key in log.rows}
        todo = [i for i in range(len(indices)) if i not in records]
        report = _reporter(progress, len(indices), len(records))
        if todo:
            _run(todo, specs, simulate_fn, executor, records, keys, labels, log, report)
    finally:
        if report is not None:
            report.close()
        if log is not None:
            log.close()
    return _table(axes, [records[i] for i in range(len(indices))], labels, metrics)


# -- the grid -------------------------------------------------------------------------------------


def _axes(grid, base: dict) -> list[_Axis]:
    if not isinstance(grid, dict):
        raise ValueError(f"sweep: grid must be a dict of key -> list of values, got {type(grid).__name__}")
    if not grid:
        raise ValueError("sweep: the grid is empty; give at least one key with a list of values")
    axes = []
    for key, values in grid.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ValueError(f"sweep: grid key {key!r} must be a dotted path such as 'cluster.nodes'")
        if isinstance(values, dict):
            labels, values = list(values), list(values.values())
            for label in labels:
                if label is not None and not isinstance(label, bool | int | float | str):
                    raise ValueError(f"sweep: grid key {key!r}: a label must be a string or number, got {label!r}")
        elif isinstance(values, str | bytes) or not hasattr(values, "__iter__"):
            raise ValueError(f"sweep: grid key {key!r} needs a list of values, got {values!r}")
        else:
            values = list(values)
            labels = None
        if not values:
            raise ValueError(f"sweep: grid key {key!r} has an empty list of values")
        plain = tuple(_plain(value, key) for value in values)
        if labels is None:
            labels = [_label(value, p) for value, p in zip(values, plain)]
        seen: dict[str, object] = {}
        for label, value in zip(labels, plain):
            text = json.dumps(value, sort_keys=True)
            if text in seen or label in seen.values():
                raise ValueError(f"sweep: grid key {key!r} lists {label!r} twice (or two values that show alike; "
                                 f"label them with a dict {{label: value}})")
            seen[text] = label
        path, zoo = _path(key, base)
        axes.append(_Axis(key=key, path=path, labels=tuple(labels), values=plain, zoo=zoo))
    paths = [axis.path for axis in axes]
    for axis in axes:
        if paths.count(axis.path) > 1:
            twins = [a.key for a in axes if a.path == axis.path]
            raise ValueError(f"sweep: grid keys {twins} set the same field")
    workload_fields = [a.key for a in axes if a.path[0] == "workload" and len(a.path) > 1 and not a.zoo]
    if workload_fields and any(a.zoo for a in axes):
        raise ValueError(f"sweep: grid keys {workload_fields} change a traced workload's table, which "
                         f"workload.zoo and zoo options rebuild; sweep one or the other")
    if any(a.zoo for a in axes):
        _check_zoo_options(axes, base)
    return axes


def _path(key: str, base: dict) -> tuple[tuple[str, ...], bool]:
    """Where ``key`` points in the experiment dict, and whether it rebuilds a zoo workload."""
    parts = tuple(key.split("."))
    if parts[0] == "workload" and len(parts) == 2 and isinstance(base.get("workload"), dict):
        if parts[1] == "zoo" or parts[1] not in base["workload"]:
            return parts, True
    if parts[0] == "cluster" and len(parts) >= 2 and isinstance(base.get("cluster"), dict):
        name = parts[1]
        if name not in base["cluster"]:
            if name == "gpu":
                return ("cluster", "device", *parts[2:]), False
            prefix, _, rest = name.partition("_")
            if prefix in _CLUSTER_PREFIXES and rest and len(parts) == 2:
                return ("cluster", _CLUSTER_PREFIXES[prefix], rest), False
    return parts, False


def _check_zoo_options(axes: list[_Axis], base: dict) -> None:
    """Each zoo option in the grid must be an option of every zoo model it is swept with."""
    from simulator import zoo

    names = next((list(a.values) for a in axes if a.zoo and a.path[1] == "zoo"), None)
    if names is None:
        source = base["workload"].get("source")
        if source is None:
            options = [a.key for a in axes if a.zoo]
            raise ValueError(
                f"sweep: grid key(s) {options} are zoo options, but the base workload "
                f"{base['workload'].get('name')!r} is not from the zoo; valid keys there: "
                f"{sorted(base['workload'])} and 'zoo'"
            )
        names = [source["name"]]
    for name in names:
        if not isinstance(name, str) or name not in zoo.MODELS:
            continue  # Experiment.from_dict reports an unknown model in that point's row
        allowed = _zoo_options(name)
        for axis in axes:
            if axis.zoo and axis.path[1] != "zoo" and axis.path[1] not in allowed:
                raise ValueError(
                    f"sweep: grid key {axis.key!r}: zoo model {name!r} has no option {axis.path[1]!r}; "
                    f"valid keys in workload: 'zoo', {sorted(allowed)}, and without zoo keys "
                    f"{sorted(base['workload'])}"
                )


def _zoo_options(name: str) -> set[str]:
    import inspect

    from simulator import zoo

    return set(inspect.signature(zoo.MODELS[name]).parameters)


def _point(base: dict, axes: list[_Axis], order: list[int], index: tuple[int, ...]) -> dict:
    """The experiment dict of one grid point (dicts along the changed paths are copies)."""
    spec = base
    options: dict[str, object] = {}
    for a in order:
        axis, value = axes[a], axes[a].values[index[a]]
        if axis.zoo:
            options[axis.path[1]] = value
        else:
            spec = _set(spec, axis.path, value, axis.key)
    if options:
        spec = _set(spec, ("workload",), _zoo_spec(spec["workload"], options), "workload")
    intra = [a for a in axes if a.path == ("cluster", "intra")]
    if intra and not any(a.path == ("cluster", "intra_kind") for a in axes):
        spec = _follow_intra_kind(spec, base)
    return spec


def _set(tree, path: tuple[str, ...], value, key: str, depth: int = 0):
    name = path[depth]
    where = ".".join(path[:depth])
    if not isinstance(tree, dict):
        raise ValueError(f"sweep: grid key {key!r}: {where} is {tree!r}, not a table with a {name!r}")
    if name not in tree:
        valid = sorted(tree)
        if where == "cluster":
            valid += ["gpu", "gpu_<device field>", "intra_<link field>", "inter_<link field>"]
        if where == "workload":
            valid += ["zoo", "<zoo model option>"]
        raise ValueError(f"sweep: grid key {key!r}: no {name!r} in {where or 'the experiment'}; "
                         f"valid keys there: {valid}")
    new = dict(tree)
    new[name] = value if depth == len(path) - 1 else _set(tree[name], path, value, key, depth + 1)
    return new


def _zoo_spec(workload: dict, options: dict) -> dict:
    """``{"zoo": name, **options}``: the point's zoo model, with the base's options that model takes."""
    from simulator import zoo

    source = dict(workload.get("source") or {})
    name = options.pop("zoo", source.get("name"))
    kept = {k: v for k, v in source.items() if k != "name"}
    if isinstance(name, str) and name in zoo.MODELS and name != source.get("name"):
        allowed = _zoo_options(name)
        kept = {k: v for k, v in kept.items() if k in allowed}  # e.g. image_size means nothing to a GPT
    return {"zoo": name, **kept, **options}


def _follow_intra_kind(spec: dict, base: dict) -> dict:
    """A new intra link gets the intra_kind ``Cluster.homogeneous`` would give it (``pcie`` for a
    PCIe link), unless the base set a kind of its own."""
    def derived(link) -> str | None:
        name = link if isinstance(link, str) else link.get("name") if isinstance(link, dict) else None
        return None if not isinstance(name, str) else "pcie" if name.lower().startswith("pcie") else "nvlink"

    cluster = base["cluster"]
    if cluster.get("intra_kind") != derived(cluster.get("intra")):
        return spec
    kind = derived(spec["cluster"]["intra"])
    return spec if kind is None else _set(spec, ("cluster", "intra_kind"), kind, "cluster.intra")


# -- values and labels ----------------------------------------------------------------------------


def _plain(value, key: str):
    """``value`` as it goes in an experiment dict: objects by their ``to_dict()``, tuples as lists."""
    if callable(getattr(value, "to_dict", None)):
        value = value.to_dict()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v, key) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, key) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"sweep: grid key {key!r}: value {value!r} is not a number, string, list, table or "
                     f"an object with to_dict()")


def _label(value, plain=None):
    """What a column shows for ``value`` (``plain``: as :func:`_plain` gives it): itself if a number
    or string, else a short form."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = getattr(value, "name", None)
        if isinstance(name, str) and name and not callable(getattr(value, "programs", None)):
            return name  # a workload, device or link: its name says which
        return _dataclass_label(value)
    return json.dumps(_plain(value, "") if plain is None else plain)


def _dataclass_label(value) -> str:
    """``ClassName(field=value, ...)`` with the fields that differ from their defaults."""
    parts = []
    for f in dataclasses.fields(value):
        if not f.init or f.name.startswith("_"):
            continue
        current = getattr(value, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if default is not dataclasses.MISSING and (current == default or _label(current) == _label(default)):
            continue
        shown = _label(current)
        parts.append(f"{f.name}={shown!r}" if isinstance(shown, str) else f"{f.name}={shown}")
    return f"{type(value).__name__}({', '.join(parts)})"


def _point_key(axes: list[_Axis], index: tuple[int, ...]) -> str:
    """A point's name in the out file: a hash of the values set (not their labels)."""
    point = {axis.key: axis.values[i] for axis, i in zip(axes, index)}
    return hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint(base: dict, runner) -> str:
    text = json.dumps({"experiment": base, "runner": _runner_name(runner)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _runner_name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _check_metrics(metrics, axes: list[_Axis]) -> list[str] | None:
    if metrics is None:
        return None
    if isinstance(metrics, str) or not isinstance(metrics, list | tuple) or not metrics:
        raise ValueError(f"sweep: metrics must be a non-empty list of summary keys, got {metrics!r}")
    unknown = [m for m in metrics if m not in SUMMARY_KEYS]
    if unknown:
        raise ValueError(f"sweep: unknown metric(s) {unknown}; summary keys are {list(SUMMARY_KEYS)}")
    clash = [m for m in metrics if m in {axis.key for axis in axes}]
    if clash:
        raise ValueError(f"sweep: metric(s) {clash} have the name of a grid key, whose column that is")
    return list(metrics)


def _check_picklable(fn) -> None:
    import pickle

    try:
        pickle.dumps(fn)
    except Exception as exc:  # noqa: BLE001 - any pickling failure means the same thing here
        raise ValueError(f"sweep: simulate_fn {fn!r} cannot be sent to worker processes ({exc}); "
                         f"define it at the top level of a module") from None


# -- running --------------------------------------------------------------------------------------


def _run_point(spec: dict, simulate_fn=None) -> dict:
    """Run one grid point (an experiment dict): its summary, or the one-line error it raised.

    Module-level so that process and Dask executors can send it by name."""
    if simulate_fn is None:
        from simulator.executor import simulate as simulate_fn
    try:
        return {"summary": simulate_fn(Experiment.from_dict(spec)).summary()}
    except Exception as exc:  # noqa: BLE001 - a failing point is a row, not a failed sweep
        message = " ".join(str(exc).split()) or "(no message)"
        return {"error": f"{type(exc).__name__}: {message}"}


def _run(todo, specs, simulate_fn, executor, records, keys, labels, log, report) -> None:
    own = executor is None
    if own:
        executor = ProcessPoolExecutor(max_workers=min(len(todo), _cores()))
    pending = {executor.submit(_run_point, specs[i], simulate_fn): i for i in todo}
    finished = False
    try:
        while pending:
            # Wake once a second with a bar, so its clock moves while a long point runs.
            done, _ = wait(pending, timeout=1.0 if report is not None else None, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=pending.get):
                i = pending.pop(future)
                outcome = future.result()  # raises if the executor itself failed; rows so far are kept
                record = _json_safe({"key": keys[i], "point": labels[i], **outcome})
                if log is not None:
                    log.append(record)
                records[i] = record
            if report is not None:
                report.update(len(records))
        finished = True
    finally:
        for future in pending:
            future.cancel()
        if own:
            executor.shutdown(wait=finished, cancel_futures=True)


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _json_safe(record: dict) -> dict:
    """The record as the out file holds it (NaN as null), whether or not there is a file: a resumed
    sweep's table is then the same as an uninterrupted one's."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, np.generic):
            return clean(value.item())
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.loads(json.dumps(clean(record)))


class _Reporter:
    def __init__(self, report, total: int, done: int):
        self._report = report
        self._total = total
        self._bar = ProgressBar(total, unit="points", done=done) if report is True else None
        self.update(done)

    def update(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(done)
        else:
            self._report(done, self._total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _reporter(progress, total: int, done: int) -> _Reporter | None:
    if progress is None:
        progress = sys.stderr.isatty()
    return None if progress is False else _Reporter(progress, total, done)


# -- the table ------------------------------------------------------------------------------------


def _table(axes: list[_Axis], records: list[dict], labels: list[dict], metrics) -> pd.DataFrame:
    grid_keys = [axis.key for axis in axes]
    if metrics is None:
        seen = {k for r in records for k in r.get("summary", {})}
        extra = [k for r in records for k in r.get("summary", {}) if k not in SUMMARY_KEYS]
        metrics = [k for k in SUMMARY_KEYS if k in seen] + list(dict.fromkeys(extra))
        metrics = [k for k in metrics if k not in grid_keys]  # e.g. "iterations": the grid's column
    rows = []
    for record, label in zip(records, labels):
        summary = record.get("summary", {})
        row = dict(label)
        for name in metrics:
            value = summary.get(name)
            row[name] = float("nan") if value is None else value
        if "error" in record:
            row["error"] = record["error"]
        rows.append(row)
    columns = grid_keys + metrics + (["error"] if any("error" in r for r in records) else [])
    return pd.DataFrame(rows, columns=columns)


# -- the out file ---------------------------------------------------------------------------------


class _RowLog:
    """The out file: a header line (which experiment, which grid keys), then one JSON row per
    finished point, each flushed to disk before the next."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a+b")  # noqa: SIM115 - held open for the sweep, closed by close()
        try:
            self._lock()
            self._file.seek(0)
            data = self._file.read()
            self.rows, keep = _read_rows(data, header, path)
            if keep < len(data):  # a row cut short by a kill: it runs again
                self._file.truncate(keep)
                self._sync()
            if keep == 0:
                self.append(header)
        except BaseException:
            self._file.close()
            raise

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, one sweep per file is up to the user
            return
        try:  # a POSIX record lock: not held by forked worker processes, gone when this one dies
            fcntl.lockf(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"sweep: out file {str(self.path)!r} is in use by another sweep") from None

    def append(self, record: dict) -> None:
        self._file.write((json.dumps(record) + "\n").encode())
        self._sync()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _read_rows(data: bytes, header: dict, path: Path) -> tuple[dict[str, dict], int]:
    """Rows by point key, and how many leading bytes of ``data`` to keep (a last line without its
    newline was cut short by a kill; it is dropped)."""
    keep = data.rfind(b"\n") + 1
    if keep == 0:
        if data and not data.startswith(b'{"clustersim_sweep"'):
            raise ValueError(f"sweep: out file {str(path)!r} is not a sweep's rows (no header line)")
        return {}, 0  # empty, or a header cut short
    lines = data[:keep].split(b"\n")[:-1]
    parsed = []
    for number, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            if number == 1:
                raise ValueError(f"sweep: out file {str(path)!r} is not a sweep's rows (no header line)")
            raise ValueError(f"sweep: out file {str(path)!r}: line {number} is not a JSON row; "
                             f"the file is damaged")
        parsed.append(obj)
    head = parsed[0]
    if "clustersim_sweep" not in head:
        raise ValueError(f"sweep: out file {str(path)!r} is not a sweep's rows (no header line)")
    if head.get("clustersim_sweep") != FORMAT:
        raise ValueError(f"sweep: out file {str(path)!r} has format {head.get('clustersim_sweep')!r}, "
                         f"this version reads {FORMAT}")
    if set(head.get("grid_keys", [])) != set(header["grid_keys"]):
        raise ValueError(f"sweep: out file {str(path)!r} holds rows for grid keys {head.get('grid_keys')}, "
                         f"not {header['grid_keys']}; use another file")
    if head.get("fingerprint") != header["fingerprint"]:
        raise ValueError(
            f"sweep: out file {str(path)!r} holds rows of a different base experiment "
            f"({head.get('experiment')!r} run by {head.get('runner')}, fingerprint {head.get('fingerprint')}; "
            f"this is {header['experiment']!r} run by {header['runner']}, fingerprint "
            f"{header['fingerprint']}); use another file"
        )
    rows: dict[str, dict] = {}
    for number, obj in enumerate(parsed[1:], 2):
        if not isinstance(obj.get("key"), str) or not ("summary" in obj or "error" in obj):
            raise ValueError(f"sweep: out file {str(path)!r}: line {number} is not a sweep row")
        rows.setdefault(obj["key"], obj)
    return rows, keep
