"""Qwen3 weights: Hugging Face names ↔ the `qwen3` language model (Megatron-Core GPTModel).

Hugging Face keeps q, k and v apart; Megatron fuses them into ``linear_qkv`` laid out per query group
``[q heads of group g; k_g; v_g]`` (so a TP split along rows keeps whole groups together). SwiGLU's
gate and up projections are fused into ``linear_fc1`` as ``[gate; up]``. Everything else is a rename.
Full (unsharded) tensors on both sides; TP/PP slicing happens elsewhere.
"""

from __future__ import annotations

from typing import Any

import torch

_RENAMES = {
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    hidden = q.shape[1]
    q = q.view(groups, heads // groups * head_dim, hidden)  # (G, heads/G·D, H)
    k = k.view(groups, head_dim, hidden)
    v = v.view(groups, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)  # (G·(heads/G + 2)·D, H)


def _split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    hidden = qkv.shape[1]
    per_group = qkv.view(groups, (heads // groups + 2) * head_dim, hidden)
    q, k, v = per_group.split([heads // groups * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def hf_to_keye(hf: dict[str, torch.Tensor], config: Any, *, hf_prefix: str = "model.", head: str = "lm_head.weight",
               prefix: str = "gpt.") -> dict[str, torch.Tensor]:
    """Released/HF Qwen3 tensors → the state dict of `Qwen3LanguageModel` (``prefix`` + Megatron names)."""
    heads, groups, head_dim = config.num_attention_heads, config.num_query_groups, config.head_dim
    out = {
        f"{prefix}embedding.word_embeddings.weight": hf[f"{hf_prefix}embed_tokens.weight"],
        f"{prefix}decoder.final_layernorm.weight": hf[f"{hf_prefix}norm.weight"],
        f"{prefix}output_layer.weight": hf[head],
    }
    for layer in range(config.num_layers):
        src, dst = f"{hf_prefix}layers.{layer}.", f"{prefix}decoder.layers.{layer}."
        for hf_name, name in _RENAMES.items():
            out[dst + name] = hf[src + hf_name]
        out[dst + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"], hf[src + "self_attn.v_proj.weight"],
            heads, groups, head_dim,
        )
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]])
    return out


def keye_to_hf(state: dict[str, torch.Tensor], config: Any, *, hf_prefix: str = "model.", head: str = "lm_head.weight",
               prefix: str = "gpt.") -> dict[str, torch.Tensor]:
    """The inverse of `hf_to_keye` (exact: only views, splits and concatenations)."""
    heads, groups, head_dim = config.num_attention_heads, config.num_query_groups, config.head_dim
    out = {
        f"{hf_prefix}embed_tokens.weight": state[f"{prefix}embedding.word_embeddings.weight"],
        f"{hf_prefix}norm.weight": state[f"{prefix}decoder.final_layernorm.weight"],
        head: state[f"{prefix}output_layer.weight"],
    }
    for layer in range(config.num_layers):
        src, dst = f"{prefix}decoder.layers.{layer}.", f"{hf_prefix}layers.{layer}."
        for hf_name, name in _RENAMES.items():
            out[dst + hf_name] = state[src + name]
        q, k, v = _split_qkv(state[src + "self_attention.linear_qkv.weight"], heads, groups, head_dim)
        out[dst + "self_attn.q_proj.weight"], out[dst + "self_attn.k_proj.weight"], out[dst + "self_attn.v_proj.weight"] = q, k, v
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
    return {name: tensor.contiguous() for name, tensor in out.items()}
