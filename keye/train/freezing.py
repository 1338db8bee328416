"""Which modules train in a stage. Frozen ones get ``requires_grad=False`` before the model is wrapped
in DDP and the optimiser is built, so they get no gradient buffers, no gradients and no optimiser state."""

from __future__ import annotations

from typing import Iterable

import torch

from keye.config.schema import MODULES


def apply_freezing(model: torch.nn.Module, train: Iterable[str]) -> dict[str, int]:
    """Set ``requires_grad`` per top-level module; return trainable parameter counts per module."""
    train = set(train)
    counts: dict[str, int] = {}
    for module_name in MODULES:
        module = getattr(model, module_name, None)
        if module is None:
            continue
        trainable = module_name in train
        for param in module.parameters():
            param.requires_grad_(trainable)
        counts[module_name] = sum(p.numel() for p in module.parameters()) if trainable else 0
    return counts
