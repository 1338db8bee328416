"""A Hugging Face Qwen3 checkpoint as a stage's language model, through a blueprint's per-module ``init_from``.

A tiny random ``Qwen3ForCausalLM`` is written with transformers. One real two-process run (tensor parallel 2)
chains three stages: ``warm`` trains the vision encoder and projector one step; ``chained`` takes its vision
encoder by stage name, the language model from the Qwen3 directory and a fresh projector; ``swap`` names only
``language_model: fresh``, so everything else comes from the previous stage. The chained model, read back in
one process, gives transformers' text-only logits: the key map, the TP slicing and the resharding agree.
Bad directories are refused before any process starts, in one line naming the key.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keye.testing import write_blueprint
from keye.testing.distributed import run_distributed

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DATA = {"max_tokens": 256, "pack_buffer": 8, "image_max_tokens": 16, "video_frame_tokens": [4, 16],
        "video_max_tokens": 64, "sources": {"qa": {"name": "synthetic", "tasks": ["color", "count"], "num_samples": 40}}}
#: keye's tiny sizes (siglip_navit, patch_merge_mlp, qwen3 ``size: tiny``: 64 wide, 2 layers, 4 heads, 2 groups)
MODEL = {"vision_encoder": {"name": "siglip_navit", "size": "tiny"},
         "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
         "language_model": {"name": "qwen3", "size": "tiny"}}


def write_qwen3(path: Path, seed: int = 0):
    """A random ``Qwen3ForCausalLM`` as keye's tiny qwen3, O(1) weights (logits of order 1-10), saved to ``path``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
                         max_position_embeddings=4096)
    model = Qwen3ForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.15 * noise)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3") / "Qwen3-tiny"
    return path, write_qwen3(path)


def _blueprint(path: Path, run: Path, qwen3_dir: Path, parallel: dict | None = None, **stage) -> Path:
    return write_blueprint(path, {
        "run": {"name": "chain", "output_dir": str(run), "seed": 3}, "model": MODEL, "parallel": parallel or {},
        "stages": [
            {"name": "warm", "kind": "lm", "train": ["vision_encoder", "projector"], "steps": 1,
             "optimizer": {"lr": 3e-3}, "data": DATA},
            {"name": "chained", "kind": "lm", "data": DATA, "init_from": {
                "vision_encoder": "warm", "language_model": str(qwen3_dir), "projector": "fresh"}, **stage},
            {"name": "swap", "kind": "lm", "data": DATA, "init_from": {"language_model": "fresh"}},
        ],
    })


@pytest.fixture(scope="module")
def chain(qwen3):
    qwen3_dir, _ = qwen3
    root = qwen3_dir.parent
    path = _blueprint(root / "chain.yaml", root / "run", qwen3_dir, {"tensor": 2})
    result = subprocess.run([sys.executable, "-m", "keye.launch.cli", "run", str(path), "--nproc", "2"],
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return path, root / "run"


def _text_logits(blueprint: str, folder: str, ids: torch.Tensor) -> torch.Tensor:
    """The stage's model, built in one process (the TP=2 weights resharded), on text alone."""
    from keye.config import load_blueprint
    from keye.eval.model import stage_model
    from keye.hf.forward import causal_padding_mask
    from keye.parallel import init_parallel
    from keye.plugins import get_registry

    parallel = init_parallel()
    cfg = load_blueprint(blueprint, ["parallel.tensor=1"], get_registry())
    model = stage_model(cfg, Path(folder), get_registry(), parallel)
    batch, length = ids.shape
    positions = torch.arange(length).expand(3, batch, length)  # text: the three M-RoPE rows are equal
    with torch.no_grad():
        return model(ids, positions, causal_padding_mask(None, batch, length))  # (B, L, V)


def test_chained_stage_gives_qwen3_logits(qwen3, chain):
    _, reference = qwen3
    blueprint, run = chain
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(1))
    [logits] = run_distributed(_text_logits, 1, str(blueprint), str(run / "chained"), ids)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    assert expected.abs().max() > 1.0  # not two near-zero tensors
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_each_module_comes_from_its_source(qwen3, chain):
    """By stage name, from the Hugging Face directory, fresh; and, for modules a mapping leaves out, the
    previous stage."""
    from keye.parallel.dist_checkpoint import read_full_tensors

    qwen3_dir, _ = qwen3
    _, run = chain
    warm, chained, swap = (read_full_tensors(run / stage / "weights") for stage in ("warm", "chained", "swap"))

    def same(a: dict, b: dict, module: str) -> bool:
        return all(torch.equal(a[name], b[name]) for name in a if name.startswith(module + "."))

    assert same(chained, warm, "vision_encoder") and same(swap, chained, "vision_encoder")
    assert not same(chained, warm, "projector")  # fresh, not warm's trained one
    assert same(swap, chained, "projector")
    assert not same(swap, chained, "language_model")  # named fresh
    summary = json.loads((run / "summary.json").read_text())["stages"]
    assert summary["chained"]["initialised_from"] == (
        f"language_model={qwen3_dir}, projector=fresh, vision_encoder={run / 'warm' / 'weights'}")
    assert summary["swap"]["initialised_from"] == (
        f"language_model=fresh, projector={run / 'chained' / 'weights'}, vision_encoder={run / 'chained' / 'weights'}")


