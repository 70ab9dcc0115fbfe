"""Strategy search: the space, pruning that never loses the optimum, rows equal to simulate()."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest

from simulator import Cluster, Workload, simulate
from simulator.memory import OutOfMemoryError
from simulator.search import candidate_experiment, search
from simulator.search_space import candidates, check_space, family


@pytest.fixture(scope="module")
def small_gpt():
    return Workload.from_zoo("gpt", size="gpt2-small", seq_len=256)


def _cluster(nodes=2, gpus=4, inter="HDR", gpu="A100-80GB"):
    return Cluster.homogeneous(nodes=nodes, gpus_per_node=gpus, gpu=gpu, intra="nvlink3", inter=inter,
                               nics_per_node=gpus)


LLM_SMALL = {"tp": [1, 2, 4], "pp": [1, 2, 4], "micro_batch_size": [1, 2], "zero": [0, 1],
             "recompute": [False, True], "sequence_parallel": [False]}


@pytest.fixture(scope="module")
def exhaustive(small_gpt):
    """Every candidate of a small transformer space simulated (no pruning)."""
    with ThreadPoolExecutor(1) as pool:
        return search(small_gpt, _cluster(), global_batch=32, precision="bf16", optimizer="adam", space=LLM_SMALL,
                      prune=False, executor=pool, progress=False)


def test_the_family_follows_the_model(small_gpt):
    assert family(small_gpt) == "llm"
    assert family(Workload.from_zoo("resnet50")) == "data_parallel"


def test_only_valid_combinations_are_generated(small_gpt):
    space = check_space(LLM_SMALL, "llm")
    cands = candidates("llm", space, _cluster(), 32, small_gpt)
    for c in cands:
        assert c["tp"] * c["pp"] * c["dp"] == 8
        assert c["dp"] * c["micro_batch_size"] * c["micro_batches"] == 32
        assert c["pp"] > 1 or c["schedule"] == "1f1b"
        if c["schedule"] == "interleaved":
            assert c["micro_batches"] % c["pp"] == 0 and c["chunks"] == 2
        assert not (c["zero"] and c["dp"] == 1)
    assert len({json.dumps(c, sort_keys=True) for c in cands}) == len(cands)


def test_the_lower_bound_holds_for_every_candidate(exhaustive):
    sim = exhaustive[exhaustive["status"] == "simulated"]
    assert len(sim) == exhaustive.attrs["counts"]["generated"] > 100
    assert (sim["lower_bound"] > 0).all()
    assert (sim["iteration_time"] >= sim["lower_bound"] * (1 - 1e-9)).all(), \
        sim.loc[sim["iteration_time"] < sim["lower_bound"], ["candidate", "iteration_time", "lower_bound"]]


def test_pruning_keeps_the_optimum(small_gpt, exhaustive):
    with ThreadPoolExecutor(1) as pool:
        pruned = search(small_gpt, _cluster(), global_batch=32, precision="bf16", optimizer="adam", space=LLM_SMALL,
                        executor=pool, progress=False)
    c = pruned.attrs["counts"]
    assert c["simulated"] + c["pruned_bound"] + c["pruned_memory"] + c["invalid"] == c["generated"]
    assert c["pruned_bound"] > 0
    assert pruned.iloc[0]["candidate"] == exhaustive.iloc[0]["candidate"]
    assert pruned.iloc[0]["throughput"] == exhaustive.iloc[0]["throughput"]
    # ranked best first by throughput, what was simulated agrees with the exhaustive run
    sim = pruned[pruned["status"] == "simulated"]
    assert list(sim["throughput"]) == sorted(sim["throughput"], reverse=True)
    both = sim.merge(exhaustive, on="candidate", suffixes=("", "_all"))
    assert (both["throughput"] == both["throughput_all"]).all()


def test_a_row_is_the_single_simulation_of_its_experiment(small_gpt, exhaustive):
    for _, row in exhaustive.head(3).iterrows():
        knobs = {k: row[k] for k in ("tp", "pp", "dp", "micro_batch_size", "micro_batches", "schedule", "chunks",
                                     "zero", "recompute", "sequence_parallel")}
        knobs = {k: (int(v) if isinstance(v, int | float) and not isinstance(v, bool) and k != "schedule" else v)
                 for k, v in knobs.items()}
        exp = candidate_experiment(small_gpt, _cluster(), knobs, global_batch=32, precision="bf16", optimizer="adam")
        s = simulate(exp).summary()
        assert s["throughput"] == row["throughput"]
        assert s["peak_memory"] / 1e9 == pytest.approx(row["peak_memory_gb"], rel=1e-12)


DP_SMALL = {"strategy": ["allreduce", "local_sgd"], "algorithm": ["ring", "halving_doubling"],
            "compression": [None, "powersgd"], "period": [4]}


@pytest.mark.parametrize("inter, expect_lossy", [("10GbE", True), ("IB-EDR", False)])
def test_resnet_on_64_v100_picks_by_the_network(inter, expect_lossy):
    """On 10 GbE the gradients (102 MB) take longer to all-reduce than the compute at 32 images per
    GPU, and only compression or local SGD hides them; on 100 Gb/s IB exact all-reduce is as fast."""
    wl = Workload.from_zoo("resnet50")
    cluster = Cluster.homogeneous(nodes=8, gpus_per_node=8, gpu="V100", intra="nvlink2", inter=inter)
    with ThreadPoolExecutor(1) as pool:
        table = search(wl, cluster, global_batch=2048, space=DP_SMALL, executor=pool, progress=False)
    best = table.iloc[0]
    assert bool(best["lossy"]) is expect_lossy
    if not expect_lossy:
        assert best["strategy"] == "allreduce" and pd.isna(best["compression"])
    knobs = {k: best[k] for k in ("strategy", "algorithm", "compression", "bucket_mb", "period")
             if not (isinstance(best[k], float) and math.isnan(best[k])) and best[k] is not pd.NA}
    s = simulate(candidate_experiment(wl, cluster, knobs, global_batch=2048)).summary()
    assert s["throughput"] == best["throughput"]


def test_cluster_size_is_a_knob_and_cost_ranks_it(tmp_path):
    from simulator.search import plot_search

    wl = Workload.from_zoo("resnet50")
    cluster = Cluster.homogeneous(nodes=2, gpus_per_node=8, gpu="V100", intra="nvlink2", inter="25GbE")
    space = {"nodes": [1, 2, 4], "strategy": ["allreduce"], "algorithm": ["ring"], "compression": [None]}
    with ThreadPoolExecutor(1) as pool:
        table = search(wl, cluster, global_batch=1024, space=space, objective="cost", executor=pool, progress=False)
    assert list(table["gpus"]) == sorted(table["gpus"])  # communication makes each GPU dearer at scale
    assert (table["cost"] == table["gpus"] / table["throughput"]).all()
    assert list(table["cost"]) == sorted(table["cost"])
    assert [p.name for p in plot_search(table, tmp_path)] == ["search_pareto.png", "search_gpus.png"]


def test_pruning_under_a_constraint_keeps_the_optimum_it_allows():
    """On 10 GbE lossy candidates win; asked for exact training only, the pruned search must still
    find the exhaustive search's best exact candidate (a lossy best must not prune it)."""
    wl = Workload.from_zoo("resnet50")
    cluster = Cluster.homogeneous(nodes=8, gpus_per_node=8, gpu="V100", intra="nvlink2", inter="10GbE")
    space = {**DP_SMALL, "strategy": ["allreduce", "local_sgd", "parameter_server"], "servers": ["nodes"],
             "placement": ["colocated"], "mode": ["sync"]}
    kw = dict(global_batch=2048, space=space, constraints={"exact": True}, progress=False)
    with ThreadPoolExecutor(1) as pool:
        pruned = search(wl, cluster, executor=pool, **kw)
        full = search(wl, cluster, executor=pool, prune=False, **kw)
    assert not pruned.iloc[0]["lossy"]
    assert pruned.iloc[0]["candidate"] == full.iloc[0]["candidate"]
    with pytest.raises(ValueError, match="constraint 'exact' must be True or False, got 1"):
        search(wl, cluster, global_batch=2048, constraints={"exact": 1})


