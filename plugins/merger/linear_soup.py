"""``linear_soup``: a weighted average of N checkpoints of the same architecture ("model soup").

Keye-VL's stage 3 averages models annealed on different data mixtures; the number of models and the
weights are unknown, so both are settings. Works shard by shard: the merge stage hands every rank only its
share of each checkpoint's tensors (`keye_plugins.stage.merge`), so no process ever holds the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from keye import hookimpl
from keye.config import doc


class LinearSoup:
    @dataclass
    class Config:
        normalize: bool = doc("Divide the weights by their sum (so they need not add up to 1).", True)

    def __init__(self, config: Config, ctx=None) -> None:
        self.config = config

    def __call__(self, states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
        """Average ``states`` (one share of each checkpoint, by tensor name) with ``weights``; math in fp64, result in each tensor's dtype."""
        if len(states) != len(weights) or not states:
            raise ValueError(f"linear_soup: {len(states)} checkpoints but {len(weights)} weights")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"linear_soup: weights must be non-negative and not all zero, got {list(weights)}")
        total = sum(weights) if self.config.normalize else 1.0
        names = set(states[0])
        for index, state in enumerate(states[1:], start=1):
            if set(state) != names:
                diff = sorted(names.symmetric_difference(state))[:3]
                raise ValueError(f"linear_soup: checkpoint {index} has different tensors than checkpoint 0 (e.g. {diff})")
        merged = {}
        for name in states[0]:
            reference = states[0][name]
            if not torch.is_floating_point(reference):  # counters, ids: must agree, taken as they are
                merged[name] = reference.clone()
                continue
            acc = torch.zeros(reference.shape, dtype=torch.float64)
            for state, weight in zip(states, weights):
                if state[name].shape != reference.shape:
                    raise ValueError(f"linear_soup: '{name}' has shape {tuple(state[name].shape)} vs {tuple(reference.shape)}")
                acc += (weight / total) * state[name].double()
            merged[name] = acc.to(reference.dtype)
        return merged


@hookimpl
def keye_register_mergers(register):
    register("linear_soup", LinearSoup)
