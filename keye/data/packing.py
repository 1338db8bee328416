"""Sequence packing, and the FLOPs a packed sample costs.

Packing puts many samples into one sequence of at most ``max_tokens`` LLM tokens (and at most
``max_vision_patches`` ViT patches, which bounds the vision encoder's memory) so short samples do not
waste a padded row. Each sample keeps its own attention block: ``cu_seqlens`` marks the boundaries
(what FlashAttention varlen / Megatron's ``PackedSeqParams`` take), position ids restart per sample,
and `block_attention_mask` builds the equivalent dense mask (for tests and references: a micro-batch
carries the boundaries, `keye.model.packing_masks.PackedMask`).

Bin packing is greedy *first-fit-decreasing* (default) or *best-fit-decreasing*: sort by length,
then put each sample in the first (or the tightest) open pack where it fits. With tokens as the only
limit both use about 11/9 of the optimal number of packs at worst (Johnson 1973; 11/9·OPT + 6/9 is
FFD's tight bound, Dósa 2007); the patch cap makes it a two-dimensional problem without that guarantee,
but it binds only for image-heavy packs. Cost is O(n·packs), negligible next to a training step.

Packs then differ in cost: attention is quadratic in each sample's length, so one 8K-token sample
costs more than eight 1K-token samples of the same total length. `estimate_flops` prices a sample (and
`flops_cost` a pack item) for the Keye-VL paper's *global greedy balancing* across data-parallel ranks
(spec §3.2, infra), which `keye.data.balance` does on samples, from sizes the ranks exchange before decoding.

Token accounting: ``num_text_tokens`` excludes the vision placeholders and ``vision_tokens`` are the
LLM tokens the vision contributes after the 2×2 patch merge (``num_vision_patches // 4``), so a sample
occupies ``num_text_tokens + vision_tokens`` positions of the packed sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

STRATEGIES = ("first_fit", "best_fit")


@dataclass(frozen=True)
class PackItem:
    """What the packer needs to know about one processed sample."""

    key: str
    num_text_tokens: int
    num_vision_patches: int = 0
    vision_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        """Positions the sample occupies in the LLM sequence."""
        return self.num_text_tokens + self.vision_tokens


@dataclass
class Pack:
    """One packed sequence: which input items it holds, in sequence order."""

    indices: list[int]
    lengths: list[int]
    vision_patches: list[int]
    capacity: int
    flops: float = 0.0

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def num_vision_patches(self) -> int:
        return sum(self.vision_patches)

    @property
    def cu_seqlens(self) -> list[int]:
        """Cumulative sample boundaries ``[0, l0, l0+l1, ...]``; sample i is ``[cu[i], cu[i+1])``."""
        return [0, *_cumsum(self.lengths)]


@dataclass(frozen=True)
class Rejected:
    """A sample the packer could not place, with the reason (counted and reported, never dropped silently)."""

    index: int
    key: str
    reason: str


@dataclass
class PackingResult:
    packs: list[Pack]
    rejected: list[Rejected] = field(default_factory=list)


def _cumsum(values: Sequence[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def _rejection(item: PackItem, max_tokens: int, max_vision_patches: int | None) -> str | None:
    if item.num_text_tokens < 0 or item.num_vision_patches < 0 or item.vision_tokens < 0:
        return "negative token or patch count"
    if item.num_tokens == 0:
        return "empty sample (0 tokens)"
    if item.num_tokens > max_tokens:
        return (
            f"{item.num_tokens} tokens (text {item.num_text_tokens} + vision {item.vision_tokens}) "
            f"exceed max_tokens {max_tokens}"
        )
    if max_vision_patches is not None and item.num_vision_patches > max_vision_patches:
        return f"{item.num_vision_patches} vision patches exceed max_vision_patches {max_vision_patches}"
    return None


def pack_samples(
    items: Sequence[PackItem],
    max_tokens: int,
    max_vision_patches: int | None = None,
    *,
    strategy: str = "first_fit",
    cost: Callable[[PackItem], float] | None = None,
) -> PackingResult:
    """Pack ``items`` into sequences of at most ``max_tokens`` tokens and ``max_vision_patches`` patches.

    Items are taken longest first (ties: more patches first, then input order, so the result is
    deterministic). ``first_fit`` places each in the oldest pack with room for both its tokens and its
    patches; ``best_fit`` in the pack whose token room is smallest after placing it. Within a pack,
    samples keep their input order. ``cost`` (e.g. `flops_cost`) fills ``Pack.flops`` as the sum over
    its samples, which is exact because each sample is its own attention block.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown packing strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    patch_cap = math.inf if max_vision_patches is None else max_vision_patches

    rejected: list[Rejected] = []
    order: list[int] = []
    for i, item in enumerate(items):
        reason = _rejection(item, max_tokens, max_vision_patches)
        if reason is None:
            order.append(i)
        else:
            rejected.append(Rejected(i, item.key, reason))
    order.sort(key=lambda i: (-items[i].num_tokens, -items[i].num_vision_patches, i))

    bins: list[list[int]] = []  # item indices per pack
    tokens: list[int] = []  # used tokens per pack
    patches: list[int] = []  # used patches per pack
    for i in order:
        need, need_patches = items[i].num_tokens, items[i].num_vision_patches
        fits = [
            b for b in range(len(bins)) if tokens[b] + need <= max_tokens and patches[b] + need_patches <= patch_cap
        ]
        if not fits:
            bins.append([])
            tokens.append(0)
            patches.append(0)
            target = len(bins) - 1
        elif strategy == "first_fit":
            target = fits[0]
        else:
            target = min(fits, key=lambda b: (max_tokens - tokens[b] - need, b))
        bins[target].append(i)
        tokens[target] += need
        patches[target] += need_patches

    packs = []
    for members in bins:
        members.sort()
        packs.append(
            Pack(
                indices=members,
                lengths=[items[i].num_tokens for i in members],
                vision_patches=[items[i].num_vision_patches for i in members],
                capacity=max_tokens,
                flops=sum(cost(items[i]) for i in members) if cost is not None else 0.0,
            )
        )
    return PackingResult(packs, rejected)


