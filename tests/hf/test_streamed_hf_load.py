"""A Hugging Face module is loaded a layer at a time, and each pipeline stage reads only the layers it holds.

Two claims. (1) Every built-in key map honours the contract of `keye.hf.contract`: converting a checkpoint
unit by unit (one layer's tensors, or one tensor outside the layers) gives exactly the tensors of
converting it whole. (2) In a real two-process run with pipeline parallelism 2 on a tiny 4-layer Qwen3
checkpoint (files written here), each rank reads the tensors of its own layers plus the embedding (first
stage) or the final norm and output head (last stage), and nothing else; the most held at once is one unit;
and the model gathered back equals the whole-dict conversion of the file. (3) Under TP 2 each rank reads
only its half of the weights the key map merely renames, and the gathered model is still exact.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from keye.testing.distributed import run_distributed

LAYERS = 4
QWEN3 = dict(hidden_size=64, num_layers=LAYERS, num_attention_heads=4, num_query_groups=2, head_dim=16,
             ffn_hidden_size=192, vocab_size=1024,
             position_encoding={"name": "mrope_time_aligned", "mrope_section": [2, 3, 3]})
_LAYER = re.compile(r"^(.*\blayers\.\d+\.)")


def _random(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in sorted(shapes.items())}


def _units(hf: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One dict per layer (``…layers.N.``), one per other tensor."""
    units: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in hf.items():
        match = _LAYER.match(name)
        units.setdefault(match.group(1) if match else name, {})[name] = tensor
    return list(units.values())


def _key_maps():
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel
    from keye_plugins.loss.siglip_sigmoid import SiglipSigmoidLoss
    from keye_plugins.projector.patch_merge_mlp import PatchMergeMLP
    from keye_plugins.text_encoder.siglip_text import SiglipText
    from keye_plugins.vision_encoder.siglip_navit import SiglipNaViT

    return {
        "qwen3": (Qwen3LanguageModel, Qwen3LanguageModel.Config(**QWEN3)),
        "siglip_navit": (SiglipNaViT, SiglipNaViT.Config(**SiglipNaViT.SIZES["tiny"], pooling_head=True)),
        "siglip_text": (SiglipText, SiglipText.Config(**SiglipText.SIZES["tiny"])),
        "patch_merge_mlp": (PatchMergeMLP, PatchMergeMLP.Config(in_dim=32, out_dim=64)),
        "siglip_sigmoid": (SiglipSigmoidLoss, SiglipSigmoidLoss.Config()),
    }


@pytest.mark.parametrize("name", ["qwen3", "siglip_navit", "siglip_text", "patch_merge_mlp", "siglip_sigmoid"])
def test_each_key_map_converts_unit_by_unit(name):
    cls, config = _key_maps()[name]
    hf = _random(cls.hf_weight_shapes(config))
    whole = cls.hf_to_keye(hf, config)
    parts = [cls.hf_to_keye(unit, config) for unit in _units(hf)]
    assert sum(len(part) for part in parts) == len(whole)  # every tensor from exactly one unit
    streamed = {key: tensor for part in parts for key, tensor in part.items()}
    assert sorted(streamed) == sorted(whole) and all(torch.equal(streamed[key], whole[key]) for key in whole)
    for unit, part in zip(_units(hf), parts):  # shapes alone tell what a unit makes (the load asks before reading)
        meta = cls.hf_to_keye({name: torch.empty(t.shape, device="meta") for name, t in unit.items()}, config)
        assert {key: t.shape for key, t in meta.items()} == {key: t.shape for key, t in part.items()}


