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

from simulator.cluster import Cluster, Host
from simulator.collectives import COLLECTIVE_MODELS
from simulator.compute import MIXED, OPTIMIZERS, PRECISION_BYTES, ComputeModel
from simulator.memory import OUT_OF_MEMORY
from simulator.workload import Workload
from strategies import STRATEGIES, strategy_from_dict

FIDELITIES = ("auto", "full")


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """What to run: the model, the machines, the strategy, and how long."""

    workload: Workload
    cluster: Cluster
    strategy: Any
    """A strategy from ``strategies`` (e.g. ``AllReduceSGD()``)."""
    batch_size: int | tuple[int, ...] = 32
    """Samples per worker (GPU rank) per iteration; a list gives each GPU rank its
    own (uneven data shards, e.g. ``strategies.split_batch(512, speeds)``)."""
    iterations: int = 10
    seed: int = 0
    precision: str = "fp32"
    """Compute precision: the device's peak for this dtype applies. ``fp16``/``bf16`` train in
    mixed precision: 16-bit weights, activations and gradients, fp32 master weights and
    optimizer state (and dynamic loss scaling with ``fp16``)."""
    optimizer: str = "sgd"
    compute: ComputeModel = field(default_factory=ComputeModel)
    collective_model: str = "auto"
    """"auto" takes the exact closed-form fast path where it applies; "stepped" never does."""
    fidelity: str = "auto"
    """``auto``: where ranks are interchangeable (a strategy's replicas and tensor-parallel
    ranks on a symmetric cluster, without per-rank noise), simulate one representative per
    class and let it stand for the others (:mod:`simulator.symmetry`); it gives the same
    iteration times, bytes and memory as simulating every rank, and falls back to that
    wherever it could not. ``full``: simulate every rank. ``result.summary()["fidelity"]`` and
    ``["fidelity_reason"]`` say which ran and why."""
    eager_limit: float | None = None
    """Point-to-point messages up to this many bytes flow as soon as they are sent (eager);
    of a larger one only the first ``eager_limit`` bytes do, and the rest once the receiver
    has posted the matching receive and its ready notification is back at the sender
    (rendezvous: MPI's and NCCL's protocol for large messages, gloo's for every message; a
    server that reads one push at a time then takes them one after another). The sender's
    send is done once the rest is handed over. ``None``: every message is eager, however
    large. Calibration sets 0 (see :attr:`realrun.Calibration.eager_limit`)."""
    out_of_memory: str = "raise"
    """When a rank needs more memory than its device has: ``raise`` an
    :class:`~simulator.memory.OutOfMemoryError` before simulating, or ``report`` it (a
    warning, and ``memory_fits`` False in the summary) and simulate anyway."""
    name: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.compute, dict):
            object.__setattr__(self, "compute", ComputeModel(**self.compute))
        if not isinstance(self.compute, ComputeModel):
            raise ValueError(f"Experiment.compute must be a ComputeModel or a table, got {self.compute!r}")
        if not isinstance(self.workload, Workload):
            raise ValueError(f"Experiment.workload must be a Workload, got {type(self.workload).__name__}")
        if not isinstance(self.cluster, Cluster):
            raise ValueError(f"Experiment.cluster must be a Cluster, got {type(self.cluster).__name__}")
        if not (callable(getattr(self.strategy, "programs", None)) and callable(getattr(self.strategy, "to_dict", None))):
            raise ValueError(
                f"Experiment.strategy must be a strategy (one of {[c.__name__ for c in STRATEGIES.values()]}, "
                f"or your own object with programs(job) and to_dict()), got {type(self.strategy).__name__}"
            )
        if isinstance(self.batch_size, list | tuple):
            sizes = tuple(self.batch_size)
            if len(sizes) != self.cluster.num_gpus or any(
                isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes
            ):
                raise ValueError(
                    f"Experiment.batch_size as a list must hold {self.cluster.num_gpus} integers >= 1 "
                    f"(one per GPU rank), got {list(sizes)!r}"
                )
            object.__setattr__(self, "batch_size", sizes)
        for name in ("iterations",) if isinstance(self.batch_size, tuple) else ("batch_size", "iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Experiment.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.name, str):
            raise ValueError(f"Experiment.name must be a string, got {self.name!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Experiment.seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.precision, str) or self.precision not in PRECISION_BYTES:
            raise ValueError(f"Experiment.precision must be one of {tuple(PRECISION_BYTES)}, got {self.precision!r}")
        # Host processes (parameter servers) run optimizer maths in fp32 whatever the precision.
        for rank in range(self.cluster.num_gpus if self.cluster.devices is not None else 1):
            device = self.cluster.device_of(rank)
            if self.precision not in device.peak_flops:  # the device must have this dtype
                raise ValueError(
                    f"Experiment.precision {self.precision!r} is not supported by device {device.name} "
                    f"(rank {rank}); it has {tuple(device.peak_flops)}"
                )
        if not isinstance(self.optimizer, str) or self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Experiment.optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}")
        if not isinstance(self.collective_model, str) or self.collective_model not in COLLECTIVE_MODELS:
            raise ValueError(
                f"Experiment.collective_model must be one of {COLLECTIVE_MODELS}, got {self.collective_model!r}"
            )
        if not isinstance(self.fidelity, str) or self.fidelity not in FIDELITIES:
            raise ValueError(f"Experiment.fidelity must be one of {FIDELITIES}, got {self.fidelity!r}")
        if self.eager_limit is not None and (
                isinstance(self.eager_limit, bool) or not isinstance(self.eager_limit, int | float)
                or not self.eager_limit >= 0):
            raise ValueError(f"Experiment.eager_limit must be None or a number of bytes >= 0, got {self.eager_limit!r}")
        if self.out_of_memory not in OUT_OF_MEMORY:
            raise ValueError(f"Experiment.out_of_memory must be one of {OUT_OF_MEMORY}, got {self.out_of_memory!r}")
        object.__setattr__(self, "_run_cluster", self._place_hosts())
        object.__setattr__(self, "_job", self._make_job())  # derived once: a Job is immutable
        check = getattr(self.strategy, "check", None)
        if callable(check):
            check(self.job())
        world = self.run_cluster.world_size
        for window in self.compute.slowdowns:
            if window.rank >= world:
                raise ValueError(f"compute.slowdowns names rank {window.rank}, but the cluster has ranks 0..{world - 1}")
        for rank in self.compute.stragglers:
            if rank >= world:
                raise ValueError(f"compute.stragglers names rank {rank}, but the cluster has ranks 0..{world - 1}")

    @property
    def world_size(self) -> int:
        """Ranks of the run: the cluster's GPUs and any host processes the strategy adds."""
        return self.run_cluster.world_size

    @property
    def run_cluster(self) -> Cluster:
        """The cluster the run uses: ``cluster`` plus the host processes (parameter
        servers) the strategy places with ``hosts(cluster)``, if it has that method."""
        return self._run_cluster  # set in __post_init__

    def _place_hosts(self) -> Cluster:
        place = getattr(self.strategy, "hosts", None)
        if not callable(place):
            return self.cluster
        if self.cluster.hosts:
            raise ValueError(
                f"Experiment.cluster already has {len(self.cluster.hosts)} host process(es); "
                f"strategy {type(self.strategy).__name__} places its own"
            )
        try:
            return self.cluster.with_hosts([Host(**spec) for spec in place(self.cluster)])
        except ValueError as exc:
            raise ValueError(f"strategy {type(self.strategy).__name__}: {exc}") from None

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Samples per iteration of each GPU rank."""
        b = self.batch_size
        return b if isinstance(b, tuple) else (b,) * self.cluster.num_gpus

    def job(self):
        """The :class:`strategies.Job` role programs see (one per experiment: strategies
        cache their layout on it)."""
        return self._job  # set in __post_init__

    def _make_job(self):
        from strategies.context import Job

        cluster = self.run_cluster
        sizes = self.batch_sizes
        layers = self.workload.layers
        return Job(
            world_size=cluster.world_size,
            iterations=self.iterations,
            batch_size=sizes[0],
            layer_params=tuple(layer.params for layer in self.workload.layers),
            node_of=tuple(cluster.node_of(r) for r in range(cluster.world_size)),
            accelerators=cluster.num_gpus,
            batch_sizes=sizes,
            layer_shapes=tuple(layer.param_shapes for layer in self.workload.layers),
            param_dtype=self.precision if self.precision in MIXED else "fp32",
            layer_names=tuple(layer.name for layer in layers),
            layer_tp=self.workload.tp_roles,
            layer_inputs=tuple(layer.input_elems for layer in layers),
            layer_outputs=tuple(layer.output_elems for layer in layers),
            layer_tied=self.workload.tied,
            layer_costs=self._layer_costs(cluster, sizes[0]),
        )

    def _layer_costs(self, cluster, samples: int) -> tuple[float, ...]:
        """Forward plus backward seconds per sample of each layer on the first GPU (roofline or
        measured), at the per-rank batch."""
        from simulator.compute import layer_times

        fwd, bwd = layer_times(self.workload, cluster.device_of(0), self.precision, samples)
        return tuple(float(x) / samples for x in fwd + bwd)

    def memory(self):
        """Bytes each rank needs at its peak, by component (a DataFrame; see :mod:`simulator.memory`)."""
        from simulator.memory import memory_table

        return memory_table(self)

    def replace(self, **changes) -> Experiment:
        return dataclasses.replace(self, **changes)

    # serialisation
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "batch_size": list(self.batch_size) if isinstance(self.batch_size, tuple) else self.batch_size,
            "iterations": self.iterations,
            "seed": self.seed,
            "precision": self.precision,
            "optimizer": self.optimizer,
            "collective_model": self.collective_model,
            "fidelity": self.fidelity,
            "eager_limit": self.eager_limit,
            "out_of_memory": self.out_of_memory,
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
                allowed = sorted(f.name for f in dataclasses.fields(ComputeModel))
                raise ValueError(f"experiment.compute: unknown field in {sorted(compute)}; allowed: {allowed}") from None
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
        name = spec.pop("zoo")
        if not isinstance(name, str):
            raise ValueError(f"workload.zoo must be a zoo model name (a string), got {name!r}")
        try:
            return Workload.from_zoo(name, **spec)
        except TypeError as exc:  # a keyword the zoo builder does not take
            import inspect

            from simulator import zoo

            allowed = sorted(inspect.signature(zoo.MODELS[name]).parameters)
            unknown = sorted(set(spec) - set(allowed))
            if not unknown:
                raise ValueError(f"workload: zoo model {name!r}: {exc}") from None
            raise ValueError(
                f"workload: unknown option(s) {unknown} for zoo model {name!r}; allowed: {allowed}"
            ) from None
    if "path" in spec:
        if set(spec) != {"path"}:
            raise ValueError(f"workload: with 'path', no other field is allowed; got {sorted(spec)}")
        if not isinstance(spec["path"], str):
            raise ValueError(f"workload.path must be a file name (string), got {spec['path']!r}")
        path = Path(spec["path"])
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        if not path.is_file():
            raise ValueError(f"workload.path: no such file {str(path)!r}")
        try:
            return _workload_from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(f"workload.path {str(path)!r}: {exc}") from None
    if "layers" in spec:
        return _workload_from_dict(spec)
    raise ValueError(f"workload must have one of 'zoo', 'path', 'layers'; got keys {sorted(spec)}")


def _workload_from_dict(spec) -> Workload:
    try:
        return Workload.from_dict(spec)
    except TypeError as exc:  # Workload.from_dict iterates values without checking their type
        raise ValueError(
            f"workload: malformed table ({exc}); 'layers' must be a list of layer tables "
            f"and 'sample_shape' a list of integers"
        ) from None


def cluster_from_spec(spec) -> Cluster:
    """A cluster from ``Cluster.homogeneous`` keywords or a full ``Cluster.to_dict()``."""
    if isinstance(spec, Cluster):
        return spec
    if not isinstance(spec, dict):
        raise ValueError(f"cluster must be a table, got {spec!r}")
    if "links" in spec or "device" in spec:
        return Cluster.from_dict(spec)
    # Check the keywords here, so that a typo is told with the fields allowed.
    unknown = sorted(
        key for key in spec
        if key not in _HOMOGENEOUS_FIELDS and key.partition("_")[0] not in ("gpu", "intra", "inter")
    )
    if unknown:
        raise ValueError(
            f"cluster: unknown field(s) {unknown}; allowed: {list(_HOMOGENEOUS_FIELDS)} "
            f"and overrides gpu_<Device field>, intra_<LinkSpec field>, inter_<LinkSpec field>"
        )
    if "nodes" not in spec:
        raise ValueError("cluster: missing the field 'nodes' (number of nodes, >= 1)")
    return Cluster.homogeneous(**spec)


_HOMOGENEOUS_FIELDS = (
    "nodes", "gpus_per_node", "gpu", "intra", "inter", "topology", "nics_per_node", "intra_kind",
)


def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment from a ``.toml`` or ``.json`` file."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"experiment file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"experiment file {str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
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
        except RecursionError:
            raise ValueError(f"{path}: JSON nested too deeply") from None
    else:
        raise ValueError(f"experiment file must end in .toml or .json, got {path.name!r}")
    return Experiment.from_dict(spec, base_dir=path.parent)