def test_an_interrupted_search_resumes_to_the_same_table(small_gpt, tmp_path):
    space = {"tp": [2, 4], "pp": [1, 2], "micro_batch_size": [2], "zero": [0], "recompute": [False],
             "sequence_parallel": [False]}
    kw = dict(global_batch=32, precision="bf16", optimizer="adam", space=space, progress=False)
    with ThreadPoolExecutor(1) as pool:
        whole = search(small_gpt, _cluster(), executor=pool, **kw)
        out = tmp_path / "rows.jsonl"
        search(small_gpt, _cluster(), executor=pool, out=out, **kw)
        lines = out.read_text().splitlines()
        assert len(lines) == 1 + whole.attrs["counts"]["simulated"]
        out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # killed while writing the second row
        submitted = []

        class Counting(ThreadPoolExecutor):
            def submit(self, fn, *args, **kwargs):
                submitted.append(args)
                return super().submit(fn, *args, **kwargs)

        with Counting(1) as counting:
            resumed = search(small_gpt, _cluster(), executor=counting, out=out, **kw)
    assert len(submitted) == whole.attrs["counts"]["simulated"] - 1
    pd.testing.assert_frame_equal(resumed, whole)


def test_bad_spaces_are_named(small_gpt):
    cl = _cluster()
    with pytest.raises(ValueError, match=r"unknown knob 'bogus' for a llm model; knobs: \[.*'tp'"):
        search(small_gpt, cl, global_batch=32, space={"bogus": [1]})
    with pytest.raises(ValueError, match="knob 'tp' has an empty list"):
        search(small_gpt, cl, global_batch=32, space={"tp": []})
    with pytest.raises(ValueError, match=r"knob 'tp' value '2' must be an integer >= 1"):
        search(small_gpt, cl, global_batch=32, space={"tp": ["2"]})
    with pytest.raises(ValueError, match=r"knob 'schedule' value 'zigzag' is not one of"):
        search(small_gpt, cl, global_batch=32, space={"schedule": ["zigzag"]})
    with pytest.raises(ValueError, match=r"knob 'compression' value 'zip' is not a compressor"):
        search(Workload.from_zoo("resnet50"), cl, global_batch=64, space={"compression": ["zip"]})
    with pytest.raises(ValueError, match="objective must be one of"):
        search(small_gpt, cl, global_batch=32, objective="speed")
    with pytest.raises(ValueError, match=r"unknown constraints \['fast'\]"):
        search(small_gpt, cl, global_batch=32, constraints={"fast": 1})
    with pytest.raises(ValueError, match="global_batch must be an integer >= 1, got 0"):
        search(small_gpt, cl, global_batch=0)
    with pytest.raises(ValueError, match="no valid candidate in the space for 8 GPUs and global batch 7"):
        search(small_gpt, cl, global_batch=7, space={"tp": [2], "pp": [2]})


