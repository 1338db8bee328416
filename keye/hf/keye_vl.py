"""Released Keye-VL-8B-Preview checkpoints (Hugging Face layout) ↔ keye's ``KeyeVLModel``: load and save.

The format (spec §1.7, §2) is composed from registered components (`keye.hf.config`), each of which owns the
key map of its weights (`keye.hf.contract`); `keye.hf.weights` puts the maps together and `keye.hf.files`
reads and writes the directory. Here:

- :func:`build_keye_vl_model`: an untrained ``KeyeVLModel`` for a config.json, built through the registry
  like any blueprint model;
- :func:`load_keye_vl` / :func:`save_keye_vl`: build and load one, write one back; both work under TP (each
  rank its slice) and PP (each stage its layers). A blueprint-built model saves too, whatever components it
  holds, as long as they have key maps.

The unused released weights (SigLIP pooling ``head.*``, ``packing_position_embedding``; spec §1.1) are not
loaded but kept on the wrapper (``KeyeVL.unused``) and written back: load → save loses nothing.

What the released remote code needs to load a saved folder (issue 15): config.json's ``auto_map`` naming
``configuration_keye.KeyeConfig`` / ``modeling_keye.KeyeForConditionalGeneration`` (`keye.hf.config.remote_code_auto_map`),
and every tensor its ``KeyeForConditionalGeneration`` builds, the unused ones included: a missing one would be
initialised at random by transformers, with a warning, and ``strict`` loaders refuse the folder. So the head and
the packing table are always written: the model's own (a vision encoder built with ``pooling_head``: stage 0's
trained head), else the loaded ones (``KeyeVL.unused``: a converted release), else initialised as the released
code initialises them (the component's ``hf_released_extras``). :func:`released_hf_names` lists them all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from keye.hf.config import FORMAT, KeyeVLConfigs, configs_of, hf_config_dict, hf_configs, remote_code_auto_map
from keye.hf.files import INDEX_NAME, read_config, read_weights, write_weights
from keye.hf.forward import KeyeVL
from keye.hf.weights import check_hf_names, expected_hf_shapes, gather_full_state, hf_to_keye_state, keye_to_hf_state
from keye.hf.weights import load_hf_into


def build_keye_vl_model(configs: KeyeVLConfigs, dtype: torch.dtype = torch.float32, parallel: Any = None) -> nn.Module:
    """An (untrained) ``KeyeVLModel`` for this process's place in the parallel layout (``parallel``: a
    ``ParallelContext``; default: the running one, or a single-process one started here)."""
    from megatron.core import parallel_state as mpu

    from keye.model.composition import KeyeVLModel
    from keye.model.protocols import BuildContext
    from keye.parallel import current_context, init_parallel
    from keye.plugins import get_registry

    parallel = parallel or (current_context() if mpu.model_parallel_is_initialized() else init_parallel())
    ctx = BuildContext(parallel, dtype, parallel.is_first_stage, parallel.is_last_stage)
    return KeyeVLModel(configs.model_section(), get_registry(), ctx,
                       image_token_id=configs.mrope.image_token_id, video_token_id=configs.mrope.video_token_id)


def load_keye_vl(path: str | Path, dtype: torch.dtype = torch.float32) -> KeyeVL:
    """Build a ``KeyeVLModel`` sized from ``path/config.json`` and load the released weights into it.

    Runs in this process's Megatron parallel state; with none initialised it starts a single-process one
    (``init_parallel()``: world 1, gloo on CPU), which patches Megatron's CUDA assumptions in this process
    on a CPU machine. Under TP each rank loads its slice (call it on every rank). Unused released weights
    (``head.*``, ``packing_position_embedding``) are skipped and listed in ``KeyeVL.skipped``; any other
    missing, unexpected or misshapen weight is a ``KeyeUserError`` naming it.
    """
    path = Path(path)
    cfg = read_config(path)
    configs = hf_configs(cfg, where=str(path / "config.json"))
    hf = read_weights(path)
    unused = check_hf_names({name: tuple(t.shape) for name, t in hf.items()}, configs, str(path))
    model = build_keye_vl_model(configs, dtype)
    load_hf_into(model, hf_to_keye_state(hf, configs))
    model.eval()
    generation = path / "generation_config.json"
    generation_config = json.loads(generation.read_text()) if generation.is_file() else None
    return KeyeVL(model, cfg, {name: hf[name] for name in unused}, generation_config)


def released_extras(configs: KeyeVLConfigs) -> dict[str, torch.Tensor]:
    """Released tensors a model with these settings does not hold, as the released code initialises them (each
    part's ``hf_released_extras``: the vision tower's packing table, and its pooling head when it has none)."""
    out: dict[str, torch.Tensor] = {}
    for slot in FORMAT:
        extras = getattr(configs.cls(slot.kind), "hf_released_extras", None)
        if extras is not None:
            out.update({slot.prefix + name: t for name, t in extras(configs.config(slot.kind)).items()})
    return out


def released_hf_names(configs: KeyeVLConfigs) -> dict[str, tuple[int, ...]]:
    """Every tensor of a released checkpoint with these settings and its shape: the weights the model maps
    (`keye.hf.weights.expected_hf_shapes`) and those it never uses (:func:`released_extras`)."""
    return {**expected_hf_shapes(configs), **{name: tuple(t.shape) for name, t in released_extras(configs).items()}}


def save_keye_vl(model: nn.Module, path: str | Path, *, dtype: torch.dtype | None = None,
                 max_shard_bytes: int | None = None, include_unused: bool = True,
                 extra_config: dict | None = None) -> Path | None:
    """Write ``model`` (a :class:`KeyeVL`, or a ``KeyeVLModel`` with the Preview architecture) in the released format.

    config.json, model.safetensors (sharded with an index past ``max_shard_bytes``) and, when known,
    generation_config.json; ``extra_config`` keys go into config.json last (e.g. token ids a blueprint-built
    model does not hold: ``vision_start_token_id``). Tensors keep the model's dtype unless ``dtype`` is given.
    Collective under TP/PP: call it on every rank; global rank 0 writes and returns the path, others None.
    """
    import torch.distributed as dist

    wrapper = model if isinstance(model, KeyeVL) else None
    keye_model, base = (model.model, model.config) if wrapper else (model, None)
    configs = model.configs if wrapper else configs_of(model)
    state = gather_full_state(keye_model)
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return None
    hf = keye_to_hf_state(state, configs)
    if include_unused and wrapper is not None:
        hf.update(wrapper.unused)
    stored = dtype or next(iter(state.values())).dtype
    if include_unused:  # what neither the model nor the source held: initialised as the released code does
        hf.update({name: t.to(stored) for name, t in released_extras(configs).items() if name not in hf})
    if dtype is not None:
        hf = {name: tensor.to(dtype) for name, tensor in hf.items()}
    expected = expected_hf_shapes(configs)
    assert set(expected) <= set(hf), f"internal: not exported: {sorted(set(expected) - set(hf))[:3]}"
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = {**hf_config_dict(configs, base, stored), **(extra_config or {})}
    config["auto_map"] = remote_code_auto_map(config["auto_map"], out)  # the released code: beside it, or on the Hub
    if isinstance(config["vision_config"].get("auto_map"), dict):
        config["vision_config"]["auto_map"] = remote_code_auto_map(config["vision_config"]["auto_map"], out)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if wrapper is not None and wrapper.generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(wrapper.generation_config, indent=2) + "\n")
    for stale in [out / INDEX_NAME, *out.glob("model*.safetensors")]:
        stale.unlink(missing_ok=True)
    write_weights(hf, out, max_shard_bytes)
    if dist.is_initialized():
        dist.barrier()
    return out
