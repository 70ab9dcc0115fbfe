"""Experiment: validation of every user input, dict/JSON round trip, reproducibility, examples.

Bad values must raise ``ValueError`` naming the field and what is allowed;
expected values come from the inputs (catalogue names, allowed sets), never
from a previous run.
"""

import json
from pathlib import Path

import pandas as pd
import pytest
from builders import small_workload

from simulator.cluster import Cluster, LeafSpine
from simulator.collectives import COLLECTIVE_MODELS
from simulator.compute import OPTIMIZERS, PRECISION_BYTES, ComputeModel
from simulator.executor import simulate
from simulator.experiment import Experiment, load_experiment
from simulator.hardware import DEVICES, LINKS
from strategies import AllReduceSGD
from strategies.collectives import ALGORITHMS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "experiments" / "examples"




def small_experiment(**changes) -> Experiment:
    base = dict(
        workload=small_workload(),
        cluster=Cluster.homogeneous(nodes=2, gpus_per_node=2, inter="25GbE"),
        strategy=AllReduceSGD(),
        batch_size=8,
        iterations=3,
    )
    return Experiment(**{**base, **changes})


def small_spec(**changes) -> dict:
    """A plain-dict experiment (as a TOML/JSON file gives it) with a workload table."""
    spec = {
        "name": "small",
        "batch_size": 8,
        "iterations": 3,
        "workload": small_workload().to_dict(),
        "cluster": {"nodes": 2, "gpus_per_node": 2, "inter": "25GbE"},
        "strategy": {"name": "allreduce"},
    }
    for key, value in changes.items():
        table, _, field = key.rpartition(".")
        target = spec[table] if table else spec
        target[field] = value
    return spec


# -- validation ------------------------------------------------------------------------


def test_small_spec_is_valid():
    exp = Experiment.from_dict(small_spec())
    assert exp.world_size == 4
    assert exp.workload == small_workload()


@pytest.mark.parametrize("value", [-1, "-25Gbps", 0])
def test_non_positive_bandwidth_override_is_refused(value):
    with pytest.raises(ValueError, match="bandwidth") as info:
        Cluster.homogeneous(nodes=2, inter_bandwidth=value)
    assert "> 0" in str(info.value)
    with pytest.raises(ValueError, match="bandwidth"):
        Experiment.from_dict(small_spec(**{"cluster.inter_bandwidth": value}))


@pytest.mark.parametrize("field", ["nodes", "gpus_per_node", "nics_per_node"])
@pytest.mark.parametrize("value", [0, -2])
def test_zero_or_negative_counts_are_refused(field, value):
    args = {"nodes": 2, field: value}
    with pytest.raises(ValueError, match=f"Cluster.{field}") as info:
        Cluster.homogeneous(**args)
    assert ">= 1" in str(info.value)
    with pytest.raises(ValueError, match=f"Cluster.{field}"):
        Experiment.from_dict(small_spec(**{f"cluster.{field}": value}))


def test_unknown_device_lists_the_catalogue():
    with pytest.raises(ValueError, match="device") as info:
        Experiment.from_dict(small_spec(**{"cluster.gpu": "Z100"}))
    message = str(info.value)
    assert "'Z100'" in message
    for name in DEVICES:
        assert name in message


@pytest.mark.parametrize("field", ["inter", "intra"])
def test_unknown_link_lists_the_catalogue(field):
    with pytest.raises(ValueError, match=f"Cluster.{field}") as info:
        Experiment.from_dict(small_spec(**{f"cluster.{field}": "1000GbE"}))
    message = str(info.value)
    assert "'1000GbE'" in message
    for name in LINKS:
        assert name in message


def test_unknown_all_reduce_algorithm_lists_the_algorithms():
    with pytest.raises(ValueError, match="algorithm") as info:
        AllReduceSGD(algorithm="foo")
    message = str(info.value)
    assert "'foo'" in message
    for name in ALGORITHMS["all_reduce"]:
        assert name in message
    with pytest.raises(ValueError, match="algorithm"):
        Experiment.from_dict(small_spec(**{"strategy.algorithm": "foo"}))


