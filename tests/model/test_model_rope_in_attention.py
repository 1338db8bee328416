"""RoPE applied inside the SDPA core attention (``KeyeSelfAttention``, keye.model.sdpa_attention) against
Megatron's own RoPE.

* ``rotate`` with ``rotary_tables`` against Megatron's unfused ``_apply_rotary_pos_emb_bshd``: output and
  input gradient, for rotate-half angles ``[f, f]`` and for arbitrary ones; fp32 within 1e-6, bf16 within
  one bf16 rounding (both cast cos/sin to bf16 first); the tables are computed once per angle tensor;
* one ViT layer and one qwen3 layer, ``KeyeSelfAttention`` against Megatron's ``SelfAttention`` (same
  weights, same SDPA core attention): output and every parameter gradient within 1e-5, with angles
  ``[s, b, 1, d]`` (bshd) and per token under ``thd`` packing; the fused path is really taken, and a
  configuration it does not cover (interleaved rotary) goes through Megatron's path.
Megatron's parallel state is per process, so the layer cases run in a spawned rank.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from keye.testing.distributed import run_distributed

TOLERANCE = 1e-5


@pytest.mark.parametrize("halves", ["equal", "arbitrary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_matches_megatrons_rope(halves: str, dtype: torch.dtype) -> None:
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from keye.model.sdpa_attention import rotary_tables, rotate

    gen = torch.Generator().manual_seed(0)
    angles = torch.rand(11, 2, 1, 8, generator=gen) * 20  # (s, b, 1, d/2)
    freqs = torch.cat([angles, angles if halves == "equal" else angles.flip(-1) * 0.3], dim=-1)  # (s, b, 1, d)
    x = torch.randn(11, 2, 3, 16, generator=gen).to(dtype)  # (s, b, heads, d)
    upstream = torch.randn(11, 2, 3, 16, generator=gen).to(dtype)
    results = []
    for fn in (lambda t: rotate(t, rotary_tables(freqs, dtype)), lambda t: _apply_rotary_pos_emb_bshd(t, freqs)):
        inputs = x.clone().requires_grad_()
        out = fn(inputs)
        (out.float() * upstream.float()).sum().backward()
        results.append((out.detach().float(), inputs.grad.float()))
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2  # bf16: one rounding of values of size ~3
    for ours, megatron in zip(*results):
        assert (ours - megatron).abs().max().item() <= tolerance
    assert rotary_tables(freqs, dtype)[0] is rotary_tables(freqs, dtype)[0]  # once per angle tensor
    before = rotary_tables(freqs, dtype)[0]
    freqs.add_(1.0)  # changed in place: recomputed
    assert not torch.equal(rotary_tables(freqs, dtype)[0], before)


# --- whole layers (spawned rank) ---------------------------------------------------------------------


def _layer_pair(spec: Any, config: Any, **overrides: Any) -> tuple[Any, Any]:
    """The layer of ``spec`` (KeyeSelfAttention) and the same with Megatron's SelfAttention, same weights."""
    import dataclasses

    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.spec_utils import build_module

    from keye.model.spec_swap import swap_spec_modules
    from keye.model.sdpa_attention import KeyeSelfAttention

    config = dataclasses.replace(config, **overrides) if overrides else config
    megatron_spec, swapped = swap_spec_modules(spec, {KeyeSelfAttention: SelfAttention})
    assert swapped == [KeyeSelfAttention]
    ours, theirs = (build_module(s, config=config, layer_number=1) for s in (spec, megatron_spec))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _compare(pair: tuple[Any, Any], hidden: torch.Tensor, **inputs: Any) -> dict[str, Any]:
    """Max |ours - Megatron| over the output and the parameter gradients, and whether ours fused the RoPE."""
    from keye.model import sdpa_attention

    calls: list[int] = []
    original = sdpa_attention.rotate
    sdpa_attention.rotate = lambda x, tables: calls.append(1) or original(x, tables)
    try:
        runs, rotations = [], []
        for layer in pair:
            calls.clear()
            x = hidden.clone().requires_grad_()
            out, _ = layer(x, **inputs)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            runs.append([out.detach(), x.grad, *(p.grad for p in layer.parameters())])
            rotations.append(len(calls))
    finally:
        sdpa_attention.rotate = original
    fused = rotations == [2, 0]  # ours rotated q and k in its core attention, Megatron's did not
    return {"diff": max((a - b).abs().max().item() for a, b in zip(*runs)), "fused": fused}


