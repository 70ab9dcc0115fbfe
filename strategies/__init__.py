"""Strategies written once as role programs, run by the simulator and by realrun."""

from strategies.bucketing import Bucket, assign_buckets
from strategies.context import Job, Program, RankContext
from strategies.data_parallel import AllReduceSGD
from strategies.local_sgd import LocalSGD
from strategies.model_parallel import Hybrid, PipelineParallel, TensorParallel, ZeRO
from strategies.parameter_server import ParameterServer
from strategies.sharding import ParamShard, partition_params, split_batch

STRATEGIES = {cls.name: cls for cls in (AllReduceSGD, ParameterServer, LocalSGD, Hybrid, PipelineParallel,
                                         TensorParallel, ZeRO)}


def strategy_from_dict(spec: dict):
    """Build a strategy from ``{"name": ..., **fields}`` (JSON/TOML)."""
    if not isinstance(spec, dict):
        raise ValueError(f"strategy must be a table with a 'name', got {spec!r}")
    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str) or name not in STRATEGIES:
        raise ValueError(f"strategy.name must be one of {tuple(STRATEGIES)}, got {name!r}")
    cls = STRATEGIES[name]
    try:
        return cls(**spec)
    except TypeError as exc:
        import dataclasses

        allowed = tuple(f.name for f in dataclasses.fields(cls))
        raise ValueError(f"strategy {name!r}: unknown field in {sorted(spec)}; allowed: {allowed}") from exc


__all__ = [
    "AllReduceSGD",
    "Hybrid",
    "PipelineParallel",
    "TensorParallel",
    "ZeRO",
    "LocalSGD",
    "ParamShard",
    "ParameterServer",
    "partition_params",
    "split_batch",
    "Bucket",
    "Job",
    "Program",
    "RankContext",
    "STRATEGIES",
    "assign_buckets",
    "strategy_from_dict",
]
