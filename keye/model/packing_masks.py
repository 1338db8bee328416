"""Block-diagonal attention over a packed sequence, in the two forms Megatron's attentions take.

NaViT-style towers put every image/video of a batch in one sequence ``[sum N, 1, D]``, each block seeing
only itself. ``packed_seq_params`` is the ``thd`` form (cu_seqlens) that Transformer Engine's fused
attention and, without TE, ``keye.model.sdpa_attention.SDPAAttention`` (SDPA per block) take;
``block_diagonal_mask`` is the boolean mask (True = masked) for Megatron's own dense attention, which
SDPAAttention also reads (it finds the blocks in the mask).

The LLM's packed rows are block-causal (``keye.data.batch.collate_pack``: one causal block per sample, the
padding one more block). Transformer Engine cannot take such a row as a dense mask: its fused attention
under the ``causal`` mask type *ignores* ``attention_mask``, so the samples of a row would attend to each
other. It takes them as ``thd`` PackedSeqParams (the padding included as a last block, so
``cu_seqlens[-1]`` is the row length and per-token RoPE angles map one to one): ``PackedMask.thd`` below,
or ``causal_thd_params`` for a mask that arrives dense (a test's, a caller's own); Megatron's ``TEDotProductAttention`` then runs TE with ``padding_causal`` (it maps ``causal``
to it under ``thd``), causal inside each block and nothing across blocks. A mask of another shape (a
preference pair's shared-prompt tree, a left-padded batch of several rows) has no ``thd`` form:
``causal_block_lengths`` says so with None.

``PackedMask`` is how a packed micro-batch carries its attention without the dense mask: the block
boundaries, plus the few blocks that have their own pattern (a preference pair's tree). A dense
``(1, 1, T, T)`` bool is T² bytes, 1 GiB at the 8B blueprints' 32768 tokens, for what the boundaries say in
a few numbers; the language model asks for ``thd`` first and builds ``dense`` only where an attention needs
it (Megatron's own dense-mask attention, a tree block on local layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class PackedMask:
    """The attention of one packed row, compactly: block ``i`` spans ``cu_seqlens[i]:cu_seqlens[i + 1]`` and
    is causal unless ``blocks`` gives its own ``(n, n)`` pattern (True = may attend) by start position;
    nothing is seen across blocks. The padding is the last block, so ``cu_seqlens[-1]`` is the row length.

    A value object rather than a lazily built tensor so that the choice of form stays with the consumer
    (``Qwen3LanguageModel._attention_inputs``): ``thd`` where the row is all causal blocks, ``dense`` only
    where an attention takes nothing else. Megatron never sends it between pipeline stages (each stage's
    data iterator hands it its own copy), so it needs no tensor protocol.
    """

    cu_seqlens: Tensor  # (K + 1,) long, from 0 to T
    blocks: dict[int, Tensor] = field(default_factory=dict)  # block start -> (n, n) bool, True = may attend

    @property
    def length(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The dense form's shape, for messages."""
        return (1, 1, self.length, self.length)

    def lengths(self) -> list[int]:
        """The non-empty block lengths in order (an empty sample is no block)."""
        return [n for n in torch.diff(self.cu_seqlens).tolist() if n]

    def causal_lengths(self) -> list[int] | None:
        """The block lengths when every block is causal (what ``thd`` can say), else None."""
        return None if self.blocks else self.lengths()

    def thd(self, device: torch.device | None = None) -> Any:
        """``thd`` PackedSeqParams, or None where a block has its own pattern (no ``thd`` form)."""
        lengths = self.causal_lengths()
        return None if lengths is None else packed_seq_params(lengths, device)

    def dense(self, device: torch.device | None = None) -> Tensor:
        """``(1, 1, T, T)`` bool, True = masked (Megatron's convention): the mask this object stands for."""
        keep = torch.zeros(self.length, self.length, dtype=torch.bool)
        for start, end in zip(self.cu_seqlens[:-1].tolist(), self.cu_seqlens[1:].tolist()):
            if end == start:  # an empty sample: no block (a tree block at this start is the next sample's)
                continue
            pattern = self.blocks.get(start)
            keep[start:end, start:end] = (torch.ones(end - start, end - start, dtype=torch.bool).tril_()
                                          if pattern is None else pattern)
        return (~keep).view(1, 1, self.length, self.length).to(device)
