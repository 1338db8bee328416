"""Which modules train in a stage. Frozen ones get ``requires_grad=False`` before the model is wrapped
in DDP and the optimiser is built, so they get no gradient buffers, no gradients and no optimiser state."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from keye.config.schema import MODULES


def apply_freezing(model: torch.nn.Module | Sequence[torch.nn.Module], train: Iterable[str]) -> dict[str, int]:
    """Set ``requires_grad`` per top-level module; return trainable parameter counts per module (summed
    over the model chunks of an interleaved pipeline, when ``model`` is a list of them)."""
    train = set(train)
    counts: dict[str, int] = {}
    for chunk in model if isinstance(model, Sequence) else [model]:
        for module_name in MODULES:
            module = getattr(chunk, module_name, None)
            if module is None:
                continue
            trainable = module_name in train
            for param in module.parameters():
                param.requires_grad_(trainable)
            counts[module_name] = counts.get(module_name, 0) + (sum(p.numel() for p in module.parameters()) if trainable else 0)
    return counts