@pytest.mark.parametrize("field", ["inter_bandwidth", "intra_bandwidth"])
def test_malformed_unit_string_is_refused(field):
    with pytest.raises(ValueError, match="bandwidth") as info:
        Experiment.from_dict(small_spec(**{f"cluster.{field}": "25Gbsp"}))
    message = str(info.value)
    assert "'25Gbsp'" in message
    assert "Gbps" in message  # says what a bandwidth looks like


@pytest.mark.parametrize("field,value,allowed", [
    ("precision", "fp7", tuple(PRECISION_BYTES)),
    ("optimizer", "sgdx", tuple(OPTIMIZERS)),
    ("collective_model", "exact", COLLECTIVE_MODELS),
])
def test_unknown_choice_lists_the_choices(field, value, allowed):
    with pytest.raises(ValueError, match=f"Experiment.{field}") as info:
        small_experiment(**{field: value})
    for name in allowed:
        assert name in str(info.value)
    with pytest.raises(ValueError, match=f"Experiment.{field}"):
        Experiment.from_dict(small_spec(**{field: value}))


def test_precision_the_device_lacks_is_refused():
    # The V100 has no bf16 peak in the catalogue.
    assert "bf16" not in DEVICES["V100"].peak_flops
    cluster = Cluster.homogeneous(nodes=2, gpu="V100")
    with pytest.raises(ValueError, match="precision") as info:
        small_experiment(cluster=cluster, precision="bf16")
    for dtype in DEVICES["V100"].peak_flops:
        assert dtype in str(info.value)


@pytest.mark.parametrize("field", ["batch_size", "iterations"])
@pytest.mark.parametrize("value", [0, -1, 2.5, "8", True, None])
def test_bad_batch_size_and_iterations(field, value):
    with pytest.raises(ValueError, match=f"Experiment.{field}") as info:
        small_experiment(**{field: value})
    assert ">= 1" in str(info.value)
    with pytest.raises(ValueError, match=f"Experiment.{field}"):
        Experiment.from_dict(small_spec(**{field: value}))


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_bad_seed(value):
    with pytest.raises(ValueError, match="Experiment.seed"):
        small_experiment(seed=value)


def test_straggler_outside_the_cluster():
    exp = small_experiment()
    world = exp.world_size
    small_experiment(compute=ComputeModel(stragglers={world - 1: 2.0}))  # the last rank is fine
    with pytest.raises(ValueError, match="stragglers") as info:
        small_experiment(compute=ComputeModel(stragglers={world: 2.0}))
    assert f"0..{world - 1}" in str(info.value)
    with pytest.raises(ValueError, match="stragglers"):
        Experiment.from_dict(small_spec(compute={"stragglers": {str(world): 2.0}}))
    with pytest.raises(ValueError, match="stragglers"):
        ComputeModel(stragglers={-1: 2.0})
    with pytest.raises(ValueError, match="stragglers"):
        ComputeModel(stragglers={0: 0.0})


def test_unknown_experiment_field_lists_the_fields():
    with pytest.raises(ValueError, match="'batchsize'") as info:
        Experiment.from_dict(small_spec(batchsize=8))
    for name in ("batch_size", "iterations", "seed", "workload", "cluster", "strategy"):
        assert name in str(info.value)


def test_unknown_strategy_field_lists_the_fields():
    with pytest.raises(ValueError, match="'bucket_size'") as info:
        Experiment.from_dict(small_spec(**{"strategy.bucket_size": 25}))
    for name in ("algorithm", "bucket_mb", "overlap"):
        assert name in str(info.value)


def test_unknown_strategy_name_lists_the_strategies():
    with pytest.raises(ValueError, match="strategy.name") as info:
        Experiment.from_dict(small_spec(**{"strategy.name": "gossip"}))
    assert AllReduceSGD.name in str(info.value)


def test_unknown_cluster_field_lists_the_fields():
    with pytest.raises(ValueError, match="'gpus'") as info:
        Experiment.from_dict(small_spec(**{"cluster.gpus": 8}))
    for name in ("nodes", "gpus_per_node", "gpu", "inter", "intra", "topology"):
        assert name in str(info.value)


def test_misspelt_override_names_the_link_fields():
    with pytest.raises(ValueError, match="bandwith") as info:
        Experiment.from_dict(small_spec(**{"cluster.inter_bandwith": "25Gbps"}))
    assert "bandwidth" in str(info.value) and "latency" in str(info.value)


