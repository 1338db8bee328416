"""The ``rl`` stage through ``keye-launch run`` on a fresh tiny model: one process, and TP=2 and PP=2 in two real
gloo processes each, for the same seed. Shared runs (module fixture), checked for:

- the same rollouts (token ids of every step, the second drawn after an update) and the same losses,
  gradient norms, KL and held-out rewards in every layout: rollouts (the in-process generator under TP/PP),
  update and reference agree;
- the step metrics (reward per component and mode, think ratio, reply length, KL, clip fraction, entropy,
  times, counts) in metrics.jsonl, before/after held-out reward (of 2 sampled replies per prompt, the same in
  every layout) in the summary, the reward curve report;
- bad input handled by rule and counted, never a crash: a prompt without a reference (``answer_match``
  scores it 0 and counts it), a conversation that asks nothing (skipped by reason) and a prompt whose image is
  missing (skipped by the source, by kind), replies cut by the length limit (counted), groups whose rewards
  are all equal (counted).
"""

import json
import re
from pathlib import Path

import pytest

from keye.testing import write_blueprint
from keye.testing.third_party import launch as launch_with, write_distribution

STEPS = 2
#: a third-party reward model: a random model never answers right, and its replies need a reward that varies
REWARD_PLUGIN = """
    from dataclasses import dataclass

    from keye import hookimpl
    from keye.rewards.contract import RewardOutput


    class TextLength:
        \"\"\"(characters of the reply mod 7) / 6: arbitrary, but different for different replies.\"\"\"

        @dataclass
        class Config:
            pass

        def __init__(self, config, ctx=None):
            self.config = config

        def score(self, samples):
            return RewardOutput([(len(s.response) % 7) / 6 for s in samples])


    @hookimpl
    def keye_register_reward_models(register):
        register("text_length", TextLength)
"""


def _bad_prompts(folder: Path) -> Path:
    lines = [
        {"kind": "rl_prompt", "key": "no-reference", "reward_names": ["answer_match", "format"],
         "messages": [{"role": "user", "content": "how many circles?"}]},
        {"kind": "conversation", "key": "asks-nothing", "messages": [{"role": "assistant", "content": "hello"}]},
        {"kind": "rl_prompt", "key": "missing-image", "reference_answer": "red", "reward_names": ["answer_match"],
         "messages": [{"role": "user", "content": [{"type": "image", "image": {"path": "gone.png"}},
                                                   {"type": "text", "text": "what colour?"}]}]},
    ]
    path = folder / "bad.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def blueprint(folder: Path, name: str, **parallel: int) -> Path:
    return write_blueprint(folder / f"{name}.yaml", {
        "run": {"name": name, "output_dir": str(folder / name), "seed": 5},
        "parallel": parallel,
        "model": {
            "vision_encoder": {"name": "siglip_navit", "size": "tiny"},
            "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
            "language_model": {"name": "qwen3", "size": "tiny"},
        },
        "stages": [{
            "name": "rl", "kind": "rl", "train": ["projector", "language_model"], "steps": STEPS,
            "optimizer": {"lr": 1e-3}, "schedule": {"kind": "constant"},
            "loss": {"name": "grpo", "beta": 0.05, "kl_estimator": "k3", "clip_high": 0.28},
            "options": {
                "prompts_per_step": 4, "group_size": 3, "updates": 2, "max_new_tokens": 6,
                "mode_mix": {"think": 0.5, "no_think": 0.5}, "mask_truncated": False, "save_rollouts": True,
                "rewards": {"answer_match": {"weight": 1.0}, "format": {"weight": 0.5},
                            "text_length": {"weight": 1.0}},
                "eval_prompts": 3, "eval_samples": 2,
            },
            "data": {
                "max_tokens": 160, "image_max_tokens": 16, "video_frame_tokens": [4, 16], "video_max_tokens": 64,
                "sources": {"qa": {"name": "synthetic", "tasks": ["count", "color"], "num_samples": 64},
                            "bad": {"name": "jsonl", "path": str(_bad_prompts(folder)), "max_bad_fraction": 0.5}},
                "mixer": {"name": "weighted", "weights": {"qa": 0.6, "bad": 0.4}},
                "heldout": {"qa": {"name": "synthetic", "tasks": ["count", "color"], "split": "heldout",
                                   "num_samples": 3}},
            },
        }],
    })


