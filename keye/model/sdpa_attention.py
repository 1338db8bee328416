"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for Megatron's local layer specs.

Why: without Transformer Engine (CPU, or a GPU without TE) Megatron's layer specs use its unfused
``DotProductAttention``, which materialises every ``[L, L]`` score, fills the mask in, softmaxes and
multiplies. Keye's packed inputs make that worst-case: the NaViT pack is one sequence of ``ΣN`` patches with
a block-diagonal mask, and the LLM's packed rows have one causal block per sample, so most of the scores
it computes are thrown away. ``SDPAAttention`` computes only the diagonal blocks, each with PyTorch's
fused SDPA kernel (flash on CPU and GPU), which is what transformers does when it splits at ``cu_seqlens``.

``SDPAAttention`` subclasses ``DotProductAttention`` (same constructor, head bookkeeping and state dict)
and replaces ``forward``. What it does, by input:

* no mask: one SDPA call, causal exactly when Megatron's would be (``attn_mask_type == causal`` and
  ``sq > 1``), bidirectional otherwise;
* a boolean mask (True = masked, ``[b or 1, 1, L, L]``): the blocks are read from the mask in O(L):
  inside a block, causal or not, query ``i`` may see key ``i - 1``, so a block starts where
  ``mask[i, i - 1]`` is True. The mask is then verified to be exactly block-diagonal (each block all
  visible or exactly lower-triangular; every entry outside the blocks masked), and SDPA runs per block.
  Any other mask falls back to one SDPA call with ``attn_mask=~mask``, or, when some row is masked
  entirely, to Megatron's own forward (it fills masked scores with -10000, so such a row attends
  uniformly to every key, where SDPA gives zeros);
* ``packed_seq_params`` (``thd``, cu_seqlens; what Megatron passes with q/k/v ``[t, np, hn]``): per block,
  causal for the causal mask types, without looking at any mask.

Numerics: fp32 results equal Megatron's within float rounding (its -10000 fill equals SDPA's -inf for any
row that sees at least one key). GQA repeats each key/value group to its query heads as Megatron does;
under TP the heads are the per-rank heads of the given tensors. Dropout is ``config.attention_dropout``
in training, drawn inside Megatron's model-parallel RNG tracker as the original does. Sliding windows and
softmax offsets are Megatron-only: those configurations use the original forward.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor

ATTENTION_IMPLS = ("sdpa", "megatron")
_CAUSAL_TYPES = (
    AttnMaskType.causal,
    AttnMaskType.padding_causal,
    AttnMaskType.causal_bottom_right,
)

Block = tuple[int, int, bool]  # (start, end, causal): tokens [start, end) attend among themselves


def local_core_attention(attention: str) -> type:
    """The ``core_attention`` module for a local (non-TE) layer spec: 'sdpa' or 'megatron' (the original)."""
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention {attention!r}; known: {', '.join(ATTENTION_IMPLS)}")
    return SDPAAttention if attention == "sdpa" else DotProductAttention


def block_structure(mask: Tensor) -> list[Block] | None:
    """``mask [L, L]`` bool (True = masked) → its diagonal blocks, or None if it is not block-diagonal.

    A block is either fully visible (bidirectional) or exactly causal (lower triangle visible); blocks
    may differ in kind. Reads O(L) entries to find the blocks, then checks the whole mask once.
    """
    length = mask.shape[0]
    starts = (torch.nonzero(torch.diagonal(mask, offset=-1)).flatten() + 1).tolist()  # mask[i, i-1] masked
    bounds = [0, *starts, length]
    longest = max(end - start for start, end in zip(bounds[:-1], bounds[1:])) if length else 0
    upper = torch.ones(longest, longest, dtype=torch.bool, device=mask.device).triu_(1)  # (n, n) causal mask
    blocks: list[Block] = []
    visible = 0  # unmasked entries the blocks account for
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        block = mask[start:end, start:end]  # (n, n) view
        causal = n > 1 and bool(block[0, 1])
        if causal:
            if not torch.equal(block, upper[:n, :n]):
                return None
            visible += n * (n + 1) // 2
        elif bool(block.any()):
            return None
        else:
            visible += n * n
        blocks.append((start, end, causal))
    if int(mask.sum()) != length * length - visible:  # something outside the blocks is visible
        return None
    return blocks


# The same mask goes to every layer of a forward (and again in recompute): detect its blocks once.
_last_mask: tuple[Any, int, list[list[Block]] | None] = (None, -1, None)


