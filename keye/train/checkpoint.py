"""Resumable training state within a stage (weights handed between stages: `keye.train.stage_weights`).

A checkpoint is one Megatron-Core distributed checkpoint (`keye.parallel.dist_checkpoint`) holding
everything a killed run needs to continue exactly:

- ``model``: the weights with per-layer extra state, as global tensors;
- ``optimizer``: Megatron's own sharded optimizer state (Adam moments per parameter as global tensors;
  the distributed optimizer in its ``fully_reshardable`` format), so it is not tied to the layout either;
- ``rng``: this rank's CPU and model-parallel RNG states, one object per (pipeline, tensor, data) rank;
- ``data``: the data stream's position, one object per data-parallel rank (its tensor/pipeline ranks
  read the same samples);
- common values (written once): the step, the LR schedule, the non-finite guard's counters, the layout.

Checkpoints are ``<stage>/checkpoints/step_<N>/``, each published atomically with a manifest of its
files' sizes and checksums (`keye.parallel.checkpoint_folder`); the newest ``run.keep_checkpoints``
stay. ``latest`` names the newest one (rewritten atomically after each publish). ``--resume`` takes the
newest checkpoint that verifies: one that is truncated, corrupted or unsafe to read, or a ``latest``
that names nothing, is said in one line naming it and the one used instead; when checkpoints exist
but none verifies, resuming is a one-line error, never a silent restart from step 0. A run killed while
saving leaves only a ``.step_<N>.partial`` folder, which is removed.

Resuming in another tensor/pipeline layout works (model, optimiser, schedule and data position reshard;
the RNG streams and per-layer extra state such as FP8 scaling history cannot, so they restart, which is
said on the terminal). The data-parallel size must stay
the same, because the data position is per data-parallel rank.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from keye.errors import KeyeUserError
from keye.parallel import checkpoint_folder
from keye.parallel.dist_checkpoint import load, load_common, load_model_state, model_state, save, tensors_only

#: Megatron's layout-independent format for the distributed optimizer's state.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


#: A published checkpoint's folder name.
STEP_FOLDER = re.compile(r"step_(\d+)")


def _checkpoint_root(ctx: Any) -> Path:
    return Path(ctx.output_dir) / "checkpoints"


def _published(root: Path) -> list[Path]:
    """The published checkpoints under ``root``, newest first."""
    found = [p for p in root.glob("step_*") if p.is_dir() and STEP_FOLDER.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(STEP_FOLDER.fullmatch(p.name).group(1)), reverse=True)


def _layout(parallel: Any) -> dict[str, int]:
    return {"tensor": parallel.tp_size, "pipeline": parallel.pp_size, "data": parallel.dp_size}


def _rng_object(parallel: Any, state: Any = None) -> Any:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", state, (parallel.pp_size, parallel.tp_size, parallel.dp_size),
                         (parallel.pp_rank, parallel.tp_rank, parallel.dp_rank), replica_id=0)


def _data_object(parallel: Any, state: Any = None) -> Any:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("data_position", state, (parallel.dp_size,), (parallel.dp_rank,),
                         replica_id=(parallel.pp_rank, parallel.tp_rank))


def _sharded_training_state(model: torch.nn.Module, engine: Any, is_loading: bool) -> dict[str, Any]:
    state = model_state(model)  # per chunk for an interleaved pipeline's list of chunks
    optimizer = engine.optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    return {"model": state, "optimizer": optimizer}


def _give_fresh_optimizer_state(optimizer: Any) -> None:
    """Megatron's distributed optimizer describes its sharded state from its existing Adam state, which a
    freshly built optimizer (resuming before its first step) does not have yet. Megatron's own placeholder
    state (one step on zero gradients) gives it the right structure; loading then overwrites all of it,
    the fp32 main parameters included."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(inner, "_init_optimizer_states_with_dummy_values") and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def _load_optimizer_state(optimizer: Any, state: Any) -> None:
    """Megatron's ``load_state_dict``, with two bridges for the distributed optimizer on its plain-PyTorch
    Adam path (no apex/TE; both are no-ops where they do not apply).

    Megatron gives every parameter the *same* ``step`` tensor, which torch's Adam then increments in place
    once per parameter, corrupting the bias correction: each parameter gets its own copy. And it copies the
    saved moments into every entry of a parameter's Adam state, torch's ``step`` included, which the saved
    state does not have: ``step`` is set aside during that copy (it was restored just before).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    states = [state] if len(inner) == 1 else [state[index] for index in sorted(state)]
    for opt, opt_state in zip(inner, states):
        param_state = opt_state.pop("param_state", None) if isinstance(opt, DistributedOptimizer) else None
        opt_state.pop("param_state_sharding_type", None)
        opt.load_state_dict(opt_state)
        steps = [(entry, entry.pop("step")) for entry in opt.optimizer.state.values() if "step" in entry]
        try:
            if param_state is not None:
                with torch.no_grad():
                    opt.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for entry, step in steps:
                entry["step"] = step.clone()


def save_training_state(ctx: Any, step: int, model: torch.nn.Module, engine: Any, stream: Any) -> Path:
    """Write and publish the checkpoint of ``step`` (every rank), point ``latest`` at it, and keep the
    newest ``run.keep_checkpoints``."""
    from megatron.core import tensor_parallel

    parallel = ctx.parallel
    root = _checkpoint_root(ctx)
    folder = root / f"step_{step:08d}"
    state = _sharded_training_state(model, engine, is_loading=False)
    rng = {"cpu": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    state.update(
        rng=_rng_object(parallel, rng),
        data=_data_object(parallel, stream.state_dict()),
        step=step,
        scheduler=engine.scheduler.state_dict(),
        engine={"bad_in_a_row": engine.bad_in_a_row, "skipped_steps": engine.skipped_steps},
        layout=_layout(parallel),
    )
    if parallel.rank == 0:  # what a run killed while writing left behind
        for partial in root.glob(f".step_*{checkpoint_folder.PARTIAL_SUFFIX}"):
            shutil.rmtree(partial, ignore_errors=True)
    save(state, folder)
    if parallel.rank == 0:
        try:
            checkpoint_folder.write_text_atomically(root / "latest", f"{folder.name}\n")
        except OSError as exc:  # --resume finds the newest valid checkpoint without it
            raise checkpoint_folder.CheckpointWriteError(f"{root / 'latest'}: cannot be written ({exc.strerror})") from None
        # Newer ones are from an attempt this run resumed before (they failed to verify); of the rest,
        # the newest `keep` stay.
        published = _published(root)
        position = published.index(folder)
        for stale in published[:position] + published[position + ctx.blueprint.run.keep_checkpoints:]:
            shutil.rmtree(stale)
    dist.barrier()
    return folder


def _choose_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under ``root`` that verifies, and one line for each one passed over."""
    latest = root / "latest"
    named = latest.read_text(errors="replace").strip() if latest.is_file() else None
    published = _published(root)
    rejected = []
    if named is not None and root / named not in published:
        rejected.append(f"{latest} names '{named}', which is not a checkpoint there")
    for folder in published:
        try:
            checkpoint_folder.verify(folder, require_manifest=True)
        except checkpoint_folder.CheckpointError as exc:
            rejected.append(f"{folder} is not usable: {exc}")
            continue
        return folder, [f"keye: {line}; resuming from {folder} instead" for line in rejected]
    if rejected or published:
        raise KeyeUserError(f"--resume: no usable checkpoint in {root}: {'; '.join(rejected)}")
    return None, []


