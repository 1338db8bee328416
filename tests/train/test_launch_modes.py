"""How keye-launch starts work: --stage runs one stage from the previous one's weights, and a run started
under torchrun uses the environment torchrun gives it instead of spawning its own processes."""

import json
import os
import subprocess
import sys

from keye.parallel.dist_checkpoint import read_full_tensors
from keye.parallel.state import free_port
from keye.testing import write_blueprint

MODEL = {"language_model": {"name": "qwen3", "size": "tiny"}}
DATA = {"max_tokens": 128, "pack_buffer": 8,
        "sources": {"t": {"name": "synthetic", "tasks": ["ocr"], "num_samples": 100}},
        "heldout": {"t": {"name": "synthetic", "tasks": ["ocr"], "split": "heldout", "num_samples": 4}}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def stages():
    return [{"name": name, "kind": "lm", "train": ["language_model"], "steps": 2, "data": DATA,
             "options": {"eval_batches": 1}} for name in ("first", "second")]


def test_stage_flag_runs_one_stage_from_the_previous_weights(tmp_path):
    # Text-only model: synthetic OCR samples carry an image, so give the model vision too.
    model = {**MODEL, "vision_encoder": {"name": "siglip_navit", "size": "tiny"},
             "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64}}
    path = write_blueprint(tmp_path / "bp.yaml", {"run": {"name": "s", "output_dir": str(tmp_path / "run")},
                                                  "model": model, "stages": stages()})
    cli = [sys.executable, "-m", "keye.launch.cli", "run", str(path)]
    assert subprocess.run([*cli, "--stage", "first"], env=ENV, capture_output=True).returncode == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["stages"]) == ["first"]
    assert subprocess.run([*cli, "--stage", "second"], env=ENV, capture_output=True).returncode == 0
    second = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]["second"]
    assert second["initialised_from"].endswith("first/weights")


def test_under_torchrun_uses_the_given_environment(tmp_path):
    """Two data-parallel ranks under torchrun: the distributed optimiser, its checkpoint and --resume."""
    model = {**MODEL, "vision_encoder": {"name": "siglip_navit", "size": "tiny"},
             "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64}}
    stage = {**stages()[0], "steps": 4}
    path = write_blueprint(tmp_path / "bp.yaml", {"run": {"name": "t", "output_dir": str(tmp_path / "run"), "checkpoint_every": 2},
                                                  "model": model, "stages": [stage]})

    def torchrun(*extra):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
             "-m", "keye.launch.cli", "run", str(path), *extra],
            env=ENV, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((tmp_path / "run" / "summary.json").read_text())

    summary = torchrun()
    assert summary["world_size"] == 2
    saved = read_full_tensors(tmp_path / "run" / "first" / "checkpoints" / "step_00000002")
    # Megatron's distributed optimizer state as global tensors, one per trained weight (its fully reshardable
    # format); the frozen vision encoder and projector have none
    trained = [key for key in saved if key.startswith("language_model.")]
    moments = {key.removeprefix("optimizer.state.exp_avg_sq.") for key in saved if key.startswith("optimizer.state.exp_avg_sq.")}
    assert trained and moments == set(trained)
    metrics = tmp_path / "run" / "metrics.jsonl"
    straight = [json.loads(line) for line in metrics.read_text().splitlines()]
    (tmp_path / "run" / "first" / "done.json").unlink()  # as if the run had died after its last checkpoint
    resumed = torchrun("--resume")
    assert resumed["stages"]["first"]["resumed_from_step"] == 2
    again = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    # Step 4's loss depends on step 3's update, so on the restored Adam state, not only the weights.
    assert [r["loss"] for r in again] == [r["loss"] for r in straight]
    assert [r["grad_norm"] for r in again] == [r["grad_norm"] for r in straight]
