"""``mllm_judge``: reading judgements (`parse_judgement`) and the scoring rules for what cannot be read.

The rules are exercised through `MLLMJudge.score` with the judge's replies given as text (`judge` is the one
method that generates; a real generating judge runs in tests/rejection/test_judge_real.py).
"""

from __future__ import annotations

import math

import pytest

from keye.rewards.contract import RewardSample
from keye_plugins.reward_model.mllm_judge import MLLMJudge, parse_judgement, question_text


@pytest.mark.parametrize("text,outcome,consistency", [
    ("outcome: 10\nconsistency: 5", 1.0, 0.5),
    ("OUTCOME = 7 CONSISTENCY=3", 0.7, 0.3),
    ('{"outcome": 8, "consistency": 10}', 0.8, 1.0),
    ("outcome: 3/4\nconsistency: 1/2", 0.75, 0.5),
    ("Outcome: 2.5 consistency: 0", 0.25, 0.0),
    ("outcome: 1\noutcome: 9\nconsistency: 9", 0.9, 0.9),  # the last verdict counts
    ("<think>outcome: 0 maybe</think>outcome: 10 consistency: 10<|im_end|>", 1.0, 1.0),
    ("<think>outcome: 10 consistency: 10", None, None),  # cut off while thinking
    ("outcome: 11\nconsistency: -1", None, None),  # out of range
    ("outcome: 5/0 consistency: 20/10", None, None),
    ("outcome: high, consistency: low", None, None),
    ("", None, None),
    ("the answer is right", None, None),
    ("outcome: 6", 0.6, None),
    ("incomeoutcome: 6 consistencyx: 2", None, None),  # names must stand alone
    ("<|image_pad|>outcome:<|im_end|> 4 consistency : 4", 0.4, 0.4),
])
def test_parse_judgement(text, outcome, consistency):
    got = parse_judgement(text)
    for value, want in ((got["outcome"], outcome), (got["consistency"], consistency)):
        assert value is None if want is None else value == pytest.approx(want)


def test_scale():
    assert parse_judgement("outcome: 1 consistency: 0", scale=1.0) == {"outcome": 1.0, "consistency": 0.0}
    assert parse_judgement("outcome: 4 consistency: 5", scale=5.0) == {"outcome": 0.8, "consistency": 1.0}


class CannedJudge(MLLMJudge):
    """The judge with fixed replies instead of generated ones; records the prompts it was given."""

    def __init__(self, replies, **config):
        super().__init__(MLLMJudge.Config(path="unused", **config))
        self.replies, self.prompts = list(replies), []

    def judge(self, prompts, counts=None):
        self.prompts.extend(prompts)
        return [self.replies.pop(0) for _ in prompts]


def sample(response="<answer>red</answer>", reference="red"):
    return RewardSample("<|vision_start|><|image_pad|><|vision_end|>What colour?", response, "think", reference)


def test_scores_and_rules():
    judge = CannedJudge(["outcome: 10\nconsistency: 6", "nonsense nonsense", "outcome: 2", "consistency: 8",
                         "outcome: 10 consistency: 10"], outcome_weight=0.6, consistency_weight=0.4)
    out = judge.score([sample(), sample(), sample(), sample(reference=None), sample(response="  <|im_end|>"),
                       sample(reference=["a", "b"])])
    # the independent formulation: w_o * o + w_c * c with unreadable parts at 0; no reference -> consistency alone
    assert out.scores == pytest.approx([0.6 * 1.0 + 0.4 * 0.6, 0.0, 0.6 * 0.2, 1.0 * 0.8, 0.0, 1.0])
    assert out.counts == {"unparsable": 1, "unparsable_outcome": 1, "unparsable_consistency": 2,
                          "missing_reference": 1, "empty_response": 1}
    assert out.components["parsed"] == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    outcome = out.components["outcome"]
    assert outcome[0] == 1.0 and math.isnan(outcome[1]) and math.isnan(outcome[3]) and math.isnan(outcome[4])
    assert len(judge.prompts) == 5  # the empty reply was not sent
    assert "Reference answer: (none)" in judge.prompts[3] and "Reference answer: a or b" in judge.prompts[4]
    assert "<|" not in judge.prompts[0] and "Question: What colour?" in judge.prompts[0]
    assert out.means()["count/unparsable"] == 1.0


def test_unparsable_rule_is_configurable():
    judge = CannedJudge(["?", "outcome: 10"], unparsable_score=0.25)
    assert judge.score([sample(), sample()]).scores == pytest.approx([0.25, 0.5 * 1.0 + 0.5 * 0.25])


def test_custom_rubric():
    judge = CannedJudge(["outcome: 5 consistency: 5"], rubric="Q={question} R={reference} A={response} grade")
    judge.score([sample()])
    assert judge.prompts == ["Q=What colour? R=red A=<answer>red</answer> grade"]


def test_question_text_drops_vision_and_template_tokens():
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>How many?<|im_end|>"
    assert question_text(prompt) == "user How many?"


@pytest.mark.parametrize("config,key", [
    ({}, "stage"),
    ({"stage": "a", "path": "/x"}, "stage"),
    ({"path": "/x", "scale": 0}, "scale"),
    ({"path": "/x", "outcome_weight": 0.0, "consistency_weight": 0.0}, "outcome_weight"),
    ({"path": "/x", "mode": "ponder"}, "mode"),
    ({"path": "/x", "rubric": "{question} {score}"}, "rubric"),
    ({"path": "/x", "batch_size": 0}, "batch_size"),
])
def test_bad_config_is_one_line_naming_the_key(config, key, tmp_path, keye_registry):
    from keye.config import load_blueprint
    from keye.errors import BlueprintError
    from keye.testing import write_blueprint

    path = write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "x", "output_dir": str(tmp_path / "run")},
        "model": {"vision_encoder": {"name": "siglip_navit", "size": "tiny"},
                  "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
                  "language_model": {"name": "qwen3", "size": "tiny"}},
        "stages": [
            {"name": "a", "kind": "lm", "steps": 1, "train": ["projector"],
             "data": {"sources": {"q": {"name": "synthetic"}}}},
            {"name": "rs", "kind": "rejection_sampling",
             "options": {"modes": {"think": 1}, "rewards": {"judge": {"name": "mllm_judge", **config}}},
             "data": {"sources": {"q": {"name": "synthetic"}}}},
        ]})
    with pytest.raises(BlueprintError) as error:
        load_blueprint(path, [], keye_registry)
    message = str(error.value)
    assert f"stages.1.options.rewards.judge.{key}" in message and "\n" not in message and "bp.yaml" in message
