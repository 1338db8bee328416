"""Training stages end to end through keye-launch: freezing, layout independence, the tiny pre-training recipe."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keye.parallel.dist_checkpoint import read_full_tensors
from keye.testing import write_blueprint
from keye.train.report import headline

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, "-m", "keye.launch.cli", "run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

MODEL = {
    "vision_encoder": {"name": "siglip_navit", "size": "tiny"},
    "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
    "language_model": {"name": "qwen3", "size": "tiny"},
}
DATA = {
    "max_tokens": 256, "pack_buffer": 8, "image_max_tokens": 16, "video_frame_tokens": [4, 16], "video_max_tokens": 64,
    "sources": {"qa": {"name": "synthetic", "tasks": ["color", "count", "video_direction"], "num_samples": 300}},
    "heldout": {"qa": {"name": "synthetic", "tasks": ["color"], "split": "heldout", "num_samples": 8}},
}


def lm_stage(name: str, train: list[str], steps: int, **extra) -> dict:
    return {"name": name, "kind": "lm", "train": train, "steps": steps, "optimizer": {"lr": 3e-3},
            "schedule": {"kind": "cosine", "warmup_steps": 1}, "data": DATA, "options": {"eval_batches": 2}, **extra}


def launch(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([*LAUNCH, *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(run: Path, stage: str) -> dict:
    """A stage's weights, whole, by global name (its Megatron-Core distributed checkpoint, read here)."""
    return read_full_tensors(run / stage / "weights")


def test_frozen_modules_stay_bit_identical(tmp_path):
    path = write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "freeze", "output_dir": str(tmp_path / "run"), "seed": 5},
        "model": MODEL,
        "stages": [lm_stage("warm", ["vision_encoder", "projector", "language_model"], 2),
                   lm_stage("align", ["projector"], 3)],
    })
    launch(str(path))
    before, after = weights(tmp_path / "run", "warm"), weights(tmp_path / "run", "align")
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same == (not name.startswith("projector.")), name
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]["align"]
    assert summary["trainable_parameters"]["vision_encoder"] == 0 and summary["trainable_parameters"]["language_model"] == 0
    assert summary["trainable_parameters"]["projector"] > 0
    assert summary["initialised_from"].endswith("warm/weights")


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tp2_pp2_trains_like_one_process(tmp_path):
    content = {"run": {"name": "layout", "seed": 9}, "model": MODEL,
               "stages": [lm_stage("stage2", ["vision_encoder", "projector", "language_model"], 4)]}
    one = write_blueprint(tmp_path / "one.yaml", {**content, "run": {**content["run"], "output_dir": str(tmp_path / "one")}})
    four = write_blueprint(tmp_path / "four.yaml", {**content, "run": {**content["run"], "output_dir": str(tmp_path / "four")},
                                                   "parallel": {"tensor": 2, "pipeline": 2}})
    launch(str(one))
    launch(str(four), "--nproc", "4")
    expected, got = _losses(tmp_path / "one"), _losses(tmp_path / "four")
    assert len(got) == len(expected) == 4
    assert got == pytest.approx(expected, abs=1e-5)
    summary = json.loads((tmp_path / "four" / "summary.json").read_text())
    assert summary["world_size"] == 4
    heldout = lambda run: json.loads((tmp_path / run / "summary.json").read_text())["stages"]["stage2"]["eval_after"]["heldout_loss"]
    assert heldout("four") == pytest.approx(heldout("one"), abs=1e-5)


