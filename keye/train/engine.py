"""One optimiser step on Megatron-Core: DDP, the pipeline schedule, gradient finalisation, a guard.

``TrainEngine`` wraps the model chunks in Megatron's DistributedDataParallel, builds the optimiser and
schedule (`keye.train.optim`), and runs ``get_forward_backward_func()`` over the micro-batches of a step
(1F1B when PP > 1, interleaved when there are several model chunks: one per virtual pipeline stage,
each fed the same micro-batches). A step whose loss or gradient norm is not finite is skipped (no
update, counted); too many in a row stop the run with a clear message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from keye.parallel.fp8 import fp8_context
from keye.train.optim import build_optimizer, build_scheduler


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    extras: dict[str, float]


#: What a loss function reports per micro-batch (sums, so micro-batches and ranks add up exactly).
REPORTED = ("loss_sum", "tokens", "correct", "answers")


def _sum_over_pipeline_and_data(values: torch.Tensor, is_last_stage: bool) -> torch.Tensor:
    """Sums computed on the last pipeline stage, added over data-parallel ranks, on every rank."""
    from megatron.core import parallel_state as mpu

    values = values if is_last_stage else torch.zeros_like(values)
    if mpu.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(values, group=mpu.get_pipeline_model_parallel_group())
    if mpu.get_data_parallel_world_size() > 1:
        dist.all_reduce(values, group=mpu.get_data_parallel_group())
    return values


def schedule_data(chunks: Sequence[torch.nn.Module], batches: list, forward_only: bool = False) -> tuple[Any, int]:
    """The data iterator(s) and micro-batch count to give Megatron's schedule for ``batches`` on ``chunks``.

    One chunk: an iterator over ``batches``. Several (an interleaved pipeline): Megatron's interleaved schedule
    reads one iterator per model chunk, each micro-batch once per chunk (the first chunk for its inputs, the last
    for its labels), so the batches are handed to every chunk. It runs micro-batches in groups of
    ``microbatch_group_size_per_vp_stage`` (default: the pipeline size), a count that must not leave a smaller
    remainder; a step (a held-out pass) whose count is not a multiple of it runs as one group, which is as
    correct, only less overlapped. It needs at least ``pipeline`` micro-batches: a training step with fewer is
    one line; a ``forward_only`` pass with fewer runs its last batch again to make up the count, and the caller
    keeps the first ``len(batches)`` outputs (a pass over a few held-out batches, a step's few rollout packs).
    """
    from megatron.core import parallel_state as mpu

    if len(chunks) == 1:
        return iter(batches), len(batches)
    pipeline = mpu.get_pipeline_model_parallel_world_size()
    if len(batches) < pipeline:
        if not forward_only or not batches:
            from keye.errors import KeyeUserError

            raise KeyeUserError(f"parallel.virtual_pipeline: {len(batches)} micro-batches in a step (or held-out "
                                f"pass) but the interleaved pipeline needs at least parallel.pipeline = {pipeline}")
        batches = batches + [batches[-1]] * (pipeline - len(batches))
    count = len(batches)
    chunks[0].config.microbatch_group_size_per_vp_stage = pipeline if count % pipeline == 0 else count
    return [iter(batches) for _ in chunks], count


class TrainEngine:
    def __init__(
        self,
        chunks: Sequence[torch.nn.Module],
        stage: Any,
        dtype: torch.dtype = torch.float32,
        *,
        max_bad_steps: int = 5,
        precision: Any = None,
    ) -> None:
        from megatron.core import parallel_state as mpu
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        config = chunks[0].config  # the schedule's; each chunk's DDP reads its own
        for chunk in chunks:
            # Losses report (sum, token count); Megatron divides gradients by the global token count, so the
            # update is the same token-mean for any micro-batch split or data-parallel size. DDP reads this.
            chunk.config.calculate_per_token_loss = True
        distributed_optimizer = mpu.get_data_parallel_world_size() > 1
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer
        )
        self.distributed_optimizer = distributed_optimizer
        self.chunks = [DistributedDataParallel(chunk.config, ddp_config, chunk) for chunk in chunks]
        config.finalize_model_grads_func = finalize_model_grads  # DP all-reduce, TP sums of norm grads
        config.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 else self.chunks[0].no_sync
        self.config = config
        self.clip_grad = stage.optimizer.clip_grad
        self.optimizer = self.scheduler = None  # an evaluation-only stage (no steps) needs neither
        if stage.steps > 0:
            trainable = torch.tensor([sum(p.requires_grad for chunk in chunks for p in chunk.parameters())])
            if dist.is_initialized():
                dist.all_reduce(trainable)  # a pipeline stage may hold none of the trained modules
            if int(trainable) == 0:
                from keye.errors import KeyeUserError

                raise KeyeUserError(f"stage '{stage.name}': {stage.steps} steps but nothing to train (stages.*.train)")
            self.optimizer = build_optimizer(self.chunks, stage.optimizer, dtype, distributed=distributed_optimizer)
            self.scheduler = build_scheduler(self.optimizer, stage.optimizer, stage.schedule, stage.steps)
        self.max_bad_steps = max_bad_steps
        self.precision = precision
        self.bad_in_a_row = 0
        self.skipped_steps = 0
        self.is_last_stage = mpu.is_pipeline_last_stage()

    def train_step(
        self,
        forward_step: Callable[[Iterator, torch.nn.Module], Any],
        data: Iterator | list[Iterator],
        num_microbatches: int,
        seq_length: int,
        micro_batch_size: int,
    ) -> StepResult:
        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._schedule(forward_step, data, num_microbatches, seq_length, micro_batch_size)
        metrics = self._mean_metrics(outputs)
        loss = metrics.pop("loss")
        found_inf = self.optimizer.prepare_grads()
        grad_norm = self.optimizer.clip_grad_norm(self.clip_grad) if self.clip_grad > 0 else self.optimizer.get_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        finite = (not found_inf) and math.isfinite(grad_norm) and math.isfinite(loss)
        lr = self.optimizer.param_groups[0]["lr"]
        if finite:
            self.optimizer.step_with_ready_grads()
            self.scheduler.step(1)
            self.bad_in_a_row = 0
        else:
            self.bad_in_a_row += 1
            self.skipped_steps += 1
            if self.bad_in_a_row > self.max_bad_steps:
                raise NonFiniteLossError(
                    f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient "
                    f"(loss={loss}, grad_norm={grad_norm}); stopping"
                )
        return StepResult(loss, grad_norm, lr, not finite, metrics)

    @torch.no_grad()
    def eval_step(self, forward_step: Callable, data: Iterator, num_microbatches: int, seq_length: int, micro_batch_size: int) -> dict[str, float]:
        for chunk in self.chunks:
            chunk.eval()
        outputs = self._schedule(forward_step, data, num_microbatches, seq_length, micro_batch_size, forward_only=True)
        return self._mean_metrics(outputs)

    def _schedule(self, forward_step: Callable, data: Any, num_microbatches: int, seq_length: int,
                  micro_batch_size: int, forward_only: bool = False) -> list[dict[str, torch.Tensor]]:
        """Megatron's pipeline schedule over the step's micro-batches, inside one FP8 scaling step."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if len(self.chunks) > 1:
            data = self._interleaved(data, num_microbatches)
        with fp8_context(self.precision):
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=data,
                model=self.chunks,
                num_microbatches=num_microbatches,
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                forward_only=forward_only,
            )

    def _interleaved(self, data: Any, num_microbatches: int) -> list[Iterator]:
        """The step's micro-batches, taken once, for every chunk (`schedule_data`)."""
        if isinstance(data, list):
            return data
        return schedule_data(self.chunks, [next(data) for _ in range(num_microbatches)])[0]

    def _mean_metrics(self, outputs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Token-weighted means over micro-batches and data-parallel ranks, known on every rank.

        Each micro-batch's loss function reports sums (``REPORTED``); only the last pipeline stage has
        them, so the totals are summed over the pipeline group (others add zeros) and the data group.
        """
        totals = torch.zeros(len(REPORTED), dtype=torch.float64)
        for out in outputs:
            for index, key in enumerate(REPORTED):
                if key in out:
                    totals[index] += float(out[key])
        totals = _sum_over_pipeline_and_data(totals, self.is_last_stage)
        values = dict(zip(REPORTED, totals.tolist()))
        result = {"loss": values["loss_sum"] / values["tokens"] if values["tokens"] else float("nan"),
                  "tokens": values["tokens"]}
        if values["answers"] > 0:
            result["answer_accuracy"] = values["correct"] / values["answers"]
        return result