def test_unknown_compute_field_lists_the_fields():
    with pytest.raises(ValueError, match="compute") as info:
        Experiment.from_dict(small_spec(compute={"noise": 0.1}))
    assert "noise_cv" in str(info.value) and "stragglers" in str(info.value)


def test_missing_tables_are_named():
    for table in ("workload", "cluster", "strategy"):
        spec = small_spec()
        del spec[table]
        with pytest.raises(ValueError, match=table):
            Experiment.from_dict(spec)
    spec = small_spec()
    del spec["cluster"]["nodes"]
    with pytest.raises(ValueError, match="nodes"):
        Experiment.from_dict(spec)


@pytest.mark.parametrize("workload", [
    {"name": "w", "layers": 5},
    {"name": "w", "layers": []},
    {"name": "w", "layers": [{"name": "a"}]},
    "resnet50",
    {"model": "resnet50"},
])
def test_malformed_workload_table(workload):
    with pytest.raises(ValueError, match="(?i)workload"):
        Experiment.from_dict(small_spec(workload=workload))


def test_unknown_zoo_option_lists_the_options():
    with pytest.raises(ValueError, match="'widths'") as info:
        Experiment.from_dict(small_spec(workload={"zoo": "mlp", "widths": [4, 4]}))
    assert "hidden" in str(info.value)


def test_malformed_toml_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "unterminated\n[workload\n')
    with pytest.raises(ValueError, match="TOML") as info:
        load_experiment(path)
    assert str(path) in str(info.value)


def test_malformed_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"name": ')
    with pytest.raises(ValueError, match="JSON") as info:
        load_experiment(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ValueError, match="does not exist") as info:
        load_experiment(path)
    assert str(path) in str(info.value)


def test_unreadable_files(tmp_path):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\x80\x81\xfe")
    with pytest.raises(ValueError, match="UTF-8"):
        load_experiment(binary)
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    with pytest.raises(ValueError, match="not a file"):
        load_experiment(folder)
    other = tmp_path / "exp.yaml"
    other.write_text("name: x\n")
    with pytest.raises(ValueError, match=r"\.toml or \.json"):
        load_experiment(other)


def test_missing_workload_file_is_named(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(small_spec(workload={"path": "missing.json"})))
    with pytest.raises(ValueError, match="workload.path") as info:
        load_experiment(path)
    assert str(tmp_path / "missing.json") in str(info.value)


def test_workload_path_is_relative_to_the_experiment_file(tmp_path):
    (tmp_path / "model.json").write_text(small_workload().to_json())
    path = tmp_path / "exp.toml"
    path.write_text(
        'iterations = 2\n[workload]\npath = "model.json"\n'
        '[cluster]\nnodes = 2\n[strategy]\nname = "allreduce"\n'
    )
    exp = load_experiment(path)
    assert exp.workload == small_workload()
    assert exp.iterations == 2


# -- round trip ------------------------------------------------------------------------


def rich_experiment() -> Experiment:
    """Every field away from its default, so the round trip cannot lose one silently."""
    cluster = Cluster.homogeneous(
        nodes=4, gpus_per_node=2, gpu="H100", intra="nvlink4", inter="100GbE-RoCE",
        nics_per_node=2, inter_latency="4us",
        topology=LeafSpine(nodes_per_leaf=2, oversubscription=2.0, spines=2),
    )
    return Experiment(
        workload=small_workload(),
        cluster=cluster,
        strategy=AllReduceSGD(algorithm="hierarchical", bucket_mb=0.5, first_bucket_mb=0.25,
                              overlap=False, grad_dtype="bf16"),
        batch_size=16,
        iterations=3,
        seed=7,
        precision="bf16",
        optimizer="adam",
        compute=ComputeModel(noise_cv=0.05, stragglers={3: 1.5}),
        collective_model="stepped",
        name="rich",
    )


def assert_same_tables(a, b) -> None:
    for table in ("iterations", "timeline", "links", "ranks", "updates"):
        pd.testing.assert_frame_equal(getattr(a, table), getattr(b, table))


def test_dict_and_json_round_trip_give_the_same_experiment():
    exp = rich_experiment()
    assert Experiment.from_dict(exp.to_dict()) == exp
    assert Experiment.from_json(exp.to_json()) == exp
    assert json.loads(exp.to_json()) == exp.to_dict()


