"""One real ``mllm_judge`` pass: a tiny released-format Keye-VL model (tests/generate's, random weights) judges a
batch through the generator in a real Megatron process. A random model answers nonsense; every judgement must
still turn into a score by the documented rule, recomputed here from its raw text."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from keye.testing.distributed import run_distributed

TINY = Path(__file__).resolve().parents[1] / "eval" / "tiny_model.py"


def _judge_in_a_process(folder: str) -> dict:
    spec = importlib.util.spec_from_file_location("keye_tiny_model_for_judge", TINY)
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    tiny._write(folder)  # the released folder, written in this process (one spawn for the whole test)

    from keye.rewards.contract import RewardSample
    from keye_plugins.reward_model.mllm_judge import MLLMJudge

    judge = MLLMJudge(MLLMJudge.Config(path=folder, max_new_tokens=8, batch_size=2))
    samples = [
        RewardSample("how many red circle", "<think>two red</think><answer>two</answer>", "think", "two"),
        RewardSample("how many blue square", "three", "no_think", "two"),
        RewardSample("where is the circle", "left <|image_pad|>", "no_think", ["left", "right"]),
        RewardSample("how many green", "two", "no_think", None),  # no reference
        RewardSample("what", "   ", "no_think", "two"),  # empty: not judged
    ]
    out = judge.score(samples)
    first = list(judge.judgements)
    again = judge.score(samples[:2])  # greedy: the same judgements for the same prompts
    return {"scores": out.scores, "components": out.components, "counts": out.counts, "judgements": first,
            "again": list(judge.judgements), "again_scores": again.scores}


@pytest.fixture(scope="module")
def judged(tmp_path_factory) -> dict:
    return run_distributed(_judge_in_a_process, 1, str(tmp_path_factory.mktemp("judge") / "ckpt"))[0]


def test_every_judgement_scores_by_the_rule(judged):
    from keye_plugins.reward_model.mllm_judge import parse_judgement

    raw, scores = judged["judgements"], judged["scores"]
    assert len(raw) == len(scores) == 5
    assert all(text for text in raw[:4]) and raw[4] == ""  # the judge generated for the four non-empty replies
    expected_counts: dict[str, int] = {"missing_reference": 1, "empty_response": 1}
    for i, text in enumerate(raw[:4]):
        verdict = parse_judgement(text)
        o = verdict["outcome"] if verdict["outcome"] is not None else 0.0
        c = verdict["consistency"] if verdict["consistency"] is not None else 0.0
        want = c if i == 3 else 0.5 * o + 0.5 * c  # no reference: consistency alone, at the whole weight
        assert scores[i] == pytest.approx(want)
        if verdict["outcome"] is None and verdict["consistency"] is None:
            expected_counts["unparsable"] = expected_counts.get("unparsable", 0) + 1
        for part in ("outcome", "consistency"):
            if verdict[part] is None and (part == "consistency" or i != 3):
                expected_counts[f"unparsable_{part}"] = expected_counts.get(f"unparsable_{part}", 0) + 1
    assert scores[4] == 0.0
    assert judged["counts"] == expected_counts
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert math.isnan(judged["components"]["outcome"][3])  # not asked without a reference


def test_greedy_judgements_repeat(judged):
    assert judged["again"] == judged["judgements"][:2]
    assert judged["again_scores"] == judged["scores"][:2]
