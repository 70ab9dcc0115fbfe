"""Models and single-process reference training for the realrun tests.

Ranks import this module (the project root is on their path), so what is
defined here can travel to them in a run's spec.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from realrun.model import Data, ModelState, build_model


class FailingMLP(nn.Sequential):
    """An MLP whose forward raises on the rank named by ``fail_rank`` at ``fail_iteration``."""

    def __init__(self, fail_rank: int, fail_after: int):
        super().__init__(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.fail_rank, self.fail_after, self.calls = fail_rank, fail_after, 0
        self.sample_shape = (8,)

    def example_input(self, batch_size, device=None):
        return torch.randn(batch_size, 8, device=device)

    def forward(self, x):
        self.calls += 1
        if int(os.environ.get("RANK", "-1")) == self.fail_rank and self.calls > self.fail_after:
            raise RuntimeError(f"deliberate failure on rank {self.fail_rank}")
        return super().forward(x)


def reference(experiment):
    """A fresh copy of the experiment's model, its flat-parameter state and its data."""
    model = build_model(experiment.workload, experiment.seed)
    state = ModelState(model, experiment.workload, torch.device("cpu"))
    return model, state, Data(model, experiment.seed, torch.device("cpu"))


def gradient(model, state, data, shard: int, iteration: int, size: int) -> torch.Tensor:
    """The mean-loss gradient of a shard's batch at the model's current parameters (flat)."""
    state.zero_grads()
    x = data.inputs(shard, iteration, size, 0, size)
    loss = data.loss(model(x), shard, iteration, size, 0, size)
    loss.backward()
    return state.grads.clone()