# --- refused before any process starts (check_runnable, in this process) ---------------------------------


def _variant(qwen3_dir: Path, tmp_path: Path, config: dict | None = None, drop: str | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    path = tmp_path / "variant"
    shutil.copytree(qwen3_dir, path)
    if config:
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, **config}))
    if drop:
        weights = load_file(str(path / "model.safetensors"))
        del weights[drop]
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("case, expect", [
    ("layers", "config.json: num_hidden_layers = 3, but model.language_model.num_layers = 2"),
    ("theta", "config.json: rope_parameters.rope_theta = 10000.0, but model.language_model.position_encoding.theta = 1000000.0"),
    ("act", "config.json: hidden_act = 'gelu' is not supported (keye's model.language_model implements 'silu')"),
    ("missing", "missing weight model.layers.1.mlp.up_proj.weight"),
    ("model_type", "model_type 'llama' is not one keye imports (known: qwen3, Keye, siglip"),
    ("no_projector", "(model_type 'qwen3') holds no projector (it holds language_model)"),
])
def test_a_directory_that_does_not_fit_is_one_line(qwen3, tmp_path, case, expect):
    from keye.config import check_runnable, load_blueprint
    from keye.errors import BlueprintError
    from keye.plugins import get_registry

    qwen3_dir, _ = qwen3
    path = {
        "layers": lambda: _variant(qwen3_dir, tmp_path, {"num_hidden_layers": 3}),
        "theta": lambda: _variant(qwen3_dir, tmp_path, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}),
        "act": lambda: _variant(qwen3_dir, tmp_path, {"hidden_act": "gelu"}),
        "missing": lambda: _variant(qwen3_dir, tmp_path, drop="model.layers.1.mlp.up_proj.weight"),
        "model_type": lambda: _variant(qwen3_dir, tmp_path, {"model_type": "llama"}),
        "no_projector": lambda: qwen3_dir,
    }[case]()
    module = "projector" if case == "no_projector" else "language_model"
    blueprint = _blueprint(tmp_path / "bp.yaml", tmp_path / "run", path)
    cfg = load_blueprint(blueprint, [f"stages.1.init_from={{{module}: '{path}'}}"], get_registry())
    with pytest.raises(BlueprintError) as error:
        check_runnable(cfg)
    message = str(error.value)
    assert message.startswith(f"stages.1.init_from.{module}: ") and expect in message and "\n" not in message


def test_keye_launch_run_refuses_it_with_exit_2(qwen3, tmp_path, capsys):
    from keye.launch.cli import main

    qwen3_dir, _ = qwen3
    path = _variant(qwen3_dir, tmp_path, {"num_hidden_layers": 3})
    assert main(["run", str(_blueprint(tmp_path / "bp.yaml", tmp_path / "run", path))]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "stages.1.init_from.language_model: " in lines[0] and "num_hidden_layers = 3" in lines[0]
    assert not (tmp_path / "run").exists()  # refused before the output folder was claimed


def test_tied_embeddings_fill_the_output_layer(qwen3, tmp_path):
    """The smaller Qwen3 models tie lm_head to the embedding and do not store it: keye's (untied) output layer
    starts as a copy of the embedding, so the logits are the tied model's."""
    from keye.config import build_component_config, check_runnable, load_blueprint
    from keye.hf.sources import open_hf_directory, read_module
    from keye.plugins import get_registry

    qwen3_dir, reference = qwen3
    path = _variant(qwen3_dir, tmp_path, {"tie_word_embeddings": True}, drop="lm_head.weight")
    cfg = load_blueprint(_blueprint(tmp_path / "bp.yaml", tmp_path / "run", path), [], get_registry())
    check_runnable(cfg)  # the missing lm_head.weight is not reported
    cls, config = build_component_config("language_model", cfg.model.language_model, get_registry())
    state = read_module(open_hf_directory(path, "init_from"), "language_model", cls, config)
    embedding = reference.model.embed_tokens.weight
    assert torch.equal(state["language_model.gpt.output_layer.weight"], embedding)
    assert torch.equal(state["language_model.gpt.embedding.word_embeddings.weight"], embedding)