def test_round_trip_simulates_to_identical_tables():
    exp = rich_experiment()
    first = simulate(exp)
    again = simulate(Experiment.from_dict(exp.to_dict()))
    pd.testing.assert_frame_equal(first.iterations, again.iterations)
    assert_same_tables(first, again)


def test_result_carries_an_experiment_that_resimulates_to_the_same_result():
    exp = rich_experiment()
    result = simulate(exp)
    rebuilt = Experiment.from_dict(json.loads(json.dumps(result.experiment)))
    assert rebuilt == exp
    again = simulate(rebuilt)
    assert_same_tables(result, again)
    assert again.summary() == result.summary()


# -- reproducibility -------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: small_experiment(compute=ComputeModel(noise_cv=0.1), seed=3),
    # many concurrent flows finishing at the same instant: their order must not depend
    # on anything but the experiment (object ids, hash order, memory addresses)
    rich_experiment,
    lambda: rich_experiment().replace(compute=ComputeModel()),
], ids=["small-noisy", "leafspine-noisy", "leafspine-deterministic"])
def test_same_seed_gives_identical_tables(make):
    exp = make()
    a, b = simulate(exp), simulate(exp)
    pd.testing.assert_frame_equal(a.iterations, b.iterations)
    pd.testing.assert_frame_equal(a.timeline, b.timeline)


def test_noise_makes_the_seed_matter():
    exp = small_experiment(compute=ComputeModel(noise_cv=0.1))
    a = simulate(exp.replace(seed=1)).iterations
    b = simulate(exp.replace(seed=2)).iterations
    assert not a["duration"].equals(b["duration"])
    assert not a["compute"].equals(b["compute"])
    # noise is per op, so ranks of one run differ from each other too
    assert a["compute"].nunique() > 1


def test_without_noise_the_seed_does_not_matter():
    exp = small_experiment(compute=ComputeModel(noise_cv=0.0))
    a, b = simulate(exp.replace(seed=0)), simulate(exp.replace(seed=12345))
    pd.testing.assert_frame_equal(a.iterations, b.iterations)
    pd.testing.assert_frame_equal(a.timeline, b.timeline)


# -- example files ---------------------------------------------------------------------


def example_files() -> list[Path]:
    return sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".toml", ".json"))


def test_there_are_examples():
    names = {p.name for p in example_files()}
    assert {"resnet50_ring.toml", "gpt2_leafspine.toml"} <= names


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_every_example_loads_and_simulates(path):
    exp = load_experiment(path)
    result = simulate(exp)
    summary = result.summary()
    assert summary["world_size"] == exp.world_size
    gpus = exp.run_cluster.num_gpus  # host processes (servers) run no training iterations
    if getattr(exp.strategy, "mode", None) == "async":  # stops at a global step count
        assert summary["updates_applied"] >= exp.iterations * gpus
    else:
        assert summary["iterations"] == exp.iterations
        assert len(result.iterations) == gpus * exp.iterations
    assert summary["makespan"] > 0 and summary["throughput"] > 0
    assert Experiment.from_dict(result.experiment) == exp


def test_resnet50_example_is_what_its_name_says():
    exp = load_experiment(EXAMPLES / "resnet50_ring.toml")
    c = exp.cluster
    assert (c.nodes, c.gpus_per_node, c.nics_per_node) == (4, 8, 8)
    assert c.device == DEVICES["A100-80GB"]
    assert c.intra == LINKS["nvlink3"] and c.inter == LINKS["100GbE"]
    assert exp.strategy == AllReduceSGD(algorithm="ring")
    assert (exp.iterations, exp.batch_size) == (10, 64)
    # torchvision's ResNet-50 at 1000 classes has 25,557,032 parameters
    assert exp.workload.params == 25_557_032


def test_gpt2_example_runs_over_an_oversubscribed_leaf_spine():
    exp = load_experiment(EXAMPLES / "gpt2_leafspine.toml")
    topology = exp.cluster.topology
    assert isinstance(topology, LeafSpine)
    assert topology.oversubscription > 1
    assert exp.cluster.nodes > topology.nodes_per_leaf  # traffic crosses leaves
    # GPT-2 small: 124,439,808 parameters with the LM head tied to the embeddings
    assert exp.workload.params == 124_439_808
