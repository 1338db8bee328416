"""Layout-invariant initialisation: the same weights for any tensor/pipeline layout.

Megatron-Core draws initial weights from the running RNG as it builds modules. With
``use_cpu_initialization`` a tensor-parallel layer draws the full matrix and keeps its slice, so TP
does not change the weights, but a pipeline stage builds only its own layers, so its draws start from
a different RNG state: PP=2 would start from other weights than PP=1, and the loss curves of two layouts
could not be compared. Here every parameter is drawn in full from its own generator, seeded by the run
seed and the parameter's *global* name (pipeline stages renumber their layers from 0), then sliced for
this tensor-parallel rank exactly as Megatron slices (`keye.parallel.tp_weights.tp_slice`).
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch

from keye.parallel.tp_weights import tp_slice


def global_name(model: torch.nn.Module, name: str, layers_attr: str = "decoder.layers") -> str:
    """``decoder.layers.<local>.x`` → ``decoder.layers.<global>.x`` using each layer's ``layer_number``."""
    prefix_root = layers_attr + "."
    if prefix_root not in name:
        return name
    head, tail = name.split(prefix_root, 1)
    local, rest = tail.split(".", 1)
    layers = model.get_submodule(head + layers_attr if head else layers_attr)
    number = getattr(layers[int(local)], "layer_number", int(local) + 1)
    return f"{head}{prefix_root}{number - 1}.{rest}"


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@torch.no_grad()
def layout_invariant_init(
    model: torch.nn.Module,
    seed: int,
    std_of: Callable[[str], float | None],
    tp_rank: int,
    tp_size: int,
) -> None:
    """Redraw every parameter for which ``std_of(global_name)`` gives a std (normal(0, std)); keep the rest."""
    for name, param in model.named_parameters():
        name = global_name(model, name)
        std = std_of(name)
        if std is None:
            continue
        shape = list(param.shape)
        if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
            shape[param.partition_dim] *= tp_size
        full = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=_generator(seed, name))
        param.copy_(tp_slice(full, param, tp_rank, tp_size).to(param.dtype))
