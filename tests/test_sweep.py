"""Parameter sweeps: every row is the run of its grid point, whatever ran it and however often
it was interrupted.

Expected rows come from ``simulate`` run directly on the experiment the point
describes, built here with the constructors (``Cluster.homogeneous``, the
strategy classes, ``Workload.from_zoo``), not through ``sweep``'s own path
handling.
"""

import dataclasses
import io
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from builders import small_workload

from simulator import Cluster, ComputeModel, Experiment, Workload, simulate, sweep
from simulator.cli import EXIT_USAGE, main, parse_value
from simulator.progress import ProgressBar
from simulator.results import SUMMARY_KEYS
from strategies import AllReduceSGD, ParameterServer

ROOT = Path(__file__).resolve().parent.parent


def cluster(nodes=2, **kw):
    return Cluster.homogeneous(nodes=nodes, gpus_per_node=2, inter="25GbE", **kw)


def base_experiment(**changes) -> Experiment:
    exp = Experiment(workload=small_workload(), cluster=cluster(), strategy=AllReduceSGD(), batch_size=8,
                     iterations=3, seed=1, compute=ComputeModel(noise_cv=0.2), name="small-sweep")
    return exp.replace(**changes)


def assert_row_is(row: pd.Series, summary: dict, columns=None) -> None:
    """A table row holds exactly the summary's values (NaN where the summary has NaN)."""
    for key in columns or summary:
        expected, got = summary[key], row[key]
        if isinstance(expected, float) and math.isnan(expected):
            assert pd.isna(got), key
        else:
            assert got == expected, (key, got, expected)


def threads():
    return ThreadPoolExecutor(max_workers=2)


class Counting:
    """simulate, counting its calls (threads only: the count stays in this process)."""

    def __init__(self):
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, experiment):
        with self._lock:
            self.calls += 1
        return simulate(experiment)