def _mask_blocks(mask: Tensor) -> list[list[Block]] | None:
    """Blocks of each ``[1, 1, L, L]`` slice of ``mask [B, 1, L, L]``; None if any is not block-diagonal."""
    global _last_mask
    ref, version, cached = _last_mask
    if ref is not None and ref() is mask and version == mask._version:
        return cached
    result: list[list[Block]] | None = []
    for item in mask[:, 0]:
        blocks = block_structure(item)
        if blocks is None:
            result = None
            break
        result.append(blocks)
    _last_mask = (weakref.ref(mask), mask._version, result)
    return result


class SDPAAttention(DotProductAttention):
    """Megatron's ``DotProductAttention`` with ``forward`` on SDPA, per diagonal block (module docstring)."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection: Any = None) -> None:
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout,
                         softmax_scale, cp_comm_type, pg_collection)
        # The parent divides its scale by layer_number under apply_query_key_layer_scaling and multiplies
        # it back in the softmax: the effective scale is this one.
        self.sdpa_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(
            self.hidden_size_per_attention_head
        )
        self._megatron_only = self.scale_mask_softmax.window_size is not None or self.softmax_offset is not None

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """q ``[sq, b, np, hn]``, k/v ``[sk, b, ng, hn]`` → context ``[sq, b, np * hn]``.

        With ``thd`` packed_seq_params Megatron passes q/k/v without b (``[t, n, hn]``): context ``[t, np * hn]``.
        """
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)  # (t, 1, n, hn)
        elif self._megatron_only or attention_bias is not None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        sq, batch, heads, _ = query.shape
        sk = key.shape[0]
        if heads // key.shape[2] > 1:  # GQA: [sk, b, ng, hn] -> [sk, b, np, hn], as Megatron
            key = key.repeat_interleave(heads // key.shape[2], dim=2)
            value = value.repeat_interleave(heads // value.shape[2], dim=2)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # (b, np, s, hn)

        if thd:
            context = self._attend_blocks(q, k, v, self._cu_blocks(packed_seq_params, sq, attn_mask_type))
        elif attention_mask is None:
            causal = self.attn_mask_type == AttnMaskType.causal and sq > 1
            if causal and sq != sk:
                raise ValueError(f"causal attention needs as many queries as keys, got {sq} and {sk}")
            context = self._attend_blocks(q, k, v, [(0, sq, causal)])
        else:
            mask = attention_mask.bool()
            per_item = None
            if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[0] in (1, batch) and sq == sk:
                per_item = _mask_blocks(mask)
            if per_item is None:  # not block-diagonal
                if bool(mask.all(dim=-1).any()):  # a row sees nothing: keep Megatron's uniform row
                    return super().forward(query, key, value, attention_mask, attn_mask_type)
                context = self._sdpa(q, k, v, attn_mask=~mask)
            elif len(per_item) == 1:
                context = self._attend_blocks(q, k, v, per_item[0])
            else:  # a different block layout per batch item
                context = torch.cat([
                    self._attend_blocks(q[i:i + 1], k[i:i + 1], v[i:i + 1], blocks)
                    for i, blocks in enumerate(per_item)
                ])  # (b, np, sq, hn)

        context = context.permute(2, 0, 1, 3).reshape(sq, batch, heads * context.shape[-1])  # (sq, b, np*hn)
        return context[:, 0] if thd else context

    # --- pieces ------------------------------------------------------------------------------------

    def _cu_blocks(self, params: PackedSeqParams, total: int, attn_mask_type: Optional[AttnMaskType]) -> list[Block]:
        """Blocks from ``cu_seqlens`` (tokens after the last one form one more block)."""
        cu = params.cu_seqlens_q
        for other in (params.cu_seqlens_kv, params.cu_seqlens_q_padded, params.cu_seqlens_kv_padded):
            if other is not None and not torch.equal(other.to(cu.device), cu):
                raise NotImplementedError("SDPAAttention: thd needs equal q/kv cu_seqlens and no padded ones")
        causal = (attn_mask_type or self.attn_mask_type) in _CAUSAL_TYPES
        bounds = [b for b in cu.tolist() if b < total] + [total]
        return [(s, e, causal) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]

    def _attend_blocks(self, q: Tensor, k: Tensor, v: Tensor, blocks: list[Block]) -> Tensor:
        """SDPA on each block of q/k/v ``[b, np, L, hn]``, concatenated back to ``[b, np, L, hn]``."""
        outputs = [
            self._sdpa(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=causal) for s, e, causal in blocks
        ]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
              is_causal: bool = False) -> Tensor:
        """SDPA on ``[b, np, s, hn]`` with this module's scale and dropout."""
        dropout = self.attention_dropout.p if self.training else 0.0
        call = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal, scale=self.sdpa_scale
        )
        if dropout > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():  # as the original draws its dropout
                return call()
        return call()
