"""The ``clustersim`` command line: simulate, collective, and one-line user errors.

Tested through ``simulator.cli.main`` (in-process) and once through a real
``python -m simulator.cli`` process; the console script may not be installed
in a development environment.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from builders import small_workload

from simulator.cli import EXIT_USAGE, main
from simulator.experiment import Experiment
from simulator.hardware import LINKS
from simulator.units import parse_time
from strategies.collectives import ALGORITHMS

ROOT = Path(__file__).resolve().parent.parent
TABLES = ("iterations.csv", "timeline.csv", "links.csv", "ranks.csv", "updates.csv",
          "summary.json", "experiment.json")




VALID_TOML = """\
name = "cli-small"
batch_size = 8
iterations = 3
seed = 1

[workload]
path = "workload.json"

[cluster]
nodes = 2
gpus_per_node = 2
inter = "25GbE"

[strategy]
name = "allreduce"
algorithm = "ring"
"""


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "workload.json").write_text(small_workload().to_json())
    return tmp_path


@pytest.fixture
def valid_file(folder):
    path = folder / "exp.toml"
    path.write_text(VALID_TOML)
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str) -> str:
    assert code == EXIT_USAGE
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("clustersim: error: ")
    return lines[0]


# -- simulate ------------------------------------------------------------------------------


def test_simulate_prints_a_summary(capsys, valid_file):
    code, out, err = run(capsys, "simulate", valid_file)
    assert code == 0, err
    assert err == ""
    assert out.startswith("cli-small: 4 ranks, 3 iterations")
    for key in ("makespan", "throughput", "iteration_time_mean", "bytes_on_wire"):
        assert key in out


def test_simulate_writes_tables_and_trace(capsys, valid_file, tmp_path):
    out_dir, trace = tmp_path / "out", tmp_path / "t.json"
    code, out, err = run(capsys, "simulate", valid_file, "--out", out_dir, "--trace", trace)
    assert code == 0, err
    for name in TABLES:
        assert (out_dir / name).is_file(), name
    it = pd.read_csv(out_dir / "iterations.csv")
    assert len(it) == 4 * 3
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["iterations"] == 3
    exp = Experiment.from_dict(json.loads((out_dir / "experiment.json").read_text()))
    assert exp.name == "cli-small" and exp.world_size == 4

    data = json.loads(trace.read_text())
    assert isinstance(data, dict) and isinstance(data["traceEvents"], list)
    spans = [e for e in data["traceEvents"] if e.get("ph") == "X"]
    assert len(spans) == len(pd.read_csv(out_dir / "timeline.csv"))
    for e in spans:
        for key in ("ts", "dur"):
            assert isinstance(e[key], (int, float)) and not isinstance(e[key], bool)
            assert e[key] >= 0
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
        assert isinstance(e["name"], str) and e["name"]


def test_simulate_json_file(capsys, folder):
    spec = {"name": "from-json", "iterations": 2, "workload": {"path": "workload.json"},
            "cluster": {"nodes": 2}, "strategy": {"name": "allreduce"}}
    path = folder / "exp.json"
    path.write_text(json.dumps(spec))
    code, out, err = run(capsys, "simulate", path)
    assert code == 0, err
    assert out.startswith("from-json: 2 ranks, 2 iterations")


# -- bad input files: one line on stderr, exit status 2 --------------------------------------

# (what to change in VALID_TOML, words the message must contain)
BAD_FILES = {
    "negative bandwidth": (
        ('inter = "25GbE"', 'inter = "25GbE"\ninter_bandwidth = "-25Gbps"'), ["bandwidth", "> 0"]),
    "zero gpus per node": (("gpus_per_node = 2", "gpus_per_node = 0"), ["gpus_per_node", ">= 1"]),
    "zero nodes": (("nodes = 2", "nodes = 0"), ["nodes", ">= 1"]),
    "unknown device": (('inter = "25GbE"', 'inter = "25GbE"\ngpu = "Z100"'),
                       ["device", "Z100", "A100-80GB", "H100-SXM"]),
    "unknown link": (('inter = "25GbE"', 'inter = "1000GbE"'), ["Cluster.inter", "1000GbE", *LINKS]),
    "unknown algorithm": (('algorithm = "ring"', 'algorithm = "foo"'),
                          ["algorithm", "foo", *ALGORITHMS["all_reduce"]]),
    "malformed unit": (('inter = "25GbE"', 'inter = "25GbE"\ninter_bandwidth = "25Gbsp"'),
                       ["bandwidth", "25Gbsp"]),
    "unknown precision": (("seed = 1", 'seed = 1\nprecision = "fp7"'), ["precision", "fp32", "bf16"]),
    "unknown optimizer": (("seed = 1", 'seed = 1\noptimizer = "sgdx"'), ["optimizer", "sgd", "adam"]),
    "zero batch size": (("batch_size = 8", "batch_size = 0"), ["batch_size", ">= 1"]),
    "fractional batch size": (("batch_size = 8", "batch_size = 2.5"), ["batch_size", ">= 1"]),
    "zero iterations": (("iterations = 3", "iterations = 0"), ["iterations", ">= 1"]),
    "negative iterations": (("iterations = 3", "iterations = -3"), ["iterations", ">= 1"]),
    "straggler outside": (("seed = 1", "seed = 1\n[compute]\nstragglers = { 4 = 2.0 }"),
                          ["stragglers", "0..3"]),
    "unknown experiment field": (("seed = 1", "seed = 1\nepochs = 3"), ["epochs", "iterations"]),
    "unknown strategy field": (('algorithm = "ring"', 'algorithm = "ring"\nbucket_size = 25'),
                               ["bucket_size", "bucket_mb"]),
    "unknown strategy": (('name = "allreduce"', 'name = "gossip"'), ["strategy.name", "allreduce"]),
    "unknown cluster field": (("nodes = 2", "nodes = 2\ngpus = 8"), ["gpus", "gpus_per_node"]),
    "missing workload file": (('path = "workload.json"', 'path = "nope.json"'),
                              ["workload.path", "nope.json"]),
    "malformed toml": (("[strategy]", "[strategy"), ["TOML"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_fails_with_one_line(capsys, folder, case):
    (old, new), words = BAD_FILES[case]
    assert old in VALID_TOML
    path = folder / "bad.toml"
    path.write_text(VALID_TOML.replace(old, new, 1))
    code, out, err = run(capsys, "simulate", path)
    line = assert_one_line_error(code, err)
    for word in words:
        assert word in line, (word, line)
    assert out == ""  # nothing was simulated


def test_missing_file_fails_with_one_line(capsys, tmp_path):
    path = tmp_path / "missing.toml"
    code, _, err = run(capsys, "simulate", path)
    line = assert_one_line_error(code, err)
    assert str(path) in line and "does not exist" in line


def test_unwritable_output_fails_with_one_line(capsys, valid_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, "simulate", valid_file, "--out", blocker / "sub")
    assert_one_line_error(code, err)


@pytest.mark.parametrize("argv", [
    ["simulate"],
    ["frobnicate"],
    ["collective", "--nodes", "four"],
    [],
])
def test_usage_errors_are_one_line(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err)


# -- collective ------------------------------------------------------------------------------


def test_collective_table_matches_the_ring_formula(capsys):
    code, out, err = run(capsys, "collective", "--op", "all_reduce", "--algorithm", "ring",
                         "--size", "1MB", "64MB", "--nodes", "4", "--gpus-per-node", "1",
                         "--inter", "100GbE")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("all_reduce / ring on 4 ranks")
    assert lines[1].split() == ["size", "time", "algbw", "busbw"]
    rows = lines[2:]
    assert len(rows) == 2
    # ring all-reduce, uncontended: 2(p-1) steps, each alpha + (n/p)/B
    p, link = 4, LINKS["100GbE"]
    for row, nbytes, size in zip(rows, (1e6, 64e6), ("1 MB", "64 MB"), strict=True):
        assert row.split()[:2] == size.split()
        t = parse_time("".join(row.split()[2:4]))
        expected = 2 * (p - 1) * (link.latency + nbytes / p / link.bandwidth)
        assert t == pytest.approx(expected, rel=1e-3)  # the table shows 4 digits


def test_collective_default_algorithm_follows_the_op(capsys):
    code, out, err = run(capsys, "collective", "--op", "all_to_all", "--size", "1MB",
                         "--nodes", "2", "--gpus-per-node", "2")
    assert code == 0, err
    assert out.startswith(f"all_to_all / {ALGORITHMS['all_to_all'][0]} on 4 ranks")


def test_collective_unknown_algorithm_fails_with_one_line(capsys):
    code, out, err = run(capsys, "collective", "--op", "all_reduce", "--algorithm", "foo",
                         "--size", "1MB", "--nodes", "4", "--gpus-per-node", "1")
    line = assert_one_line_error(code, err)
    assert "--algorithm" in line and "foo" in line
    for name in ALGORITHMS["all_reduce"]:
        assert name in line
    assert out == ""


@pytest.mark.parametrize("argv,words", [
    (["--op", "all_shuffle"], ["--op", "all_shuffle", "all_reduce"]),
    (["--size", "1MBx"], ["--size", "1MBx"]),
    (["--inter", "1000GbE"], ["Cluster.inter", "1000GbE"]),
    (["--nodes", "0"], ["nodes", ">= 1"]),
])
def test_collective_bad_values_fail_with_one_line(capsys, argv, words):
    code, out, err = run(capsys, "collective", "--nodes", "2", "--gpus-per-node", "1", *argv)
    line = assert_one_line_error(code, err)
    for word in words:
        assert word in line
    assert out == ""


# -- a real process ----------------------------------------------------------------------------


def run_process(*argv, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.run([sys.executable, "-m", "simulator.cli", *map(str, argv)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


@pytest.mark.spawns
def test_real_process(folder, valid_file):
    done = run_process("simulate", valid_file.name, "--out", "out", cwd=folder)
    assert done.returncode == 0, done.stderr
    assert "throughput" in done.stdout
    for name in TABLES:
        assert (folder / "out" / name).is_file()

    bad = folder / "bad.toml"
    bad.write_text(VALID_TOML.replace('algorithm = "ring"', 'algorithm = "foo"'))
    done = run_process("simulate", bad.name, cwd=folder)
    assert done.returncode == EXIT_USAGE
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("clustersim: error: ")
    assert "algorithm" in lines[0]
