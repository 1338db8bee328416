"""Reward models: the contract, the weighted combiner and the built-in rule rewards, with hand-checkable
replies per think mode (the shapes `keye.data.chat` trains on), bad input scored 0 and counted, and the
registration through the real plugin host."""

import math

import pytest

from keye.rewards.contract import RewardModel, RewardOutput, RewardSample, WeightedRewards
from keye_plugins.reward_model.answer_match import AnswerMatchReward
from keye_plugins.reward_model.format import FormatReward
from keye_plugins.reward_model.length import LengthReward, overlong_penalty
from keye_plugins.reward_model.repetition import RepetitionReward, repeated_share


def S(response, **kw):
    return RewardSample(prompt="q", response=response, **kw)


def answer_match(**kw):
    return AnswerMatchReward(AnswerMatchReward.Config(**kw))


# --- answer_match ------------------------------------------------------------------------------------


def test_answer_match_reads_the_final_answer_of_every_mode():
    replies = {
        "think": "<think>2 red and 1 blue make 3</think><answer>3</answer><|im_end|>",
        "auto_direct": "<analysis>Easy. /no_think mode is more appropriate.</analysis>3<|im_end|>",
        "auto_think": "<analysis>Hard. /think mode is more appropriate.</analysis><think>count: 3</think><answer>3</answer>",
        "boxed": "<think>so 3</think><answer>The count is \\boxed{3}</answer>",
        "no_think": "3",
    }
    out = answer_match().score([S(r, reference="3") for r in replies.values()])
    assert out.scores == [1.0] * len(replies)
    wrong = answer_match().score([S("<think>I think 3</think><answer>4</answer>", reference="3")])
    assert wrong.scores == [0.0]


def test_the_thought_is_never_scored_as_the_answer():
    # cut off inside <think>: the 3 in the thought is not an answer
    out = answer_match().score([S("<think>it is 3, or", reference="3", finish_reason="length")])
    assert out.scores == [0.0] and out.counts == {"no_answer": 1} and out.components["answered"] == [0.0]


def test_choice_letter_and_number_with_tolerance():
    choices = {"A": "two", "B": "three"}
    out = answer_match(metric="choice").score([
        S("<answer>(B)</answer>", reference="B", choices=choices),
        S("The answer is B.", reference="B", choices=choices),
        S("three", reference="B", choices=choices),   # the option's text names its letter
        S("<answer>A</answer>", reference="B", choices=choices),
    ])
    assert out.scores == [1.0, 1.0, 1.0, 0.0]
    exact = answer_match(metric="number")
    assert exact.score([S("so x = 12.0", reference="12"), S("x = 12.5", reference="12")]).scores == [1.0, 0.0]
    loose = answer_match(metric="number", abs_tolerance=0.5)
    assert loose.score([S("x = 12.5", reference="12"), S("x = 12.6", reference="12")]).scores == [1.0, 0.0]
    relative = answer_match(metric="number", rel_tolerance=0.1)
    assert relative.score([S("1,080", reference="1000"), S("1,101", reference="1000")]).scores == [1.0, 0.0]
    # a sample's own metric wins over the configured default
    assert answer_match(metric="exact").score([S("about 1,050", reference="1000", metric="relaxed")]).scores == [1.0]


def test_boxes_by_iou_threshold_or_continuous():
    # predicted [0,0,10,10] vs reference [0,0,10,20]: IoU = 100 / 200 = 0.5; vs [5,0,15,10]: 50/150 = 1/3
    reply = "<|box_start|>[[0,0,10,10]]<|box_end|>"
    samples = [S(reply, metric="iou", reference=[0, 0, 10, 20]), S(reply, metric="iou", reference="[5, 0, 15, 10]")]
    out = answer_match().score(samples)
    assert out.scores == [1.0, 0.0]
    assert out.components["iou"] == pytest.approx([0.5, 1 / 3])
    assert answer_match(iou_reward="continuous").score(samples).scores == pytest.approx([0.5, 1 / 3])


