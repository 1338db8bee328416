"""Block-diagonal attention over a packed sequence, in the two forms Megatron's attentions take.

NaViT-style towers put every image/video of a batch in one sequence ``[sum N, 1, D]``, each block seeing
only itself. ``packed_seq_params`` is the ``thd`` form (cu_seqlens) that Transformer Engine's fused
attention and, without TE, ``keye.model.sdpa_attention.SDPAAttention`` (SDPA per block) take;
``block_diagonal_mask`` is the boolean mask (True = masked) for Megatron's own dense attention, which
SDPAAttention also reads (it finds the blocks in the mask).

The LLM's packed rows arrive as a dense block-causal mask (``keye.data.batch.collate_pack``: one causal
block per sample, the padding one more block). Transformer Engine cannot take that mask: its fused
attention under the ``causal`` mask type *ignores* ``attention_mask``, so the samples of a row would
attend to each other. ``causal_thd_params`` turns such a mask back into ``thd`` PackedSeqParams (the
padding included as a last block, so ``cu_seqlens[-1]`` is the row length and per-token RoPE angles map
one to one); Megatron's ``TEDotProductAttention`` then runs TE with ``padding_causal`` (it maps ``causal``
to it under ``thd``), causal inside each block and nothing across blocks. A mask of another shape (a
preference pair's shared-prompt tree, a left-padded batch of several rows) has no ``thd`` form:
``causal_block_lengths`` says so with None.
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


def causal_block_lengths(mask: Tensor) -> list[int] | None:
    """The block lengths of a block-causal mask (``[1, 1, T, T]`` or ``[T, T]`` bool, True = masked), in
    order, or None when it is anything else (several rows, a bidirectional or tree-shaped block, a token
    that sees across blocks). A block of one token counts as causal."""
    from keye.model.sdpa_attention import block_structure

    if mask.dim() == 4:
        if mask.shape[:2] != (1, 1):
            return None
        mask = mask[0, 0]
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return None
    blocks = block_structure(mask.bool())
    if blocks is None or not all(causal or end - start == 1 for start, end, causal in blocks):
        return None
    return [end - start for start, end, _ in blocks]


def causal_thd_params(mask: Tensor, device: torch.device | None = None) -> Any:
    """``thd`` PackedSeqParams for a block-causal mask (see the module docstring), or None when the mask
    has no such form (``causal_block_lengths``)."""
    lengths = causal_block_lengths(mask)
    return None if lengths is None else packed_seq_params(lengths, device if device is not None else mask.device)
