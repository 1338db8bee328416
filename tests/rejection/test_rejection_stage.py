"""Rejection sampling and iterative alignment in a real run: a short SFT, then two rounds of
[rejection_sampling → preference] written once as a ``repeat: 2`` group.

Each round samples the model the last round left (the rejection-sampling stage publishes the weights it sampled
from, so the MPO after it starts there), scores the replies with a rule reward and the MLLM judge (the SFT
stage as the judge: a barely trained model that answers nonsense, which is counted and scored by rule), and
writes pairs (best against worst, at least the margin apart) and SFT targets with their provenance, which the
round's MPO reads. One prompt has no reference: counted, never a crash.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from keye.data.chat import parse_answer
from keye.testing import write_blueprint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BUDGETS = {"max_tokens": 512, "pack_buffer": 8, "image_max_tokens": 16, "video_frame_tokens": [4, 16],
           "video_max_tokens": 64}
N, MARGIN, JUDGE_WEIGHT = 4, 0.5, 0.1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rs")
    noref = tmp / "noref.jsonl"  # a prompt without a reference answer
    noref.write_text(json.dumps({"kind": "conversation", "key": "noref", "messages": [
        {"role": "user", "content": "What colour is the square?"}]}) + "\n")
    out = tmp / "run"
    path = write_blueprint(tmp / "bp.yaml", {
        "run": {"name": "rs", "output_dir": str(out), "seed": 5},
        "model": {"vision_encoder": {"name": "siglip_navit", "size": "tiny"},
                  "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
                  "language_model": {"name": "qwen3", "size": "tiny"}},
        "stages": [
            # enough SFT on one question type that sampled answers are sometimes right, sometimes wrong
            {"name": "sft", "kind": "lm", "train": ["projector", "language_model"], "steps": 40,
             "optimizer": {"lr": 3e-3}, "data": {**BUDGETS, "sources": {
                 "qa": {"name": "synthetic", "tasks": ["color"], "num_samples": 2000}}}},
            {"repeat": 2, "stages": [
                {"name": "rs", "kind": "rejection_sampling",
                 "options": {"n": N, "num_prompts": 5, "max_new_tokens": 10, "batch_size": 5, "margin": MARGIN,
                             "outputs": ["pairs", "sft"], "sft_min_score": 1.0, "modes": {"think": 1, "no_think": 1},
                             "rewards": {"answer_match": {"weight": 1.0},
                                         "judge": {"name": "mllm_judge", "stage": "sft", "weight": JUDGE_WEIGHT,
                                                   "max_new_tokens": 4}}},
                 "data": {**BUDGETS, "sources": {
                     "p": {"name": "synthetic", "tasks": ["color"], "num_samples": 4, "seed": 3},
                     "noref": {"name": "jsonl", "path": str(noref)}}}},
                {"name": "mpo", "kind": "preference", "train": ["projector", "language_model"], "steps": 1,
                 "loss": {"name": "mpo"}, "options": {"reference": "precomputed"},
                 "data": {**BUDGETS, "sources": {
                     "pairs": {"name": "jsonl", "path": "${run.output_dir}/rs_r{round}/pairs.jsonl"}}}},
            ]},
            {"name": "measure", "kind": "rejection_sampling",  # measure only: nothing written, no weights
             "options": {"stage": "sft", "n": 2, "num_prompts": 2, "max_new_tokens": 4, "outputs": [],
                         "save_weights": False, "modes": {"no_think": 1}, "rewards": {"answer_match": {}}},
             "data": {**BUDGETS, "sources": {"p": {"name": "synthetic", "tasks": ["color"], "num_samples": 2}}}},
        ],
    })
    result = subprocess.run([sys.executable, "-m", "keye.launch.cli", "run", str(path)], env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text())["stages"]


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rounds_chain_and_each_mpo_reads_its_round(run):
    out, stages = run
    assert list(stages) == ["sft", "rs_r1", "mpo_r1", "rs_r2", "mpo_r2", "measure"]
    assert stages["rs_r1"]["policy"] == "stage sft" and stages["rs_r2"]["policy"] == "stage mpo_r1"
    assert stages["mpo_r1"]["initialised_from"] == str(out / "rs_r1" / "weights")  # = the model rs_r1 sampled
    assert stages["mpo_r2"]["initialised_from"] == str(out / "rs_r2" / "weights")
    assert (stages["rs_r1"]["seed"], stages["rs_r2"]["seed"]) == (5 + 1, 5 + 3)  # run.seed + stage index
    for k in (1, 2):
        pairs = stages[f"rs_r{k}"]["pairs"]
        assert pairs >= 1 and stages[f"mpo_r{k}"]["steps"] == 1
        assert len(lines(out / f"rs_r{k}" / "pairs.jsonl")) == pairs


def test_pairs_are_best_against_worst_with_provenance(run):
    out, stages = run
    for k in (1, 2):
        summary = stages[f"rs_r{k}"]
        assert summary["prompts"] == 5 and summary["samples"] == 5 * N
        assert summary["pairs"] + sum(summary["no_pair"].values()) == 5
        for pair in lines(out / f"rs_r{k}" / "pairs.jsonl"):
            meta = pair["meta"]
            prov = meta["rejection_sampling"]
            assert prov["model"] == summary["policy"] and prov["step"] == (40 if k == 1 else 1)
            assert prov["seed"] == summary["seed"] and prov["n"] == N and len(prov["scores"]) == N
            assert prov["mode"] == pair["thinking_mode"] in ("think", "no_think")
            scores, best, worst = prov["scores"], prov["chosen"], prov["rejected"]
            assert scores[best] == max(scores) and scores[worst] == min(scores)
            assert scores[best] - scores[worst] >= MARGIN
            # the independent check: with the judge worth at most 0.1, a margin of 0.5 means the chosen answer
            # is the reference and the rejected one is not
            chosen, rejected = pair["chosen"]["content"][0]["text"], pair["rejected"]["content"][0]["text"]
            assert parse_answer(chosen).strip() == meta["answer"] != parse_answer(rejected).strip()
            assert pair["prompt"][0]["content"][0]["type"] == "image"
        for target in lines(out / f"rs_r{k}" / "sft.jsonl"):
            reply = target["messages"][-1]["content"][0]["text"]
            assert parse_answer(reply).strip() == target["meta"]["answer"]  # sft_min_score 1: only right answers


def test_bad_input_is_counted_not_fatal(run):
    _, stages = run
    for k in (1, 2):
        summary = stages[f"rs_r{k}"]
        counts = summary["counts"]
        assert counts["answer_match/missing_reference"] == N  # every reply to the prompt without a reference
        judged = summary["samples"] - counts.get("judge/empty_response", 0)
        assert counts.get("judge/missing_reference", 0) <= N  # the judge is asked about non-empty replies only
        # a 40-step model is no judge: its nonsense is counted, and scored 0 by rule
        assert 1 <= counts["judge/unparsable"] <= judged
        assert 0.0 <= summary["components"]["judge"] <= 1.0
        assert set(summary["reward_by_mode"]) <= {"think", "no_think"}
        assert summary["mean_best_reward"] >= summary["mean_reward"]


def test_measure_only_writes_nothing(run):
    out, stages = run
    measure = stages["measure"]
    assert measure["outputs"] == {} and measure["samples"] == 4 and measure["policy"] == "stage sft"
    assert 0.0 <= measure["mean_reward"] <= 1.0 and set(measure["reward_by_mode"]) == {"no_think"}
    assert sorted(p.name for p in (out / "measure").iterdir()) == ["done.json", "rejection_summary.json"]
