"""The ``reward_model`` contract, and `WeightedRewards`, which adds several reward models by weight.

A reward model is a registered component built as ``Cls(config, ctx)`` (``ctx`` may be None for rule
rewards) with one method::

    score(samples: Sequence[RewardSample]) -> RewardOutput

It scores a whole batch at once, because a judge model generates for the batch in one go. A rollout is
scored from text only (`RewardSample`): the prompt and the reply as rendered/decoded, the think mode the
prompt asked for, the reference answer (with the metric that compares to it), the generator's finish
reason and the reply's length in tokens. The output is one float per sample plus named per-sample
components (what the score is made of, for logging) and counts of what was handled by rule (a missing
reference, an unparsable judgement, ...). Bad input is never an exception: it scores 0 and is counted,
so one odd rollout cannot stop a run, and the count shows up in the step metrics.

Rewards combine linearly: ``r = Σ_k w_k · r_k`` with the blueprint's weights. `WeightedRewards` does it and
keeps every model's score and component, prefixed with the model's name, so each can be logged. A
sample may name the models that apply to it (``RLPromptSample.reward_names``); the others add nothing to
its total and leave NaN in their component columns, which `RewardOutput.means` skips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

#: finish reasons a generator reports (`keye.generate.contract`): ``stop`` (an end token) or ``length``
FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class RewardSample:
    """One rollout to score.

    ``prompt``/``response``: text (the reply decoded with its special tokens, as the generator gives it).
    ``mode``: the think mode the prompt asked for: ``think``, ``no_think``, ``auto``, ``agentic`` or None
    (no suffix: the model's auto-think default). ``reference``: the answer to compare with (a string, a
    list of acceptable strings, or a box ``[x1, y1, x2, y2]``), None when there is none. ``metric``: how the
    answer is compared (`keye.eval.metrics.METRICS` names, or ``number``), None for the reward's default.
    ``choices``: letter → option text for multiple choice. ``task``: a free label for per-task logging.
    ``finish_reason``: ``stop`` or ``length``. ``num_tokens``: the reply's length in tokens (None if unknown).
    ``reward_names``: the reward models that apply (None: all of them).
    """

    prompt: str
    response: str
    mode: str | None = None
    reference: Any = None
    metric: str | None = None
    choices: Mapping[str, str] | None = None
    task: str | None = None
    finish_reason: str = "stop"
    num_tokens: int | None = None
    reward_names: Sequence[str] | None = None


@dataclass
class RewardOutput:
    """Scores of a batch: ``scores[i]`` for sample i; ``components[name][i]`` the parts (NaN: not
    applicable to that sample); ``counts[event]`` how many samples were handled by rule."""

    scores: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, values in self.components.items():
            if len(values) != len(self.scores):
                raise ValueError(f"reward component {name!r} has {len(values)} values for {len(self.scores)} samples")

    def means(self) -> dict[str, float]:
        """``score`` and each component averaged over the samples it applies to (NaN skipped), for logging;
        counts as they are."""
        out = {"score": _nanmean(self.scores)}
        out.update({name: _nanmean(values) for name, values in self.components.items()})
        out.update({f"count/{name}": float(n) for name, n in self.counts.items()})
        return out


@runtime_checkable
class RewardModel(Protocol):
    """What the RL and rejection-sampling stages call; see the module docstring."""

    def score(self, samples: Sequence[RewardSample]) -> RewardOutput: ...


def count(counts: dict[str, int], event: str) -> None:
    """Add one to ``counts[event]`` (helper for reward models)."""
    counts[event] = counts.get(event, 0) + 1


class WeightedRewards:
    """Several reward models added by weight: ``score_i = Σ_k w_k · r_k,i`` over the models that apply to
    sample i. Components of the output: ``<name>`` (the model's own score) and ``<name>/<component>``;
    counts ``<name>/<event>``, plus ``unknown_reward`` for a name a sample asks for that is not configured."""

    def __init__(self, models: Mapping[str, RewardModel], weights: Mapping[str, float] | None = None) -> None:
        weights = {name: 1.0 for name in models} if weights is None else dict(weights)
        missing = sorted(set(weights) ^ set(models))
        if missing:
            raise ValueError(f"reward weights and models differ: {', '.join(missing)}")
        for name, weight in weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"reward weight {name!r} must be a finite number, got {weight!r}")
        self.models = dict(models)
        self.weights = {name: float(w) for name, w in weights.items()}

    def score(self, samples: Sequence[RewardSample]) -> RewardOutput:
        totals = [0.0] * len(samples)
        components: dict[str, list[float]] = {}
        counts: dict[str, int] = {}
        for sample in samples:
            for name in sample.reward_names or ():
                if name not in self.models:
                    count(counts, "unknown_reward")
        for name, model in self.models.items():
            chosen = [i for i, s in enumerate(samples) if s.reward_names is None or name in s.reward_names]
            column = [math.nan] * len(samples)
            parts: dict[str, list[float]] = {}
            if chosen:
                out = model.score([samples[i] for i in chosen])
                if len(out.scores) != len(chosen):
                    raise ValueError(f"reward model {name!r} returned {len(out.scores)} scores for {len(chosen)} samples")
                for j, i in enumerate(chosen):
                    column[i] = float(out.scores[j])
                    totals[i] += self.weights[name] * column[i]
                for part, values in out.components.items():
                    parts[part] = [math.nan] * len(samples)
                    for j, i in enumerate(chosen):
                        parts[part][i] = float(values[j])
                for event, n in out.counts.items():
                    counts[f"{name}/{event}"] = counts.get(f"{name}/{event}", 0) + n
            components[name] = column
            components.update({f"{name}/{part}": values for part, values in parts.items()})
        return RewardOutput(totals, components, counts)


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan
