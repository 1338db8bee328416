"""Full (unsharded) tensors in and out of tensor-parallel modules: the one TP slice and gather of keye.

Megatron's tensor-parallel parameters carry ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride``: the full tensor is cut into ``tp_size * stride`` pieces along that dim and rank r
holds pieces ``r, r + tp, ...`` (stride 2 keeps a fused ``[gate; up]`` pairing whole on every rank). This
is how its CPU initialisation splits a master weight, so :func:`tp_slice` of a full tensor is exactly what
that rank would hold, and :func:`tp_gather` is its inverse. Loading released weights, gathering a model for
export, layout-invariant initialisation (`keye.parallel.weight_init`) and the tests all use these two.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def tp_slice(full: Tensor, param: Tensor, tp_rank: int, tp_size: int) -> Tensor:
    """This TP rank's slice of ``full`` for ``param`` (``full`` itself for a replicated parameter)."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = full.split(full.shape[dim] // (tp_size * stride), dim=dim)  # tp_size·stride pieces
    return torch.cat(pieces[tp_rank::tp_size], dim=dim)


def tp_block(param: Tensor, tp_rank: int, tp_size: int) -> tuple[int, int, int] | None:
    """``(dim, start, stop)``: this rank's slice of the full tensor when it is one block of it (a TP-split
    parameter of stride 1, a plain row- or column-parallel weight), so a reader can take just that block
    from a file; None when the rank holds the full tensor or several pieces of it (stride > 1)."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1 or getattr(param, "partition_stride", 1) != 1:
        return None
    size = param.shape[param.partition_dim]
    return param.partition_dim, tp_rank * size, (tp_rank + 1) * size


@torch.no_grad()
def tp_gather(local: Tensor, param: Tensor, group: Any, tp_size: int) -> Tensor:
    """The full tensor from every TP rank's ``local`` (``param`` itself, or its gradient); collective over
    ``group``. The inverse of :func:`tp_slice`; a replicated parameter comes back as a copy."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return local.detach().clone()
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    shards = [torch.empty_like(local) for _ in range(tp_size)]
    torch.distributed.all_gather(shards, local.detach().contiguous(), group=group)
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]  # [rank][stride piece]
    return torch.cat([pieces[r][s] for s in range(stride) for r in range(tp_size)], dim=dim)


def _tp() -> tuple[int, int, Any]:
    from megatron.core import parallel_state as mpu

    return (
        mpu.get_tensor_model_parallel_rank(),
        mpu.get_tensor_model_parallel_world_size(),
        mpu.get_tensor_model_parallel_group(),
    )


@torch.no_grad()
def load_full_state_dict(module: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Copy full (unsharded) tensors into ``module``'s parameters by name, each TP rank taking its slice.

    Every parameter must be given and every given tensor must be used (Transformer Engine's
    ``_extra_state`` entries are not parameters and are not needed).
    """
    tp_rank, tp_size, _ = _tp()
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    for name, param in params.items():
        load_full_tensor(param, state[name], name, tp_rank, tp_size)


@torch.no_grad()
def load_full_tensor(param: Tensor, full: Tensor, name: str, tp_rank: int, tp_size: int) -> None:
    """Copy this TP rank's slice of one full tensor into ``param`` (a streamed load fills a module tensor by
    tensor); ``name`` is only for the error on a shape that does not fit."""
    shard = tp_slice(full, param, tp_rank, tp_size)
    if shard.shape != param.shape:
        raise ValueError(f"{name}: shape {tuple(shard.shape)} for TP rank {tp_rank}, expected {tuple(param.shape)}")
    param.copy_(shard)


@torch.no_grad()
def full_state_dict(module: torch.nn.Module) -> dict[str, Tensor]:
    """Every parameter of ``module`` as a full tensor (TP shards gathered; the inverse of loading)."""
    _, tp_size, group = _tp()
    return {name: tp_gather(param, param, group, tp_size) for name, param in module.named_parameters()}
