"""The ``cot_build`` stage in a blueprint: SFT → CoT data from the SFT model → cold start on that data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from keye.testing import write_blueprint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
MODEL = {
    "vision_encoder": {"name": "siglip_navit", "size": "tiny"},
    "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
    "language_model": {"name": "qwen3", "size": "tiny"},
}
BUDGETS = {"max_tokens": 512, "pack_buffer": 8, "image_max_tokens": 16, "video_frame_tokens": [4, 16],
           "video_max_tokens": 64}


def test_sft_then_cot_build_then_cold_start(tmp_path):
    run = tmp_path / "run"
    qa = {"name": "synthetic", "tasks": ["color", "count"], "num_samples": 200, "mode_mix": {"think": 1, "auto": 1}}
    questions = {"name": "synthetic", "tasks": ["color", "count", "preference"], "num_samples": 9, "seed": 4}
    path = write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "cot", "output_dir": str(run), "seed": 5},
        "model": MODEL,
        "stages": [
            {"name": "sft", "kind": "lm", "train": ["projector", "language_model"], "steps": 2,
             "optimizer": {"lr": 1e-3}, "schedule": {"kind": "cosine", "warmup_steps": 1},
             "data": {**BUDGETS, "sources": {"qa": qa}}},
            # min_score 0 and no thought required: the 2-step teacher's paths are kept whatever they say,
            # so the next stage has data (which paths a real teacher keeps: tests/eval/test_cot_builder.py)
            {"name": "cot", "kind": "cot_build",
             "options": {"k": 2, "num_questions": 4, "max_new_tokens": 6, "modes": ["think"], "min_score": 0.0,
                         "require_thought": False, "batch_size": 4},
             "data": {**BUDGETS, "sources": {"questions": questions}}},
            {"name": "cold_start", "kind": "lm", "init_from": "sft", "train": ["projector", "language_model"],
             "steps": 1, "optimizer": {"lr": 1e-3}, "schedule": {"kind": "cosine", "warmup_steps": 1},
             "data": {**BUDGETS, "sources": {"cot": {"name": "jsonl", "path": str(run / "cot" / "cot.jsonl")}}}},
        ],
    })
    result = subprocess.run([sys.executable, "-m", "keye.launch.cli", "run", str(path)], env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = json.loads((run / "summary.json").read_text())["stages"]
    cot = stages["cot"]
    # 4 questions were asked; the preference pair among the first samples is not a question and is counted
    assert cot["questions"] == 4 and cot["written"] == 4 and cot["kept"] == {"think": 4}
    assert cot["skipped"] == {"not_a_question": 1} and cot["replies"] == 8
    lines = [json.loads(line) for line in (run / "cot" / "cot.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(line["meta"]["cot"]["teacher"] == "stage sft" for line in lines)
    assert stages["cold_start"]["modes"]["think"]["samples"] >= 1
    assert stages["cold_start"]["initialised_from"].endswith("sft/weights")


def test_bad_options_are_one_line_naming_the_key(tmp_path):
    for options, key in (({"modes": ["ponder"]}, "modes"), ({"temperature": 0.0}, "temperature"),
                         ({"stage": "later"}, "stage")):
        path = write_blueprint(tmp_path / "bp.yaml", {
            "run": {"name": "cot", "output_dir": str(tmp_path / "run")},
            "model": MODEL,
            "stages": [
                {"name": "sft", "kind": "lm", "steps": 1, "train": ["projector"],
                 "data": {**BUDGETS, "sources": {"qa": {"name": "synthetic"}}}},
                {"name": "cot", "kind": "cot_build", "options": options,
                 "data": {**BUDGETS, "sources": {"qa": {"name": "synthetic"}}}},
            ],
        })
        result = subprocess.run([sys.executable, "-m", "keye.launch.cli", "validate", str(path)], env=ENV,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if "stages.1.options" in line]
        assert len(lines) == 1 and f"options.{key}" in lines[0], result.stderr
