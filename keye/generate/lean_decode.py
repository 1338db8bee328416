"""A decode step of the LLM as one lean loop over its layers' own weights (CPU, fp32, one TP rank).

Why: a decode step brings one token per row, so on the CPU it is a handful of small GEMMs per layer (32 rows
of the benchmark's 256-wide model), and the modules around them cost as much as the math: Megatron's
``TransformerLayer`` → ``SelfAttention`` → tensor-parallel linear wrappers and their autograd Functions,
bias-dropout-add closures, viewless-tensor bookkeeping, per-layer mask handling. ``LeanDecoder`` runs the same
math as the model's forward with keye's KV cache, reading the very parameters the modules hold:

    per layer:  h = rms(x);  [q | k | v] per query group = h Wqkv^T;  q, k = rms_q(q), rms_k(k)  (per head)
                q, k = RoPE(q), RoPE(k);  cache k, v;  x = x + attention(q, cached k, v) Wproj^T
                h = rms(x);  [a | b] = h W1^T;  x = x + (silu(a) * b) W2^T
    last stage: logits = rms_final(x) Wout^T

and differs from that forward in fp32 rounding only. What it does differently, measured on
``tools/bench/generate.py`` (one thread; per call, 32 rows of the small model):

- GEMMs on MKL's ``mm`` with weights transposed once per batch (``[K, N]`` contiguous): 1.1-1.2 ms for one
  layer's four GEMMs and the output layer, against 1.7 ms on oneDNN's ``_linear_pointwise`` (which the
  training path keeps: it wins at training's row counts) and 1.5 ms on ``F.linear``. The copies cost the
  LLM stage's weight memory once more for the duration of one batch (the small model: 16 MB).
- attention as two batched matmuls on the batch-major cache (`KVCache.append`), the padding as an
  additive ``-inf`` row made once per batch: 0.33 against 0.46 ms for SDPA's flash kernel with a mask.
- RoPE tables of every step made once per batch (the positions of every step are known up front).
- no autograd: the generator runs under ``no_grad``; nothing here records a graph.

When it applies (`unsupported` says why not, and the model's own forward runs instead): keye's KV cache,
the LLM is a Megatron ``GPTModel`` with M-RoPE (``.gpt``, as keye's ``qwen3``) in eval mode, fp32 weights
on the CPU, tensor parallelism 1 (pipeline stages are fine: each runs its own layers), and every layer is
the plain pre-norm layer above: keye's ``SDPAAttention`` with the RoPE handed to it (``KeyeSelfAttention``),
RMSNorms with weights (q/k norms included), no biases, no output gate, a SwiGLU MLP, the embedding and
output weights untied or tied alike. Anything else (GPUs, bf16, TP > 1, TE layers, other activations)
keeps the module path, which is what every layout test compares against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from keye.generate.kv_cache import KVCache
from keye.model.sdpa_attention import rotary_tables, rotate


def rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim: the forward of ``keye.model.rms_norm.KeyeRMSNorm``, op for op."""
    return (x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True).add_(eps))).mul_(weight)


@dataclass
class _Layer:
    """One layer's weights (norm weights as held by the modules; GEMM weights transposed ``[K, N]``)."""

    number: int  # the core attention's layer_number: the layer's key in the KV cache
    norm1: Tensor
    q_norm: Tensor
    k_norm: Tensor
    qkv: Tensor  # (H, ng * (np/ng + 2) * d)
    proj: Tensor  # (np * d, H)
    norm2: Tensor
    fc1: Tensor  # (H, 2 * F)
    fc2: Tensor  # (F, H)


def _norm_weight(module: Any) -> Tensor | None:
    """The weight of a ``torch.nn.RMSNorm`` over one dim, or None for anything else."""
    if not isinstance(module, torch.nn.RMSNorm) or module.weight is None or len(module.normalized_shape) != 1:
        return None
    return module.weight


def _plain_linear(module: Any) -> bool:
    return getattr(module, "bias", None) is None and isinstance(getattr(module, "weight", None), Tensor)


def unsupported(lm: Any) -> str | None:
    """Why `LeanDecoder` cannot run this language model stage (None: it can); see the module docstring."""
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from keye.model.sdpa_attention import KeyeSelfAttention, SDPAAttention

    gpt = getattr(lm, "gpt", None)
    if not isinstance(gpt, GPTModel) or gpt.position_embedding_type != "mrope" or gpt.training:
        return "not a GPTModel with M-RoPE in eval mode"
    if mpu.model_parallel_is_initialized() and mpu.get_tensor_model_parallel_world_size() > 1:
        return "tensor parallel"
    params = list(gpt.parameters())
    if not params or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return "not fp32 on the CPU"
    config = gpt.config
    if (config.sequence_parallel or config.context_parallel_size != 1 or config.fp32_residual_connection
            or config.apply_residual_connection_post_layernorm or config.layernorm_zero_centered_gamma
            or getattr(config, "attention_output_gate", False) or config.num_moe_experts
            or not config.gated_linear_unit or config.activation_func is not F.silu
            or getattr(config, "glu_linear_offset", 0.0) != 0.0
            or getattr(config, "activation_func_clamp_value", None) is not None):
        return "a transformer config other than Qwen3's (pre-norm, SwiGLU, no output gate, no MoE)"
    for layer in gpt.decoder.layers:
        attention, mlp = getattr(layer, "self_attention", None), getattr(layer, "mlp", None)
        if not (isinstance(layer, TransformerLayer) and isinstance(attention, KeyeSelfAttention)
                and isinstance(attention.core_attention, SDPAAttention) and isinstance(mlp, MLP)):
            return f"layer {layer.layer_number} is not a TransformerLayer with keye's SDPA attention and an MLP"
        if attention.core_attention._megatron_only or attention._fusable_rope(
                torch.zeros(1, 1, 1, attention.hidden_size_per_attention_head), None, {}) is None:
            return f"layer {layer.layer_number}: attention or RoPE beyond plain rotate-half SDPA"
        norms = (layer.input_layernorm, attention.q_layernorm, attention.k_layernorm, layer.pre_mlp_layernorm)
        if any(_norm_weight(n) is None for n in norms):
            return f"layer {layer.layer_number}: a norm other than RMSNorm with a weight"
        if not all(_plain_linear(m) for m in (attention.linear_qkv, attention.linear_proj, mlp.linear_fc1,
                                                  mlp.linear_fc2)):
            return f"layer {layer.layer_number}: a linear with a bias"
    if gpt.post_process and (_norm_weight(gpt.decoder.final_layernorm) is None
                             or getattr(gpt.output_layer, "bias", None) is not None):
        return "the final norm or output layer is not RMSNorm / a linear without bias"
    return None


