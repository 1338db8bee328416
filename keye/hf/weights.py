"""Released Keye-VL weight names ↔ ``KeyeVLModel`` parameter names, composed from the components' key maps.

Each part of the format (`keye.hf.config.FORMAT`: vision encoder, projector, language model) has its
released weights under a prefix; the component class that fills the part maps them (`keye.hf.contract`).
Here they are put together: :func:`expected_hf_shapes` lists every weight of the format, so loading names
each missing, unexpected or misshapen tensor *before* converting anything; :func:`hf_to_keye_state` /
:func:`keye_to_hf_state` map full tensors (global layer numbers), renames, splits and concatenations only:
the round trip is bit-exact. :func:`load_hf_into` / :func:`gather_full_state` move those full tensors in
and out of a model in any TP/PP layout; :func:`load_hf_parts` moves them in a part at a time (a streamed
load, `keye.hf.sources.stream_module`), so no rank needs the whole state at once.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from keye.errors import KeyeUserError
from keye.hf.config import FORMAT, KeyeVLConfigs, Slot
from keye.hf.contract import hf_weights


def _parts(configs: KeyeVLConfigs) -> Iterator[tuple[Slot, Any, Any]]:
    """(slot, component class with a key map, its config) for each part of the format."""
    for slot in FORMAT:
        yield slot, hf_weights(configs.cls(slot.kind), slot.kind), configs.config(slot.kind)


def unused_prefixes(configs: KeyeVLConfigs) -> tuple[str, ...]:
    """Released names the model has no use for (kept and written back, never loaded)."""
    return tuple(slot.prefix + p for slot, cls, _ in _parts(configs) for p in getattr(cls, "HF_UNUSED", ()))


def expected_hf_shapes(configs: KeyeVLConfigs) -> dict[str, tuple[int, ...]]:
    """Every weight of a released checkpoint with these settings (unused ones aside), and its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for slot, cls, config in _parts(configs):
        shapes.update({slot.prefix + name: tuple(shape) for name, shape in cls.hf_weight_shapes(config).items()})
    return shapes


def check_hf_names(shapes: dict[str, tuple[int, ...]], configs: KeyeVLConfigs, where: str) -> list[str]:
    """Raise a ``KeyeUserError`` naming missing/unexpected/misshapen weights; return the skipped unused names."""
    expected, skip = expected_hf_shapes(configs), unused_prefixes(configs)
    unused = sorted(name for name in shapes if name.startswith(skip))
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - set(unused))
    wrong = [f"{name} {tuple(shapes[name])} (config says {expected[name]})"
             for name in sorted(set(expected) & set(shapes)) if tuple(shapes[name]) != expected[name]]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            problems.append(f"{label} weight {', '.join(names[:3])}{more}")
    if problems:
        raise KeyeUserError(f"{where}: " + "; ".join(problems))
    return unused


def hf_to_keye_state(hf: dict[str, Tensor], configs: KeyeVLConfigs) -> dict[str, Tensor]:
    """Released tensors (checked by :func:`check_hf_names`) → ``KeyeVLModel`` parameter names, full tensors."""
    out: dict[str, Tensor] = {}
    left = dict(hf)
    for slot, cls, config in _parts(configs):
        part = {name[len(slot.prefix):]: left.pop(name) for name in list(left) if name.startswith(slot.prefix)}
        out.update({f"{slot.kind}.{name}": t for name, t in cls.hf_to_keye(part, config).items()})
    return out


def keye_to_hf_state(state: dict[str, Tensor], configs: KeyeVLConfigs) -> dict[str, Tensor]:
    """``KeyeVLModel`` full tensors (global layer numbers) → released names (inverse of :func:`hf_to_keye_state`).

    Tensor by tensor: any subset of the state maps on its own (a one-tensor dict gives that tensor's released
    tensors, as the weight stream needs). A name outside the format's parts is a ``KeyError``.
    """
    out: dict[str, Tensor] = {}
    left = dict(state)
    for slot, cls, config in _parts(configs):
        start = slot.kind + "."
        part = {name[len(start):]: left.pop(name) for name in list(left) if name.startswith(start)}
        if part:
            out.update({slot.prefix + name: t for name, t in cls.keye_to_hf(part, config).items()})
    if left:
        raise KeyError(f"no released name for {sorted(left)[0]}")
    return {name: tensor.contiguous() for name, tensor in out.items()}


