"""An experiment: workload + cluster + strategy + run settings, and its files.

Experiments are frozen and validated when built; they round-trip through
plain dicts, so a result can carry the experiment that made it and a TOML or
JSON file can describe one::

    name = "resnet50-ring"
    batch_size = 64
    iterations = 10
    seed = 1

    [workload]
    zoo = "resnet50"

    [cluster]
    nodes = 8
    gpus_per_node = 8
    gpu = "A100-80GB"
    intra = "nvlink3"
    inter = "100GbE"

    [strategy]
    name = "allreduce"
    algorithm = "ring"
    bucket_mb = 25
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.cluster import Cluster
from simulator.collectives import COLLECTIVE_MODELS
from simulator.compute import OPTIMIZERS, PRECISION_BYTES, ComputeModel
from simulator.workload import Workload
from strategies import STRATEGIES, strategy_from_dict


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """What to run: the model, the machines, the strategy, and how long."""

    workload: Workload
    cluster: Cluster
    strategy: Any
    """A strategy from ``strategies`` (e.g. ``AllReduceSGD()``)."""
    batch_size: int = 32
    """Samples per rank per iteration."""
    iterations: int = 10
    seed: int = 0
    precision: str = "fp32"
    """Compute precision: the device's peak for this dtype applies."""
    optimizer: str = "sgd"
    compute: ComputeModel = field(default_factory=ComputeModel)
    collective_model: str = "auto"
    """"auto" takes the exact closed-form fast path where it applies; "stepped" never does."""
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.workload, Workload):
            raise ValueError(f"Experiment.workload must be a Workload, got {type(self.workload).__name__}")
        if not isinstance(self.cluster, Cluster):
            raise ValueError(f"Experiment.cluster must be a Cluster, got {type(self.cluster).__name__}")
        if type(self.strategy) not in STRATEGIES.values():
            raise ValueError(
                f"Experiment.strategy must be one of {[c.__name__ for c in STRATEGIES.values()]}, "
                f"got {type(self.strategy).__name__}"
            )
        for name in ("batch_size", "iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Experiment.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Experiment.seed must be an integer >= 0, got {self.seed!r}")
        if self.precision not in PRECISION_BYTES:
            raise ValueError(f"Experiment.precision must be one of {tuple(PRECISION_BYTES)}, got {self.precision!r}")
        self.cluster.device_of(0).flops(self.precision)  # the device must have this dtype
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Experiment.optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.collective_model not in COLLECTIVE_MODELS:
            raise ValueError(
                f"Experiment.collective_model must be one of {COLLECTIVE_MODELS}, got {self.collective_model!r}"
            )
        world = self.cluster.world_size
        for rank in self.compute.stragglers:
            if rank >= world:
                raise ValueError(f"compute.stragglers names rank {rank}, but the cluster has ranks 0..{world - 1}")

    @property
    def world_size(self) -> int:
        return self.cluster.world_size

    def replace(self, **changes) -> Experiment:
        return dataclasses.replace(self, **changes)

    # serialisation
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "batch_size": self.batch_size,
            "iterations": self.iterations,
            "seed": self.seed,
            "precision": self.precision,
            "optimizer": self.optimizer,
            "collective_model": self.collective_model,
            "compute": self.compute.to_dict(),
            "workload": self.workload.to_dict(),
            "cluster": self.cluster.to_dict(),
            "strategy": self.strategy.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, spec: dict, *, base_dir: Path | None = None) -> Experiment:
        if not isinstance(spec, dict):
            raise ValueError(f"an experiment must be a table, got {type(spec).__name__}")
        spec = dict(spec)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"experiment: unknown field(s) {unknown}; allowed: {sorted(known)}")
        for required in ("workload", "cluster", "strategy"):
            if required not in spec:
                raise ValueError(f"experiment: missing the [{required}] table")
        spec["workload"] = workload_from_spec(spec["workload"], base_dir=base_dir)
        spec["cluster"] = cluster_from_spec(spec["cluster"])
        spec["strategy"] = strategy_from_dict(spec["strategy"])
        if "compute" in spec:
            compute = spec["compute"]
            if not isinstance(compute, dict):
                raise ValueError(f"experiment.compute must be a table, got {compute!r}")
            try:
                spec["compute"] = ComputeModel(**compute)
            except TypeError:
                raise ValueError(
                    f"experiment.compute: unknown field in {sorted(compute)}; allowed: ['noise_cv', 'stragglers']"
                ) from None
        return cls(**spec)

    @classmethod
    def from_json(cls, text: str) -> Experiment:
        return cls.from_dict(json.loads(text))


def workload_from_spec(spec, *, base_dir: Path | None = None) -> Workload:
    """A workload from ``{"zoo": name, **options}``, ``{"path": file}`` or a full dict."""
    if isinstance(spec, Workload):
        return spec
    if not isinstance(spec, dict):
        raise ValueError(f"workload must be a table with 'zoo', 'path' or 'layers', got {spec!r}")
    spec = dict(spec)
    if "zoo" in spec:
        return Workload.from_zoo(spec.pop("zoo"), **spec)
    if "path" in spec:
        path = Path(spec["path"])
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        if not path.exists():
            raise ValueError(f"workload.path: no such file {str(path)!r}")
        return Workload.from_json(path.read_text())
    if "layers" in spec:
        return Workload.from_dict(spec)
    raise ValueError(f"workload must have one of 'zoo', 'path', 'layers'; got keys {sorted(spec)}")


def cluster_from_spec(spec) -> Cluster:
    """A cluster from ``Cluster.homogeneous`` keywords or a full ``Cluster.to_dict()``."""
    if isinstance(spec, Cluster):
        return spec
    if not isinstance(spec, dict):
        raise ValueError(f"cluster must be a table, got {spec!r}")
    if "links" in spec or "device" in spec:
        return Cluster.from_dict(spec)
    try:
        return Cluster.homogeneous(**spec)
    except TypeError as exc:
        raise ValueError(f"cluster: {exc}") from None


def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment from a ``.toml`` or ``.json`` file."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"experiment file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            spec = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: malformed TOML: {exc}") from None
    elif path.suffix == ".json":
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: malformed JSON: {exc}") from None
    else:
        raise ValueError(f"experiment file must end in .toml or .json, got {path.name!r}")
    return Experiment.from_dict(spec, base_dir=path.parent)
