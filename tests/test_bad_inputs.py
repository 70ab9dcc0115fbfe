"""Bad experiment files and arguments found in review: one-line errors naming the field."""

import pytest

from simulator.cli import main
from simulator.cluster import Cluster
from simulator.collectives import simulate_collective
from simulator.compute import ComputeModel
from simulator.experiment import Experiment
from simulator.workload import Layer, Workload
from strategies import AllReduceSGD

GOOD = {
    "workload": '[workload]\npath = "w.json"\n',
    "cluster": '[cluster]\nnodes = 2\n',
    "strategy": '[strategy]\nname = "allreduce"\n',
}
WORKLOAD = Workload(name="w", layers=(Layer(name="l", kind="Linear", params=10, fwd_flops=1, bwd_flops=2,
                                            input_elems=1, output_elems=1),))


def write(tmp_path, top="", **tables):
    (tmp_path / "w.json").write_text(WORKLOAD.to_json())
    parts = [top] + [tables.get(k, v) for k, v in GOOD.items()] + [tables.get("extra", "")]
    path = tmp_path / "exp.toml"
    path.write_text("\n".join(parts))
    return path


CASES = [
    ({"top": 'precision = ["fp8"]'}, "precision"),
    ({"top": 'optimizer = ["x"]'}, "optimizer"),
    ({"strategy": '[strategy]\nname = ["allreduce"]\n'}, "strategy.name"),
    ({"cluster": '[cluster]\nnodes = 2\ntopology = {kind = "leaf_spine"}\n'}, "nodes_per_leaf"),
    ({"workload": "[workload]\npath = 5\n"}, "workload.path"),
    ({"strategy": '[strategy]\nname = "allreduce"\nbucket_mb = inf\n'}, "bucket_mb"),
    ({"strategy": '[strategy]\nname = "allreduce"\nbucket_mb = true\n'}, "bucket_mb"),
    ({"extra": "[compute]\nnoise_cv = true\n"}, "noise_cv"),
    ({"extra": '[compute]\nstragglers = "x"\n'}, "stragglers"),
    ({"extra": "[compute]\nslowdowns = [{rank = 9, start = 0, end = 1, factor = 2}]\n"}, "slowdowns"),
    ({"cluster": "[cluster]\nnodes = 2\ngpus_per_node = 2\nnics_per_node = 4\n"}, "nics_per_node"),
]


@pytest.mark.parametrize("tables,field", CASES)
def test_cli_one_line_naming_the_field(tmp_path, capsys, tables, field):
    assert main(["simulate", str(write(tmp_path, **tables))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("clustersim: error:") and "Traceback" not in err
    assert field in err


def test_deeply_nested_json(tmp_path, capsys):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100000 + "]" * 100000)
    assert main(["simulate", str(path)]) == 2
    assert capsys.readouterr().err.startswith("clustersim: error:")


def test_python_api_arguments():
    cluster = Cluster.homogeneous(nodes=2)
    assert simulate_collective(cluster, "all_reduce", "1MB", algorithm="ring") == simulate_collective(
        cluster, "all_reduce", 1e6, algorithm="ring")
    with pytest.raises(ValueError, match="ranks"):
        simulate_collective(cluster, "all_reduce", 1e6, algorithm="ring", ranks=3)
    with pytest.raises(ValueError, match="cluster must be a Cluster"):
        simulate_collective({"nodes": 2}, "all_reduce", 1e6, algorithm="ring")
    exp = Experiment(workload=WORKLOAD, cluster=cluster, strategy=AllReduceSGD(), compute={"noise_cv": 0.1})
    assert exp.compute == ComputeModel(noise_cv=0.1)