def launch(site: Path, *args: str) -> None:
    result = launch_with(site, "run", *args)
    assert result.returncode == 0, result.stderr[-3000:]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rl")
    site = folder / "site"
    write_distribution(site, "keye-test-rl-reward", "0.1", {"text_length": "keye_test_rl_reward"},
                       {"keye_test_rl_reward.py": REWARD_PLUGIN})
    launch(site, str(blueprint(folder, "one")))
    launch(site, str(blueprint(folder, "tp2", tensor=2)), "--nproc", "2")
    launch(site, str(blueprint(folder, "pp2", pipeline=2)), "--nproc", "2")
    return folder


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_model_parallel_layouts_give_the_same_rollouts_and_update(runs, layout):
    one, other = lines(runs / "one" / "rl" / "rollouts.jsonl"), lines(runs / layout / "rl" / "rollouts.jsonl")
    assert {line["step"] for line in one} == set(range(1, STEPS + 1))
    assert [line["token_ids"] for line in other] == [line["token_ids"] for line in one]
    assert [line["reward"] for line in other] == pytest.approx([line["reward"] for line in one], abs=1e-6)
    first, second = lines(runs / "one" / "metrics.jsonl"), lines(runs / layout / "metrics.jsonl")
    assert all(line["updates"] == 2 for line in first), first  # something to learn from at every step
    for name in ("loss", "grad_norm", "kl", "clip_fraction", "entropy", "reward"):
        assert [line[name] for line in second] == pytest.approx([line[name] for line in first], abs=2e-5), name
    after = json.loads((runs / layout / "summary.json").read_text())["stages"]["rl"]["eval_after"]
    expected = json.loads((runs / "one" / "summary.json").read_text())["stages"]["rl"]["eval_after"]
    assert after == pytest.approx(expected, abs=1e-6)


def test_metrics_summary_and_report(runs):
    metrics = lines(runs / "one" / "metrics.jsonl")
    assert [line["step"] for line in metrics] == list(range(1, STEPS + 1))
    for line in metrics:
        for name in ("loss", "reward", "reward/answer_match", "reward/format", "reward/text_length",
                     "reward/format/structure", "think_ratio", "response_tokens", "kl", "clip_fraction", "entropy",
                     "ratio", "rollout_time_s", "update_time_s", "rollouts", "truncated", "groups",
                     "groups_all_equal", "trained_rollouts"):
            assert name in line, name
        assert set(k for k in line if k.startswith("reward_by_mode/")) <= {"reward_by_mode/think",
                                                                           "reward_by_mode/no_think"}
        assert line["kl"] >= 0.0 and 0.0 <= line["clip_fraction"] <= 1.0 and line["entropy"] > 0
    # μ = 2: the second update of a step is off-policy (ratio != 1) and the policy has left the reference
    assert metrics[0]["ratio"] != pytest.approx(1.0, abs=1e-7) and metrics[0]["kl"] > 0
    summary = json.loads((runs / "one" / "summary.json").read_text())["stages"]["rl"]
    for stage_eval in (summary["eval_before"], summary["eval_after"]):
        assert stage_eval["heldout_rollouts"] == 3 * 2 and "heldout_reward" in stage_eval  # 2 sampled replies each
    assert summary["reference"] == "live"
    report = (runs / "one" / "rl" / "report.md").read_text()
    assert "reward_curve.png" in report and (runs / "one" / "rl" / "reward_curve.png").stat().st_size > 1000
    # the run's report: the held-out reward before -> after, per component (three reward models), and the curve
    run_report = (runs / "one" / "report.md").read_text()
    row = next(line for line in run_report.splitlines() if line.startswith("| rl | rl |"))
    before, after = summary["eval_before"], summary["eval_after"]
    for key in ("heldout_reward/answer_match", "heldout_reward/format", "heldout_reward/text_length"):
        assert f"<br>{key} " in row, (key, row)
    shown = [f"{value:.3f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:g}"
             for value in (before["heldout_reward"], after["heldout_reward"])]
    assert re.search(rf"heldout_reward {shown[0]}0* → {shown[1]}0*<br>", row), (shown, row)
    assert "![rl reward curve](rl/reward_curve.png)" in run_report


def test_bad_input_is_handled_by_rule_and_counted(runs):
    metrics = lines(runs / "one" / "metrics.jsonl")
    total = lambda name: sum(line.get(name, 0) for line in metrics)  # noqa: E731
    assert total("count/answer_match/missing_reference") >= 3  # the prompt without a reference, G rollouts
    assert total("truncated") >= 1 and total("count/format/truncated") == total("truncated")
    # dynamic sampling: a group whose rewards are all equal is counted and none of its rollouts trains
    rollouts = lines(runs / "one" / "rl" / "rollouts.jsonl")
    groups: dict = {}
    for line in rollouts:
        groups.setdefault((line["step"], line["group"]), []).append(line)
    equal = [g for g in groups.values() if len({line["reward"] for line in g}) == 1]
    assert total("groups") == len(groups) and total("groups_all_equal") == len(equal)
    assert not any(line["trained"] for g in equal for line in g)
    assert total("trained_rollouts") == sum(line["trained"] for line in rollouts)
    skipped = json.loads((runs / "one" / "summary.json").read_text())["stages"]["rl"]["data"]["skipped_prompts"]
    assert skipped.get("no_user_turn", 0) >= 1
    bad = json.loads((runs / "one" / "summary.json").read_text())["stages"]["rl"]["data"]["bad_inputs"]
    assert bad.get("missing_media", 0) >= 1  # the jsonl source skips it, by kind
