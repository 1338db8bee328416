"""Which modules train in a stage. Frozen ones get ``requires_grad=False`` before the model is wrapped
in DDP and the optimiser is built, so they get no gradient buffers, no gradients and no optimiser state.

A vision encoder's pooling ``head`` (SigLIP's, `keye.model.pooling_head`) is carried through every stage so
that export writes stage 0's, but only a model that pools (the contrastive stage's, ``uses_vision_head =
True``) calls it. Elsewhere it stays frozen even when ``vision_encoder`` trains: it would get no gradient,
and decoupled weight decay would still shrink it step by step.
"""

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
            unused = _unused_head(chunk, module_name, module)
            for param in unused:
                param.requires_grad_(False)
            count = sum(p.numel() for p in module.parameters()) - sum(p.numel() for p in unused)
            counts[module_name] = counts.get(module_name, 0) + (count if trainable else 0)
    return counts


def _unused_head(chunk: torch.nn.Module, module_name: str, module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The vision encoder's pooling head's parameters, where ``chunk`` does not use it (module docstring)."""
    head = getattr(module, "head", None) if module_name == "vision_encoder" else None
    if not isinstance(head, torch.nn.Module) or getattr(chunk, "uses_vision_head", False):
        return []
    return list(head.parameters())
