"""The step loop every training stage shares: steps, metrics, progress bar, checkpoints, resume.

A stage builds its model, engine and data stream, then hands them here with a forward-step function
and a function giving its extra metric fields. With ``run.checkpoint_every`` the full training state is
saved every N steps (`keye.train.checkpoint.save_training_state`, keeping the newest
``run.keep_checkpoints``); ``keye-launch run --resume`` restores the newest one that verifies, drops
the metrics lines logged after it, and continues with the next step.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from tqdm import tqdm

from keye.errors import KeyeUserError
from keye.train.checkpoint import load_training_state, save_training_state
from keye.train.engine import StepResult, TrainEngine


def train_steps(
    ctx: Any,
    model: Any,
    engine: TrainEngine,
    stream: Any,
    forward_step: Callable,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    fields: Callable[[StepResult, float], dict[str, Any]],
) -> tuple[StepResult | None, int]:
    """Run the stage's remaining steps; returns the last step's result and the step it resumed from."""
    stage = ctx.stage
    if ctx.blueprint.run.keep_checkpoints < 1:
        raise KeyeUserError(f"run.keep_checkpoints: {ctx.blueprint.run.keep_checkpoints}; keep at least 1")
    start = load_training_state(ctx, model, engine, stream) if ctx.resume else 0
    if ctx.resume:  # a stage killed before its first checkpoint starts again at step 1: drop its lines too
        ctx.metrics.drop_after(stage.name, start)
    every = ctx.blueprint.run.checkpoint_every
    last = None
    # closed however the loop ends, so an error is printed on a line of its own, not after the bar
    with tqdm(total=stage.steps, initial=start, desc=stage.name, disable=ctx.parallel.rank != 0, unit="step") as progress:
        for step in range(start + 1, stage.steps + 1):
            began = time.perf_counter()
            last = engine.train_step(forward_step, stream, num_microbatches, seq_length, micro_batch_size)
            seconds = time.perf_counter() - began
            ctx.metrics.log(stage=stage.name, step=step, loss=last.loss, lr=last.lr, grad_norm=last.grad_norm,
                            skipped_step=last.skipped, **fields(last, seconds))
            progress.set_postfix(loss=f"{last.loss:.4f}", lr=f"{last.lr:.2e}")
            progress.update(1)
            if every and step % every == 0 and step < stage.steps:
                save_training_state(ctx, step, model, engine, stream)
    return last, start


def stage_summary(ctx: Any, engine: TrainEngine, last: StepResult | None, *, resumed_from: int, initialised_from: Any,
                  trainable: dict[str, int], before: dict, after: dict, data: dict) -> dict[str, Any]:
    """What every training stage reports in ``summary.json`` (a stage may add its own fields)."""
    return {
        "steps": ctx.stage.steps,
        "final_loss": last.loss if last else None,
        "skipped_steps": engine.skipped_steps,
        "initialised_from": str(initialised_from) if initialised_from else "fresh",
        "resumed_from_step": resumed_from,
        "trainable_parameters": trainable,
        "eval_before": before,
        "eval_after": after,
        "data": data,
    }
