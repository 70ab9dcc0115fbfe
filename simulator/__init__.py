"""clustersim's simulator: predict throughput, iteration time and utilisation of training strategies.

Stable public names::

    from simulator import Experiment, Cluster, Workload, simulate, simulate_collective, sweep, search

"""

from simulator.cluster import Cluster, LeafSpine, SingleSwitch
from simulator.collectives import simulate_collective
from simulator.compute import ComputeModel
from simulator.executor import simulate
from simulator.experiment import Experiment, load_experiment
from simulator.hardware import DEVICES, LINKS, Device, LinkSpec, device, link
from simulator.results import RunResult
from simulator.search import search
from simulator.sweep import sweep
from simulator.workload import Layer, Workload

__all__ = [
    "DEVICES",
    "LINKS",
    "Cluster",
    "ComputeModel",
    "Device",
    "Experiment",
    "Layer",
    "LeafSpine",
    "LinkSpec",
    "RunResult",
    "SingleSwitch",
    "Workload",
    "device",
    "link",
    "load_experiment",
    "search",
    "simulate",
    "simulate_collective",
    "sweep",
]
