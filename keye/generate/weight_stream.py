"""The model's weights as a stream of ``(Hugging Face name, full tensor)``, one tensor at a time, from any layout.

What an engine outside the training process needs after each optimiser step: the current weights in the
names it loads (the released Keye-VL names, spec §1.7), without ever holding the whole model in one place.
`hf_weight_stream` walks the parameters of the composed ``KeyeVLModel`` stage by stage, and for each one:

1. the stage that holds it gathers its tensor-parallel shards into the full tensor (``all_gather`` over the
   TP group, shards put back in Megatron's ``partition_dim``/``partition_stride`` order: `keye.parallel.tp_weights`);
2. that stage broadcasts the full tensor to the other pipeline stages (``broadcast`` over the PP group), so
   every rank yields the same stream;
3. the tensor is renamed (and, for the fused ones, split: Megatron's ``linear_qkv`` → ``q_proj``/``k_proj``/
   ``v_proj``, ``linear_fc1`` → ``gate_proj``/``up_proj``) into released names and yielded.

Only one full parameter (and its split pieces) is alive at a time beyond the model itself, whatever the
model size; a consumer that keeps nothing keeps the memory bounded. It is collective: every rank of the
model-parallel group iterates it to the end, in step (data-parallel replicas each run their own). The
released tensors the model does not use (SigLIP's pooling head, ``packing_position_embedding``) are not in
the stream.

How a vLLM generator uses it (vLLM supports Keye-VL up to 0.33 and pins its own torch and transformers,
so it runs in its own environment, as verl, NeMo-RL and slime run it): its ``sync_weights(stream)`` feeds
the pairs to vLLM's model ``load_weights(weights: Iterable[tuple[str, Tensor]])``, the per-model entry
point that takes exactly Hugging Face names (Keye's ``KeyeForConditionalGeneration`` maps them onto its
fused layers itself). Colocated on the same GPUs, the tensors travel as CUDA IPC handles, in buckets of a
few hundred MB; on separate nodes, over an NCCL group joining trainer rank 0 and the engine's workers
(broadcast per bucket). Because the engine samples with its own kernels, the RL trainer then corrects the
sampler/trainer mismatch with truncated importance weights on the recomputed log-probabilities.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor


def hf_weight_stream(model: torch.nn.Module, configs: Any = None) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(released name, full tensor)`` for every weight of ``model`` (a ``KeyeVLModel`` in any TP/PP
    layout, or a loaded ``keye.hf.KeyeVL``), the same sequence on every rank. Collective (module docstring).

    ``configs`` (``keye.hf.config.KeyeVLConfigs``): taken from a ``KeyeVL``, or read off a ``KeyeVLModel``
    that holds its vision encoder; pass it for a blueprint-built model on a later pipeline stage.
    """
    from keye.hf.config import configs_of
    from keye.parallel.tp_weights import tp_gather
    from keye.hf.forward import KeyeVL

    if configs is None:
        configs = model.configs if isinstance(model, KeyeVL) else configs_of(model)
    keye_model = model.model if isinstance(model, KeyeVL) else model
    params = dict(keye_model.named_parameters())
    pp_group, pp_size, tp_group, tp_size = _groups()
    local = [(name, _global_name(keye_model, name), _full_shape(p, tp_size), p.dtype) for name, p in params.items()]
    stages = [local]
    if pp_size > 1:
        stages = [None] * pp_size
        dist.all_gather_object(stages, local, group=pp_group)
    my_stage = dist.get_group_rank(pp_group, dist.get_rank()) if pp_size > 1 else 0
    for stage, entries in enumerate(stages):
        for local_name, name, shape, dtype in entries:
            if stage == my_stage:
                full = tp_gather(params[local_name], params[local_name], tp_group, tp_size)
            else:
                full = torch.empty(shape, dtype=dtype, device=_device(keye_model))
            if pp_size > 1:
                dist.broadcast(full, src=dist.get_global_rank(pp_group, stage), group=pp_group)
            yield from hf_tensors(name, full, configs)


def hf_tensors(name: str, tensor: Tensor, configs: Any) -> list[tuple[str, Tensor]]:
    """One ``KeyeVLModel`` full tensor (global layer numbers) → its released name(s) and tensor(s).

    ``keye.hf.weights.keye_to_hf_state`` of that one tensor: the components' key maps work tensor by tensor.
    """
    from keye.hf.weights import keye_to_hf_state

    pairs = keye_to_hf_state({name: tensor}, configs)
    if not pairs:
        raise KeyError(f"weight stream: no released name for {name}")
    return list(pairs.items())


# --- pieces -------------------------------------------------------------------------------------------------


def _groups() -> tuple[Any, int, Any, int]:
    from megatron.core import parallel_state as mpu

    if not mpu.model_parallel_is_initialized():
        return None, 1, None, 1
    return (mpu.get_pipeline_model_parallel_group(), mpu.get_pipeline_model_parallel_world_size(),
            mpu.get_tensor_model_parallel_group(), mpu.get_tensor_model_parallel_world_size())


def _global_name(model: torch.nn.Module, name: str) -> str:
    """The parameter's name in a one-stage model, in the local spec's naming (what the HF mapping speaks)."""
    from keye.hf.weights import unfused_name
    from keye.parallel.weight_init import global_name

    return unfused_name(global_name(model, name))


def _full_shape(param: Tensor, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
