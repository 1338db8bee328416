"""Handing weights from one stage to the next, in any tensor/pipeline/data-parallel layout.

Each stage writes its weights to ``<run.output_dir>/<stage>/weights/`` as a Megatron-Core distributed
checkpoint (`keye.parallel.dist_checkpoint`): every tensor under its *global* name (pipeline stages
renumber their layers from 0; the checkpoint does not) with the offsets of each rank's shard. Weights
only: per-layer extra state (TE's FP8 scaling history) starts afresh in each stage. ``keye-launch convert
hf-to-megatron`` writes the same ``weights/`` folder, so a converted checkpoint is a stage folder to start
from. The next stage starts from the previous stage's folder, or as ``stages[i].init_from`` says, module
by module: an earlier stage, a weights folder, a Hugging Face directory or fresh (`keye.train.init_plan`
reads it; Hugging Face directories load through `keye.hf.sources`).

Loading reads, on every rank, only this rank's slices, whatever layout wrote them: Megatron's loader
reshards, so no process ever holds the whole model. Stages hold different module sets (stage 0: vision +
text towers; later: vision + projector + LLM), so loading goes by top-level module: a module in both
must match exactly (names and global shapes, checked before anything is read); the others are left as
they are.

The folder is published atomically and verified before it is read (`keye.parallel.checkpoint_folder`):
a truncated, corrupted or crafted weights folder is one line naming the file, never a traceback or
code run by unpickling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from keye.errors import KeyeUserError
from keye.parallel.dist_checkpoint import (
    is_checkpoint,
    load,
    load_model_state,
    model_chunks,
    model_state,
    save,
    saved_tensors,
    sharded_state_dict,
    tensors_only,
)


def weights_folder(stage_dir: Path) -> Path:
    return Path(stage_dir) / "weights"


def save_stage_weights(model: torch.nn.Module | list[torch.nn.Module], ctx: Any) -> Path:
    """Publish the stage's weights (atomically: `keye.parallel.dist_checkpoint.save`); ``model`` may be the
    list of an interleaved pipeline's chunks (the files are the same: global names)."""
    folder = weights_folder(ctx.output_dir)
    save(tensors_only(model_state(model)), folder)
    return folder


def load_stage_weights(model: torch.nn.Module | list[torch.nn.Module], ctx: Any) -> Path | str | None:
    """Load the stage's starting weights as ``init_from`` says (`keye.train.init_plan`); collective.

    Returns what the summary reports: the weights folder when the whole model came from one (the usual
    chain), else ``module=source`` for each module loaded or named fresh; None when nothing was loaded.
    """
    from keye.train.init_plan import plan

    init_from = ctx.stage.init_from
    sources = plan(init_from, ctx.index, ctx.blueprint.run.output_dir, ctx.previous_output)
    held = None if init_from is None else _all_ranks(_modules(model))
    origins: dict[str, str] = {}
    for source in sources:
        origins.update(_load_source(model, source, held))
    if not origins:
        return None
    folders = set(origins.values())
    if not isinstance(init_from, DictConfig | dict) and len(folders) == 1 and sources[0].path is not None:
        return Path(folders.pop())  # one folder for everything, as the usual chain
    return ", ".join(f"{module}={origin}" for module, origin in sorted(origins.items()))


def _modules(model: torch.nn.Module | list[torch.nn.Module]) -> set[str]:
    """The top-level modules with parameters on this rank."""
    return {name.split(".", 1)[0] for chunk in model_chunks(model) for name, _ in chunk.named_parameters()}


