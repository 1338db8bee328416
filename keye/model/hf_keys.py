"""Hugging Face ↔ Megatron-Core parameter names of the two transformer stacks keye builds on Megatron.

Components own their Hugging Face key maps (``hf_to_keye`` / ``keye_to_hf`` on the component class, see
`keye.hf.contract`); the stacks they are made of share these helpers, as Megatron-Bridge's parameter
mappings are shared by its models. Full (unsharded) tensors on both sides; TP/PP slicing happens elsewhere
(`keye.parallel.tp_weights`). Only renames, splits and concatenations: every round trip is bit-exact.

* **Encoder** (SigLIP, CLIP): HF ``encoder.layers.N.*`` ↔ Megatron ``decoder.layers.N.*``. Megatron fuses q, k,
  v into one ``linear_qkv`` whose output rows are interleaved per head ``[q_h; k_h; v_h]`` (``fuse_qkv`` /
  ``split_qkv``); every other layer name maps 1:1.
* **Decoder** (Qwen3, and any Llama-style HF model): HF ``model.layers.N.*``, ``model.embed_tokens``,
  ``model.norm``, ``lm_head`` ↔ Megatron ``GPTModel``. Its ``linear_qkv`` is laid out per query group
  ``[q heads of group g; k_g; v_g]`` (a TP split along rows keeps whole groups together), SwiGLU's gate and
  up projections are fused into ``linear_fc1`` as ``[gate; up]``.

The Megatron → HF direction maps tensor by tensor (any subset of a state dict maps on its own), so an
engine's per-tensor weight stream (`keye.generate.weight_stream`) uses the same code as a whole export.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

# --- encoder layers (SigLIP) ---------------------------------------------------------------------------

_HF_TO_MEGATRON_ENCODER = {
    "layer_norm1": "input_layernorm",
    "self_attn.out_proj": "self_attention.linear_proj",
    "layer_norm2": "pre_mlp_layernorm",
    "mlp.fc1": "mlp.linear_fc1",
    "mlp.fc2": "mlp.linear_fc2",
}
_MEGATRON_TO_HF_ENCODER = {v: k for k, v in _HF_TO_MEGATRON_ENCODER.items()}
_HF_ENCODER_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_MEGATRON_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> Tensor:
    """Separate q/k/v weights ``[H*d, in]`` (or biases ``[H*d]``) → Megatron's ``linear_qkv`` ``[3*H*d, ...]``.

    Megatron reads the fused output as ``[ng, (np/ng + 2) * d]`` per token: with as many key/value
    groups as heads (plain MHA, SigLIP) that is, head by head, ``[q_h; k_h; v_h]``. Column-parallel TP
    then gives each rank whole heads.
    """
    rest = q.shape[1:]
    per_head = [x.reshape(num_heads, -1, *rest) for x in (q, k, v)]  # 3 x (H, d, ...)
    return torch.stack(per_head, dim=1).reshape(-1, *rest)  # (H, 3, d, ...) → (3*H*d, ...)


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of ``fuse_qkv``."""
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(num_heads, 3, -1, *rest).unbind(dim=1)  # 3 x (H, d, ...)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def hf_encoder_to_megatron(hf: dict[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """HF ``encoder.layers.N.*`` tensors → Megatron ``decoder.layers.N.*`` (other keys are ignored)."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for name, tensor in hf.items():
        match = _HF_ENCODER_LAYER.match(name)
        if not match:
            continue
        layer, module, kind = match.groups()
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer, kind), {})[module[-6]] = tensor  # 'q', 'k' or 'v'
        elif module in _HF_TO_MEGATRON_ENCODER:
            out[f"decoder.layers.{layer}.{_HF_TO_MEGATRON_ENCODER[module]}.{kind}"] = tensor
        else:
            raise KeyError(f"unknown SigLIP encoder weight {name!r}")
    for (layer, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise KeyError(f"encoder.layers.{layer}: q/k/v {kind} incomplete, found {sorted(parts)}")
        out[f"decoder.layers.{layer}.self_attention.linear_qkv.{kind}"] = fuse_qkv(
            parts["q"], parts["k"], parts["v"], num_heads
        )
    return out


def megatron_encoder_to_hf(state: dict[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """Megatron ``decoder.layers.N.*`` tensors → HF ``encoder.layers.N.*`` (other keys are ignored)."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        match = _MEGATRON_LAYER.match(name)
        if not match:
            continue
        layer, module, kind = match.groups()
        if module == "self_attention.linear_qkv":
            for part, x in zip("qkv", split_qkv(tensor, num_heads)):
                out[f"encoder.layers.{layer}.self_attn.{part}_proj.{kind}"] = x
        else:
            out[f"encoder.layers.{layer}.{_MEGATRON_TO_HF_ENCODER[module]}.{kind}"] = tensor
    return out


# --- decoder (Qwen3 / Llama-style GPT) -----------------------------------------------------------------

#: HF decoder-layer names → Megatron ``GPTModel`` layer names (q/k/v and gate/up are fused separately).
DECODER_RENAMES = {
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
_DECODER_RENAMES_BACK = {v: k for k, v in DECODER_RENAMES.items()}


def fuse_gqa_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int, groups: int, head_dim: int) -> Tensor:
    """Separate q ``[heads·D, H]``, k/v ``[groups·D, H]`` → Megatron's GQA ``linear_qkv``
    ``[G·(heads/G + 2)·D, H]``."""
    hidden = q.shape[1]
    q = q.view(groups, heads // groups * head_dim, hidden)  # (G, heads/G·D, H)
    k = k.view(groups, head_dim, hidden)
    v = v.view(groups, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)  # (G·(heads/G + 2)·D, H)


def split_gqa_qkv(qkv: Tensor, heads: int, groups: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of ``fuse_gqa_qkv``."""
    hidden = qkv.shape[1]
    per_group = qkv.view(groups, (heads // groups + 2) * head_dim, hidden)
    q, k, v = per_group.split([heads // groups * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def hf_decoder_to_megatron(hf: dict[str, Tensor], config: Any, *, hf_prefix: str = "model.",
                           head: str = "lm_head.weight", prefix: str = "gpt.") -> dict[str, Tensor]:
    """HF decoder tensors → ``prefix`` + Megatron ``GPTModel`` names. ``config`` gives ``num_attention_heads``,
    ``num_query_groups`` and ``head_dim`` (a Qwen3 ``Config``).

    Any subset made of whole layers and single tensors outside the layers maps on its own (a streamed load
    converts one layer at a time, `keye.hf.contract`); a layer missing one of its tensors is a ``KeyError``
    naming it. Names it does not know are ignored."""
    heads, groups, head_dim = config.num_attention_heads, config.num_query_groups, config.head_dim
    plain = {f"{hf_prefix}embed_tokens.weight": "embedding.word_embeddings.weight",
             f"{hf_prefix}norm.weight": "decoder.final_layernorm.weight", head: "output_layer.weight"}
    out = {prefix + name: hf[hf_name] for hf_name, name in plain.items() if hf_name in hf}
    layer_name = re.compile(rf"^{re.escape(hf_prefix)}layers\.(\d+)\.")
    for layer in sorted({int(m.group(1)) for m in map(layer_name.match, hf) if m}):
        src, dst = f"{hf_prefix}layers.{layer}.", f"{prefix}decoder.layers.{layer}."
        for hf_name, name in DECODER_RENAMES.items():
            out[dst + name] = hf[src + hf_name]
        out[dst + "self_attention.linear_qkv.weight"] = fuse_gqa_qkv(
            *(hf[f"{src}self_attn.{part}_proj.weight"] for part in "qkv"), heads, groups, head_dim
        )
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([hf[src + f"mlp.{part}_proj.weight"] for part in ("gate", "up")])
    return out


def megatron_decoder_to_hf(state: dict[str, Tensor], config: Any, *, hf_prefix: str = "model.",
                           head: str = "lm_head.weight", prefix: str = "gpt.") -> dict[str, Tensor]:
    """The inverse of :func:`hf_decoder_to_megatron`, tensor by tensor (keys outside ``prefix`` and
    ``_extra_state`` entries are ignored; an unknown parameter name under it is a ``KeyError``)."""
    heads, groups, head_dim = config.num_attention_heads, config.num_query_groups, config.head_dim
    plain = {"embedding.word_embeddings.weight": f"{hf_prefix}embed_tokens.weight",
             "decoder.final_layernorm.weight": f"{hf_prefix}norm.weight", "output_layer.weight": head}
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if not name.startswith(prefix) or name.endswith("_extra_state"):
            continue  # another part's, or Megatron's non-parameter extra state
        rest = name[len(prefix):]
        if rest in plain:
            out[plain[rest]] = tensor
            continue
        match = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", rest)
        layer, module = match.groups() if match else (None, None)
        dst = f"{hf_prefix}layers.{layer}."
        if module == "self_attention.linear_qkv.weight":
            for part, x in zip("qkv", split_gqa_qkv(tensor, heads, groups, head_dim)):
                out[dst + f"self_attn.{part}_proj.weight"] = x
        elif module == "mlp.linear_fc1.weight":
            out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = tensor.chunk(2)
        elif module in _DECODER_RENAMES_BACK:
            out[dst + _DECODER_RENAMES_BACK[module]] = tensor
        else:
            raise KeyError(f"no Hugging Face name for decoder weight {name!r}")
    return {name: tensor.contiguous() for name, tensor in out.items()}
