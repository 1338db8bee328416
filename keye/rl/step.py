"""One RL step: rollouts, rewards, group advantages, old-policy (and reference) log-probs, μ policy updates.

`RLEngine` is the `TrainEngine` whose ``train_step`` is a whole RL step, so the stage runs in the shared step
loop (`keye.train.loop.train_steps`: metrics lines, progress bar, checkpoints, resume) like every other stage.

A step (`RLStep.__call__`), on every rank:

1. ``prompts_per_step`` prompts from this data-parallel rank's share, each rendered in its think mode
   (`keye.rl.prompts.choose_mode`); G rollouts each from the generator (collective over the model-parallel
   group; the sampling seed depends on the run seed, the step and the data-parallel rank only, so tensor and
   pipeline peers draw the same tokens).
2. Rewards (`WeightedRewards`) and group-normalised advantages (the loss component's ``advantages``:
   (r − mean) / (std + ε), or r − mean).
3. What trains: DAPO's overlong masking (``mask_truncated``: a reply cut by the length limit carries no loss)
   and dynamic sampling (``dynamic_sampling``: a group whose rewards are all equal has zero advantage and is
   dropped rather than diluting the batch); both are counted. When no rollout is left on any data-parallel
   rank the step makes no update (``updates: 0`` in its metrics); a rank with nothing left keeps one rollout
   with weight 0 so that it still runs the step's schedule and gradient reduction.
4. Packs of prompt + reply rows (`keye.rl.packing`), the policy's log-probs before any update (``old_logp``)
   and the frozen reference's (``ref_logp``, only when the loss has β > 0) from forward-only schedules
   (`keye.rl.logps.fill_logps`), then ``updates`` (μ) optimiser steps over all the packs with the loss.

The loss function of a pack reports a *sum* and its unit count, so Megatron's per-token normalisation makes the
update the loss's own aggregation over the whole global batch whatever the packing and data-parallel split:
the unit is the reply (``sequence_mean``, ``constant``, GSPO) or the reply token (``token_mean``).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from keye.generate.contract import SamplingSettings
from keye.rl.logps import fill_logps, reply_logits, reply_targets, token_logps
from keye.rl.metrics import Rollouts
from keye.rl.packing import RolloutPack, pack_rollouts
from keye.rl.prompts import PromptStream, choose_mode
from keye.rl.rollouts import Rollout, render, reward_samples, sample_rollouts
from keye.parallel.dist_checkpoint import model_chunks
from keye.train.engine import StepResult, TrainEngine, _sum_over_pipeline_and_data

#: per-update sums of the loss metrics (token-weighted), on the last pipeline stage
LOSS_SUMS = ("rows", "tokens", "clip_fraction", "ratio", "kl", "entropy")


@dataclass
class RLSettings:
    """What a step needs besides its components (the stage's options, resolved)."""

    prompts_per_step: int
    group_size: int
    updates: int
    sampling: SamplingSettings  # its seed is replaced per step
    seq_len: int
    seed: int = 0
    mode_mix: dict[str, float] = field(default_factory=dict)
    dynamic_sampling: bool = True
    mask_truncated: bool = True
    max_vision_patches: int | None = None
    rollouts_file: Path | None = None  # where data-parallel rank 0 appends every rollout (None: nowhere)


@dataclass
class RLParts:
    """The components of a step. ``model`` is the policy (`KeyeVLModel`, the one the generator decodes with);
    ``reference`` the frozen copy, or None when the loss has no KL term. Under an interleaved pipeline each is
    the list of this rank's model chunks."""

    generator: Any
    rewards: Any  # keye.rewards.contract.WeightedRewards (or any RewardModel)
    loss: Any  # a policy loss component: advantages(rewards, G) and __call__ (plugins/loss/grpo.py)
    processor: Any
    model: torch.nn.Module | list[torch.nn.Module]
    reference: torch.nn.Module | list[torch.nn.Module] | None = None
    precision: Any = None


class _LossSums:
    def __init__(self) -> None:
        self.values = torch.zeros(len(LOSS_SUMS), dtype=torch.float64)

    def add(self, rows: int, tokens: float, metrics: dict[str, torch.Tensor]) -> None:
        self.values[0] += rows
        self.values[1] += tokens
        for index, name in enumerate(LOSS_SUMS[2:], start=2):
            if name in metrics:
                self.values[index] += float(metrics[name]) * tokens

    def means(self, is_last: bool, kl: bool) -> dict[str, float]:
        totals = _sum_over_pipeline_and_data(self.values.clone(), is_last).tolist()
        tokens = totals[1]
        out = {name: (value / tokens if tokens else math.nan) for name, value in zip(LOSS_SUMS[2:], totals[2:])}
        if not kl:
            out.pop("kl")
        return out


def _rows(flat: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """``[K]`` values of the pack's replies, concatenated → ``[n, max length]`` (zero-padded)."""
    return torch.nn.utils.rnn.pad_sequence(list(torch.split(flat, lengths)), batch_first=True)


def _policy_loss(loss: Any, pack: RolloutPack, sums: _LossSums, logits: torch.Tensor):
    """The loss of one pack as (sum, unit count, reported); see the module docstring for the unit."""
    logp, entropy = token_logps(logits, reply_targets(pack))  # [K], [K]
    train = pack.weights > 0  # [n]
    if not bool(train.any()):
        zero = logits.sum() * 0
        return zero, torch.tensor(0, dtype=torch.int), {"loss_sum": zero.detach().clone(), "tokens": torch.tensor(0.0)}
    lengths = pack.lengths
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths).unsqueeze(1)).float()[train]  # (n', T)

    def rows(flat: torch.Tensor) -> torch.Tensor:  # [K] -> [n', T]: the trained replies, one per row
        return _rows(flat, lengths)[train]

    ref = rows(pack.ref_logp) if pack.ref_logp is not None else None
    value, metrics = loss(rows(logp), rows(pack.old_logp), pack.advantages[train], mask, ref_logp=ref,
                          entropy=rows(entropy))
    token_unit = getattr(loss.config, "aggregation", None) == "token_mean"
    unit = float(mask.sum()) if token_unit else float(train.sum())
    sums.add(int(train.sum()), float(mask.sum()), metrics)
    total = value * unit
    return total, torch.tensor(int(unit), dtype=torch.int), {"loss_sum": total.detach().clone(),
                                                              "tokens": torch.tensor(unit)}