def test_bad_input_scores_zero_and_is_counted_never_raised():
    out = answer_match().score([
        S("<answer>3</answer>", reference=None),
        S("<answer>3</answer>", reference=""),
        S("<answer>3</answer>", reference="3", metric="bleu"),
        S("[1, 2, 3, 4]", reference="no box here", metric="iou"),
        S("", reference="3"),
    ])
    assert out.scores == [0.0] * 5
    assert out.counts == {"missing_reference": 2, "unknown_metric": 1, "bad_reference": 1, "no_answer": 1}


# --- format ------------------------------------------------------------------------------------------

GOOD = {
    "think": "<think>2 red, 1 blue: 3</think>\n<answer>3</answer><|im_end|>",
    "no_think": "3<|im_end|>",
    "auto": "<analysis>A simple count. /no_think mode is more appropriate.</analysis>3",
    "agentic": ("<think>Crop the corner.\n```python\nimg.crop((0, 0, 50, 50))\n```\n"
                "<sandbox_output>done</sandbox_output>It says 7.</think><answer>7</answer>"),
}
BAD = {
    "think": ["3", "<think></think><answer>3</answer>", "<think>x</think><answer></answer>",
              "<think>x</think>3", "<think>x</think><answer>3</answer> and more",
              "<think>a</think><think>b</think><answer>3</answer>"],
    "no_think": ["", "<think>x</think><answer>3</answer>", "<analysis>x</analysis>3"],
    "auto": ["3", "<think>x</think><answer>3</answer>", "<analysis></analysis>3", "<analysis>x</analysis>"],
    "agentic": ["<think>no code here</think><answer>7</answer>",
                "<think>```python\nx = 1\n```<sandbox_output>1</think><answer>7</answer>",
                "```python\nx = 1\n```<answer>7</answer>"],
}


@pytest.mark.parametrize("mode", list(GOOD))
def test_format_accepts_the_structure_of_its_mode_and_rejects_others(mode):
    reward = FormatReward(FormatReward.Config())
    assert reward.score([S(GOOD[mode], mode=mode)]).scores == [1.0]
    out = reward.score([S(reply, mode=mode) for reply in BAD[mode]])
    assert out.scores == [0.0] * len(BAD[mode]), [r for r, s in zip(BAD[mode], out.scores) if s]


def test_format_auto_takes_either_branch_and_none_means_auto():
    auto_think = "<analysis>Hard. /think mode is more appropriate.</analysis><think>steps</think><answer>3</answer>"
    out = FormatReward(FormatReward.Config()).score([S(auto_think, mode="auto"), S(GOOD["auto"], mode=None),
                                                     S(GOOD["think"], mode=None)])
    assert out.scores == [1.0, 1.0, 0.0]


def test_format_needs_a_stop_and_counts_truncation_and_unknown_modes():
    out = FormatReward(FormatReward.Config()).score([
        S(GOOD["think"], mode="think", finish_reason="length"), S(GOOD["think"], mode="ponder")])
    assert out.scores == [0.0, 0.0]
    assert out.components == {"structure": [1.0, 0.0], "stop": [0.0, 1.0]}
    assert out.counts == {"truncated": 1, "unknown_mode": 1}


# --- repetition and length ---------------------------------------------------------------------------


def test_repetition_is_the_share_of_repeated_ngrams():
    # "a b a b a b": bigrams ab ba ab ba ab -> 2 distinct of 5 -> 1 - 2/5 = 0.6
    assert repeated_share("a b a b a b", 2) == pytest.approx(0.6)
    assert repeated_share("one two three four", 2) == 0.0
    assert repeated_share("too short", 3) == 0.0
    reward = RepetitionReward(RepetitionReward.Config(ngram=2, max_penalty=-0.5))
    out = reward.score([S("a b a b a b<|im_end|>"), S("all different words here")])
    assert out.scores == pytest.approx([-0.3, 0.0]) and out.components["repeated"] == pytest.approx([0.6, 0.0])