def _write_qwen3(path: Path) -> dict[str, torch.Tensor]:
    """A ``Qwen3ForCausalLM`` directory: config.json and its weights, written as two safetensors shards."""
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    c = QWEN3
    (path / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": c["hidden_size"],
        "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": c["ffn_hidden_size"], "vocab_size": c["vocab_size"], "rms_norm_eps": 1e-6,
        "rope_theta": 1e6, "hidden_act": "silu", "tie_word_embeddings": False}))
    hf = _random(Qwen3LanguageModel.hf_weight_shapes(Qwen3LanguageModel.Config(**QWEN3)))
    names = sorted(hf)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in shards.items():
        save_file({name: hf[name] for name in part}, str(path / file))
    weight_map = {name: file for file, part in shards.items() for name in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return hf


def _load(path: str, tensor: int, pipeline: int) -> tuple:
    """Rank body: a language model in this layout, loaded from the directory; what was read, and the model
    gathered back (on the first pipeline stage)."""
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel

    from keye.hf.sources import load_module, open_hf_directory
    from keye.hf.weights import gather_full_state
    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel

    ctx = init_parallel(tensor=tensor, pipeline=pipeline, seed=0)
    holder = torch.nn.Module()  # a model with a language_model module, as a stage's is
    holder.language_model = Qwen3LanguageModel(Qwen3LanguageModel.Config(**QWEN3), BuildContext(
        ctx, torch.float32, ctx.is_first_stage, ctx.is_last_stage, seed=0))
    stats = load_module(holder, open_hf_directory(path, "init_from"), "language_model", "init_from")
    return stats, gather_full_state(holder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "Qwen3-tiny-4L"
    return path, _write_qwen3(path)


@pytest.fixture(scope="module")
def pp2(checkpoint):
    path, hf = checkpoint
    return hf, run_distributed(_load, 2, str(path), 1, 2, timeout=300)


@pytest.fixture(scope="module")
def tp2(checkpoint):
    path, hf = checkpoint
    return hf, run_distributed(_load, 2, str(path), 2, 1, timeout=300)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_each_stage_reads_only_what_it_holds(pp2):
    hf, ((first, _), (last, _)) = pp2
    layer = {i: [t for name, t in hf.items() if name.startswith(f"model.layers.{i}.")] for i in range(LAYERS)}
    first_wants = [hf["model.embed_tokens.weight"], *layer[0], *layer[1]]
    last_wants = [*layer[2], *layer[3], hf["model.norm.weight"], hf["lm_head.weight"]]
    assert (first.tensors, first.bytes) == (len(first_wants), _bytes(first_wants))
    assert (last.tensors, last.bytes) == (len(last_wants), _bytes(last_wants))
    assert first.units_skipped == 4 and last.units_skipped == 3  # the other stage's 2 layers and its extras
    assert first.bytes + last.bytes == _bytes(hf.values())  # together: the checkpoint, once
    # at most one unit at a time: one layer, or the largest tensor outside the layers (embedding / head)
    biggest = max(_bytes(layer[0]), _bytes([hf["model.embed_tokens.weight"]]))
    assert first.peak_bytes == last.peak_bytes == biggest < _bytes(hf.values()) / 3


def _whole(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole checkpoint converted at once (the load before streaming)."""
    from keye.model.hf_keys import hf_decoder_to_megatron
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel

    return hf_decoder_to_megatron(hf, Qwen3LanguageModel.Config(**QWEN3), prefix="language_model.gpt.")


def test_the_streamed_model_equals_the_whole_conversion(pp2):
    hf, ((_, gathered), (_, nothing)) = pp2
    whole = _whole(hf)
    assert nothing is None  # gathered on the first stage
    assert sorted(gathered) == sorted(whole) and all(torch.equal(gathered[name], whole[name]) for name in whole)


def test_under_tp_plain_weights_are_read_as_this_ranks_block(tp2):
    """Row/column-parallel weights the key map only renames (embedding, output head, o_proj, down_proj) are
    read as this rank's half straight from the file; fused q/k/v and gate/up, and the norms, are read whole."""
    hf, ((first, gathered), (second, _)) = tp2
    halved = ("embed_tokens", "lm_head", "o_proj", "down_proj")
    expect = sum(t.numel() * t.element_size() // (2 if any(part in name for part in halved) else 1)
                 for name, t in hf.items())
    assert first.bytes == second.bytes == expect < _bytes(hf.values())
    assert first.tensors == len(hf) and first.units_skipped == 0
    whole = _whole(hf)
    assert sorted(gathered) == sorted(whole) and all(torch.equal(gathered[name], whole[name]) for name in whole)