def resume_checkpoint(ctx: Any) -> Path | None:
    """The checkpoint ``--resume`` continues from (None: the stage has none yet), the same on every rank:
    rank 0 chooses and says why it passed any over; an error is raised on every rank alike."""
    root = _checkpoint_root(ctx)
    choice: list[Any] = [None]
    if ctx.parallel.rank == 0:
        try:
            folder, notes = _choose_checkpoint(root)
            for note in notes:
                print(note, flush=True)
            choice[0] = ("ok", folder)
        except KeyeUserError as exc:
            choice[0] = ("error", str(exc))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    status, value = choice[0]
    if status == "error":
        raise KeyeUserError(value)
    return value


def load_training_state(ctx: Any, model: torch.nn.Module, engine: Any, stream: Any) -> int:
    """Restore this stage's newest checkpoint that verifies (`resume_checkpoint`); returns its step (0 when
    the stage has none yet)."""
    from megatron.core import tensor_parallel

    folder = resume_checkpoint(ctx)
    if folder is None:
        return 0
    parallel = ctx.parallel
    common = load_common(folder)
    saved_layout, layout = common["layout"], _layout(parallel)
    if saved_layout["data"] != layout["data"]:
        raise KeyeUserError(f"{folder}: saved with data-parallel size {saved_layout['data']}, resumed with "
                            f"{layout['data']}; resume with the same data-parallel size")
    same_layout = saved_layout == layout
    _give_fresh_optimizer_state(engine.optimizer)
    template = _sharded_training_state(model, engine, is_loading=True)
    template["data"] = _data_object(parallel)
    if same_layout:
        template["rng"] = _rng_object(parallel)
    else:  # per-layer extra state (TE's FP8 history) is kept per TP shard: it restarts, like the RNG
        template["model"] = tensors_only(template["model"])
    state = load(template, folder)  # a tensor missing from the checkpoint fails here

    load_model_state(model, state["model"], strict=same_layout)
    _load_optimizer_state(engine.optimizer, state["optimizer"])
    engine.scheduler.num_steps = 0  # Megatron's load adds the saved count to the current one
    engine.scheduler.load_state_dict(state["scheduler"])
    engine.bad_in_a_row = state["engine"]["bad_in_a_row"]
    engine.skipped_steps = state["engine"]["skipped_steps"]
    stream.load_state_dict(state["data"])
    if same_layout:
        torch.set_rng_state(state["rng"]["cpu"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["rng"]["tracker"])
    elif parallel.rank == 0:
        print(f"keye: {folder} was saved with layout {saved_layout}, resuming with {layout}: "
              "weights, optimiser, schedule and data position restored; random streams (and FP8 scaling "
              "history) restart")
    return int(state["step"])
