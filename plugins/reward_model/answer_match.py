"""``answer_match``: 1 when the reply's final answer matches the reference, else 0 (a rule reward).

The answer is read as evaluation reads it (`keye.eval.extract.extract`): past ``</analysis>`` and
``</think>``, inside the last ``<answer>``, inside the last ``\\boxed{}``, then per metric a choice letter,
the last number, or the last box. It is compared by the same metric functions (`keye.eval.metrics`), so
the reward and the benchmark score agree, with two RL additions:

- ``number``: the last number within ``max(abs_tolerance, rel_tolerance·|reference|)`` of the reference
  (``relaxed`` is ChartQA's fixed 5 %; RL math usually wants exact or a chosen tolerance);
- ``iou``: scored ``1`` at IoU >= 0.5 (Acc@0.5) or, with ``iou_reward: continuous``, the IoU itself;
  a reference box may be a list or text ``[x1, y1, x2, y2]``.

Handled by rule, scored 0 and counted: a missing reference (``missing_reference``), an unknown metric
(``unknown_metric``), no answer found (``no_answer``: e.g. cut off inside ``<think>``).
Components: ``answered`` (an answer was found) and, for boxes, ``iou``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from keye import hookimpl
from keye.config import doc
from keye.eval.extract import extract
from keye.eval.metrics import METRICS, box_iou, to_number
from keye.rewards.contract import RewardOutput, RewardSample, count

METRIC_NAMES = (*METRICS, "number")


def number_match(prediction: Any, reference: Any, *, abs_tolerance: float = 0.0, rel_tolerance: float = 0.0) -> float:
    """1.0 when the prediction is a number within tolerance of (any of) the reference number(s)."""
    value = to_number(prediction) if prediction is not None else None
    if value is None:
        return 0.0
    for ref in reference if isinstance(reference, (list, tuple)) else [reference]:
        target = to_number(ref)
        if target is not None and abs(value - target) <= max(abs_tolerance, rel_tolerance * abs(target)):
            return 1.0
    return 0.0


def reference_box(reference: Any) -> list[float] | None:
    """A reference box from a 4-number list or from text holding ``[x1, y1, x2, y2]``."""
    if isinstance(reference, (list, tuple)) and len(reference) == 4:
        try:
            return [float(v) for v in reference]
        except (TypeError, ValueError):
            return None
    if isinstance(reference, str):
        return extract(reference, "iou")
    return None


class AnswerMatchReward:
    """The ``answer_match`` reward model (see the module docstring)."""

    @dataclass
    class Config:
        metric: str = doc("Metric for samples that name none: exact, relaxed, choice, anls, iou or number.", "exact")
        abs_tolerance: float = doc("number: absolute tolerance.", 0.0)
        rel_tolerance: float = doc("number: tolerance relative to the reference.", 0.0)
        iou_reward: str = doc("iou: 'threshold' (1 at IoU >= 0.5, like Acc@0.5) or 'continuous' (the IoU).",
                              "threshold")

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        check.one_of(config, "metric", METRIC_NAMES)
        check.number(config, "abs_tolerance", low=0.0)
        check.number(config, "rel_tolerance", low=0.0)
        check.one_of(config, "iou_reward", ("threshold", "continuous"))

    def __init__(self, config: Config, ctx: Any = None) -> None:
        self.config = config

    def score(self, samples: Sequence[RewardSample]) -> RewardOutput:
        counts: dict[str, int] = {}
        scores, answered, ious = [], [], []
        for sample in samples:
            score, found, iou = self._one(sample, counts)
            scores.append(score)
            answered.append(float(found))
            ious.append(iou)
        components = {"answered": answered}
        if any(not math.isnan(v) for v in ious):
            components["iou"] = ious
        return RewardOutput(scores, components, counts)

    def _one(self, sample: RewardSample, counts: dict[str, int]) -> tuple[float, bool, float]:
        """(score, whether an answer was found, IoU or NaN)."""
        metric = sample.metric or self.config.metric
        if metric not in METRIC_NAMES:
            count(counts, "unknown_metric")
            return 0.0, False, math.nan
        prediction = extract(sample.response, "relaxed" if metric == "number" else metric, sample.choices)
        found = prediction is not None and prediction != ""
        if not found:
            count(counts, "no_answer")
        reference = sample.reference
        if reference is None or reference == "" or reference == []:
            count(counts, "missing_reference")
            return 0.0, found, math.nan
        if metric == "iou":
            box = reference_box(reference)
            if box is None:
                count(counts, "bad_reference")
                return 0.0, found, math.nan
            iou = box_iou(prediction, box)
            return (iou if self.config.iou_reward == "continuous" else METRICS["iou"](prediction, box)), found, iou
        if not found:
            return 0.0, False, math.nan
        if metric == "number":
            return number_match(prediction, reference, abs_tolerance=self.config.abs_tolerance,
                                rel_tolerance=self.config.rel_tolerance), True, math.nan
        return float(METRICS[metric](prediction, reference)), True, math.nan


@hookimpl
def keye_register_reward_models(register):
    register("answer_match", AnswerMatchReward)
