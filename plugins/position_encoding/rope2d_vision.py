"""2D rotary position embedding of the Keye ViT (spec §1.1).

Every patch gets a (row, col) id inside its own frame: ``row = (i % (h*w)) // w``, ``col = i % w`` for the
i-th patch of a grid ``(t, h, w)`` laid out in raster order; ids restart for every frame (and every image).

The released model builds a ``SigLIPRotaryEmbedding(dim=head_dim // 2 = 36, theta=1e4)``, so there are
18 inverse frequencies ``theta ** (-2k / 36)``, and per patch the 36 angles ``[row * inv_freq, col * inv_freq]``.
Those angles go to flash-attn's ``apply_rotary_emb`` in non-interleaved (rotate-half) mode over the
**full** 72-dim head: dims ``i`` and ``i + 36`` rotate together by angle ``i``. In other words the first
18 pairs carry the row and the next 18 pairs carry the column. Here the 36 angles are duplicated to 72
(``cat(angles, angles)``) so the rotation is the usual ``x * cos + rotate_half(x) * sin``, which is what
flash-attn's kernel computes.

The math is done in float32 (as flash-attn's kernel does internally) and cast back to the input dtype.

As a vision encoder's ``position_encoding`` (`keye.model.protocols.PatchPositions`, the default of
``siglip_navit``): ``patch_rotary_pos_emb(grid_thw)`` gives Megatron's attention the angles
``[rows, cols, rows, cols]`` per patch, ``[N, 1, 1, head_dim]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from keye import hookimpl
from keye.config import doc


def vision_position_ids(grid_thw: Tensor) -> Tensor:
    """(row, col) id of every patch of every grid, concatenated in raster order.

    ``grid_thw`` is ``[K, 3]`` (one ``(t, h, w)`` per image or video, in patches); the result is
    ``[sum(t*h*w), 2]`` (long). Ids restart at every frame: a video frame is positioned like an image.
    """
    grid_thw = torch.as_tensor(grid_thw, dtype=torch.long).reshape(-1, 3)
    ids = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).repeat_interleave(w)  # (h*w,)
        cols = torch.arange(w).repeat(h)  # (h*w,)
        ids.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))  # (t*h*w, 2)
    if not ids:
        return torch.zeros(0, 2, dtype=torch.long)
    return torch.cat(ids, dim=0)


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim: pairs (i, i + D/2) rotate together."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[N, heads, head_dim]`` by per-patch ``cos``/``sin`` ``[N, head_dim]`` (rotate-half).

    Computed in float32 and returned in ``x``'s dtype, like flash-attn's ``apply_rotary_emb``.
    """
    cos = cos[:, None, :].float()  # (N, 1, D)
    sin = sin[:, None, :].float()
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class Rope2DVision(nn.Module):
    """The ViT's 2D RoPE: ``forward(grid_thw) -> (cos, sin)``, each ``[N, head_dim]`` float32.

    Apply to q and k with :func:`apply_rotary` in every ViT layer (the same cos/sin for all layers).
    """

    @dataclass
    class Config:
        head_dim: int = doc("Per-head width of the ViT attention (Keye: 1152 / 16 heads = 72). Must divide by 4. "
                            "A vision encoder that selects this scheme sets it to its own head width.", 72)
        theta: float = doc("RoPE base of the inverse frequencies (Keye: 10000).", 10000.0)

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        check.number(config, "theta", above=0)

    def __init__(self, config: Rope2DVision.Config | None = None, ctx: Any = None) -> None:
        super().__init__()
        self.config = config = config or self.Config()
        if config.head_dim % 4:
            raise ValueError(f"rope2d_vision: head_dim must be divisible by 4 (two axes of pairs), got {config.head_dim}")
        dim = config.head_dim // 2  # 36: the SigLIPRotaryEmbedding "dim" of the released model
        inv_freq = 1.0 / (config.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # (dim/2,) = (18,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def angles(self, grid_thw: Tensor) -> Tensor:
        """The 36 rotation angles per patch, ``[N, head_dim // 2]``: ``[row * inv_freq, col * inv_freq]``."""
        ids = vision_position_ids(grid_thw).to(self.inv_freq.device)  # (N, 2)
        rows = ids[:, :1].float() * self.inv_freq  # (N, 18)
        cols = ids[:, 1:].float() * self.inv_freq  # (N, 18)
        return torch.cat([rows, cols], dim=-1)  # (N, 36)

    def patch_rotary_pos_emb(self, grid_thw: Tensor) -> Tensor:
        """``[N, 1, 1, head_dim]`` angles for Megatron's rotate-half RoPE: ``[rows, cols, rows, cols]`` per patch."""
        angles = self.angles(grid_thw)  # (N, head_dim / 2): [row * inv_freq, col * inv_freq]
        return torch.cat([angles, angles], dim=-1)[:, None, None, :]  # (N, 1, 1, head_dim)

    def forward(self, grid_thw: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.angles(grid_thw)
        emb = torch.cat([emb, emb], dim=-1)  # (N, 72): dim i and i+36 share angle i
        return emb.cos(), emb.sin()


@hookimpl
def keye_register_position_encodings(register) -> None:
    register("rope2d_vision", Rope2DVision)
