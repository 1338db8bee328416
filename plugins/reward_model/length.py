"""``length``: DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13), a rule reward.

With L_max the generation limit, L_cache the soft buffer and |y| the reply's length in tokens::

    R = 0                              if |y| <= L_max − L_cache
    R = ((L_max − L_cache) − |y|) / L_cache   if L_max − L_cache < |y| <= L_max
    R = −1                             if |y| > L_max

so the penalty grows linearly over the last L_cache tokens before the limit. DAPO uses L_max 20480 and
L_cache 4096 (16384 + 4096 of generation). A reply cut by the limit (finish reason ``length``) scores −1
whatever its counted length. A sample without ``num_tokens`` scores 0 and is counted (``no_length``).
Component: ``tokens`` (the length used, NaN where unknown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from keye import hookimpl
from keye.config import doc
from keye.rewards.contract import RewardOutput, RewardSample, count


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment of a reply of ``length`` tokens (see the module docstring)."""
    soft = max_length - buffer
    if length <= soft:
        return 0.0
    if length <= max_length:
        return (soft - length) / buffer
    return -1.0


class LengthReward:
    """The ``length`` reward model (see the module docstring)."""

    @dataclass
    class Config:
        max_length: int = doc("L_max: the reply length (tokens) at which the penalty reaches −1.", 20480)
        buffer: int = doc("L_cache: the soft buffer before L_max over which the penalty grows.", 4096)

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        check.count(config, "max_length", "buffer")
        if config.buffer > config.max_length:
            check.fail("buffer", f"must be <= max_length ({config.max_length}), got {config.buffer}")

    def __init__(self, config: Config, ctx: Any = None) -> None:
        self.config = config

    def score(self, samples: Sequence[RewardSample]) -> RewardOutput:
        counts: dict[str, int] = {}
        scores, tokens = [], []
        for sample in samples:
            if sample.finish_reason == "length":
                scores.append(-1.0)
            elif sample.num_tokens is None:
                count(counts, "no_length")
                scores.append(0.0)
            else:
                scores.append(overlong_penalty(sample.num_tokens, self.config.max_length, self.config.buffer))
            tokens.append(math.nan if sample.num_tokens is None else float(sample.num_tokens))
        return RewardOutput(scores, {"tokens": tokens}, counts)


@hookimpl
def keye_register_reward_models(register):
    register("length", LengthReward)