def packing_efficiency(packs: Sequence[Pack]) -> float:
    """Real tokens / token capacity over all packs (1.0 = no padding); 0.0 for no packs."""
    capacity = sum(p.capacity for p in packs)
    return sum(p.num_tokens for p in packs) / capacity if capacity else 0.0


# --- attention layout for one packed sequence ---------------------------------------------------------


def _segment_ids(cu_seqlens: Sequence[int] | torch.Tensor, seq_len: int | None) -> torch.Tensor:
    """Sample index per position; padding after ``cu_seqlens[-1]`` is one extra trailing segment."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.long)
    total = int(cu[-1])
    seq_len = total if seq_len is None else seq_len
    if seq_len < total:
        raise ValueError(f"seq_len {seq_len} is shorter than the packed samples ({total} tokens)")
    lengths = torch.diff(cu)
    if bool((lengths < 0).any()) or int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0 and not decrease, got {cu.tolist()}")
    seg = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    pad = torch.full((seq_len - total,), len(lengths), dtype=torch.long)
    return torch.cat([seg, pad])  # (T,)


def block_attention_mask(
    cu_seqlens: Sequence[int] | torch.Tensor, seq_len: int | None = None, *, causal: bool = True
) -> torch.Tensor:
    """Dense boolean mask, True where query position q may attend to key position k.

    Block-diagonal: q and k must belong to the same sample; ``causal`` (the LLM) also requires k ≤ q,
    ``causal=False`` gives the ViT's bidirectional per-image blocks. Padding up to ``seq_len`` forms one
    more block of its own, so no padded row is fully masked (which would make softmax NaN) and no real
    token sees padding. Shape ``(T, T)``; for SDPA pass it as ``attn_mask`` (True = keep).
    """
    seg = _segment_ids(cu_seqlens, seq_len)
    mask = seg[:, None] == seg[None, :]  # (T, T)
    if causal:
        mask &= torch.ones_like(mask).tril()
    return mask


def packed_position_ids(cu_seqlens: Sequence[int] | torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
    """1D position ids that restart at 0 for every sample (and for the padding block). Shape ``(T,)``.

    Multimodal (M-RoPE) ids are computed per sample by the processor and simply concatenated; this
    helper is for text-only 1D RoPE and for the ViT's packed position embedding.
    """
    seg = _segment_ids(cu_seqlens, seq_len)
    if len(seg) == 0:
        return seg
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(seg[1:] != seg[:-1]).flatten() + 1])
    first_of_segment = torch.zeros_like(seg)
    first_of_segment[starts] = starts
    return torch.arange(len(seg)) - torch.cummax(first_of_segment, dim=0).values


# --- FLOPs estimate ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerDims:
    """The sizes that set a transformer's FLOPs. ``num_kv_heads``/``head_dim`` default to MHA values."""

    hidden_size: int
    num_layers: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    gated_mlp: bool = False  # SwiGLU has three FFN matrices, a GELU MLP two
    vocab_size: int = 0  # output head; 0 for an encoder without one
    causal: bool = True

    def linear_flops_per_token(self) -> float:
        d, hd = self.hidden_size, self.head_dim or self.hidden_size // self.num_heads
        kv = self.num_kv_heads or self.num_heads
        attn_proj = 2 * d * self.num_heads * hd + 2 * d * kv * hd  # q and o; k and v
        ffn = (3 if self.gated_mlp else 2) * d * self.ffn_hidden_size
        return 2.0 * (self.num_layers * (attn_proj + ffn) + d * self.vocab_size)

    def attention_flops(self, block_len: int) -> float:
        hd = self.head_dim or self.hidden_size // self.num_heads
        pairs = block_len * (block_len + 1) / 2 if self.causal else block_len * block_len
        return 4.0 * self.num_layers * self.num_heads * hd * pairs