def file_rows(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert "clustersim_sweep" in rows[0]
    return rows[1:]


# -- rows are the points' runs ----------------------------------------------------------------------


def test_rows_are_the_direct_runs_in_grid_order():
    base = base_experiment()
    grid = {"cluster.nodes": [1, 2], "strategy.algorithm": ["ring", "tree"], "batch_size": [4, 8]}
    table = sweep(base, grid, progress=False)  # the default executor: worker processes
    assert len(table) == 2 * 2 * 2
    assert list(table.columns[:3]) == list(grid)
    for (_, row), (nodes, algorithm, batch) in zip(table.iterrows(), itertools.product(*grid.values())):
        assert (row["cluster.nodes"], row["strategy.algorithm"], row["batch_size"]) == (nodes, algorithm, batch)
        exp = base.replace(cluster=cluster(nodes), strategy=AllReduceSGD(algorithm=algorithm), batch_size=batch)
        assert_row_is(row, simulate(exp).summary())
    assert "error" not in table


def test_objects_labels_and_short_forms():
    base = base_experiment()
    ps = ParameterServer(mode="async", servers=2)
    labelled = sweep(base, {"strategy": {"ring": AllReduceSGD(), "ps": ps}, "compute.noise_cv": [0.0, 0.3]},
                     executor=threads(), progress=False)
    assert list(labelled["strategy"]) == ["ring", "ring", "ps", "ps"]
    points = itertools.product([AllReduceSGD(), ps], [0.0, 0.3])
    for (_, row), (strategy, cv) in zip(labelled.iterrows(), points):
        assert_row_is(row, simulate(base.replace(strategy=strategy, compute=ComputeModel(noise_cv=cv))).summary())
    assert labelled["staleness_mean"].notna().tolist() == [False, False, True, True]

    plain = sweep(base, {"strategy": [AllReduceSGD(), ps], "cluster.inter": ["10GbE", cluster().inter]},
                  executor=threads(), progress=False, metrics=["throughput"])
    assert list(plain["strategy"]) == ["AllReduceSGD()"] * 2 + ["ParameterServer(servers=2, mode='async')"] * 2
    assert list(plain["cluster.inter"]) == ["10GbE", "25GbE"] * 2


def test_cluster_keys_as_a_cluster_file_writes_them():
    """gpu, intra and inter_<field> mean what they mean to Cluster.homogeneous, intra_kind included."""
    base = base_experiment()
    grid = {"cluster.gpu": ["V100"], "cluster.intra": ["pcie4"], "cluster.inter_bandwidth": ["1Gbps"]}
    row = sweep(base, grid, executor=threads(), progress=False).iloc[0]
    built = cluster(gpu="V100", intra="pcie4", inter_bandwidth="1Gbps")
    assert built.intra_kind == "pcie"
    expected = simulate(base.replace(cluster=built)).summary()
    assert_row_is(row, expected)
    # The check discriminates: with the base's NVLink kind the run differs.
    nvlink = dataclasses.replace(built, intra_kind="nvlink")
    assert simulate(base.replace(cluster=nvlink)).summary()["makespan"] != expected["makespan"]


def test_nested_paths_reach_into_tables():
    base = base_experiment()
    table = sweep(base, {"cluster.inter.latency": ["1us", "50us"], "strategy.bucket_mb": [0.5]},
                  executor=threads(), progress=False)
    for (_, row), latency in zip(table.iterrows(), ["1us", "50us"]):
        exp = base.replace(cluster=cluster(inter_latency=latency), strategy=AllReduceSGD(bucket_mb=0.5))
        assert_row_is(row, simulate(exp).summary())


def test_zoo_workload_and_its_options():
    base = base_experiment(iterations=2, compute=ComputeModel())
    table = sweep(base, {"workload.zoo": ["mlp"], "workload.hidden": [[16], [32, 8]]},
                  executor=threads(), progress=False, metrics=["makespan", "bytes_on_wire"])
    for (_, row), hidden in zip(table.iterrows(), [(16,), (32, 8)]):
        exp = base.replace(workload=Workload.from_zoo("mlp", hidden=hidden))
        assert_row_is(row, simulate(exp).summary(), ["makespan", "bytes_on_wire"])
    assert list(table["workload.hidden"]) == ["[16]", "[32, 8]"]


def test_metrics_pick_columns_in_their_order():
    table = sweep(base_experiment(), {"batch_size": [4]}, executor=threads(), progress=False,
                  metrics=["bytes_on_wire", "throughput"])
    assert list(table.columns) == ["batch_size", "bytes_on_wire", "throughput"]


def test_summary_keys_name_every_summary_key_in_order():
    exp = base_experiment(strategy=ParameterServer(mode="async", servers=2))
    keys = list(simulate(exp).summary())
    assert keys == [k for k in SUMMARY_KEYS if k in keys]
    assert set(keys) == set(SUMMARY_KEYS)  # this run has memory and updates: every group


def test_same_table_whatever_the_executor_and_workers():
    base = base_experiment()
    grid = {"seed": [0, 1, 2], "cluster.nodes": [1, 2]}
    one = sweep(base, grid, executor=ThreadPoolExecutor(max_workers=1), progress=False)
    with ProcessPoolExecutor(max_workers=2) as pool:
        two = sweep(base, grid, executor=pool, progress=False)
    pd.testing.assert_frame_equal(one, two)
    assert one["makespan"].nunique() == len(one)  # noise: the seeds matter, and each point kept its own


# -- failures are rows ------------------------------------------------------------------------------


def test_failing_points_are_error_rows_and_the_rest_run():
    base = base_experiment(out_of_memory="raise")
    table = sweep(base, {"batch_size": [8, 10**9], "cluster.nics_per_node": [1, 4]},
                  executor=threads(), progress=False)
    assert len(table) == 4
    with pytest.raises(ValueError) as too_many_nics:
        cluster(nics_per_node=4)
    with pytest.raises(ValueError) as oom:
        simulate(base.replace(batch_size=10**9))
    expected_errors = [None, str(too_many_nics.value), str(oom.value), str(too_many_nics.value)]
    for (_, row), error in zip(table.iterrows(), expected_errors):
        if error is None:
            assert pd.isna(row["error"])
            assert_row_is(row, simulate(base).summary())
        else:
            assert "\n" not in row["error"] and " ".join(error.split()) in row["error"]
            assert pd.isna(row["throughput"])
    assert table.loc[1, "error"].startswith("ValueError: ")
    assert table.loc[2, "error"].startswith("OutOfMemoryError: ")


# -- bad input, before anything runs ---------------------------------------------------------------


@pytest.mark.parametrize("grid, words", [
    ({}, "grid is empty"),
    ([("batch_size", [1])], "must be a dict"),
    ({"batch_size": []}, "'batch_size' has an empty list"),
    ({"batch_size": 8}, "needs a list"),
    ({"batch_size": "8"}, "needs a list"),
    ({"batch_sise": [8]}, "no 'batch_sise' in the experiment; valid keys there: [" ),
    ({"cluster.nodez": [1]}, "no 'nodez' in cluster; valid keys there: ['device'"),
    ({"strategy.mode": ["async"]}, "no 'mode' in strategy; valid keys there: ['algorithm'"),
    ({"cluster.nodes.count": [1]}, "cluster.nodes is 2, not a table"),
    ({"workload.seq_len": [8]}, "not from the zoo"),
    ({"cluster..nodes": [1]}, "dotted path"),
    ({"batch_size": [8, 8]}, "lists 8 twice"),
    ({"cluster.gpu": ["V100"], "cluster.device": ["V100"]}, "set the same field"),
    ({"batch_size": [object()]}, "not a number, string"),
    ({"batch_size": [[4, object()]]}, "'batch_size': value <object"),
    ({"strategy": {("a",): AllReduceSGD()}}, "a label must be a string or number"),
])
def test_bad_grids_are_refused_by_name(grid, words):
    counting = Counting()
    with pytest.raises(ValueError) as info:
        sweep(base_experiment(), grid, executor=threads(), progress=False, simulate_fn=counting)
    assert words in str(info.value)
    assert counting.calls == 0


def test_a_key_missing_at_some_points_is_refused_before_any_runs():
    counting = Counting()
    with pytest.raises(ValueError, match="'strategy.mode': no 'mode' in strategy"):
        sweep(base_experiment(), {"strategy": [ParameterServer(), AllReduceSGD()], "strategy.mode": ["sync"]},
              executor=threads(), progress=False, simulate_fn=counting)
    assert counting.calls == 0


def test_a_function_worker_processes_cannot_import_is_refused():
    with pytest.raises(ValueError, match="define it at the top level of a module"):
        sweep(base_experiment(), {"seed": [0]}, executor=ProcessPoolExecutor(max_workers=1),
              simulate_fn=lambda experiment: simulate(experiment))


@pytest.mark.parametrize("metrics, words", [
    (["thruput"], "unknown metric(s) ['thruput']"),
    ([], "non-empty list"),
    ("throughput", "non-empty list"),
    (["iterations"], "name of a grid key"),
])
def test_bad_metrics_are_refused(metrics, words):
    with pytest.raises(ValueError) as info:
        sweep(base_experiment(), {"iterations": [2]}, metrics=metrics, progress=False)
    assert words in str(info.value)


# -- the out file: rows as they finish, resuming ----------------------------------------------------


def test_out_file_has_a_header_and_each_point_once(tmp_path):
    out = tmp_path / "rows.jsonl"
    grid = {"cluster.nodes": [1, 2], "batch_size": [4, 8]}
    table = sweep(base_experiment(), grid, executor=threads(), out=out, progress=False)
    header = json.loads(out.read_text().splitlines()[0])
    assert header["grid_keys"] == list(grid) and header["experiment"] == "small-sweep"
    rows = file_rows(out)
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4
    by_point = {(r["point"]["cluster.nodes"], r["point"]["batch_size"]): r["summary"] for r in rows}
    for _, row in table.iterrows():
        assert_row_is(row, by_point[(row["cluster.nodes"], row["batch_size"])])


def test_resume_runs_only_the_missing_points(tmp_path):
    out = tmp_path / "rows.jsonl"
    base = base_experiment()
    first = Counting()
    sweep(base, {"batch_size": [4, 8], "seed": [0]}, executor=threads(), out=out, progress=False,
          simulate_fn=first)
    assert first.calls == 2
    again, calls = Counting(), []
    grid = {"batch_size": [2, 4, 8, 16], "seed": [0]}  # the grid grew: two new points
    table = sweep(base, grid, executor=threads(), out=out, simulate_fn=again,
                  progress=lambda done, total: calls.append((done, total)))
    assert again.calls == 2
    assert calls[0] == (2, 4) and calls[-1] == (4, 4)
    pd.testing.assert_frame_equal(table, sweep(base, grid, executor=threads(), progress=False))
    assert len(file_rows(out)) == 4


def test_a_row_cut_short_is_dropped_and_run_again(tmp_path):
    out = tmp_path / "rows.jsonl"
    base = base_experiment()
    grid = {"cluster.nodes": [1, 2], "seed": [0, 1]}
    whole = sweep(base, grid, executor=threads(), out=out, progress=False, simulate_fn=Counting())
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    counting = Counting()
    table = sweep(base, grid, executor=threads(), out=out, progress=False, simulate_fn=counting)
    assert counting.calls == 1
    pd.testing.assert_frame_equal(table, whole)
    rows = file_rows(out)  # every line whole JSON again
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4


def test_a_header_cut_short_starts_over(tmp_path):
    out = tmp_path / "rows.jsonl"
    out.write_text('{"clustersim_sweep": 1, "experim')
    grid = {"seed": [0, 1]}
    table = sweep(base_experiment(), grid, executor=threads(), out=out, progress=False)
    pd.testing.assert_frame_equal(table, sweep(base_experiment(), grid, executor=threads(), progress=False))
    assert len(file_rows(out)) == 2


def test_a_file_of_another_sweep_is_refused(tmp_path):
    out = tmp_path / "rows.jsonl"
    base = base_experiment()
    sweep(base, {"seed": [0]}, executor=threads(), out=out, progress=False)
    before = out.read_bytes()
    with pytest.raises(ValueError, match="different base experiment"):
        sweep(base.replace(iterations=4), {"seed": [0]}, executor=threads(), out=out, progress=False)
    with pytest.raises(ValueError, match=r"grid keys \['seed'\], not \['batch_size'\]"):
        sweep(base, {"batch_size": [8]}, executor=threads(), out=out, progress=False)
    with pytest.raises(ValueError, match="different base experiment"):
        sweep(base, {"seed": [0]}, executor=threads(), out=out, progress=False, simulate_fn=Counting())
    assert out.read_bytes() == before


@pytest.mark.parametrize("content, words", [
    ("name,throughput\nx,1\n", "not a sweep's rows"),
    ('{"a": 1}\n', "not a sweep's rows"),
    (None, "line 2 is not a JSON row"),
])
def test_a_damaged_or_foreign_file_is_refused(tmp_path, content, words):
    out = tmp_path / "rows.jsonl"
    base = base_experiment()
    if content is None:  # a damaged row in the middle is not silently dropped
        sweep(base, {"seed": [0, 1]}, executor=threads(), out=out, progress=False)
        lines = out.read_text().splitlines(keepends=True)
        content = lines[0] + "garbage\n" + lines[2]
    out.write_text(content)
    with pytest.raises(ValueError, match=words):
        sweep(base, {"seed": [0, 1]}, executor=threads(), out=out, progress=False)
    assert out.read_text() == content


KILLED_SWEEP = """
import json, sys
from concurrent.futures import ProcessPoolExecutor
from simulator import Experiment, sweep
base = Experiment.from_json(open(sys.argv[1]).read())
grid = json.load(open(sys.argv[2]))
with ProcessPoolExecutor(max_workers=1) as pool:
    sweep(base, grid, executor=pool, out=sys.argv[3], progress=False)
"""


@pytest.mark.spawns
def test_killed_sweep_resumes_to_the_same_table(tmp_path):
    base = base_experiment(cluster=cluster(4), iterations=20)
    grid = {"seed": list(range(10)), "strategy.algorithm": ["ring", "tree"], "batch_size": [4, 8]}
    total = 10 * 2 * 2
    (tmp_path / "base.json").write_text(base.to_json())
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    out = tmp_path / "rows.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SWEEP, str(tmp_path / "base.json"),
                             str(tmp_path / "grid.json"), str(out)], cwd=tmp_path, env=env,
                            start_new_session=True, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        rows = 0
        while rows < 3:
            assert proc.poll() is None, f"the sweep ended before it was killed: {proc.stderr.read()!r}"
            assert time.monotonic() < deadline, "no rows within 60 s"
            time.sleep(0.01)
            rows = out.read_bytes().count(b"\n") - 1 if out.exists() else 0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its worker process
        proc.wait()
    done = len(file_rows_tolerant(out))
    assert 3 <= done < total

    resumed = sweep(base, grid, executor=ThreadPoolExecutor(max_workers=1), out=out, progress=False)
    uninterrupted = sweep(base, grid, progress=False)
    pd.testing.assert_frame_equal(resumed, uninterrupted)
    rows = file_rows(out)
    assert len(rows) == total and len({r["key"] for r in rows}) == total