def test_a_space_where_nothing_fits_names_the_smallest_shortfall():
    wl = Workload.from_zoo("gpt3-175b")
    cl = Cluster.homogeneous(nodes=1, gpus_per_node=8, gpu="A100-80GB", intra="nvlink3", inter="HDR")
    with pytest.raises(OutOfMemoryError, match=r"nothing in the space fits in memory \(\d+ candidates\); the "
                                               r"closest, .*tp=8.*, needs [\d.]+ GB per GPU, [\d.]+ GB more"):
        search(wl, cl, global_batch=64, precision="bf16", optimizer="adam",
               space={"tp": [4, 8], "pp": [1, 2], "micro_batch_size": [1], "recompute": [True]})


@pytest.mark.spawns
def test_a_dask_cluster_gives_the_same_table(small_gpt):
    distributed = pytest.importorskip("distributed")
    import logging

    space = {"tp": [2, 4], "pp": [1, 2], "micro_batch_size": [2], "zero": [0], "sequence_parallel": [False]}
    kw = dict(global_batch=32, precision="bf16", optimizer="adam", space=space, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=logging.ERROR) as dask_cluster, distributed.Client(dask_cluster) as client:
        on_dask = search(small_gpt, _cluster(), executor=client.get_executor(), **kw)
    with ThreadPoolExecutor(1) as pool:
        pd.testing.assert_frame_equal(on_dask, search(small_gpt, _cluster(), executor=pool, **kw))


@pytest.mark.spawns
def test_the_cli_prints_the_ranking_and_writes_the_table_and_plots(tmp_path):
    import subprocess
    import sys

    toml = tmp_path / "gpt.toml"
    toml.write_text("""
name = "gpt2-small-8"
batch_size = 4
precision = "bf16"
optimizer = "adam"
[workload]
zoo = "gpt"
size = "gpt2-small"
seq_len = 256
[cluster]
nodes = 2
gpus_per_node = 4
nics_per_node = 4
gpu = "A100-80GB"
intra = "nvlink3"
inter = "HDR"
[strategy]
name = "allreduce"
""")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "simulator.cli", "search", str(toml), "--set", "tp=2,4",
                          "--set", "pp=1,2", "--set", "micro_batch_size=2", "--top", "3", "--out", str(out),
                          "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "candidates for 8 GPUs at global batch 32 (llm space)" in run.stdout
    table = pd.read_csv(out / "search.csv")
    assert table.iloc[0]["rank"] == 1 and (out / "search_pareto.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "simulator.cli", "search", str(toml), "--set", "bogus=1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown knob 'bogus'" in bad.stderr