def _policy_forward(loss: Any, sums: _LossSums, data: Iterator[RolloutPack], model: torch.nn.Module):
    pack = next(data)
    return reply_logits(model, pack), partial(_policy_loss, loss, pack, sums)


class RLEngine(TrainEngine):
    """A `TrainEngine` whose step is a whole RL step (``rl``, an `RLStep`); ``update`` is one optimiser step."""

    rl: "RLStep"

    def train_step(self, forward_step, data, num_microbatches, seq_length, micro_batch_size) -> StepResult:
        return self.rl(self, data)

    def update(self, packs: list[RolloutPack], sums: _LossSums) -> StepResult:
        return TrainEngine.train_step(self, partial(_policy_forward, self.rl.parts.loss, sums), iter(packs),
                                      len(packs), self.rl.settings.seq_len, 1)


def _data_parallel_sum(values: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as mpu

    if dist.is_initialized() and mpu.get_data_parallel_world_size() > 1:
        dist.all_reduce(values, group=mpu.get_data_parallel_group())
    return values


class RLStep:
    """One step of the ``rl`` stage (module docstring); called by `RLEngine.train_step` with the prompt stream."""

    def __init__(self, settings: RLSettings, parts: RLParts) -> None:
        self.settings = settings
        self.parts = parts
        self._trimmed = False  # rollouts_file not yet cut back to the steps before this run's first

    def sampling(self, step: int, dp_rank: int) -> SamplingSettings:
        from dataclasses import replace

        seed = random.Random(f"keye-rl-sample:{self.settings.seed}:{step}:{dp_rank}").getrandbits(62)
        return replace(self.settings.sampling, seed=seed)

    def rollouts(self, prompts: list, modes: list, settings: SamplingSettings, group_size: int, stats: Rollouts,
                 skipped: dict[str, int]):
        """Render, sample and score ``prompts``: the rollouts (groups of ``group_size``, contiguous) and their
        rewards ``[N]``; ``stats`` and ``skipped`` count what happened."""
        s, parts = self.settings, self.parts
        rendered = render(prompts, modes, parts.processor, group_size=group_size, max_tokens=s.seq_len,
                          max_new_tokens=settings.max_new_tokens, skipped=skipped)
        for chunk in model_chunks(parts.model):
            chunk.eval()
        rollouts = sample_rollouts(parts.generator, rendered, settings, parts.processor.tokenizer)
        if not rollouts:
            return rollouts, torch.zeros(0)
        scores = parts.rewards.score(reward_samples(rollouts))
        stats.add(rollouts, scores)
        return rollouts, torch.tensor(scores.scores, dtype=torch.float32)

    def evaluate(self, prompts: list, samples: int = 0) -> dict[str, Any]:
        """Held-out rewards of the policy's greedy reply to each prompt (``samples`` 0), or of ``samples`` replies
        per prompt drawn as the rollouts are (their temperature and filters) with a fixed seed: the expected
        reward the policy is trained to raise, where greedy replies may already be as good as the policy gets.
        Each prompt is asked in the mode the mix draws for it at step 0, so evaluations before and after training
        ask the same; over data-parallel ranks."""
        from dataclasses import replace

        s = self.settings
        stats, skipped = Rollouts(), {}
        modes = [choose_mode(prompt, s.mode_mix, s.seed, 0) for prompt in prompts]
        settings = replace(s.sampling, seed=0) if samples else replace(s.sampling, temperature=0.0, seed=0)
        self.rollouts(prompts, modes, settings, samples or 1, stats, skipped)
        for reason, n in skipped.items():
            stats.count(f"skipped/{reason}", n)
        return {f"heldout_{name}": value for name, value in stats.reduce().items()}

    def weights(self, rollouts: list, rewards: torch.Tensor, stats: Rollouts) -> torch.Tensor:
        """1 for a rollout that trains, 0 for one masked (truncated) or in a group of equal rewards."""
        s = self.settings
        weights = torch.ones(len(rollouts))
        if not rollouts:
            return weights
        vision = torch.tensor([self.has_vision_pad(r) for r in rollouts])
        weights[vision] = 0.0  # an image/video pad id in a reply has no features to embed: cannot be trained on
        stats.count("vision_token_in_reply", int(vision.sum()))
        if s.mask_truncated:
            weights[torch.tensor([r.truncated for r in rollouts])] = 0.0
        groups = rewards.view(-1, s.group_size)  # (prompts, G)
        equal = (groups.max(dim=1).values - groups.min(dim=1).values) <= 0  # DAPO: no signal in the group
        stats.count("groups", len(groups))
        stats.count("groups_all_equal", int(equal.sum()))
        if s.dynamic_sampling:
            weights.view(-1, s.group_size)[equal] = 0.0
        return weights

    def save(self, step: int, rollouts: list, rewards: torch.Tensor, advantages: torch.Tensor,
             weights: torch.Tensor) -> None:
        """Append the step's rollouts to ``rollouts_file`` (global rank 0 only: data-parallel rank 0's rollouts)."""
        path = self.settings.rollouts_file
        if path is None or (dist.is_initialized() and dist.get_rank() != 0):
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self._trimmed and path.is_file():  # a fresh stage starts anew; a resumed one drops the redone steps
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < step]
            path.write_text("".join(line + "\n" for line in kept))
        self._trimmed = True
        with path.open("a") as handle:
            for i, r in enumerate(rollouts):
                handle.write(json.dumps({
                    "step": step, "prompt": r.rendered.prompt.key, "group": r.group, "mode": r.rendered.mode,
                    "token_ids": r.token_ids, "text": r.text, "finish_reason": r.finish_reason,
                    "reward": float(rewards[i]), "advantage": float(advantages[i]), "trained": bool(weights[i] > 0),
                }) + "\n")

    def has_vision_pad(self, rollout: Rollout) -> bool:
        special = self.parts.processor.special
        return special.image_pad in rollout.token_ids or special.video_pad in rollout.token_ids

    def filler(self, rollouts: list) -> list[int]:
        """One rollout that can be packed (no vision pad id in its reply), to ride along with weight 0; none if
        no rollout can."""
        return next(([i] for i, r in enumerate(rollouts) if not self.has_vision_pad(r)), [])

    def __call__(self, engine: RLEngine, stream: PromptStream) -> StepResult:
        s, parts = self.settings, self.parts
        stream.step += 1
        stats, skipped = Rollouts(), {}
        began = time.perf_counter()
        prompts = stream.take(s.prompts_per_step, skipped)
        modes = [choose_mode(prompt, s.mode_mix, s.seed, stream.step) for prompt in prompts]
        settings = self.sampling(stream.step, _dp_rank())
        rollouts, rewards = self.rollouts(prompts, modes, settings, s.group_size, stats, skipped)
        rollout_time = time.perf_counter() - began

        began = time.perf_counter()
        advantages = parts.loss.advantages(rewards, s.group_size) if rollouts else torch.zeros(0)
        weights = self.weights(rollouts, rewards, stats)
        self.save(stream.step, rollouts, rewards, advantages, weights)
        chosen = [i for i in range(len(rollouts)) if weights[i] > 0] or self.filler(rollouts)
        stats.count("trained_rollouts", len([i for i in chosen if weights[i] > 0]))
        for reason, n in skipped.items():
            stats.count(f"skipped/{reason}", n)
        # update only when something trains somewhere and every rank has a rollout to run its schedule with
        wanted = _data_parallel_sum(torch.tensor([float(weights.sum()), float(not chosen)], dtype=torch.float64))
        result, sums = None, _LossSums()
        if wanted[0] > 0 and wanted[1] == 0:
            packs = pack_rollouts(rollouts, chosen, advantages, weights, s.seq_len,
                                  max_vision_patches=s.max_vision_patches, pad_id=parts.processor.special.pad)
            packs += _riders(packs, len(engine.chunks))
            fill_logps(engine.chunks, packs, "old_logp", s.seq_len, parts.precision)
            if parts.reference is not None:
                fill_logps(model_chunks(parts.reference), packs, "ref_logp", s.seq_len, parts.precision)
            for _ in range(s.updates):
                result = engine.update(packs, sums)
        update_time = time.perf_counter() - began

        metrics = stats.reduce()
        metrics.update(sums.means(engine.is_last_stage, kl=parts.reference is not None) if result else {})
        metrics.update(updates=s.updates if result else 0, rollout_time_s=rollout_time, update_time_s=update_time,
                       skipped_prompts=sum(v for k, v in metrics.items() if k.startswith("skipped/")))
        if result is None:  # nothing to learn from anywhere: no update, not a bad step
            lr = engine.optimizer.param_groups[0]["lr"]
            return StepResult(math.nan, math.nan, lr, False, metrics)
        result.extras = metrics
        return result


def _riders(packs: list[RolloutPack], chunks: int) -> list[RolloutPack]:
    """Under an interleaved pipeline (several model chunks) Megatron's schedule needs at least ``pipeline``
    micro-batches a step: copies of the last pack with weight 0 make up the count (no loss, no gradient, no
    metric: `_policy_loss` of a pack that trains nothing is 0 over 0 units)."""
    from dataclasses import replace

    from megatron.core import parallel_state as mpu

    missing = mpu.get_pipeline_model_parallel_world_size() - len(packs) if chunks > 1 else 0
    return [replace(packs[-1], weights=torch.zeros_like(packs[-1].weights)) for _ in range(missing)]


def _dp_rank() -> int:
    from megatron.core import parallel_state as mpu

    return mpu.get_data_parallel_rank() if dist.is_initialized() else 0
