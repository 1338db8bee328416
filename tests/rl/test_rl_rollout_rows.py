"""RL prompts and rollout rows, without a model: what a prompt is scored against, the mode it is rendered in,
the training row a rollout becomes (labels on the reply only, the generator's positions), the order in which a
pack lists its replies, the reward options' one-line errors, and the step metrics' means and counts."""

import math

import pytest
import torch

from keye.data.batch import IGNORE
from keye.data.sample import ConversationSample, Message, RLPromptSample, TextPart
from keye.data.sources import LoadedSample
from keye.data.synthetic import generate
from keye.errors import KeyeUserError
from keye.generate.contract import GenerationRequest
from keye.rewards.contract import RewardOutput
from keye.rl.metrics import Rollouts
from keye.rl.packing import pack_rollouts, rollout_sample
from keye.rl.prompts import RLPrompt, choose_mode, prompt_of
from keye.rl.rollouts import Rendered, Rollout, reward_samples


def _family_prompt(family: str) -> LoadedSample:
    for index in range(200):
        loaded = generate(index, tasks=["rl"], seed=5)
        if loaded.sample.meta["family"] == family:
            return loaded
    raise AssertionError(f"no {family} prompt in 200 samples")


def test_prompt_takes_its_metric_from_the_family_and_keeps_a_missing_reference():
    when = prompt_of(_family_prompt("video_when"))
    assert when.metric == "relaxed"  # BENCHMARK_METRICS: RL prompts carry a family, not a metric
    assert re_number(when.reference)  # "at 2.0 seconds" -> "2.0": the relaxed metric compares numbers
    assert when.reward_names == ["answer_match", "format"] and when.task == "rl"
    loaded = _family_prompt("color")
    color = prompt_of(loaded)
    assert color.metric is None and color.reference == loaded.sample.reference_answer  # the reward's default
    no_reference = RLPromptSample("k", [Message("user", [TextPart("how many?")])], ["answer_match"])
    prompt = prompt_of(LoadedSample(no_reference, {}))
    assert isinstance(prompt, RLPrompt) and prompt.reference is None  # scored 0 and counted by the reward, not dropped
    no_user = ConversationSample("c", [Message("assistant", [TextPart("hi")])])
    assert prompt_of(LoadedSample(no_user, {})) == "no_user_turn"


def re_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def test_modes_follow_the_mix_and_repeat_for_the_same_step():
    prompts = [RLPrompt(f"p{i}", [], {}) for i in range(2000)]
    mix = {"think": 0.75, "no_think": 0.25}
    modes = [choose_mode(p, mix, seed=1, step=3) for p in prompts]
    assert modes == [choose_mode(p, mix, seed=1, step=3) for p in prompts]  # every rank draws the same
    assert modes != [choose_mode(p, mix, seed=1, step=4) for p in prompts]
    assert abs(modes.count("think") / len(modes) - 0.75) < 0.04
    assert choose_mode(RLPrompt("x", [], {}, mode="auto"), {}, seed=1, step=1) == "auto"  # no mix: its own


def _rollout(prompt_ids, reply, group=0, positions=None) -> Rollout:
    ids = torch.tensor(prompt_ids)
    positions = positions if positions is not None else torch.arange(len(prompt_ids)).expand(3, -1)
    request = GenerationRequest(ids, position_ids=positions, n=1)
    prompt = RLPrompt("p", [], {}, reference="2", metric="exact", reward_names=["format"], text="how many?")
    return Rollout(group, Rendered(prompt, "think", request), list(reply), [-0.5] * len(reply), "length", "two")


def test_a_rollout_row_has_labels_on_the_reply_and_the_generator_positions():
    # a prompt whose M-RoPE ids peak above its length (an image block), as the generator sees it
    positions = torch.tensor([[0, 1, 1, 1, 3], [0, 1, 2, 2, 3], [0, 1, 1, 2, 3]])
    sample = rollout_sample(_rollout([5, 6, 7, 8, 9], [20, 21, 22], positions=positions), "0")
    assert sample.input_ids.tolist() == [5, 6, 7, 8, 9, 20, 21, 22]
    assert sample.labels.tolist() == [IGNORE] * 4 + [20, 21, 22, IGNORE]  # position t predicts id t + 1
    assert sample.position_ids[:, 5:].tolist() == [[4, 5, 6]] * 3  # max + 1 + k on all axes
    assert sample.answer_mask.tolist() == [False] * 4 + [True] * 3 + [False]


