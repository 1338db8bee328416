"""Per-token log-probabilities (and entropy) of the reply tokens of packed rollouts, under any TP/PP layout.

The training forward runs the composed model to the logits of the reply positions only (qwen3's ``logits_at``:
the output layer, the last layer's MLP and the final norm skip every prompt position, as the ``lm`` stage's
``loss_mask`` does), ``(1, K, V/TP)``. log π(y_t) comes from Megatron's vocab-parallel cross entropy (no
gather of the vocabulary over TP ranks; differentiable), the entropy from a vocab-parallel log-sum-exp (no
gradient: a metric). Both are fp32.

`fill_logps` runs a forward-only pipeline schedule over a step's packs and stores each pack's per-token
log-probs on it (``old_logp`` for the policy before the update, ``ref_logp`` for the frozen reference); only the
last pipeline stage computes them, which is the only one whose loss reads them. It runs as a whole schedule
between optimiser steps, never inside the policy's schedule, whose point-to-point messages it would cross
under PP > 1 (as the preference stage's reference pass).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from keye.parallel.fp8 import fp8_context
from keye.rl.packing import RolloutPack


def reply_logits(model: torch.nn.Module, pack: RolloutPack) -> torch.Tensor:
    """Logits of the pack's reply positions ``(1, K, V/TP)`` on the last pipeline stage (hidden states on the
    others). ``model`` is a `KeyeVLModel`, or Megatron's DDP wrapper of one."""
    module = getattr(model, "module", model)  # DistributedDataParallel keeps the model as .module
    batch = pack.batch
    decoder_input = module.embed(batch.input_ids, batch.images, batch.videos) if module.pre_process else None
    return module.language_model(batch.input_ids, batch.position_ids, batch.attention_mask,
                                 decoder_input=decoder_input, logits_at=batch.loss_mask != 0)


def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = log Σ e^z − Σ softmax(z)·z per row of ``logits`` ``(K, V/TP)`` split over TP ranks: ``[K]``."""
    from megatron.core import parallel_state as mpu

    group = mpu.get_tensor_model_parallel_group()
    split = mpu.get_tensor_model_parallel_world_size() > 1
    with torch.no_grad():
        peak = logits.max(dim=-1).values  # (K,)
        if split:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - peak.unsqueeze(-1)
        exp = shifted.exp()
        sums = torch.stack([exp.sum(dim=-1), (exp * shifted).sum(dim=-1)])  # (2, K)
        if split:
            dist.all_reduce(sums, group=group)
        return sums[0].log() - sums[1] / sums[0]


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(target) ``[K]`` with gradient, entropy ``[K]`` without) from ``(1, K, V/TP)`` logits."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = logits[0].float()  # (K, V/TP)
    entropy = vocab_parallel_entropy(logits)  # first: the cross entropy shifts the logits in place
    return -vocab_parallel_cross_entropy(logits, targets), entropy


def reply_targets(pack: RolloutPack) -> torch.Tensor:
    """The sampled ids at the reply positions, in ``logits_at`` order: ``[K]``."""
    return pack.batch.labels[pack.batch.loss_mask != 0]


def _store(pack: RolloutPack, attribute: str, logits: torch.Tensor):
    logp, _ = token_logps(logits, reply_targets(pack))
    setattr(pack, attribute, logp.detach())
    return logits.sum() * 0, torch.tensor(1, dtype=torch.int), {}


def _forward_step(attribute: str, data: Iterator[RolloutPack], model: torch.nn.Module):
    pack = next(data)
    return reply_logits(model, pack), partial(_store, pack, attribute)


def fill_logps(chunks: Sequence[torch.nn.Module], packs: Sequence[RolloutPack], attribute: str, seq_len: int,
               precision: Any = None) -> None:
    """Set ``pack.<attribute>`` (``old_logp`` or ``ref_logp``) on every pack, on the last pipeline stage, from
    a forward-only schedule of ``chunks`` (module docstring; this rank's model chunks, several under an
    interleaved pipeline: `keye.train.engine.schedule_data`)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from keye.train.engine import schedule_data

    if not packs:
        return
    for chunk in chunks:
        chunk.eval()
    data, count = schedule_data(list(chunks), list(packs), forward_only=True)
    with torch.no_grad(), fp8_context(precision):
        get_forward_backward_func()(
            forward_step_func=partial(_forward_step, attribute), data_iterator=data, model=list(chunks),
            num_microbatches=count, seq_length=seq_len, micro_batch_size=1, forward_only=True,
        )