#: Keye-VL-8B (spec §1.1, §1.3): Qwen3-8B and the SigLIP-so400m ViT.
KEYE_8B_LLM = TransformerDims(4096, 36, 12288, 32, num_kv_heads=8, head_dim=128, gated_mlp=True, vocab_size=151936)
KEYE_VIT = TransformerDims(1152, 27, 4304, 16, head_dim=72, causal=False)


def estimate_flops(
    num_text_tokens: int,
    num_vision_patches: int | Sequence[int],
    llm: TransformerDims,
    vit: TransformerDims | None = None,
    *,
    num_vision_tokens: int | None = None,
) -> float:
    """Forward FLOPs of one sample (a multiply-add counts 2), for balancing, not for MFU reports.

    For a transformer with hidden size d, FFN size f, h query / g kv heads of size e, L layers, and an
    attention block of n tokens::

        linear(n) = 2·n·[L·(2·d·h·e + 2·d·g·e + m·d·f) + d·V]      m = 3 (SwiGLU) or 2 (GELU), V = vocab
        attn(n)   = 4·L·h·e·P(n)     P = n(n+1)/2 score entries if causal, n² if not  (QKᵀ and A·V)

    The LLM sees one block of ``num_text_tokens + num_vision_tokens`` tokens (default
    ``num_vision_tokens = patches // 4``, the 2×2 merge). The ViT sees the patches; pass a list of
    per-image/per-video patch counts to charge each as its own block (an int is one block, an upper
    bound). Left out, as small or constant factors: norms, RoPE, softmax, the projector MLP (~0.5% of the
    LLM per merged token), and the backward pass (~2× forward, the same ratio for every sample unless
    parts are frozen).
    """
    blocks = [num_vision_patches] if isinstance(num_vision_patches, int) else list(num_vision_patches)
    patches = sum(blocks)
    vision_tokens = patches // 4 if num_vision_tokens is None else num_vision_tokens
    n = num_text_tokens + vision_tokens
    total = n * llm.linear_flops_per_token() + llm.attention_flops(n)
    if vit is not None:
        total += patches * vit.linear_flops_per_token() + sum(vit.attention_flops(b) for b in blocks)
    return total


def flops_cost(llm: TransformerDims, vit: TransformerDims | None = None) -> Callable[[PackItem], float]:
    """A ``cost`` for `pack_samples`: `estimate_flops` of an item (its vision patches as one block)."""

    def cost(item: PackItem) -> float:
        return estimate_flops(
            item.num_text_tokens, item.num_vision_patches, llm, vit, num_vision_tokens=item.vision_tokens
        )

    return cost
