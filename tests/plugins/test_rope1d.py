"""1D RoPE against transformers' Qwen3 rotary embedding and a hand-checkable 2-dim rotation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb

from keye_plugins.position_encoding.rope1d import Rope1D, apply_rope


@pytest.mark.parametrize("theta", [10000.0, 1_000_000.0])
def test_matches_qwen3(theta):
    torch.manual_seed(0)
    head_dim = 32
    hf_config = Qwen3Config(
        hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim,
        num_hidden_layers=1, intermediate_size=32, vocab_size=32,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    hf_rope = Qwen3RotaryEmbedding(hf_config)
    rope = Rope1D(Rope1D.Config(head_dim=head_dim, theta=theta))
    torch.testing.assert_close(rope.inv_freq, hf_rope.inv_freq, atol=0, rtol=0)

    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [5, 9, 100, 4000, 4001, 7, 0, 32767]])
    q = torch.randn(2, 2, 8, head_dim)  # (B, H, L, D)
    k = torch.randn(2, 1, 8, head_dim)
    cos, sin = rope(position_ids)
    hf_cos, hf_sin = hf_rope(q, position_ids)
    torch.testing.assert_close(cos, hf_cos)
    torch.testing.assert_close(sin, hf_sin)
    got_q, got_k = apply_rope(q, k, cos, sin)
    want_q, want_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)


def test_two_dims_by_hand():
    """With head_dim 2 there is one pair, frequency 1: position p turns (x0, x1) by p radians."""
    rope = Rope1D(Rope1D.Config(head_dim=2, theta=10000.0))
    cos, sin = rope(torch.tensor([[0, 1, 3]]))
    x = torch.tensor([1.0, 2.0]).expand(1, 1, 3, 2)  # (B, H, L, D)
    q, _ = apply_rope(x, x, cos, sin)
    for i, p in enumerate([0, 1, 3]):
        want = [math.cos(p) - 2 * math.sin(p), 2 * math.cos(p) + math.sin(p)]
        assert q[0, 0, i].tolist() == pytest.approx(want, abs=1e-6)


def test_layout_bshd():
    torch.manual_seed(0)
    rope = Rope1D(Rope1D.Config(head_dim=16))
    cos, sin = rope(torch.arange(5)[None])
    q = torch.randn(1, 3, 5, 16)
    got, _ = apply_rope(q.transpose(1, 2), q.transpose(1, 2), cos, sin, unsqueeze_dim=2)
    want, _ = apply_rope(q, q, cos, sin)
    torch.testing.assert_close(got.transpose(1, 2), want)


def test_registers_through_its_hook(keye_empty_host):
    import keye_plugins.position_encoding.rope1d as plugin

    keye_empty_host.add_plugin(plugin, "rope1d")
    assert keye_empty_host.registry.cls("position_encoding", "rope1d") is Rope1D
