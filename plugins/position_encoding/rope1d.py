"""Standard 1D rotary position embedding (rotate-half / GPT-NeoX layout), as in Qwen3 and Llama.

``inv_freq[k] = theta ** (-2k / head_dim)`` for k < head_dim / 2; a token at position p rotates the
pair of dims (k, k + head_dim/2) by ``p * inv_freq[k]``. This is what Megatron-Core's ``rope``
position embedding computes with ``rotary_interleaved=False``.

As a language model's ``position_encoding`` (`keye.model.protocols.TokenPositions`): every token, text or
image/video pad, is one position (0, 1, 2, ... per sample; a generated token continues after the prompt's
last), and ``rotary_pos_emb`` gives Megatron the angles of row 0 of the ``[3, B, L]`` ids. Vision tokens
then carry no 2D/time structure: this is the text-only special case of M-RoPE (equal ids on the three axes
give the same rotation), and the way to train an LLM stage with plain RoPE
(``model.language_model.position_encoding.name=rope1d``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from keye import hookimpl
from keye.config import doc
from keye.model.protocols import next_position_ids, sequential_position_ids


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim: pairs (i, i + D/2) rotate together."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """Rotate q and k ``[B, heads, L, D]`` by ``cos``/``sin`` ``[B, L, D]``.

    ``unsqueeze_dim`` is where the heads axis is inserted into cos/sin: 1 for ``[B, heads, L, D]``,
    2 for ``[B, L, heads, D]``. Same contract as transformers' ``apply_rotary_pos_emb``.
    """
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Rope1D(nn.Module):
    """``forward(position_ids [B, L]) -> (cos, sin)``, each ``[B, L, head_dim]`` in float32."""

    @dataclass
    class Config:
        head_dim: int = doc("Per-head width that is rotated (Qwen3-8B: 128). Must be even. A model part that "
                            "selects this scheme sets it to its own head width.", 128)
        theta: float = doc("RoPE base (Qwen3: 1e6; Keye-VL-1.5 anneals at 8e6 for 128K context).", 1_000_000.0)
        spatial_merge_size: int = doc("ViT patches per LLM token along each side (the projector's merge): how "
                                      "many pad tokens the data pipeline writes per image or video.", 2)

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        check.number(config, "theta", above=0)
        check.count(config, "spatial_merge_size")

    def __init__(self, config: Rope1D.Config | None = None, ctx: Any = None) -> None:
        super().__init__()
        self.config = config = config or self.Config()
        if config.head_dim % 2:
            raise ValueError(f"rope1d: head_dim must be even, got {config.head_dim}")
        d = config.head_dim
        inv_freq = 1.0 / (config.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # (D/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, L, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (B, L, D)
        return emb.cos(), emb.sin()

    # --- TokenPositions (a language model's position_encoding) --------------------------------------

    @property
    def spatial_merge_size(self) -> int:
        return self.config.spatial_merge_size

    def position_ids(self, input_ids: Tensor, **vision: Any) -> Tensor:
        """``[3, L]``: 0..L-1 on every row; images and videos take one position per pad token."""
        return sequential_position_ids(input_ids.shape[-1]).to(input_ids.device)

    def decode_position_ids(self, position_ids: Tensor, count: int) -> Tensor:
        return next_position_ids(position_ids, count)

    def rotary_pos_emb(self, position_ids: Tensor) -> Tensor:
        """Angles ``[L, B, 1, D]`` of row 0 of ``position_ids [3, B, L]`` (or of ``[B, L]``), Megatron's layout."""
        ids = position_ids[0] if position_ids.dim() == 3 else position_ids  # (B, L)
        freqs = ids.to(self.inv_freq.device)[..., None].float() * self.inv_freq  # (B, L, D/2)
        return torch.cat([freqs, freqs], dim=-1).transpose(0, 1)[:, :, None, :].contiguous()  # (L, B, 1, D)


@hookimpl
def keye_register_position_encodings(register) -> None:
    register("rope1d", Rope1D)