def test_tiny_pretrain_blueprint_end_to_end_shortened(tmp_path):
    out = tmp_path / "tiny"
    shorten = [f"run.output_dir={out}", "stages.0.steps=3", "stages.1.steps=2", "stages.2.steps=3",
               "stages.3.steps=2", "stages.4.steps=2", "stages.0.options.eval_pairs=8"]
    shorten += [f"stages.{i}.options.eval_batches=1" for i in (1, 2, 3, 4, 6)]
    shorten += ["stages.7.options.synthetic_samples=4", "stages.7.options.max_new_tokens=4"]
    launch(str(ROOT / "blueprints" / "tiny" / "pretrain.yaml"), *shorten)
    summary = json.loads((out / "summary.json").read_text())["stages"]
    assert list(summary) == ["stage0_vit", "stage1_align", "stage2_multitask", "stage3_anneal_image",
                             "stage3_anneal_video", "stage3_merge", "stage3_eval", "final_eval"]
    assert summary["final_eval"]["evaluated"] == "stage3_merge" and summary["final_eval"]["samples"] == 4
    assert summary["stage0_vit"]["eval_after"]["pairs"] == 8
    assert summary["stage3_eval"]["initialised_from"].endswith("stage3_merge/weights")
    merged = weights(out, "stage3_merge")
    a, b = weights(out, "stage3_anneal_image"), weights(out, "stage3_anneal_video")
    for name in merged:
        torch.testing.assert_close(merged[name], (a[name] + b[name]) / 2, rtol=0, atol=1e-6)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 + 2 + 3 + 2 + 2
    assert {"stage", "step", "loss", "lr", "grad_norm", "skipped_step"} <= set(records[-1])
    report = (out / "report.md").read_text()
    assert "| stage2_multitask | lm | 3 |" in report and (out / "plots" / "loss_stage2_multitask.png").is_file()
    # each stage's headline (its kind's headline_keys): retrieval and accuracy before -> after, the eval's score
    vit, lm, final = summary["stage0_vit"], summary["stage2_multitask"], summary["final_eval"]
    assert headline(vit) == [(key, vit["eval_before"][key], vit["eval_after"][key])
                             for key in ("image_to_text_top1", "text_to_image_top1", "chance")]
    assert headline(lm)[0] == ("answer_accuracy", lm["eval_before"]["answer_accuracy"], lm["eval_after"]["answer_accuracy"])
    assert headline(final)[0] == ("score", None, final["score"]) and headline(summary["stage3_merge"]) == []
    rows = {line.split(" | ")[0][2:]: line for line in report.splitlines() if line.startswith("| stage")}
    assert "image_to_text_top1 " in rows["stage0_vit"] and " → " in rows["stage0_vit"]
    assert "answer_accuracy " in rows["stage2_multitask"] and "heldout_loss " in rows["stage2_multitask"]


def test_weights_load_into_a_different_layout(tmp_path):
    """Trained with TP=2; evaluated with PP=2 and with one process: the same held-out loss."""
    trained = write_blueprint(tmp_path / "tp2.yaml", {
        "run": {"name": "tp2", "output_dir": str(tmp_path / "tp2"), "seed": 4}, "model": MODEL,
        "parallel": {"tensor": 2}, "stages": [lm_stage("warm", ["vision_encoder", "projector", "language_model"], 3)],
    })
    launch(str(trained), "--nproc", "2")
    expected = json.loads((tmp_path / "tp2" / "summary.json").read_text())["stages"]["warm"]["eval_after"]["heldout_loss"]
    for name, parallel, nproc in (("pp2", {"pipeline": 2}, "2"), ("one", {}, "1")):
        path = write_blueprint(tmp_path / f"{name}.yaml", {
            "run": {"name": name, "output_dir": str(tmp_path / name), "seed": 4}, "model": MODEL, "parallel": parallel,
            "stages": [lm_stage("eval", [], 0, init_from=str(tmp_path / "tp2" / "warm"))],
        })
        launch(str(path), "--nproc", nproc)
        result = json.loads((tmp_path / name / "summary.json").read_text())["stages"]["eval"]
        assert result["eval_after"]["heldout_loss"] == pytest.approx(expected, abs=1e-5), name
        assert result["initialised_from"] == str(tmp_path / "tp2" / "warm" / "weights")
