"""``keye-launch convert`` as a user runs it: separate processes, real gloo ranks, real Megatron-Core checkpoints.

HF → Megatron-Core distributed checkpoint written by 2 tensor-parallel ranks → HF, read back in one process
and in 2 pipeline stages (so the checkpoint is resharded on the way): every tensor, the unused ones
included, must come back with the same bits and dtype, and the non-weight files must travel along.
The converted folder has a stage's layout (``weights/``), so a stage starts from it as from another stage.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_keye_vl_checkpoint import TINY_CONFIG, write_tiny_checkpoint

LAUNCH = [sys.executable, "-m", "keye.launch.cli"]


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("convert") / "hf"
    weights = write_tiny_checkpoint(path, seed=7)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))  # an asset to carry
    return path, weights


@pytest.fixture(scope="module")
def megatron_dir(hf_dir) -> Path:
    """The tiny checkpoint converted by 2 tensor-parallel ranks."""
    src, _ = hf_dir
    megatron = src.parent / "megatron"
    result = launch("convert", "hf-to-megatron", src, megatron, "--tensor", 2, "--pipeline", 1)
    assert result.returncode == 0, result.stderr[-3000:]
    return megatron


def test_hf_to_megatron_writes_a_tp2_dist_checkpoint(megatron_dir):
    meta = json.loads((megatron_dir / "keye_checkpoint.json").read_text())
    assert (meta["tensor"], meta["pipeline"], meta["dtype"]) == (2, 1, "float32")
    backend = json.loads((megatron_dir / "weights" / "metadata.json").read_text())
    assert backend["sharded_backend"] == "torch_dist"  # Megatron-Core's dist_checkpointing format
    assert len(list((megatron_dir / "weights").glob("*.distcp"))) >= 2  # both ranks wrote their shards
    assert not (megatron_dir / "model").exists()


def test_a_stage_starts_from_the_converted_folder(megatron_dir, tmp_path):
    """The layout stages read: ``init_from: DST`` is a weights folder, and the run's checks accept it."""
    from keye.config import check_runnable, load_blueprint
    from keye.plugins import get_registry
    from keye.testing import write_blueprint
    from keye.train.init_plan import KEYE, folder_kind

    assert folder_kind(megatron_dir, "init_from") == KEYE
    path = write_blueprint(tmp_path / "bp.yaml", {
        "model": {"language_model": {"name": "qwen3", "size": "tiny"}},
        "stages": [{"name": "sft", "kind": "lm", "init_from": str(megatron_dir)}]})
    check_runnable(load_blueprint(path, [], get_registry()))


def test_llm_norms_are_saved_under_transformer_engine_names(megatron_dir):
    """Megatron's local spec saves the pre-attention and pre-MLP RMSNorms under TE's fused names, so a
    model built with the TE spec (GPU) loads checkpoints written without TE; `unfused_name` maps a TE
    model's parameter names back to the names the HF mapping uses."""
    from keye.hf.weights import unfused_name
    from keye.parallel.dist_checkpoint import read_full_tensors

    keys = set(read_full_tensors(megatron_dir / "weights"))
    layers = "language_model.gpt.decoder.layers."
    assert {layers + "self_attention.linear_qkv.layer_norm_weight", layers + "mlp.linear_fc1.layer_norm_weight"} <= keys
    assert not any(key.startswith(layers) and "input_layernorm" in key for key in keys)
    assert unfused_name(layers + "3.self_attention.linear_qkv.layer_norm_weight") == layers + "3.input_layernorm.weight"
    assert unfused_name(layers + "0.mlp.linear_fc1.layer_norm_weight") == layers + "0.pre_mlp_layernorm.weight"
    for unchanged in (layers + "0.mlp.linear_fc1.weight", "vision_encoder.decoder.layers.0.input_layernorm.bias"):
        assert unfused_name(unchanged) == unchanged


@pytest.mark.parametrize("layout", [(), ("--pipeline", 2)], ids=["one_process", "pipeline2"])
def test_back_to_hf_is_bit_exact(hf_dir, megatron_dir, tmp_path, layout):
    """Read back in another layout than the one that wrote it (Megatron reshards): same bits."""
    src, weights = hf_dir
    back = tmp_path / "back"
    result = launch("convert", "megatron-to-hf", megatron_dir, back, *layout)
    assert result.returncode == 0, result.stderr[-3000:]
    restored = load_file(str(back / "model.safetensors"))
    assert set(restored) == set(weights)
    changed = [n for n in weights if restored[n].dtype != weights[n].dtype or not torch.equal(restored[n], weights[n])]
    assert not changed, changed[:5]
    config = json.loads((back / "config.json").read_text())
    assert {k: config.get(k) for k in TINY_CONFIG if k != "vision_config"} == {  # export may add keys (auto_map)
        k: v for k, v in TINY_CONFIG.items() if k != "vision_config"
    }
    for name in ("tokenizer_config.json", "generation_config.json"):  # the assets travel along
        assert json.loads((back / name).read_text()) == json.loads((src / name).read_text()), name


def _bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad"
    path.mkdir()
    (path / "config.json").write_text("{not json")
    return path


def _older_convert(megatron_dir: Path, tmp_path: Path) -> Path:
    """A folder as convert wrote it before the layouts were one: ``model/`` instead of ``weights/``."""
    path = tmp_path / "old"
    path.mkdir()
    shutil.copy(megatron_dir / "keye_checkpoint.json", path)
    shutil.copytree(megatron_dir / "weights", path / "model")
    return path


def _stage_folder(megatron_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "stage"
    shutil.copytree(megatron_dir / "weights", path / "weights")
    return path


@pytest.mark.parametrize("case, expect", [
    ("missing", "not a directory"),
    ("bad_config", "not valid JSON"),
    ("layout", "--tensor 3 does not divide num_attention_heads = 4"),
    ("not_converted", "no keye_checkpoint.json"),
    ("older_layout", "written by an older keye-launch convert (model/ instead of weights/); convert the Hugging Face"),
    ("stage_folder", "(a stage's folder: keye-launch export BLUEPRINT STAGE DST writes it)"),
])
def test_user_errors_exit_2_with_one_line(hf_dir, megatron_dir, tmp_path, case, expect):
    src, _ = hf_dir
    args = {
        "missing": lambda: ("hf-to-megatron", tmp_path / "nowhere", tmp_path / "out"),
        "bad_config": lambda: ("hf-to-megatron", _bad_config(tmp_path), tmp_path / "out"),
        "layout": lambda: ("hf-to-megatron", src, tmp_path / "out", "--tensor", 3),
        "not_converted": lambda: ("megatron-to-hf", src, tmp_path / "out"),
        "older_layout": lambda: ("megatron-to-hf", _older_convert(megatron_dir, tmp_path), tmp_path / "out"),
        "stage_folder": lambda: ("megatron-to-hf", _stage_folder(megatron_dir, tmp_path), tmp_path / "out"),
    }[case]()
    result = launch("convert", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("keye-launch: error: ") and expect in lines[0], lines
    assert not (tmp_path / "out").exists()  # nothing was started or written
