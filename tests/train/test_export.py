"""A stage's result exported to the released Keye-VL Hugging Face format, from a TP=2 run, and loaded back."""

import json
import os
import subprocess
import sys

import torch

from keye.parallel.dist_checkpoint import read_full_tensors
from keye.testing import write_blueprint
from keye.testing.distributed import run_distributed

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _export_and_reload(blueprint: str, destination: str) -> dict:
    from keye.hf import load_keye_vl
    from keye.launch.export import export_stage

    export_stage(blueprint, "warm", destination)
    loaded = load_keye_vl(destination)
    return {name: tensor.clone() for name, tensor in loaded.model.state_dict().items() if tensor is not None}


def test_stage_export_round_trips_through_the_hf_format(tmp_path):
    path = write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "x", "output_dir": str(tmp_path / "run"), "seed": 6},
        "model": {"vision_encoder": {"name": "siglip_navit", "size": "tiny"},
                  "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
                  "language_model": {"name": "qwen3", "size": "tiny"}},
        "parallel": {"tensor": 2},
        "stages": [{"name": "warm", "kind": "lm", "train": ["projector", "language_model"], "steps": 2,
                    "data": {"max_tokens": 128, "pack_buffer": 8,
                             "sources": {"t": {"name": "synthetic", "tasks": ["ocr"], "num_samples": 40}}}}],
    })
    run = subprocess.run([sys.executable, "-m", "keye.launch.cli", "run", str(path), "--nproc", "2"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = tmp_path / "hf"
    # The export runs in one process with parallel.tensor=1: the TP=2 weights are resharded on load.
    [reloaded] = run_distributed(_export_and_reload, 1, str(path), str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "Keye" and config["vision_config"]["hidden_size"] == 32
    assert (out / "tokenizer.json").is_file()
    saved = read_full_tensors(tmp_path / "run" / "warm" / "weights")  # the TP=2 run's checkpoint, whole
    # A replicated tensor and a tensor-parallel one (row-parallel: saved from two column halves).
    norm = "language_model.gpt.decoder.final_layernorm.weight"
    assert torch.equal(reloaded[norm], saved[norm])
    fc2 = "language_model.gpt.decoder.layers.mlp.linear_fc2.weight"  # layers stacked along a leading axis
    assert torch.equal(reloaded[fc2.replace("layers.", "layers.1.")], saved[fc2][1])
