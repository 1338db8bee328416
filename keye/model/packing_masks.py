"""Block-diagonal attention over a packed sequence, in the two forms Megatron's attentions take.

NaViT-style towers put every image/video of a batch in one sequence ``[sum N, 1, D]``, each block seeing
only itself. ``packed_seq_params`` is the ``thd`` form (cu_seqlens) that Transformer Engine's fused
attention and, without TE, ``keye.model.sdpa_attention.SDPAAttention`` (SDPA per block) take;
``block_diagonal_mask`` is the boolean mask (True = masked) for Megatron's own dense attention, which
SDPAAttention also reads (it finds the blocks in the mask).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor


def block_diagonal_mask(seqlens: Iterable[int], device: torch.device | None = None) -> Tensor:
    """``[1, 1, N, N]`` bool, True where attention is *masked*: token i sees token j only in its own block."""
    seqlens = torch.as_tensor(list(seqlens), dtype=torch.long)
    block = torch.repeat_interleave(torch.arange(len(seqlens)), seqlens).to(device)  # (N,) block id per token
    return (block[:, None] != block[None, :])[None, None]  # (1, 1, N, N)


def packed_seq_params(seqlens: Iterable[int], device: torch.device | None = None) -> Any:
    """Megatron ``PackedSeqParams`` (``thd``) for blocks of these lengths: TE's varlen attention."""
    from megatron.core.packed_seq_params import PackedSeqParams

    seqlens = torch.as_tensor(list(seqlens), dtype=torch.int32)
    cu_seqlens = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0)).to(device)  # (K + 1,)
    longest = int(seqlens.max()) if len(seqlens) else 0
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )
