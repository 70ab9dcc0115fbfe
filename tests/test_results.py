"""RunResult: summary metrics agree with the tables, ring all-reduce bytes, exports.

Expected byte counts come from the ring all-reduce formula: each of p ranks
sends 2(p-1) chunks of n/p bytes, i.e. 2(p-1)/p x n, where n is the gradient
size (4 bytes x parameters in fp32).
"""

import json

import pandas as pd
import pytest
from builders import small_workload

from simulator.cluster import Cluster, LeafSpine
from simulator.compute import ComputeModel
from simulator.executor import simulate
from simulator.experiment import Experiment
from simulator.results import ITERATION_COLUMNS, LINK_COLUMNS, TIMELINE_COLUMNS
from strategies import AllReduceSGD, Job

SUMMARY_KEYS = {
    "executor", "world_size", "iterations", "makespan", "throughput",
    "iteration_time_mean", "iteration_time_p50", "iteration_time_p99",
    "compute_time_mean", "exposed_comm_mean", "scaling_efficiency",
    "compute_utilisation", "model_flops_utilisation", "achieved_flops_per_device",
    "network_utilisation", "bytes_on_wire",
}




def experiment(*, nodes=4, gpus_per_node=1, iterations=3, batch_size=8, **changes) -> Experiment:
    base = dict(
        workload=small_workload(),
        cluster=Cluster.homogeneous(nodes=nodes, gpus_per_node=gpus_per_node, inter="25GbE"),
        strategy=AllReduceSGD(algorithm="ring"),
        batch_size=batch_size,
        iterations=iterations,
    )
    return Experiment(**{**base, **changes})


@pytest.fixture(scope="module")
def ring4():
    exp = experiment(compute=ComputeModel(noise_cv=0.05), seed=2)
    return exp, simulate(exp)


def gradient_bytes(exp: Experiment) -> float:
    """Bytes all-reduced per iteration: the DDP buckets, which must hold every fp32 gradient."""
    job = Job(world_size=exp.world_size, iterations=exp.iterations, batch_size=exp.batch_size,
              layer_params=tuple(layer.params for layer in exp.workload.layers),
              node_of=tuple(exp.cluster.node_of(r) for r in range(exp.world_size)))
    buckets = exp.strategy.buckets(job)
    assert len(buckets) > 1  # the test workload spans more than one bucket
    total = sum(b.nbytes for b in buckets)
    assert total == 4 * exp.workload.params
    return total


# -- tables and summary ------------------------------------------------------------------


def test_tables_have_their_columns(ring4):
    _, r = ring4
    assert list(r.iterations.columns) == ITERATION_COLUMNS
    assert list(r.timeline.columns) == TIMELINE_COLUMNS
    assert list(r.links.columns) == LINK_COLUMNS
    assert {"rank", "node", "device", "bytes_sent"} <= set(r.ranks.columns)


def test_summary_keys(ring4):
    _, r = ring4
    summary = r.summary()
    assert SUMMARY_KEYS <= set(summary)
    assert list(r.summary_frame().columns) == list(summary)


def test_iterations_table_is_consistent(ring4):
    exp, r = ring4
    it = r.iterations
    assert len(it) == exp.world_size * exp.iterations
    assert sorted(set(zip(it["rank"], it["iteration"], strict=True))) == [
        (rank, i) for rank in range(exp.world_size) for i in range(exp.iterations)
    ]
    assert (it["samples"] == exp.batch_size).all()
    assert it["duration"].to_numpy() == pytest.approx((it["end"] - it["start"]).to_numpy(), rel=1e-12)
    assert it["exposed_comm"].to_numpy() == pytest.approx(
        (it["duration"] - it["compute"]).to_numpy(), rel=1e-9, abs=1e-15
    )
    assert (it["compute"] > 0).all() and (it["compute"] <= it["duration"] * (1 + 1e-12)).all()


def test_compute_column_is_the_sum_of_compute_spans(ring4):
    _, r = ring4
    tl = r.timeline
    spans = tl[tl["stream"] == "compute"]
    per = (spans["end"] - spans["start"]).groupby([spans["rank"], spans["iteration"]]).sum()
    it = r.iterations.set_index(["rank", "iteration"])["compute"]
    assert per.sort_index().to_numpy() == pytest.approx(it.sort_index().to_numpy(), rel=1e-9)


def test_throughput_is_total_samples_over_makespan(ring4):
    exp, r = ring4
    summary = r.summary()
    total_samples = exp.world_size * exp.iterations * exp.batch_size
    assert summary["makespan"] == r.iterations["end"].max()
    assert summary["throughput"] == pytest.approx(total_samples / summary["makespan"], rel=1e-12)
    assert summary["world_size"] == exp.world_size
    assert summary["iterations"] == exp.iterations
    assert summary["iteration_time_mean"] == pytest.approx(r.iterations["duration"].mean(), rel=1e-12)
    assert summary["compute_time_mean"] == pytest.approx(r.iterations["compute"].mean(), rel=1e-12)
    it = r.iterations
    assert it["duration"].min() <= summary["iteration_time_p50"] <= summary["iteration_time_p99"]
    assert summary["iteration_time_p99"] <= it["duration"].max()


def test_bytes_on_wire_is_the_sum_of_bytes_sent(ring4):
    _, r = ring4
    assert r.summary()["bytes_on_wire"] == pytest.approx(r.ranks["bytes_sent"].sum(), rel=1e-12)


def test_link_utilisation_is_carried_bytes_over_capacity(ring4):
    exp, r = ring4
    makespan = r.summary()["makespan"]
    links = r.links
    expected = links["bytes"] / (links["bandwidth"] * makespan)
    assert links["utilisation"].to_numpy() == pytest.approx(expected.to_numpy())
    assert ((links["utilisation"] >= 0) & (links["utilisation"] <= 1 + 1e-12)).all()
    # stepped: a link is busy exactly when the timeline has a span for it
    r = simulate(exp.replace(collective_model="stepped"))
    links = r.links
    tl = r.timeline[r.timeline["rank"] == -1]
    busy = (tl["end"] - tl["start"]).groupby(tl["name"]).sum()
    for row in links.itertuples():
        assert busy.get(row.name, 0.0) == pytest.approx(row.busy_time, rel=1e-9, abs=1e-15)


# -- ring all-reduce bytes ---------------------------------------------------------------


@pytest.mark.parametrize("nodes,gpus_per_node", [(2, 1), (3, 1), (4, 1), (5, 1), (2, 4)])
def test_ring_bytes_sent_per_rank(nodes, gpus_per_node):
    exp = experiment(nodes=nodes, gpus_per_node=gpus_per_node, iterations=2)
    p = exp.world_size
    n = gradient_bytes(exp)
    r = simulate(exp)
    per_iteration = 2 * (p - 1) / p * n
    for sent in r.ranks["bytes_sent"]:
        assert sent == pytest.approx(exp.iterations * per_iteration, rel=1e-12)
    assert r.summary()["bytes_on_wire"] == pytest.approx(p * exp.iterations * per_iteration, rel=1e-12)


@pytest.mark.parametrize("collective_model", ["auto", "stepped"])
def test_nic_uplink_carries_what_its_rank_sends(collective_model):
    # one GPU per node: every byte a rank sends leaves through its NIC and nothing else does
    exp = experiment(nodes=4, gpus_per_node=1, collective_model=collective_model)
    r = simulate(exp)
    links = r.links.set_index("name")
    for row in r.ranks.itertuples():
        assert links.loc[f"node{row.node}.nic0.up", "bytes"] == pytest.approx(row.bytes_sent, rel=1e-12)
        # in a ring, each rank receives as much as it sends
        assert links.loc[f"node{row.node}.nic0.down", "bytes"] == pytest.approx(row.bytes_sent, rel=1e-12)


def test_leaf_spine_uplinks_carry_the_cross_leaf_ring_edges():
    # 4 single-GPU nodes, 2 per leaf: the ring 0->1->2->3->0 crosses leaves on 1->2 and 3->0,
    # so each leaf's uplink carries exactly one rank's bytes.
    cluster = Cluster.homogeneous(nodes=4, inter="25GbE",
                                  topology=LeafSpine(nodes_per_leaf=2, oversubscription=2.0))
    exp = experiment(cluster=cluster)
    r = simulate(exp)
    links = r.links.set_index("name")
    per_rank = r.ranks["bytes_sent"].iloc[0]
    for leaf in (0, 1):
        assert links.loc[f"leaf{leaf}->spine0", "bytes"] == pytest.approx(per_rank, rel=1e-12)
        assert links.loc[f"spine0->leaf{leaf}", "bytes"] == pytest.approx(per_rank, rel=1e-12)


# -- exports -----------------------------------------------------------------------------


def test_save_writes_every_table(ring4, tmp_path):
    exp, r = ring4
    folder = r.save(tmp_path / "out")
    names = {p.name for p in folder.iterdir()}
    assert {"iterations.csv", "timeline.csv", "links.csv", "ranks.csv", "updates.csv",
            "summary.json", "experiment.json"} <= names
    it = pd.read_csv(folder / "iterations.csv")
    assert list(it.columns) == ITERATION_COLUMNS
    assert len(it) == len(r.iterations)
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary) == set(r.summary())
    assert summary["makespan"] == pytest.approx(r.summary()["makespan"], rel=1e-15)
    assert Experiment.from_dict(json.loads((folder / "experiment.json").read_text())) == exp


def check_chrome_trace(trace: dict, n_spans: int) -> None:
    assert isinstance(trace, dict) and isinstance(trace["traceEvents"], list)
    spans = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    assert len(spans) == n_spans
    for event in spans:
        for key in ("ts", "dur"):
            value = event[key]
            assert isinstance(value, (int, float)) and not isinstance(value, bool)
            assert value >= 0
        assert isinstance(event["pid"], int) and isinstance(event["tid"], int)
        assert isinstance(event["name"], str) and event["name"]


def test_chrome_trace(ring4, tmp_path):
    _, r = ring4
    path = r.to_chrome_trace(tmp_path / "trace.json")
    trace = json.loads(path.read_text())
    check_chrome_trace(trace, len(r.timeline))
