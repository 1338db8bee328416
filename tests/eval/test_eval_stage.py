"""The ``eval`` stage in a blueprint run (TP=2, two processes) after a short lm stage, and ``keye-launch eval``
on the same finished stage from the blueprint (one process, TP=1: the checkpoint resharded on load)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from keye.testing import write_blueprint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def blueprint(tmp_path, **eval_options) -> dict:
    return {
        "run": {"name": "x", "output_dir": str(tmp_path / "run"), "seed": 6},
        "model": {"vision_encoder": {"name": "siglip_navit", "size": "tiny"},
                  "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
                  "language_model": {"name": "qwen3", "size": "tiny"}, "tokenizer": "synthetic"},
        "parallel": {"tensor": 2},
        "stages": [
            {"name": "warm", "kind": "lm", "train": ["projector", "language_model"], "steps": 2,
             "data": {"max_tokens": 128, "pack_buffer": 8, "image_max_tokens": 16,
                      "sources": {"t": {"name": "synthetic", "tasks": ["ocr"], "num_samples": 40}}}},
            {"name": "evaluate", "kind": "eval", "data": {"image_max_tokens": 16},
             "options": {"synthetic_tasks": ["count", "ocr", "grounding", "video_when"], "synthetic_samples": 8,
                         "mode": "no_think", "max_new_tokens": 8, **eval_options}},
        ],
    }


def keye_launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keye.launch.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=600)


def test_eval_stage_in_a_tp2_run_and_the_cli_on_the_same_stage(tmp_path):
    path = write_blueprint(tmp_path / "bp.yaml", blueprint(tmp_path))
    run = keye_launch("run", str(path), "--nproc", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    stage = tmp_path / "run" / "evaluate"
    rows = [json.loads(line) for line in (stage / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["task"] for r in rows} == {"count", "ocr", "grounding", "video_when"}
    assert all("<|video_pad|>" in r["prompt"] for r in rows if r["task"] == "video_when")
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["overall"]["score"] == pytest.approx(sum(r["score"] for r in rows) / 8)
    assert summary["tasks"]["grounding"]["metric"] == "iou" and "mean_iou" in summary["tasks"]["grounding"]
    assert (stage / "report.md").read_text().count("| ocr | anls | 2 |") == 1
    run_summary = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]["evaluate"]
    assert run_summary["evaluated"] == "warm" and run_summary["samples"] == 8
    assert run_summary["score"] == summary["overall"]["score"]

    out = tmp_path / "cli"
    cli = keye_launch("eval", str(path), "warm", str(stage / "synthetic_benchmark" / "heldout.jsonl"),
                      "parallel.tensor=1", "--mode", "no_think", "--max-new-tokens", "8", "--out", str(out))
    assert cli.returncode == 0, cli.stderr[-3000:]
    cli_rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in cli_rows] == [r["prompt"] for r in rows]  # same rendering, same budgets
    assert [r["response"] for r in cli_rows] == [r["response"] for r in rows]  # TP=2 in the run == one process


@pytest.mark.parametrize("options,message", [
    ({"stage": "later"}, "stages.1.options.stage: no earlier stage named 'later'; earlier stages: warm"),
    ({"synthetic_tasks": []}, "stages.1.options.benchmarks: nothing to evaluate"),
    ({"mode": "deep"}, "stages.1.options.mode: unknown mode 'deep'"),
])
def test_eval_stage_options_are_validated(tmp_path, options, message):
    path = write_blueprint(tmp_path / "bp.yaml", blueprint(tmp_path, **options))
    result = keye_launch("validate", str(path))
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
