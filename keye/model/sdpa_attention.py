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
row that sees at least one key). GQA: each key/value group serves its query heads (SDPA's ``enable_gqa``,
the grouping of Megatron's ``repeat_interleave``, without copying k and v; with an explicit mask on CUDA k and v
are repeated, as CUDA's masked kernels do not take GQA; the CPU ones do); under TP the heads are the per-rank heads of the
given tensors. Dropout is ``config.attention_dropout`` in training, drawn inside Megatron's model-parallel
RNG tracker as the original does. Sliding windows and softmax offsets are Megatron-only: those
configurations use the original forward.

Blocks are cut with one ``split`` of the sequence and the per-block outputs joined with one ``cat`` in
the ``[s, b, np, hn]`` layout Megatron wants back: slicing q/k/v block by block would make autograd build
a zero-filled full-size gradient per slice and add them up (three per block per layer).

**RoPE inside the core attention** (``KeyeSelfAttention``): Megatron's ``SelfAttention`` rotates q and k
with its unfused ``apply_rotary_pos_emb``, which recomputes ``cos``/``sin`` of the angles for every layer
and tensor and goes through rotate-half's negate-and-concatenate, then one more concatenation with the
(empty) unrotated part, each a full pass over q or k in forward and again in backward. ``KeyeSelfAttention``
(Megatron's ``SelfAttention`` with the same submodules and state dict) hands the angles to this core
attention instead, which rotates q and k with ``rotate``: one autograd function, ``x * cos + swap(x) * sin``
forward and its transpose backward, with ``cos`` and ``sin`` (rotate-half's sign folded into ``sin``)
computed once per forward for all layers. The math is Megatron's rotate-half RoPE on the full head
(cos/sin cast to the activation dtype as Megatron does); any configuration this does not cover (partial
rotary, interleaved, YaRN scaling, MLA, inference caches, context parallelism, ``no_rope_freq``,
recomputing only the core attention, other core attentions) goes through Megatron's own path unchanged.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention
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


def local_self_attention(attention: str) -> type:
    """The ``self_attention`` module for a local layer spec: ``KeyeSelfAttention`` with SDPA (RoPE applied in
    the core attention), Megatron's ``SelfAttention`` with its own core attention."""
    return KeyeSelfAttention if local_core_attention(attention) is SDPAAttention else SelfAttention


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


# A decode step's padding mask goes to every layer: invert it and look for fully masked rows once.
_last_visible: tuple[Any, int, Tensor | None] = (None, -1, None)


def _visible(mask: Tensor) -> Tensor | None:
    """``~mask`` (True = visible, SDPA's convention), or None if some query row of ``mask`` is masked entirely."""
    global _last_visible
    ref, version, cached = _last_visible
    if ref is not None and ref() is mask and version == mask._version:
        return cached
    visible = None if bool(mask.all(dim=-1).any()) else ~mask
    _last_visible = (weakref.ref(mask), mask._version, visible)
    return visible


# --- RoPE ---------------------------------------------------------------------------------------------

# Every layer of a forward (and its recompute) gets the same angles: take cos/sin once.
_last_angles: tuple[Any, int, Any, tuple[Tensor, Tensor] | None] = (None, -1, None, None)


def rotary_tables(freqs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Angles ``[..., d]`` (rotate-half layout: ``[f, f]``) → ``(cos, sin)`` in ``dtype``, rotate-half's sign
    folded into ``sin`` (``[-sin f, sin f]``), so that ``rotate`` computes Megatron's
    ``x * cos + rotate_half(x) * sin`` as ``x * cos + swap(x) * sin``."""
    global _last_angles
    ref, version, cached_dtype, cached = _last_angles
    if ref is not None and ref() is freqs and version == freqs._version and cached_dtype == dtype:
        return cached
    half = freqs.shape[-1] // 2
    cos, sin = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)  # Megatron: computed in freqs' dtype, cast
    tables = (cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1))
    _last_angles = (weakref.ref(freqs), freqs._version, dtype, tables)
    return tables


def _add_swapped(out: Tensor, x: Tensor, sin: Tensor, transpose: bool = False) -> Tensor:
    """``out += swap(x) * sin`` in place (``swap([x1, x2]) = [x2, x1]`` over the last dim), without building
    ``swap(x)``; with ``transpose``, ``out += swap(x * sin)``, its transpose."""
    half = x.shape[-1] // 2
    first, second = (sin[..., half:], sin[..., :half]) if transpose else (sin[..., :half], sin[..., half:])
    out[..., :half].addcmul_(x[..., half:], first)
    out[..., half:].addcmul_(x[..., :half], second)
    return out


class _Rotate(torch.autograd.Function):
    """``y = x * cos + swap(x) * sin``; backward ``dx = dy * cos + swap(dy * sin)`` (cos/sin are constants).
    Each is one product and two in-place halves (no ``cat`` of swapped halves)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _add_swapped(x * cos, x, sin)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _add_swapped(grad * cos, grad, sin, transpose=True), None, None


def rotate(x: Tensor, tables: tuple[Tensor, Tensor]) -> Tensor:
    """Megatron's unfused rotate-half RoPE of ``x [..., d]`` with ``rotary_tables`` (broadcast against x)."""
    if not torch.is_grad_enabled():  # inference (decoding): the same ops without an autograd Function's overhead
        return _add_swapped(x * tables[0], x, tables[1])
    return _Rotate.apply(x, *tables)


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
        self.rotary: tuple[Tensor, Tensor] | None = None  # set by KeyeSelfAttention for one call
        self.kv_cache: Any = None  # set while decoding (keye.generate.kv_cache): keys after RoPE are appended

    @contextlib.contextmanager
    def rotating(self, tables: tuple[Tensor, Tensor]) -> Iterator[None]:
        """Within the block, ``forward`` first rotates q and k with these ``rotary_tables``."""
        self.rotary = tables
        try:
            yield
        finally:
            self.rotary = None

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
        if self.rotary is not None:  # RoPE handed over by KeyeSelfAttention; tables [s, b, 1, d]
            tables = tuple(t[:, 0] for t in self.rotary) if thd else self.rotary  # thd: [t, 1, d]
            query, key = rotate(query, tables), rotate(key, tables)
        if self.kv_cache is not None:  # decoding: this call's keys/values join the cached ones, q sees them all
            key, value = self.kv_cache.extend(self.layer_number, key, value)
        if thd:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)  # (t, 1, n, hn)
        elif self._megatron_only or attention_bias is not None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        sq, batch, heads, _ = query.shape
        sk = key.shape[0]

        if thd:
            context = self._attend_blocks(query, key, value, self._cu_blocks(packed_seq_params, sq, attn_mask_type))
        elif attention_mask is None:
            causal = self.attn_mask_type == AttnMaskType.causal and sq > 1
            if causal and sq != sk:
                raise ValueError(f"causal attention needs as many queries as keys, got {sq} and {sk}")
            context = self._attend_blocks(query, key, value, [(0, sq, causal)])
        else:
            mask = attention_mask.bool()
            per_item = None
            if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[0] in (1, batch) and sq == sk:
                per_item = _mask_blocks(mask)
            if per_item is None:  # not block-diagonal
                visible = _visible(mask)
                if visible is None:  # a row sees nothing: keep Megatron's uniform row
                    return super().forward(query, key, value, attention_mask, attn_mask_type)
                q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # (b, n, s, hn)
                context = self._sdpa(q, k, v, attn_mask=visible).permute(2, 0, 1, 3)  # (sq, b, np, hn)
            elif len(per_item) == 1:
                context = self._attend_blocks(query, key, value, per_item[0])
            else:  # a different block layout per batch item
                context = torch.cat([
                    self._attend_blocks(query[:, i:i + 1], key[:, i:i + 1], value[:, i:i + 1], blocks)
                    for i, blocks in enumerate(per_item)
                ], dim=1)  # (sq, b, np, hn)

        context = context.reshape(sq, batch, heads * context.shape[-1])  # (sq, b, np*hn)
        return context[:, 0] if thd else context

    # --- pieces ------------------------------------------------------------------------------------

    def _cu_blocks(self, params: PackedSeqParams, total: int, attn_mask_type: Optional[AttnMaskType]) -> list[Block]:
        """Blocks from ``cu_seqlens`` (tokens after the last one form one more block)."""
        cu = params.cu_seqlens_q
        for other in (params.cu_seqlens_kv, params.cu_seqlens_q_padded, params.cu_seqlens_kv_padded):
            if other is not None and not torch.equal(other.to(cu.device), cu):
                raise NotImplementedError("SDPAAttention: thd needs equal q/kv cu_seqlens and no padded ones")
        causal = (attn_mask_type or self.attn_mask_type) in _CAUSAL_TYPES
        bounds = [0] + [b for b in cu.tolist() if 0 < b < total] + [total]
        return [(s, e, causal) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]

    def _attend_blocks(self, query: Tensor, key: Tensor, value: Tensor, blocks: list[Block]) -> Tensor:
        """SDPA on each block of q ``[L, b, np, hn]``, k/v ``[L, b, ng, hn]`` → context ``[L, b, np, hn]``.

        The blocks tile ``[0, L)`` in order: one ``split`` cuts them, one ``cat`` joins the outputs (their
        backward is one ``cat`` and free views, where slicing block by block would zero-fill a full-size
        gradient per slice).
        """
        def attend(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:  # [s, b, n, hn] in and out
            return self._sdpa(*(x.permute(1, 2, 0, 3) for x in (q, k, v)), is_causal=causal).permute(2, 0, 1, 3)

        if len(blocks) == 1:  # no split: its backward would copy each gradient once more
            return attend(query, key, value, blocks[0][2])
        sizes = [end - start for start, end, _ in blocks]
        outputs = [
            attend(q, k, v, causal)
            for q, k, v, (_, _, causal) in zip(query.split(sizes), key.split(sizes), value.split(sizes), blocks)
        ]
        return torch.cat(outputs)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
              is_causal: bool = False) -> Tensor:
        """SDPA on q ``[b, np, s, hn]``, k/v ``[b, ng, s, hn]`` with this module's scale and dropout."""
        dropout = self.attention_dropout.p if self.training else 0.0
        groups = q.shape[1] // k.shape[1]
        if groups > 1 and attn_mask is not None and q.is_cuda:  # GQA with a mask: CUDA's masked kernels lack it
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        call = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal, scale=self.sdpa_scale,
            enable_gqa=q.shape[1] != k.shape[1],  # key/value group g serves query heads g*np/ng .. (g+1)*np/ng-1
        )
        if dropout > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():  # as the original draws its dropout
                return call()
        return call()


class KeyeSelfAttention(SelfAttention):
    """Megatron's ``SelfAttention`` that lets its ``SDPAAttention`` apply the RoPE (module docstring).

    Same submodules, parameters and state dict as ``SelfAttention``. ``forward`` takes the rotary angles
    out of Megatron's path and hands ``rotary_tables`` of them to the core attention for this call, when
    Megatron's path would compute exactly the plain rotate-half RoPE over whole heads; otherwise it is
    ``SelfAttention.forward`` unchanged.
    """

    def forward(self, hidden_states: Tensor, attention_mask: Any, key_value_states: Any = None,
                inference_context: Any = None, rotary_pos_emb: Any = None, **kwargs: Any) -> Any:
        freqs = self._fusable_rope(rotary_pos_emb, inference_context, kwargs)
        if freqs is None:
            return super().forward(hidden_states, attention_mask, key_value_states=key_value_states,
                                   inference_context=inference_context, rotary_pos_emb=rotary_pos_emb, **kwargs)
        with self.core_attention.rotating(rotary_tables(freqs, hidden_states.dtype)):
            return super().forward(hidden_states, attention_mask, key_value_states=key_value_states,
                                   inference_context=inference_context, rotary_pos_emb=None, **kwargs)

    def _fusable_rope(self, rotary_pos_emb: Any, inference_context: Any, kwargs: dict) -> Tensor | None:
        """The angles ``[s, b, 1, head_dim]`` if the core attention can apply them as Megatron would, else None."""
        if isinstance(rotary_pos_emb, tuple):  # (q, k) angles: only one shared tensor is handled
            q_freqs, k_freqs = rotary_pos_emb
            rotary_pos_emb = q_freqs if q_freqs is k_freqs else None
        if rotary_pos_emb is None or rotary_pos_emb.dim() != 4 or rotary_pos_emb.requires_grad:
            return None  # (learned angles would need their own gradient)
        config = self.config
        packed = kwargs.get("packed_seq_params")
        if packed is not None and (packed.qkv_format != "thd" or packed.cu_seqlens_q_padded is not None):
            return None
        if packed is not None and int(packed.cu_seqlens_q[-1]) != rotary_pos_emb.shape[0]:
            return None  # thd with per-sequence angles (Megatron restarts them per sequence)
        plain = (
            isinstance(self.core_attention, SDPAAttention)
            and inference_context is None
            and kwargs.get("inference_params") is None  # Megatron's deprecated name for the same
            and not self.checkpoint_core_attention  # a recomputed core attention would miss the tables
            and rotary_pos_emb.shape[-1] == self.hidden_size_per_attention_head
            and not config.apply_rope_fusion
            and not config.rotary_interleaved
            and not config.multi_latent_attention
            and not config.no_rope_freq
            and not config.flash_decode
            and config.context_parallel_size == 1
            and kwargs.get("rotary_pos_cos") is None
            and kwargs.get("rotary_pos_sin") is None
            and _yarn_get_concentration_factor_from_config(config) == 1.0
        )
        return rotary_pos_emb if plain else None