class LeanDecoder:
    """Decode steps of one LLM stage with a `KVCache` the model's forward has prefilled (module docstring).

    Made once per batch, after the prefill: ``positions [3, S, T]`` are the M-RoPE ids of the ``T`` tokens
    that will be fed back, ``masked [S, L + T]`` (True = left padding) the keys each row may not see.
    """

    def __init__(self, lm: Any, cache: KVCache, positions: Tensor, masked: Tensor) -> None:
        gpt = lm.gpt
        self.cache = cache
        self.pre_process, self.post_process = gpt.pre_process, gpt.post_process
        config = gpt.config
        self.eps = config.layernorm_epsilon
        first = gpt.decoder.layers[0].self_attention if len(gpt.decoder.layers) else None
        if first is not None:
            self.heads = first.num_attention_heads_per_partition  # np
            self.groups = first.num_query_groups_per_partition  # ng
            self.head_dim = first.hidden_size_per_attention_head  # d
            self.scale = first.core_attention.sdpa_scale
        self.layers = [self._layer(layer) for layer in gpt.decoder.layers]
        if self.post_process:
            self.final_norm = gpt.decoder.final_layernorm.weight
            weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights \
                else gpt.output_layer.weight
            self.output = weight.detach().t().contiguous()  # (H, V)
        freqs = gpt.rotary_pos_emb(positions, gpt.mrope_section)  # (T, S, 1, d), as the model's forward makes them
        self.cos, self.sin = rotary_tables(freqs, torch.float32)
        self.mask = torch.zeros(masked.shape, dtype=torch.float32).masked_fill_(masked, float("-inf"))  # (S, L + T)
        self.mask = self.mask[:, None, None, :]  # (S, 1, 1, L + T): added to the scores
        self.steps = 0

    @staticmethod
    def _layer(layer: Any) -> _Layer:
        attention, mlp = layer.self_attention, layer.mlp
        t = lambda linear: linear.weight.detach().t().contiguous()  # noqa: E731  (K, N) for torch.mm
        return _Layer(attention.core_attention.layer_number, layer.input_layernorm.weight,
                      attention.q_layernorm.weight, attention.k_layernorm.weight, t(attention.linear_qkv),
                      t(attention.linear_proj), layer.pre_mlp_layernorm.weight, t(mlp.linear_fc1), t(mlp.linear_fc2))

    def step(self, hidden: Tensor) -> Tensor:
        """``hidden [1, S, H]`` (the fed-back tokens' embeddings, or the previous stage's output) → the last
        stage's logits ``[S, V]``, or this stage's output ``[1, S, H]``; the caller advances the cache."""
        x = hidden[0]  # (S, H)
        rows = x.shape[0]
        step, self.steps = self.steps, self.steps + 1
        tables = (self.cos[step], self.sin[step])  # (S, 1, d) each
        end = self.cache.length + 1
        mask = self.mask[..., :end]  # (S, 1, 1, end)
        heads, groups, dim = (self.heads, self.groups, self.head_dim) if self.layers else (0, 0, 0)
        per_group = heads // groups if groups else 0
        for layer in self.layers:
            qkv = torch.mm(rms(x, layer.norm1, self.eps), layer.qkv).view(rows, groups, (per_group + 2) * dim)
            q, k, v = qkv.split([per_group * dim, dim, dim], dim=-1)  # (S, ng, r*d), (S, ng, d), (S, ng, d)
            q = rotate(rms(q.reshape(rows, heads, dim), layer.q_norm, self.eps), tables)  # (S, np, d)
            k = rotate(rms(k, layer.k_norm, self.eps), tables)  # (S, ng, d)
            keys, values = self.cache.append(layer.number, k, v)  # (S, ng, end, d) each
            scores = torch.matmul(q.view(rows, groups, per_group, dim), keys.transpose(-1, -2))  # (S, ng, r, end)
            probs = scores.mul_(self.scale).add_(mask).softmax(dim=-1)
            context = torch.matmul(probs, values).view(rows, heads * dim)  # (S, np*d): heads in Megatron's order
            x = x + torch.mm(context, layer.proj)
            a, b = torch.mm(rms(x, layer.norm2, self.eps), layer.fc1).chunk(2, dim=-1)  # (S, F) each
            x = x + torch.mm(F.silu(a).mul_(b), layer.fc2)
        if not self.post_process:
            return x[None]  # (1, S, H)
        return torch.mm(rms(x, self.final_norm, self.eps), self.output)  # (S, V)
