"""Handing weights from one stage to the next.

Each stage writes its model weights to ``<run.output_dir>/<stage>/weights/`` (one file per tensor and
pipeline rank: the same layout reads them back) and the next stage starts from the previous stage's
folder, or from ``stages[i].init_from`` (an earlier stage's name, or a folder path). Data-parallel replicas hold equal weights, so only
data-parallel rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from keye.errors import KeyeUserError


def weights_file(folder: Path, parallel: Any) -> Path:
    return Path(folder) / "weights" / f"tp{parallel.tp_rank:02d}_pp{parallel.pp_rank:02d}.pt"


def save_stage_weights(model: torch.nn.Module, ctx: Any) -> Path:
    path = weights_file(ctx.output_dir, ctx.parallel)
    if ctx.parallel.dp_rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items() if tensor is not None}
        torch.save({"layout": (ctx.parallel.tp_size, ctx.parallel.pp_size), "model": state}, path)
    if dist.is_initialized():
        dist.barrier()
    return path


def load_stage_weights(model: torch.nn.Module, ctx: Any) -> Path | None:
    """Load ``init_from`` (or the previous stage's weights) into the modules the two models share.

    Stages hold different module sets (stage 0: vision + text towers; later: vision + projector + LLM),
    so loading goes module by module: a top-level module present in both must match exactly; modules only
    the checkpoint has are left out and modules only this model has keep their initialisation, and the
    returned summary says which. A stage with no earlier weights starts fresh.
    """
    source = ctx.stage.init_from or ctx.previous_output
    if source is None:
        return None
    named_stage = Path(ctx.blueprint.run.output_dir) / str(source)
    folder = named_stage if ctx.stage.init_from and "/" not in str(source) else Path(source)
    path = weights_file(folder, ctx.parallel)
    if not path.is_file():
        if ctx.stage.init_from:
            raise KeyeUserError(f"stages.{ctx.index}.init_from: no weights for this layout at {path}")
        return None  # the previous stage did not run here (e.g. --stage): start fresh, said in the summary
    saved = torch.load(path, map_location="cpu", weights_only=True)
    layout = (ctx.parallel.tp_size, ctx.parallel.pp_size)
    if tuple(saved["layout"]) != layout:
        raise KeyeUserError(f"{path}: saved with (tensor, pipeline) = {tuple(saved['layout'])}, this run uses {layout}")
    ours = {name for name, tensor in model.state_dict().items() if tensor is not None}
    shared = {name.split(".", 1)[0] for name in saved["model"]} & {name.split(".", 1)[0] for name in ours}
    state = {name: tensor for name, tensor in saved["model"].items() if name.split(".", 1)[0] in shared}
    missing = sorted(name for name in ours - set(state) if name.split(".", 1)[0] in shared)
    unexpected = sorted(set(state) - ours)
    if missing or unexpected:
        raise KeyeUserError(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict(state, strict=False)
    return path
