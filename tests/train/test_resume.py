"""Exact resume: a run killed (SIGKILL) mid-stage and resumed with --resume ends with bit-identical weights
to an uninterrupted run, and metrics.jsonl has each step once, with and without per-module learning rates
(``optimizer.lr_scale`` gives the optimiser several parameter groups). And a checkpoint resumes in another
tensor-parallel layout (a Megatron-Core distributed checkpoint reshards)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from keye.parallel.dist_checkpoint import read_full_tensors
from keye.testing import write_blueprint

LAUNCH = [sys.executable, "-m", "keye.launch.cli", "run"]
STEPS, EVERY = 30, 5


#: Per-module learning rates as stage 2 and the anneals of blueprints/tiny/pretrain.yaml set them.
LR_SCALES = {"one_lr": {}, "lr_scale": {"vision_encoder": 0.3, "projector": 0.5}}


def blueprint(tmp_path: Path, name: str, lr_scale: dict | None = None) -> Path:
    return write_blueprint(tmp_path / f"{name}.yaml", {
        "run": {"name": name, "output_dir": str(tmp_path / name), "seed": 3, "checkpoint_every": EVERY},
        "model": {
            "vision_encoder": {"name": "siglip_navit", "size": "tiny"},
            "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
            "language_model": {"name": "qwen3", "size": "tiny"},
        },
        "stages": [{
            "name": "stage2", "kind": "lm", "train": ["vision_encoder", "projector", "language_model"], "steps": STEPS,
            "optimizer": {"lr": 3e-3, "lr_scale": dict(lr_scale or {})}, "schedule": {"kind": "cosine", "warmup_steps": 2},
            "data": {"max_tokens": 256, "pack_buffer": 8, "image_max_tokens": 16,
                     "sources": {"a": {"name": "synthetic", "tasks": ["color", "count"], "num_samples": 500},
                                 "b": {"name": "synthetic", "tasks": ["caption"], "num_samples": 500, "seed": 5}},
                     "mixer": {"name": "weighted", "weights": {"a": 0.7, "b": 0.3}}},
        }],
    })


def final_weights(run_dir: Path) -> dict:
    return read_full_tensors(run_dir / "stage2" / "weights")


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """Uninterrupted runs, one per ``LR_SCALES`` entry, made when first asked for (each leaves its last
    checkpoint, step 25, behind)."""
    runs = {}

    def get(case: str) -> Path:
        if case not in runs:
            tmp_path = tmp_path_factory.mktemp(f"straight_{case}")
            bp = blueprint(tmp_path, "straight", LR_SCALES[case])
            done = subprocess.run([*LAUNCH, str(bp)], env=ENV, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            runs[case] = tmp_path / "straight"
        return runs[case]

    return get


@pytest.fixture
def straight(straight_runs):
    return straight_runs("one_lr")


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", LR_SCALES)
def test_killed_run_resumes_exactly(tmp_path, straight_runs, case):
    env, straight = ENV, straight_runs(case)

    killed_bp = blueprint(tmp_path, "killed", LR_SCALES[case])
    process = subprocess.Popen([*LAUNCH, str(killed_bp)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "stage2" / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert latest.exists(), "the run never reached its first checkpoint"
    assert not (tmp_path / "killed" / "stage2" / "done.json").exists(), "the run finished before it was killed"

    resumed = subprocess.run([*LAUNCH, str(killed_bp), "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())["stages"]["stage2"]
    assert summary["resumed_from_step"] >= EVERY

    expected, got = final_weights(straight), final_weights(tmp_path / "killed")
    assert expected.keys() == got.keys()
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not different, f"weights differ after resume: {different[:5]}"

    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert losses(tmp_path / "killed") == losses(straight)


def test_resumes_in_another_tensor_parallel_layout(tmp_path, straight):
    """The straight run's last checkpoint (step 25, one process) resumed with TP=2 for the last 5 steps."""
    run = tmp_path / "straight"
    shutil.copytree(straight, run)
    (run / "stage2" / "done.json").unlink()  # as if it had been killed after its last checkpoint
    bp = blueprint(tmp_path, "straight")  # the same blueprint, writing to the copy
    resumed = subprocess.run([*LAUNCH, str(bp), "--resume", "--nproc", "2", "parallel.tensor=2"], env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "position restored; random streams" in resumed.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["stages"]["stage2"]["resumed_from_step"] == STEPS - EVERY
    # TP=2 sums its matmuls in another order: the same run up to float rounding, Adam state included
    assert losses(run) == pytest.approx(losses(straight), rel=1e-5, abs=1e-6)
    expected, got = final_weights(straight), final_weights(run)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
