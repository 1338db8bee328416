"""Handing weights from one stage to the next, in any tensor/pipeline layout.

Each stage writes its weights to ``<run.output_dir>/<stage>/weights/tp<T>_pp<P>.pt``, one file per
tensor and pipeline rank (data-parallel replicas are equal: only data-parallel rank 0 writes), keyed by
*global* parameter names (pipeline stages renumber their layers from 0; the files do not) and with each
tensor's tensor-parallel split (``partition_dim``, ``partition_stride``). The next stage starts from the
previous stage's folder, or from ``stages[i].init_from`` (an earlier stage's name, or a folder).

Loading into the same layout reads one file. Loading into another layout reshards: every rank rebuilds,
one tensor at a time, each full tensor it needs from the old shards and keeps its own slice, so no process
ever holds the whole model. Stages hold different module sets (stage 0: vision + text towers; later:
vision + projector + LLM), so loading goes by top-level module: a module in both must match exactly;
the others are left as they are.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from keye.errors import KeyeUserError
from keye.parallel.init import global_name, tp_slice

_FILE = re.compile(r"tp(\d+)_pp(\d+)\.pt$")


def weights_file(folder: Path, parallel: Any) -> Path:
    return Path(folder) / "weights" / f"tp{parallel.tp_rank:02d}_pp{parallel.pp_rank:02d}.pt"


def _split(model: torch.nn.Module, name: str) -> tuple[int, int] | None:
    """(partition_dim, stride) of a tensor-parallel parameter, None for a replicated tensor."""
    try:
        param = model.get_parameter(name)
    except AttributeError:
        return None  # a buffer
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return int(param.partition_dim), int(getattr(param, "partition_stride", 1))


def save_stage_weights(model: torch.nn.Module, ctx: Any) -> Path:
    parallel = ctx.parallel
    path = weights_file(ctx.output_dir, parallel)
    if parallel.dp_rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        state, splits = {}, {}
        for name, tensor in model.state_dict().items():
            if tensor is None:
                continue
            key = global_name(model, name)
            state[key] = tensor.detach().cpu()
            splits[key] = _split(model, name)
        torch.save({"layout": (parallel.tp_size, parallel.pp_size), "model": state, "splits": splits}, path)
    if dist.is_initialized():
        dist.barrier()
    return path


def _source_folder(ctx: Any) -> tuple[Path | None, bool]:
    source = ctx.stage.init_from or ctx.previous_output
    if source is None:
        return None, False
    explicit = bool(ctx.stage.init_from)
    if explicit and "/" not in str(source):
        return Path(ctx.blueprint.run.output_dir) / str(source), True
    return Path(source), explicit


def _full_tensor(shards: list[torch.Tensor], split: tuple[int, int] | None) -> torch.Tensor:
    """The unsharded tensor from the old TP ranks' slices (the inverse of `tp_slice`)."""
    if split is None or len(shards) == 1:
        return shards[0]
    dim, stride = split
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]  # [tp rank][stride piece]
    return torch.cat([pieces[rank][k] for k in range(stride) for rank in range(len(shards))], dim=dim)


def _resharded(folder: Path, wanted: set[str], parallel: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """Full tensors of ``wanted`` global names from another layout's files, sliced for this rank later."""
    files = {}
    for path in (folder / "weights").glob("tp*_pp*.pt"):
        tp, pp = map(int, _FILE.search(path.name).groups())
        files[(tp, pp)] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not files:
        raise KeyeUserError(f"{folder}/weights: no weight files")
    tp_size = max(tp for tp, _ in files) + 1
    where: dict[str, int] = {}
    for (tp, pp), saved in files.items():
        if tp == 0:
            for name in saved["model"]:
                where[name] = pp
    full, splits = {}, {}
    for name in wanted & set(where):
        pp = where[name]
        split = files[(0, pp)]["splits"].get(name)
        full[name] = _full_tensor([files[(tp, pp)]["model"][name] for tp in range(tp_size)], split)
        splits[name] = split
    return full, splits


def load_stage_weights(model: torch.nn.Module, ctx: Any) -> Path | None:
    """Load the previous stage's weights (or ``init_from``); a stage with none starts fresh (returns None)."""
    folder, explicit = _source_folder(ctx)
    if folder is None:
        return None
    if not (folder / "weights").is_dir():
        if explicit:
            raise KeyeUserError(f"stages.{ctx.index}.init_from: no weights at {folder / 'weights'}")
        return None  # the previous stage did not run here (e.g. --stage): start fresh, said in the summary
    return load_weights_from(model, folder, ctx.parallel)


def load_weights_from(model: torch.nn.Module, folder: Path, parallel: Any) -> Path:
    """Load a stage folder's weights into ``model`` in this process's layout (resharding if it differs)."""
    folder = Path(folder)
    path = weights_file(folder, parallel)
    local = {global_name(model, name): name for name, tensor in model.state_dict().items() if tensor is not None}
    same_layout = path.is_file() and tuple(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["layout"]) == (
        parallel.tp_size, parallel.pp_size)
    if same_layout:
        saved = torch.load(path, map_location="cpu", weights_only=True)["model"]
    else:
        full, _ = _resharded(folder, set(local), parallel)
        saved = {}
        for name, tensor in full.items():
            param = _param_or_none(model, local[name])
            saved[name] = tensor if param is None else tp_slice(tensor, param, parallel.tp_rank, parallel.tp_size)
    _load_shared_modules(model, saved, local, folder)
    return path if same_layout else folder / "weights"


def _param_or_none(model: torch.nn.Module, name: str):
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def _module(name: str) -> str:
    return name.split(".", 1)[0]


def _load_shared_modules(model: torch.nn.Module, saved: dict[str, torch.Tensor], local: dict[str, str], folder: Path) -> None:
    """Load the top-level modules this model and the saved weights share; each must match exactly."""
    shared = {_module(n) for n in saved} & {_module(n) for n in local}
    missing = sorted(n for n in local if _module(n) in shared and n not in saved)
    unexpected = sorted(n for n in saved if _module(n) in shared and n not in local)
    if missing or unexpected:
        raise KeyeUserError(f"{folder}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    state = {local[n]: tensor for n, tensor in saved.items() if _module(n) in shared}
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(model.state_dict()[name].shape):
            raise KeyeUserError(f"{folder}: '{name}' has shape {tuple(tensor.shape)}, the model wants "
                                f"{tuple(model.state_dict()[name].shape)}")
    model.load_state_dict(state, strict=False)