def test_length_is_dapo_soft_overlong_punishment():
    # L_max 100, buffer 20: free up to 80, linear to -1 at 100, -1 beyond
    assert [overlong_penalty(n, 100, 20) for n in (10, 80, 81, 90, 100, 101)] == pytest.approx(
        [0.0, 0.0, -0.05, -0.5, -1.0, -1.0])
    reward = LengthReward(LengthReward.Config(max_length=100, buffer=20))
    out = reward.score([S("x", num_tokens=90), S("x", num_tokens=50, finish_reason="length"), S("x")])
    assert out.scores == pytest.approx([-0.5, -1.0, 0.0])
    assert out.counts == {"no_length": 1}


# --- the combiner ------------------------------------------------------------------------------------


def test_weighted_rewards_add_by_weight_and_keep_every_component():
    models = {"answer_match": answer_match(), "format": FormatReward(FormatReward.Config()),
              "length": LengthReward(LengthReward.Config(max_length=100, buffer=20))}
    assert all(isinstance(m, RewardModel) for m in models.values())
    combined = WeightedRewards(models, {"answer_match": 1.0, "format": 0.5, "length": 2.0})
    samples = [
        S(GOOD["think"], mode="think", reference="3", num_tokens=90),      # 1 + 0.5·1 + 2·(−0.5) = 0.5
        S("<think>x</think><answer>4</answer>", mode="auto", reference="3", num_tokens=10),  # 0 + 0 + 0
        S("3", mode="no_think", reference=None, num_tokens=10,              # only the rewards it names
          reward_names=["format", "judge"]),                                # 0.5·1; judge is not configured
    ]
    out = combined.score(samples)
    assert out.scores == pytest.approx([0.5, 0.0, 0.5])
    assert out.components["answer_match"][:2] == [1.0, 0.0] and math.isnan(out.components["answer_match"][2])
    assert out.components["format/structure"] == [1.0, 0.0, 1.0]
    assert out.components["length"][:2] == pytest.approx([-0.5, 0.0]) and math.isnan(out.components["length"][2])
    assert out.counts == {"unknown_reward": 1}
    means = out.means()
    assert means["answer_match"] == 0.5 and means["score"] == pytest.approx(1 / 3)


def test_weighted_rewards_reject_weights_without_models():
    with pytest.raises(ValueError, match="judge"):
        WeightedRewards({"format": FormatReward(FormatReward.Config())}, {"format": 1.0, "judge": 1.0})
    with pytest.raises(ValueError, match="finite"):
        WeightedRewards({"format": FormatReward(FormatReward.Config())}, {"format": math.inf})
    with pytest.raises(ValueError, match="component .x. has 1 values for 2 samples"):
        RewardOutput([1.0, 2.0], {"x": [1.0]})


def test_the_builtins_are_registered_through_the_plugin_host():
    from keye.plugins import get_registry

    registry = get_registry()
    for name in ("answer_match", "format", "repetition", "length"):
        assert registry.get("reward_model", name).cls.__name__.endswith("Reward")


@pytest.mark.parametrize("cls,settings,message", [
    (AnswerMatchReward, {"metric": "bleu"}, r"rewards\.r\.metric: 'bleu' is not one of"),
    (AnswerMatchReward, {"rel_tolerance": -0.1}, r"rel_tolerance: must be a finite number >= 0"),
    (AnswerMatchReward, {"iou_reward": "soft"}, r"iou_reward"),
    (RepetitionReward, {"max_penalty": 0.5}, r"max_penalty: must be a finite number <= 0"),
    (RepetitionReward, {"ngram": 0}, r"ngram: must be an integer from 1"),
    (LengthReward, {"max_length": 100, "buffer": 200}, r"buffer: must be <= max_length \(100\), got 200"),
])
def test_check_config_names_the_bad_setting(cls, settings, message):
    from omegaconf import OmegaConf

    from keye.config.semantics import ConfigCheck
    from keye.errors import KeyeUserError

    check = ConfigCheck(OmegaConf.create({}), "rewards.r", origin=lambda key: "bp.yaml")
    cls.check_config(cls.Config(), check)  # the defaults are valid
    with pytest.raises(KeyeUserError, match=message):
        cls.check_config(cls.Config(**settings), check)