def _layers() -> dict[str, Any]:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from keye.model import packing_masks, siglip_tower
    from keye.model.protocols import BuildContext
    from keye.model.sdpa_attention import KeyeSelfAttention, local_core_attention
    from keye.parallel import init_parallel
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel
    from keye_plugins.position_encoding.rope2d_vision import Rope2DVision
    from keye_plugins.vision_encoder.siglip_navit import SiglipNaViT

    ctx = init_parallel(tensor=1, seed=9)
    gen = torch.Generator().manual_seed(4)
    out: dict[str, Any] = {}

    # ViT layer: 2D RoPE angles per patch, bidirectional, three images packed (thd) or one (bshd)
    vit_config = SiglipNaViT(SiglipNaViT.Config(**SiglipNaViT.SIZES["tiny"]), BuildContext(ctx)).transformer_config
    vit_spec = siglip_tower.encoder_layer_spec("local", "sdpa")
    grids = torch.tensor([[1, 4, 4], [1, 2, 6], [2, 2, 3]])
    angles = Rope2DVision(Rope2DVision.Config(head_dim=16)).angles(grids)  # (N, 8)
    freqs = torch.cat([angles, angles], dim=-1)[:, None, None, :]  # (N, 1, 1, 16)
    hidden = torch.randn(len(freqs), 1, 32, generator=gen)  # (N, 1, D)
    pair = _layer_pair(vit_spec, vit_config)
    out["vit_thd"] = _compare(pair, hidden, attention_mask=None, rotary_pos_emb=freqs,
                              packed_seq_params=packing_masks.packed_seq_params([16, 12, 12]))
    out["vit_bshd"] = _compare(pair, hidden, attention_mask=None, rotary_pos_emb=freqs)
    out["vit_interleaved"] = _compare(_layer_pair(vit_spec, vit_config, rotary_interleaved=True), hidden,
                                      attention_mask=None, rotary_pos_emb=freqs)

    # qwen3 layer: GQA, q/k RMSNorm, causal, M-RoPE angles (s, b, 1, d) from Megatron's own rotary module
    llm = Qwen3LanguageModel(Qwen3LanguageModel.Config(**Qwen3LanguageModel.SIZES["tiny"]), BuildContext(ctx, seed=9))
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    spec.submodules.self_attention.module = KeyeSelfAttention
    spec.submodules.self_attention.submodules.core_attention = local_core_attention("sdpa")
    positions = torch.arange(24).expand(3, 2, 24).clone()
    positions[1:, :, 8:16] = 3  # an "image": height and width ids differ from time
    mrope = llm.gpt.rotary_pos_emb(positions, mrope_section=llm.transformer_config.mrope_section)  # (s, b, 1, d)
    hidden = torch.randn(24, 2, 64, generator=gen)  # (s, b, H)
    out["qwen3"] = _compare(_layer_pair(spec, llm.transformer_config), hidden, attention_mask=None,
                            rotary_pos_emb=mrope)
    out["mrope_shape"] = tuple(mrope.shape)
    return out


@pytest.fixture(scope="module")
def layer_results() -> dict[str, Any]:
    [result] = run_distributed(_layers, 1)
    return result


@pytest.mark.parametrize("case", ["vit_thd", "vit_bshd", "qwen3"])
def test_fused_rope_layers_match_megatron(layer_results: dict[str, Any], case: str) -> None:
    assert layer_results[case]["fused"], case
    assert layer_results[case]["diff"] < TOLERANCE, (case, layer_results[case])


def test_uncovered_configuration_uses_megatrons_rope(layer_results: dict[str, Any]) -> None:
    assert not layer_results["vit_interleaved"]["fused"]
    assert layer_results["vit_interleaved"]["diff"] < TOLERANCE
    assert layer_results["mrope_shape"] == (24, 2, 1, 16)
