"""SigLIP's attention-pooling head on packed NaViT features: one embedding per image.

transformers' ``SiglipMultiheadAttentionPoolingHead`` (and the released Keye-VL ``visual.vision_model.head``):
a learned ``probe`` query attends over an image's patch features with ``nn.MultiheadAttention``, then
``x + MLP(LayerNorm(x))`` (GELU-tanh MLP, the tower's own widths). SigLIP trains its image-text alignment
through it, so stage 0 continues from SigLIP with it rather than with a new head (which would start the
pretrained alignment from scratch).

Why packed: stage 0 feeds the ViT many images of different sizes as one sequence (``grid_thw`` gives each
image's patch count). Padding them to the longest image for ``nn.MultiheadAttention`` would hold
``images x longest x width`` (256 images of up to 65,536 patches at the 8B stage 0); a loop would run one small
attention per image. Here the key/value projections run once over the pack, and the probe's softmax is
taken per image segment (``scatter_reduce`` for the max, ``index_add`` for the sums): the same numbers as the
padded or looped module, in one pass. The parameters are ``nn.MultiheadAttention``'s own (``attention.in_proj_weight``
holds q, k, v stacked), so the names are SigLIP's and its checkpoints load unchanged.

The head is small (4·D² + 2·D·inner) and replicated on every tensor-parallel rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AttentionPoolingHead(nn.Module):
    """``forward(features [N, D], grid_thw [K, 3]) -> [K, D]``: SigLIP's pooled embedding of each packed image."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, layer_norm_eps: float = 1e-6,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.probe = nn.Parameter(torch.empty(1, 1, hidden_size, **kw))
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True, **kw)
        self.layernorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps, **kw)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(hidden_size, intermediate_size, **kw)
        self.mlp.fc2 = nn.Linear(intermediate_size, hidden_size, **kw)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """SigLIP's initialisation (transformers' ``SiglipPreTrainedModel._init_weights``, which the released
        Keye-VL code repeats): xavier-uniform probe, q/k/v and MLP weights, zero q/k/v bias, LeCun-normal output
        projection, MLP biases ~ N(0, 1e-6), LayerNorm 1 / 0."""
        for weight in (self.probe, self.attention.in_proj_weight, self.mlp.fc1.weight, self.mlp.fc2.weight):
            nn.init.xavier_uniform_(weight, generator=generator)
        self.attention.in_proj_bias.zero_()
        out = self.attention.out_proj
        std = math.sqrt(1.0 / out.weight.shape[1]) / 0.87962566103423978  # lecun_normal: N(0, 1/fan_in), cut at 2σ
        nn.init.trunc_normal_(out.weight, 0.0, std, -2 * std, 2 * std, generator=generator)
        out.bias.zero_()
        for fc in (self.mlp.fc1, self.mlp.fc2):
            fc.bias.normal_(0.0, 1e-6, generator=generator)
        self.layernorm.reset_parameters()

    def forward(self, features: Tensor, grid_thw: Tensor) -> Tensor:
        counts = torch.as_tensor(grid_thw).reshape(-1, 3).prod(dim=-1).to(features.device)  # (K,) patches per image
        images, (n, width), heads = len(counts), features.shape, self.num_heads
        if int(counts.sum()) != n:
            raise ValueError(f"pooling head: grid_thw covers {int(counts.sum())} patches, got {n}")
        segment = torch.repeat_interleave(torch.arange(images, device=features.device), counts)  # (N,) image of each
        w, b = self.attention.in_proj_weight, self.attention.in_proj_bias
        q = F.linear(self.probe.reshape(1, width), w[:width], b[:width])  # (1, D)
        k = F.linear(features, w[width:2 * width], b[width:2 * width]).view(n, heads, -1)  # (N, H, hd)
        v = F.linear(features, w[2 * width:], b[2 * width:]).view(n, heads, -1)  # (N, H, hd)
        # the softmax and its sums in float32 at least: an image may have 65,536 patches, too many to add up in bf16
        acc = torch.promote_types(k.dtype, torch.float32)
        scores = (k.to(acc) * q.to(acc).view(1, heads, -1)).sum(-1) / math.sqrt(width // heads)  # (N, H)
        index = segment[:, None].expand(n, heads)
        top = scores.new_full((images, heads), -math.inf).scatter_reduce(0, index, scores, "amax")  # (K, H)
        weights = (scores - top[segment].detach()).exp()  # (N, H); the max only steadies exp
        weights = weights / weights.new_zeros(images, heads).index_add(0, segment, weights)[segment]
        pooled = weights.new_zeros(images, heads, v.shape[-1]).index_add(0, segment, weights[..., None] * v.to(acc))
        x = self.attention.out_proj(pooled.reshape(images, width).to(v.dtype))  # (K, H, hd) → (K, D)
        hidden = F.gelu(self.mlp.fc1(self.layernorm(x)), approximate="tanh")
        return x + self.mlp.fc2(hidden)


def head_weight_shapes(hidden_size: int, intermediate_size: int) -> dict[str, tuple[int, ...]]:
    """The head's weights and shapes under SigLIP's names (relative to ``head.``), written out from SigLIP's layout."""
    d, inner = hidden_size, intermediate_size
    return {"probe": (1, 1, d), "attention.in_proj_weight": (3 * d, d), "attention.in_proj_bias": (3 * d,),
            "attention.out_proj.weight": (d, d), "attention.out_proj.bias": (d,), "layernorm.weight": (d,),
            "layernorm.bias": (d,), "mlp.fc1.weight": (inner, d), "mlp.fc1.bias": (inner,),
            "mlp.fc2.weight": (d, inner), "mlp.fc2.bias": (d,)}
