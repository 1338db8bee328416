"""What an RL step (or a held-out evaluation) logs about its rollouts, summed over data-parallel ranks.

Every rank of a tensor/pipeline group holds the same rollouts and rewards, so the numbers are summed over the
data-parallel group only, as (sum, count) pairs gathered as objects: the component names a rank saw can
differ (a reward model reports ``iou`` only where a box was asked), so a fixed-size all-reduce will not do.

Logged (``Rollouts.means``): ``reward`` (the weighted total), ``reward/<model>`` and ``reward/<model>/<part>``
(`keye.rewards.contract.WeightedRewards` components; NaN entries, where a model does not apply, skipped),
``reward_by_mode/<mode>``, ``think_ratio`` (share of replies with a non-empty ``<think>``),
``response_tokens`` (mean reply length), and counts: ``rollouts``, ``truncated`` (replies cut by the length
limit), ``count/<model>/<event>`` (what the reward models handled by rule, e.g. a missing reference).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import torch.distributed as dist

from keye.rewards.contract import RewardOutput
from keye.rl.rollouts import Rollout

NO_MODE = "none"


class Rollouts:
    """Running (sum, count) pairs and event counts of scored rollouts (module docstring)."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.counts: dict[str, float] = defaultdict(float)

    def _mean(self, name: str, value: float) -> None:
        if not math.isnan(value):
            entry = self.sums[name]
            entry[0] += value
            entry[1] += 1

    def count(self, name: str, n: float = 1) -> None:
        self.counts[name] += n

    def add(self, rollouts: Sequence[Rollout], scores: RewardOutput) -> None:
        from keye.eval.extract import thought

        for i, rollout in enumerate(rollouts):
            self._mean("reward", scores.scores[i])
            for name, values in scores.components.items():
                self._mean(f"reward/{name}", values[i])
            self._mean(f"reward_by_mode/{rollout.rendered.mode or NO_MODE}", scores.scores[i])
            self._mean("think_ratio", float(thought(rollout.text)))
            self._mean("response_tokens", float(len(rollout.token_ids)))
        self.count("rollouts", len(rollouts))
        self.count("truncated", sum(r.truncated for r in rollouts))
        for event, n in scores.counts.items():
            self.count(f"count/{event}", n)

    def reduce(self) -> dict[str, float]:
        """Means and counts over every data-parallel rank (every rank gets the same dict)."""
        local = {"sums": {k: list(v) for k, v in self.sums.items()}, "counts": dict(self.counts)}
        parts = [local]
        if dist.is_initialized():
            from megatron.core import parallel_state as mpu

            if mpu.get_data_parallel_world_size() > 1:
                parts = [None] * mpu.get_data_parallel_world_size()
                dist.all_gather_object(parts, local, group=mpu.get_data_parallel_group())
        sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        counts: dict[str, float] = defaultdict(float)
        for part in parts:
            for name, (total, n) in part["sums"].items():
                sums[name][0] += total
                sums[name][1] += n
            for name, n in part["counts"].items():
                counts[name] += n
        out = {name: total / n for name, (total, n) in sorted(sums.items()) if n}
        out.update({name: int(n) for name, n in sorted(counts.items())})
        return out
