"""Full tensors from a tensor-parallel model, for tests that compare layouts (TP=2 against one process).

Thin wrappers over `keye.parallel.tp_weights` bound to the running Megatron TP group, so a test (keye's or a
plugin's) slices and gathers exactly as keye's loaders and exporters do, not with a copy of its own.
"""

from __future__ import annotations

import torch

from keye.parallel.tp_weights import tp_gather as _tp_gather
from keye.parallel.tp_weights import tp_slice


def tp_gather(local: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """The full tensor from every TP rank's ``local`` (``param`` or its gradient); collective over the TP group."""
    from megatron.core import parallel_state as mpu

    return _tp_gather(local, param, mpu.get_tensor_model_parallel_group(), mpu.get_tensor_model_parallel_world_size())


def tp_shard(full: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """This TP rank's slice of ``full`` for ``param``, as Megatron's CPU initialisation splits it."""
    from megatron.core import parallel_state as mpu

    return tp_slice(full, param, mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size())
