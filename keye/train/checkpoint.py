"""Resumable training state within a stage (weights handed between stages: `keye.train.stage_weights`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from keye.errors import KeyeUserError


# --- resumable training state ----------------------------------------------------------------------


def _checkpoint_root(ctx: Any) -> Path:
    return Path(ctx.output_dir) / "checkpoints"


def save_training_state(ctx: Any, step: int, model: torch.nn.Module, engine: Any, stream: Any, keep: int = 1) -> Path:
    """Everything a killed run needs to continue exactly: weights, optimiser, schedule, RNG, data position.

    One file per rank (each holds its own shards and RNG streams); with the distributed optimiser its
    parameter state goes through Megatron's own gather to the first data-parallel rank. A ``latest`` file,
    written last by rank 0 after every rank finished, marks the checkpoint complete.
    """
    from megatron.core import tensor_parallel

    parallel = ctx.parallel
    folder = _checkpoint_root(ctx) / f"step_{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items() if v is not None},
        "optimizer": engine.optimizer.state_dict(),
        "scheduler": engine.scheduler.state_dict(),
        "engine": {"bad_in_a_row": engine.bad_in_a_row, "skipped_steps": engine.skipped_steps},
        "rng": torch.get_rng_state(),
        "rng_tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "data": stream.state_dict(),
    }
    torch.save(state, folder / f"rank{parallel.rank:05d}.pt")
    if hasattr(engine.optimizer, "save_parameter_state") and engine.distributed_optimizer:
        engine.optimizer.save_parameter_state(str(folder / f"optimizer_tp{parallel.tp_rank:02d}_pp{parallel.pp_rank:02d}.pt"))
    if dist.is_initialized():
        dist.barrier()
    if parallel.rank == 0:
        (_checkpoint_root(ctx) / "latest").write_text(f"{folder.name}\n")
        older = sorted(p for p in _checkpoint_root(ctx).glob("step_*") if p != folder)
        for stale in older[: max(0, len(older) - (keep - 1))]:
            for file in stale.iterdir():
                file.unlink()
            stale.rmdir()
    if dist.is_initialized():
        dist.barrier()
    return folder


def latest_checkpoint(ctx: Any) -> Path | None:
    marker = _checkpoint_root(ctx) / "latest"
    if not marker.is_file():
        return None
    folder = _checkpoint_root(ctx) / marker.read_text().strip()
    return folder if folder.is_dir() else None


def _load_distributed_optimizer_state(optimizer: Any, path: Path) -> None:
    """Megatron's ``load_parameter_state``, with two bridges for its plain-PyTorch Adam path (no apex/TE).

    It copies into views of the main parameters in place (needs no_grad), and it expects only param /
    exp_avg / exp_avg_sq per parameter, while torch's Adam also keeps a per-parameter ``step`` (restored
    already by ``load_state_dict``): set ``step`` aside during the copy. And ``load_state_dict`` gives every
    parameter the *same* step tensor, which torch's Adam then increments in place once per parameter,
    corrupting the bias correction: give each parameter its own copy.
    """
    inner = [chained.optimizer for chained in getattr(optimizer, "chained_optimizers", [optimizer])]
    steps = [(state, state.pop("step")) for opt in inner for state in opt.state.values() if "step" in state]
    try:
        with torch.no_grad():
            optimizer.load_parameter_state(str(path))
    finally:
        for state, step in steps:
            state["step"] = step.clone()


def load_training_state(ctx: Any, model: torch.nn.Module, engine: Any, stream: Any) -> int:
    """Restore the latest complete checkpoint of this stage; returns its step (0 when there is none)."""
    from megatron.core import tensor_parallel

    folder = latest_checkpoint(ctx)
    if folder is None:
        return 0
    parallel = ctx.parallel
    path = folder / f"rank{parallel.rank:05d}.pt"
    if not path.is_file():
        raise KeyeUserError(f"{folder}: no state for rank {parallel.rank}; resume with the layout the run was saved with")
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"], strict=False)
    engine.optimizer.load_state_dict(state["optimizer"])
    if engine.distributed_optimizer:
        _load_distributed_optimizer_state(
            engine.optimizer, folder / f"optimizer_tp{parallel.tp_rank:02d}_pp{parallel.pp_rank:02d}.pt"
        )
    engine.scheduler.num_steps = 0  # Megatron's load adds the saved count to the current one
    engine.scheduler.load_state_dict(state["scheduler"])
    engine.bad_in_a_row = state["engine"]["bad_in_a_row"]
    engine.skipped_steps = state["engine"]["skipped_steps"]
    torch.set_rng_state(state["rng"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker"])
    stream.load_state_dict(state["data"])
    return int(state["step"])