@functools.cache
def _fused_norm_names() -> dict[str, str]:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return dict(get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm").submodules.sharded_state_dict_keys_map)


def unfused_name(name: str) -> str:
    """A parameter name in the local layer spec's naming, which the HF mapping speaks.

    Transformer Engine's GPT layer spec fuses the norm before attention and before the MLP into the
    linear that follows (``self_attention.linear_qkv.layer_norm_weight``); the local spec keeps them as
    modules (``input_layernorm.weight``). Megatron's local spec declares this correspondence itself (its
    ``sharded_state_dict_keys_map``, which is also why distributed checkpoints of either spec load into
    the other); here it is read backwards.
    """
    for local, fused in _fused_norm_names().items():
        if f".{fused}" in name:
            return name.replace(f".{fused}", f".{local}")
    return name


def held_parameters(model: nn.Module | list[nn.Module], module: str | None = None) -> dict[str, list[Tensor]]:
    """This rank's parameters by the global name of the full tensor they are a slice of (``<module>.<name>``,
    global layer numbers, the local spec's naming); over every chunk of ``model``, only ``module`` if given."""
    from keye.parallel.dist_checkpoint import model_chunks
    from keye.parallel.weight_init import global_name

    prefix = "" if module is None else f"{module}."
    held: dict[str, list[Tensor]] = {}
    for chunk in model_chunks(model):
        target = chunk if module is None else getattr(chunk, module, None)
        if target is None:
            continue
        for name, param in target.named_parameters():
            held.setdefault(unfused_name(global_name(chunk, prefix + name)), []).append(param)
    return held


@torch.no_grad()
def load_hf_parts(model: nn.Module | list[nn.Module], parts: Iterable[dict[str, Tensor]],
                  module: str | None = None) -> None:
    """Copy full tensors (global names) into ``model`` part by part, each TP rank its slice, each PP stage (each
    chunk) its layers; tensors this rank does not hold are passed over. A part can be dropped as soon as it is
    copied, so a streamed load holds one part at a time (`keye.hf.sources.stream_module`). A tensor already of
    the parameter's shape is copied as it is: under a TP split a full tensor never is, so it is this rank's
    slice, read alone from the file. Every parameter here must be filled by some part (a ``KeyError`` naming
    the first that is not)."""
    from megatron.core import parallel_state as mpu

    from keye.parallel.tp_weights import load_full_tensor

    tp_rank, tp_size = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
    held, filled = held_parameters(model, module), set()
    for part in parts:
        for name, full in part.items():
            for param in held.get(name, ()):
                if full.shape == param.shape:  # replicated, TP 1, or read as this rank's slice already
                    param.copy_(full)
                else:
                    load_full_tensor(param, full, name, tp_rank, tp_size)
                filled.add(name)
    missing = sorted(set(held) - filled)
    if missing:
        raise KeyError(f"no tensor for {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))


def load_hf_into(model: nn.Module | list[nn.Module], keye_state: dict[str, Tensor], module: str | None = None) -> None:
    """Copy full tensors (global names) into ``model``: each TP rank its slice, each PP stage its layers
    (each chunk its own, for the list of an interleaved pipeline's chunks). With ``module``, only that
    top-level module is filled (``keye_state`` names still start with it; chunks without it are skipped)."""
    load_hf_parts(model, [keye_state], module)


def gather_full_state(model: nn.Module | list[nn.Module]) -> dict[str, Tensor] | None:
    """Full tensors by global name; collective over TP and PP ranks (``model``: this rank's model, or its
    list of chunks). Returned on the first PP stage, else None."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from keye.parallel.dist_checkpoint import model_chunks
    from keye.parallel.tp_weights import full_state_dict
    from keye.parallel.weight_init import global_name

    state = {unfused_name(global_name(chunk, name)): t
             for chunk in model_chunks(model) for name, t in full_state_dict(chunk).items()}
    if mpu.get_pipeline_model_parallel_world_size() == 1:
        return state
    group = mpu.get_pipeline_model_parallel_group()
    first = dist.get_global_rank(group, 0)
    parts = [None] * dist.get_world_size(group) if dist.get_rank() == first else None
    dist.gather_object(state, parts, dst=first, group=group)
    if dist.get_rank() != first:
        return None
    return {name: tensor for part in parts for name, tensor in part.items()}
