"""report.md's headline per stage (`keye.train.report`): each stage kind's ``headline_keys`` picked from its summary,
before → after for held-out evaluations, wildcards over components, and images a stage lists. Real runs' reports
are checked where those runs are made (tests/train/test_stages.py, tests/rl/test_rl_stage.py)."""

from __future__ import annotations

import json

from keye.train.report import headline, write_report
from keye_plugins.stage.contrastive import ContrastiveStage
from keye_plugins.stage.rejection_sampling import RejectionSamplingStage
from keye_plugins.stage.rl import RLStage

#: summaries as the stages write them (abridged from tiny recipe runs)
RETRIEVAL = {"kind": "contrastive", "headline_keys": list(ContrastiveStage.headline_keys), "steps": 800,
             "eval_before": {"pairs": 64, "image_to_text_top1": 0.03125, "text_to_image_top1": 0.015625, "chance": 0.015625},
             "eval_after": {"pairs": 64, "image_to_text_top1": 0.21875, "text_to_image_top1": 0.140625, "chance": 0.015625}}
RL = {"kind": "rl", "headline_keys": list(RLStage.headline_keys), "steps": 150,
      "eval_before": {"heldout_reward": 0.61, "heldout_reward/answer_match": 0.18, "heldout_reward/answer_match/answered": 1.0,
                      "heldout_reward/format": 0.86, "heldout_reward_by_mode/think": 0.5, "heldout_think_ratio": 0.46},
      "eval_after": {"heldout_reward": 0.68, "heldout_reward/answer_match": 0.24, "heldout_reward/answer_match/answered": 1.0,
                     "heldout_reward/format": 0.9, "heldout_reward_by_mode/think": 0.61, "heldout_think_ratio": 0.46}}
ROUND = {"kind": "rejection_sampling", "headline_keys": list(RejectionSamplingStage.headline_keys),
         "prompts": 128, "pairs": 88, "mean_reward": 0.59, "mean_best_reward": 0.91,
         "pair_rewards": {"chosen": 1.2, "rejected": 0.3},
         "reward_by_mode": {"no_think": 0.67, "think": 0.52},
         "components": {"answer_match": 0.17, "answer_match/answered": 0.94, "format": 0.85, "judge": 0.0, "judge/outcome": None},
         "counts": {"answer_match/no_answer": 33, "judge/unparsable": 510, "judge/unparsable_outcome": 510}}


def test_evaluations_show_before_and_after_in_the_kinds_order():
    assert headline(RETRIEVAL) == [("image_to_text_top1", 0.03125, 0.21875), ("text_to_image_top1", 0.015625, 0.140625),
                                   ("chance", 0.015625, 0.015625)]


def test_a_wildcard_is_one_key_part_and_a_breakdown_into_one_part_is_left_out():
    rows = headline(RL)
    # heldout_reward/* is each component, not its parts (answered); one think mode only: no breakdown
    assert rows == [("heldout_reward", 0.61, 0.68), ("heldout_reward/answer_match", 0.18, 0.24),
                    ("heldout_reward/format", 0.86, 0.9), ("heldout_think_ratio", 0.46, 0.46)]


def test_values_outside_evaluations_are_shown_as_reported():
    assert headline(ROUND) == [
        ("pairs", None, 88), ("pair_rewards.chosen", None, 1.2), ("pair_rewards.rejected", None, 0.3),
        ("mean_reward", None, 0.59), ("mean_best_reward", None, 0.91),
        ("reward_by_mode.no_think", None, 0.67), ("reward_by_mode.think", None, 0.52),
        ("components.answer_match", None, 0.17), ("components.format", None, 0.85), ("components.judge", None, 0.0),
        ("counts.judge/unparsable", None, 510)]  # a wildcard inside a key is no breakdown: one match is shown
    assert headline({"kind": "merge", "tensors": 34}) == []  # a kind without headline keys shows none


def test_the_report_has_a_row_per_stage_and_the_images_a_stage_lists(tmp_path):
    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "reward_curve.png").write_bytes(b"\x89PNG")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"stage": "rl", "step": 1, "loss": 0.1, "lr": 1e-4}) + "\n")
    summary = {"run": "x", "world_size": 1, "stages": {"stage0": RETRIEVAL, "rl": {**RL, "plots": ["reward_curve.png"]},
                                                        "rs": ROUND}}
    text = write_report(tmp_path, summary).read_text()
    assert "| stage0 | contrastive | 800 |  | image_to_text_top1 0.031 → 0.219<br>text_to_image_top1 0.016 → 0.141" in text
    assert "| rl | rl | 150 |  | heldout_reward 0.610 → 0.680<br>heldout_reward/answer_match 0.180 → 0.240" in text
    assert "| rs | rejection_sampling |  |  | pairs 88<br>pair_rewards.chosen 1.200<br>" in text
    assert "![rl loss](plots/loss_rl.png)" in text and "![rl reward curve](rl/reward_curve.png)" in text
