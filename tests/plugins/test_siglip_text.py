"""The SigLIP text tower (``siglip_text``) against transformers' ``SiglipTextModel``, at TP=2 and TP=1.

Megatron-Core needs its parallel state and, on CPU, keye's CUDA bridge (which patches its process), so
the model runs in two spawned ranks: first as TP=2 (each rank holds half the vocabulary and heads), then,
in the same processes, as TP=1 (data-parallel 2). Both must give transformers' ``pooler_output`` and
``last_hidden_state`` from the same weights, loaded by name.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from keye.testing.distributed import run_distributed
from keye_plugins.text_encoder import siglip_text
from keye_plugins.text_encoder.siglip_text import SiglipText, hf_to_keye_state_dict, keye_to_hf_state_dict

SEED = 1234
TINY = SiglipText.SIZES["tiny"]  # hidden 32, 2 layers, 2 heads, vocab 128, 16 positions
TOLERANCE = 1e-5


def _hf_model() -> Any:
    """A tiny transformers ``SiglipTextModel`` whose every weight (biases, norms too) is non-trivial."""
    from transformers import SiglipTextConfig, SiglipTextModel

    config = SiglipTextConfig(
        hidden_size=TINY["hidden_size"], intermediate_size=TINY["intermediate_size"],
        num_hidden_layers=TINY["num_layers"], num_attention_heads=TINY["num_heads"],
        vocab_size=TINY["vocab_size"], max_position_embeddings=TINY["max_position_embeddings"],
        projection_size=24, layer_norm_eps=1e-6, bos_token_id=2, eos_token_id=3,  # ids inside the tiny vocab
        attn_implementation="eager",
    )
    torch.manual_seed(SEED)
    model = SiglipTextModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@torch.no_grad()
def _rank() -> dict[int, dict[str, Any]]:
    from megatron.core import parallel_state as mpu

    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel

    hf = _hf_model()
    weights = {name: t.detach().clone() for name, t in hf.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, TINY["vocab_size"], (3, length), generator=generator) for length in (16, 9)]
    results = {}
    for tensor in (2, 1):
        ctx = init_parallel(tensor=tensor, pipeline=1, seed=SEED + tensor)  # weights must come from the file
        model = SiglipText(SiglipText.Config(**TINY, projection_size=24), BuildContext(parallel=ctx)).eval()
        model.load_hf_state_dict(weights, prefix="")
        pooled, hidden = [], []
        for ids in batches:
            expected = hf(ids)
            pooled.append(_max_diff(model(ids), expected.pooler_output))
            hidden.append(_max_diff(model.hidden_states(ids).transpose(0, 1), expected.last_hidden_state))
        round_trip = model.hf_state_dict(prefix="")
        results[tensor] = {
            "pooled": max(pooled),
            "hidden": max(hidden),
            "vocab_rows_here": model.embedding.word_embeddings.weight.shape[0],
            "out_dim": model.out_dim,
            "round_trip": sorted(round_trip) == sorted(weights)
            and all(torch.equal(t, weights[name]) for name, t in round_trip.items()),
        }
        mpu.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict[int, dict[str, Any]]]:
    return run_distributed(_rank, 2)


@pytest.mark.parametrize("tensor", [1, 2], ids=["tp1", "tp2"])
def test_matches_transformers_siglip_text(ranks: list[dict[int, dict[str, Any]]], tensor: int) -> None:
    for rank in ranks:
        result = rank[tensor]
        assert result["pooled"] < TOLERANCE
        assert result["hidden"] < TOLERANCE
        assert result["round_trip"]
        assert result["out_dim"] == 24
        assert result["vocab_rows_here"] == TINY["vocab_size"] // tensor  # TP really splits the vocabulary


def test_weight_names_map_both_ways() -> None:
    hf = {"text_model.embeddings.token_embedding.weight": torch.randn(8, 4),
          "text_model.final_layer_norm.bias": torch.randn(4),
          "text_model.head.weight": torch.randn(4, 4),
          "vision_model.post_layernorm.weight": torch.randn(4),
          "logit_scale": torch.zeros(1)}
    for part in ("q", "k", "v"):
        hf[f"text_model.encoder.layers.3.self_attn.{part}_proj.bias"] = torch.randn(4)
    ours = hf_to_keye_state_dict(hf, num_heads=2)
    assert sorted(ours) == ["decoder.final_layernorm.bias", "decoder.layers.3.self_attention.linear_qkv.bias",
                            "embedding.word_embeddings.weight", "head.weight"]
    back = keye_to_hf_state_dict(ours, num_heads=2)
    assert sorted(back) == sorted(name for name in hf if name.startswith("text_model."))
    assert all(torch.equal(back[name], hf[name]) for name in back)
    with pytest.raises(KeyError, match="unknown weight text_model.pooler"):
        hf_to_keye_state_dict({"text_model.pooler.weight": torch.zeros(1)}, num_heads=2)


def test_registers_itself() -> None:
    registered = {}
    siglip_text.keye_register_text_encoders(lambda name, cls: registered.update({name: cls}))
    assert registered == {"siglip_text": SiglipText}
    assert SiglipText.SIZES["keye_vl_8b"] == dict(hidden_size=1152, intermediate_size=4304, num_layers=27,
                                                  num_heads=16, vocab_size=32000, max_position_embeddings=64)