def file_rows_tolerant(path: Path) -> list[str]:
    """Whole row lines of a file a kill may have left with half a last line."""
    lines = path.read_bytes().split(b"\n")[1:-1]
    return [line for line in lines if line]


# -- Dask ---------------------------------------------------------------------------------------------


def test_dask_cluster_gives_the_same_table():
    distributed = pytest.importorskip("distributed")
    import logging

    base = base_experiment()
    grid = {"cluster.nodes": [1, 2], "strategy": {"ring": AllReduceSGD(), "ps": ParameterServer(servers=2)}}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=logging.ERROR) as dask_cluster, \
            distributed.Client(dask_cluster) as client:
        on_dask = sweep(base, grid, executor=client.get_executor(), progress=False)
    pd.testing.assert_frame_equal(on_dask, sweep(base, grid, progress=False))


# -- progress -----------------------------------------------------------------------------------------


def test_progress_bar_and_reports(capsys):
    grid = {"seed": [0, 1, 2]}
    calls = []
    sweep(base_experiment(), grid, executor=threads(), progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 3) and calls[-1] == (3, 3)
    capsys.readouterr()
    sweep(base_experiment(), grid, executor=threads(), progress=True)
    err = capsys.readouterr().err
    assert "3/3 points" in err and "elapsed" in err and err.endswith("\n")
    sweep(base_experiment(), grid, executor=threads(), progress=False)
    assert capsys.readouterr().err == ""


