"""Handing weights from one stage to the next, in any tensor/pipeline/data-parallel layout.

Each stage writes its weights to ``<run.output_dir>/<stage>/weights/`` as a Megatron-Core distributed
checkpoint (`keye.parallel.dist_checkpoint`): every tensor under its *global* name (pipeline stages
renumber their layers from 0; the checkpoint does not) with the offsets of each rank's shard. Weights
only: per-layer extra state (TE's FP8 scaling history) starts afresh in each stage. The next
stage starts from the previous stage's folder, or from ``stages[i].init_from`` (an earlier stage's name,
or a folder).

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


def _source_folder(ctx: Any) -> tuple[Path | None, bool]:
    source = ctx.stage.init_from or ctx.previous_output
    if source is None:
        return None, False
    explicit = bool(ctx.stage.init_from)
    if explicit and "/" not in str(source):
        return Path(ctx.blueprint.run.output_dir) / str(source), True
    return Path(source), explicit


def load_stage_weights(model: torch.nn.Module | list[torch.nn.Module], ctx: Any) -> Path | None:
    """Load the previous stage's weights (or ``init_from``); a stage with none starts fresh (returns None)."""
    stage_dir, explicit = _source_folder(ctx)
    if stage_dir is None:
        return None
    if not is_checkpoint(weights_folder(stage_dir)):
        if explicit:
            raise KeyeUserError(f"stages.{ctx.index}.init_from: no weights at {weights_folder(stage_dir)}")
        return None  # the previous stage did not run here (e.g. --stage): start fresh, said in the summary
    return load_weights_from(model, stage_dir)


def _module(key: str) -> str:
    return key.split(".", 1)[0]


def _all_ranks(keys: set[str]) -> set[str]:
    """The union of every rank's keys (a pipeline stage holds only its own part of the model)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return keys
    gathered: list[set[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, keys)
    return set().union(*gathered)


def shared_module_state(model: torch.nn.Module | list[torch.nn.Module], folder: Path) -> dict[str, Any]:
    """The part of ``model``'s sharded state dict that a checkpoint holds: the top-level modules both have
    (per chunk, as `keye.parallel.dist_checkpoint.model_state` nests them, for a list of chunks).

    Each shared module must match exactly (over all ranks and chunks together); a mismatch is one line
    naming the first differing tensors.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = saved_tensors(folder)
    saved_modules = {_module(k) for k in saved}
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
