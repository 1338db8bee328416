"""``repetition``: a penalty in [max_penalty, 0] for replies that repeat n-grams (a rule reward).

Over the reply's words (stop tokens removed, split on whitespace), with N the number of word n-grams and
U the number of distinct ones, the repeated share is ``1 − U/N`` and the reward is ``max_penalty · (1 −
U/N)``: 0 for a reply without a repeated n-gram, ``max_penalty`` in the limit of one n-gram repeated
forever. This is Open-R1's repetition penalty (n = 3, max_penalty = −1 by default). A reply shorter
than n words scores 0. Component: ``repeated`` (the share 1 − U/N).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from keye import hookimpl
from keye.config import doc
from keye.eval.extract import clean
from keye.rewards.contract import RewardOutput, RewardSample


def repeated_share(text: str, n: int) -> float:
    """``1 − distinct/total`` over the word n-grams of ``text``; 0 when it has fewer than n words."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


class RepetitionReward:
    """The ``repetition`` reward model (see the module docstring)."""

    @dataclass
    class Config:
        ngram: int = doc("n of the word n-grams compared.", 3)
        max_penalty: float = doc("The reward of a reply that is all repetition (<= 0).", -1.0)

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        check.count(config, "ngram")
        check.number(config, "max_penalty", high=0.0)

    def __init__(self, config: Config, ctx: Any = None) -> None:
        self.config = config

    def score(self, samples: Sequence[RewardSample]) -> RewardOutput:
        shares = [repeated_share(clean(s.response), self.config.ngram) for s in samples]
        return RewardOutput([self.config.max_penalty * share for share in shares], {"repeated": shares})


@hookimpl
def keye_register_reward_models(register):
    register("repetition", RepetitionReward)
