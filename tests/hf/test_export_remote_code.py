"""An exported folder is one the released remote code loads (issue 15): ``auto_map`` and every released tensor.

The released ``KeyeForConditionalGeneration`` (spec §2: configuration_keye.py ``KeyeConfig``, modeling_keye.py)
is found through config.json's ``auto_map`` and builds SigLIP's pooling head and a 32,768-row packing position
table that Keye-VL never uses. One spawned process (Megatron state is per process) writes three folders with
`keye.hf.save_keye_vl`, the writer behind ``keye-launch export`` and ``convert megatron-to-hf``:

- a blueprint-built model whose vision encoder has the pooling head (stage 0's, trained): the head is written
  from the model, bit for bit, the packing table initialised as the released code does;
- one without a head: the head too is initialised as SigLIP initialises it;
- a converted release (``load_keye_vl``) saved beside the remote-code files: its own head and table go back out.

Names are checked against the list typed out from the spec in test_keye_vl_checkpoint (not keye.hf's). Last,
the whole path in real processes: a contrastive stage 0 started from a SigLIP checkpoint (``init_from``), with the
pooling head and SigLIP's caption tokenizer, an lm stage after it, ``keye-launch export``: the exported head is
stage 0's, bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from keye.testing import write_blueprint
from keye.testing.distributed import run_distributed
from test_keye_vl_checkpoint import TINY_CONFIG, released_shapes, write_tiny_checkpoint
from test_siglip_import import write_siglip, write_tokenizer

V = "visual.vision_model."
HUB = "Kwai-Keye/Keye-VL-8B-Preview--"


def _saved(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {"config": json.loads((path / "config.json").read_text()), "tensors": load_file(str(path / "model.safetensors"))}


@torch.no_grad()
def _rank(root: str) -> dict[str, Any]:
    from keye.hf import hf_configs, load_keye_vl, save_keye_vl
    from keye.hf.keye_vl import build_keye_vl_model, released_hf_names
    from keye.parallel import init_parallel

    root_path = Path(root)
    init_parallel(seed=3)
    configs = hf_configs(TINY_CONFIG)
    out: dict[str, Any] = {}

    with_head = replace(configs, vision=replace(configs.vision, pooling_head=True))
    model = build_keye_vl_model(with_head)
    for param in model.vision_encoder.head.parameters():  # "trained": nothing like an initialisation
        param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    save_keye_vl(model, root_path / "with_head")
    out["with_head"] = _saved(root_path / "with_head")
    out["model_head"] = {f"{V}head.{name}": t.clone() for name, t in model.vision_encoder.head.state_dict().items()}
    out["released_names"] = released_hf_names(configs)  # keye.hf's list, compared with the test's own

    plain = build_keye_vl_model(configs)
    for name in ("no_head", "no_head_again"):
        save_keye_vl(plain, root_path / name)
        out[name] = _saved(root_path / name)

    source = root_path / "release"
    out["source"] = write_tiny_checkpoint(source)
    beside_code = root_path / "beside_code"
    beside_code.mkdir()
    for module in ("configuration_keye.py", "modeling_keye.py"):  # as convert copies a release's files
        (beside_code / module).write_text("# the released remote code would be here\n")
    save_keye_vl(load_keye_vl(source), beside_code)
    out["beside_code"] = _saved(beside_code)
    out["reloaded"] = sorted(load_keye_vl(root_path / "with_head").unused)  # keye's own loader takes the export
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_distributed(_rank, 1, str(tmp_path_factory.mktemp("export")), timeout=300)[0]


def _released(rows: int = 32768) -> dict[str, tuple[int, ...]]:
    """The spec's list for TINY_CONFIG, with the released code's 32,768-row packing table."""
    shapes = released_shapes(TINY_CONFIG)
    shapes[V + "embeddings.packing_position_embedding.weight"] = (rows, TINY_CONFIG["vision_config"]["hidden_size"])
    return shapes


def test_auto_map_names_the_released_remote_code(saved: dict[str, Any]) -> None:
    config = saved["with_head"]["config"]
    assert config["auto_map"] == {"AutoConfig": HUB + "configuration_keye.KeyeConfig",
                                  "AutoModel": HUB + "modeling_keye.KeyeForConditionalGeneration",
                                  "AutoModelForCausalLM": HUB + "modeling_keye.KeyeForConditionalGeneration"}
    assert config["vision_config"]["auto_map"] == {"AutoConfig": HUB + "configuration_keye.KeyeVisionConfig",
                                                   "AutoModel": HUB + "modeling_keye.SiglipVisionModel"}
    assert config["architectures"] == ["KeyeForConditionalGeneration"] and config["model_type"] == "Keye"
    # beside the released .py files the references are local, as in the released config.json
    local = saved["beside_code"]["config"]["auto_map"]
    assert local["AutoModel"] == "modeling_keye.KeyeForConditionalGeneration"
    assert local["AutoConfig"] == "configuration_keye.KeyeConfig"


def test_every_released_tensor_is_written(saved: dict[str, Any]) -> None:
    for name in ("with_head", "no_head"):
        shapes = {k: tuple(t.shape) for k, t in saved[name]["tensors"].items()}
        assert shapes == _released(), name
    assert saved["released_names"] == _released()


def test_the_trained_head_is_carried_and_the_table_initialised_as_released(saved: dict[str, Any]) -> None:
    tensors = saved["with_head"]["tensors"]
    for name, tensor in saved["model_head"].items():
        assert torch.equal(tensors[name], tensor), name
    table = tensors[V + "embeddings.packing_position_embedding.weight"]
    assert table.std().item() == pytest.approx(32 ** -0.5, rel=0.02)  # N(0, 1/hidden), as _init_weights draws it
    assert sorted(saved["reloaded"]) == sorted(n for n in _released() if ".head." in n or "packing" in n)


def test_a_missing_head_is_initialised_as_siglip_does(saved: dict[str, Any]) -> None:
    tensors, again = saved["no_head"]["tensors"], saved["no_head_again"]["tensors"]
    assert all(torch.equal(t, again[name]) for name, t in tensors.items())  # the same export, the same files
    d = TINY_CONFIG["vision_config"]["hidden_size"]
    assert torch.equal(tensors[V + "head.attention.in_proj_bias"], torch.zeros(3 * d))
    assert torch.equal(tensors[V + "head.layernorm.weight"], torch.ones(d))
    assert tensors[V + "head.mlp.fc1.bias"].abs().max() < 1e-5  # N(0, 1e-6)
    probe = tensors[V + "head.probe"]
    assert probe.abs().max() <= (6 / (2 * d)) ** 0.5 and probe.std() > 0.1  # xavier-uniform over (1, 1, d)


def test_a_converted_release_keeps_its_own_head_and_table(saved: dict[str, Any]) -> None:
    tensors, source = saved["beside_code"]["tensors"], saved["source"]
    assert set(tensors) == set(source)  # the tiny release's 64-row table, not a new 32,768-row one
    assert all(torch.equal(tensors[name], t) for name, t in source.items())


def test_stage0_head_goes_through_a_later_stage_into_the_export(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from keye.hf.siglip import tower_nodes
    from keye.parallel.dist_checkpoint import read_full_tensors

    siglip = write_siglip(tmp_path / "siglip")
    towers = tower_nodes(json.loads((siglip / "config.json").read_text()))  # pooling_head: true
    towers["text_encoder"]["tokenizer"] = str(write_tokenizer(tmp_path / "siglip_tokenizer"))
    pairs = {"name": "synthetic", "tasks": ["pair"], "num_samples": 8}
    blueprint = write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "head", "output_dir": str(tmp_path / "run"), "seed": 2},
        "model": {**towers, "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
                  "language_model": {"name": "qwen3", "size": "tiny"}},
        "stages": [
            {"name": "vit", "kind": "contrastive", "train": ["vision_encoder", "text_encoder"], "steps": 2,
             "init_from": str(siglip), "options": {"batch_size": 4}, "optimizer": {"lr": 1e-2},
             "schedule": {"kind": "constant"},
             "data": {"image_max_tokens": 16, "sources": {"pairs": pairs}}},
            {"name": "align", "kind": "lm", "train": ["projector"], "steps": 1, "schedule": {"kind": "constant"},
             "data": {"max_tokens": 128, "image_max_tokens": 16, "sources": {"pairs": pairs}}},
        ],
    })
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in (["run", str(blueprint)], ["export", str(blueprint), "align", str(tmp_path / "hf")]):
        done = subprocess.run([sys.executable, "-m", "keye.launch.cli", *command], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    trained = read_full_tensors(tmp_path / "run" / "vit" / "weights")
    assert not any(name.startswith("vision_head.") for name in trained)  # no stage-0-only Linear any more
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    heads = {name.removeprefix("vision_encoder."): t for name, t in trained.items()
             if name.startswith("vision_encoder.head.")}
    assert len(heads) == 11
    for name, tensor in heads.items():
        assert torch.equal(exported[V + name], tensor), name
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]["vit"]
    assert summary["initialised_from"] == str(siglip)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["auto_map"]["AutoConfig"] == (
        HUB + "configuration_keye.KeyeConfig")