def test_packs_list_their_replies_in_the_order_logits_at_returns_them():
    rollouts = [_rollout([1, 2, 3], [10 + i] * (i + 1), group=i // 2) for i in range(6)]
    advantages = torch.arange(6, dtype=torch.float32)
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    packs = pack_rollouts(rollouts, [0, 2, 3, 4, 5], advantages, weights, max_tokens=16)
    seen = []
    for pack in packs:
        batch = pack.batch
        keep = batch.loss_mask[0] != 0
        flat = torch.cat(batch.answer_segments)
        assert torch.equal(flat, torch.nonzero(keep).flatten())  # ascending: logits_at's batch-major order
        for j, index in enumerate(pack.rollouts):
            assert batch.labels[0][batch.answer_segments[j]].tolist() == rollouts[index].token_ids
            assert pack.advantages[j] == advantages[index] and pack.weights[j] == weights[index]
        assert pack.lengths == [len(rollouts[i].token_ids) for i in pack.rollouts]
        seen += pack.rollouts
    assert sorted(seen) == [0, 2, 3, 4, 5]  # rollout 1 (not chosen) is in no pack
    with pytest.raises(ValueError, match="does not fit"):
        pack_rollouts(rollouts, [5], advantages, weights, max_tokens=5)


def test_reward_samples_carry_what_the_rewards_need():
    [sample] = reward_samples([_rollout([1, 2], [3, 4])])
    assert (sample.prompt, sample.response, sample.mode, sample.reference, sample.metric) == (
        "how many?", "two", "think", "2", "exact")
    assert sample.finish_reason == "length" and sample.num_tokens == 2 and sample.reward_names == ["format"]


def test_reward_options_fail_in_one_line_naming_the_key(keye_empty_host):
    from keye.rl.rewards import build_rewards, reward_configs
    from keye_plugins.reward_model import answer_match, format, length

    for module in (answer_match, format, length):
        keye_empty_host.add_plugin(module, module.__name__)
    keye_registry = keye_empty_host.registry

    rewards = build_rewards({"answer_match": {"weight": 2.0, "metric": "number"}, "format": {}}, keye_registry)
    assert rewards.weights == {"answer_match": 2.0, "format": 1.0}
    assert rewards.models["answer_match"].config.metric == "number"
    cases = {
        "rewards.answer_macth: unknown reward_model": {"answer_macth": {}},
        "rewards.format.strict: unknown key for reward_model 'format'": {"format": {"strict": True}},
        "rewards.format.weight: must be a finite number": {"format": {"weight": "high"}},
        "rewards.length: ": {"length": {"max_length": "many"}},
        "rewards: no reward model": {},
        "rewards.format: expected {weight: w, <its settings>}, got 1": {"format": 1},
    }
    for expected, spec in cases.items():
        with pytest.raises(KeyeUserError) as caught:
            reward_configs(spec, keye_registry)
        assert str(caught.value).startswith(expected) and "\n" not in str(caught.value), str(caught.value)


def test_step_metrics_average_per_component_and_mode_and_count_events():
    rollouts = [_rollout([1], [2] * n) for n in (1, 3)]
    rollouts[0].text = "<think>a</think><answer>2</answer>"
    rollouts[1].rendered = Rendered(rollouts[1].rendered.prompt, None, rollouts[1].rendered.request)
    stats = Rollouts()
    stats.add(rollouts, RewardOutput([1.0, 0.0], {"format": [1.0, math.nan]}, {"format/truncated": 2}))
    means = stats.reduce()
    assert means["reward"] == 0.5 and means["reward/format"] == 1.0  # NaN: not applicable, skipped
    assert means["reward_by_mode/think"] == 1.0 and means["reward_by_mode/none"] == 0.0
    assert means["think_ratio"] == 0.5 and means["response_tokens"] == 2.0
    assert means["rollouts"] == 2 and means["truncated"] == 2 and means["count/format/truncated"] == 2