def test_progress_bar_estimates_from_its_own_rate():
    file = io.StringIO()
    bar = ProgressBar(10, unit="points", done=4, file=file)
    bar.update(4)
    assert "4/10 points" in file.getvalue() and "left" not in file.getvalue()
    bar.update(7)
    last = file.getvalue().split("\r")[-1]
    assert "7/10 points" in last and "left" in last and last.count("#") == 21


# -- command line -------------------------------------------------------------------------------------


@pytest.fixture
def experiment_file(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(base_experiment().to_json())
    return path


def test_cli_sweep_prints_and_writes_the_table(capsys, experiment_file, tmp_path):
    csv = tmp_path / "table.csv"
    code = main(["sweep", str(experiment_file), "--set", "cluster.nodes=1,2", "--set", "strategy.algorithm=ring,tree",
                 "--csv", str(csv), "--out", str(tmp_path / "rows.jsonl"), "--workers", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "small-sweep: 4 points over cluster.nodes, strategy.algorithm" in out
    table = pd.read_csv(csv)
    assert len(table) == 4 and list(table.columns[:2]) == ["cluster.nodes", "strategy.algorithm"]
    for (_, row), (nodes, algorithm) in zip(table.iterrows(), itertools.product([1, 2], ["ring", "tree"])):
        expected = simulate(base_experiment(cluster=cluster(nodes), strategy=AllReduceSGD(algorithm=algorithm)))
        assert (row["cluster.nodes"], row["strategy.algorithm"]) == (nodes, algorithm)
        assert row["throughput"] == pytest.approx(expected.summary()["throughput"], rel=1e-12)
    assert len(file_rows(tmp_path / "rows.jsonl")) == 4


@pytest.mark.parametrize("argv, words", [
    (["--set", "cluster.nodes"], "--set must be KEY=V1,V2"),
    (["--set", "cluster.nodes="], "--set must be KEY=V1,V2"),
    (["--set", "cluster.nodes=1,,2"], "empty value"),
    (["--set", "cluster.nodez=1"], "no 'nodez' in cluster"),
    (["--set", "seed=1", "--set", "seed=2"], "given twice"),
    (["--set", "seed=1", "--workers", "0"], "--workers must be at least 1"),
    ([], "the following arguments are required: --set"),
])
def test_cli_sweep_bad_input_is_one_line(capsys, experiment_file, argv, words):
    code = main(["sweep", str(experiment_file), *argv])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert err.count("\n") == 1 and err.startswith("clustersim: error: ") and "Traceback" not in err
    assert words in err


def test_cli_values_are_numbers_where_they_read_as_numbers():
    assert [parse_value(v) for v in ["4", "-2", "0.5", "1e3", "true", "False", "none", "ring", "25Gbps", "nan"]] \
        == [4, -2, 0.5, 1000.0, True, False, None, "ring", "25Gbps", "nan"]