def _load_source(model: Any, source: Any, held: set[str] | None) -> dict[str, str]:
    """Load one `keye.train.init_plan.Source` into ``model``; {module: where it came from}."""
    from keye.train.init_plan import HF, folder_kind

    if held is not None:
        absent = [module for module in source.modules or () if module not in held]
        if absent:
            raise KeyeUserError(f"{source.key}: this stage's model has no {absent[0]} (it has {', '.join(sorted(held))})")
    if source.path is None:
        return dict.fromkeys(source.modules or (), "fresh")
    if not source.explicit and not is_checkpoint(weights_folder(source.path)):
        return {}  # the previous stage did not run here (e.g. --stage): start fresh, said in the summary
    if source.earlier_stage and not is_checkpoint(weights_folder(source.path)):
        raise KeyeUserError(f"{source.key}: no weights at {weights_folder(source.path)} (that stage has not run here)")
    if source.explicit and folder_kind(source.path, source.key) == HF:
        return _load_hf(model, source, held)
    folder = weights_folder(source.path)
    saved = {_module(key) for key in saved_tensors(folder)}
    for module in source.modules or ():
        if module not in saved:
            raise KeyeUserError(f"{source.key}: {folder} holds no {module} (it holds {', '.join(sorted(saved))})")
    chosen = set(source.modules) if source.modules else saved - set(source.exclude)
    if held is not None:
        chosen &= held
    if not chosen:
        return {}
    state = load(shared_module_state(model, folder, chosen), folder)
    load_model_state(model, state, strict=False)
    return dict.fromkeys(sorted(chosen), str(folder))


def _load_hf(model: Any, source: Any, held: set[str]) -> dict[str, str]:
    """Each module the source names (or, for the whole model, every module both have) from a Hugging Face
    directory; each rank loads what it holds (not collective)."""
    from keye.hf.sources import load_module, open_hf_directory

    directory = open_hf_directory(source.path, source.key)
    modules = source.modules or tuple(m for m in directory.modules if m in held)
    if not modules:
        raise KeyeUserError(f"{source.key}: {source.path} (model_type {directory.model_type!r}) holds none of this "
                            f"stage's modules ({', '.join(sorted(held))}); it holds {', '.join(directory.modules)}")
    for module in modules:
        load_module(model, directory, module, source.key)
    return dict.fromkeys(modules, str(source.path))


def _module(key: str) -> str:
    return key.split(".", 1)[0]


def _all_ranks(keys: set[str]) -> set[str]:
    """The union of every rank's keys (a pipeline stage holds only its own part of the model)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return keys
    gathered: list[set[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, keys)
    return set().union(*gathered)


def shared_module_state(model: torch.nn.Module | list[torch.nn.Module], folder: Path,
                        modules: set[str] | None = None) -> dict[str, Any]:
    """The part of ``model``'s sharded state dict that a checkpoint holds: the top-level modules both have
    (only those of ``modules``, when given), per chunk as `keye.parallel.dist_checkpoint.model_state` nests
    them for a list of chunks.

    Each shared module must match exactly (over all ranks and chunks together); a mismatch is one line
    naming the first differing tensors.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = saved_tensors(folder)
    saved_modules = {_module(k) for k in saved}
    if modules is not None:
        saved_modules &= modules
    per_chunk = [{name: sh for name, sh in tensors_only(sharded_state_dict(chunk)).items() if _module(sh.key) in saved_modules}
                 for chunk in model_chunks(model)]
    wanted = {f"{index}.{name}": sh for index, chunk in enumerate(per_chunk) for name, sh in chunk.items()}
    keys = _all_ranks({sh.key for sh in wanted.values()})
    missing = sorted(keys - set(saved))
    shared_modules = {_module(key) for key in keys}
    unexpected = sorted(k for k in saved if _module(k) in shared_modules and k not in keys)
    if missing or unexpected:
        raise KeyeUserError(f"{folder}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for sh in wanted.values():
        if isinstance(sh, ShardedTensor) and tuple(saved[sh.key].global_shape) != tuple(sh.global_shape):
            raise KeyeUserError(f"{folder}: '{sh.key}' has shape {tuple(saved[sh.key].global_shape)}, the model "
                                f"wants {tuple(sh.global_shape)}")
    return per_chunk[0] if len(per_chunk) == 1 else {f"chunk{index}": chunk for index, chunk in enumerate(per_chunk)}


def load_weights_from(model: torch.nn.Module | list[torch.nn.Module], stage_dir: Path) -> Path:
    """Load a stage folder's weights into ``model`` in this process's layout (resharding if it differs)."""
    folder = weights_folder(stage_dir)
    if not is_checkpoint(folder):
        raise KeyeUserError(f"{folder}: no weights (a stage's weights/ folder with metadata.json)")
    state = load(shared_module_state(model, folder), folder)
    load_model_state(model, state, strict=False)
    return folder
