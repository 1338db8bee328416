"""Processed samples and packed micro-batches: what the data pipeline hands the model.

A `TokenSample` is one sample after the processor (chat template, vision processing, M-RoPE ids).
`collate_pack` puts several of them into one row of ``seq_len`` positions: each keeps its own causal
attention block and its own position ids (M-RoPE ids restart per sample), images and videos are
concatenated in reading order so the model's ``masked_scatter`` puts every feature at its own pad token.
Padding is one extra block that attends only to itself and carries no loss. A preference pair is one
sample whose block is tree-shaped (its two replies share the prompt, `keye.data.preference`); the micro-batch
lists each pair's chosen and rejected label positions in ``pairs``.

The attention travels as a `PackedMask` (block boundaries, and only the tree blocks as tensors), never as
the dense ``(1, 1, T, T)`` mask: that is T² bytes (1 GiB per micro-batch at 32768 tokens) built on the data
path only for the language model to turn it back into cu_seqlens. Whoever needs the dense form calls
``attention_mask.dense()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from keye.model.composition import VisionInputs
from keye.model.packing_masks import PackedMask

IGNORE = -100


@dataclass
class TokenSample:
    key: str
    input_ids: torch.Tensor  # (L,) long
    labels: torch.Tensor  # (L,) long: the next token to predict at each position, IGNORE where no loss
    position_ids: torch.Tensor  # (3, L) long: M-RoPE (t, h, w) ids; text has t == h == w
    images: VisionInputs | None = None
    videos: VisionInputs | None = None
    answer_mask: torch.Tensor | None = None  # (L,) bool: label positions that make up the answer
    # A preference pair (keye.data.preference): its rejected reply's label positions (answer_mask: the
    # chosen one's), and its (L, L) attention, True = may attend (None: causal).
    rejected_mask: torch.Tensor | None = None
    attention: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (1, T)
    labels: torch.Tensor  # (1, T), IGNORE replaced by 0 (Megatron's cross entropy needs valid ids)
    loss_mask: torch.Tensor  # (1, T) float: 1 where the label counts
    position_ids: torch.Tensor  # (3, 1, T)
    attention_mask: PackedMask  # the row's blocks; .dense(): (1, 1, T, T) bool, True = masked
    cu_seqlens: torch.Tensor  # (S + 1,) sample boundaries (the padding not included)
    answer_segments: list[torch.Tensor] = field(default_factory=list)  # per sample: positions of its answer
    images: VisionInputs | None = None
    videos: VisionInputs | None = None
    keys: list[str] = field(default_factory=list)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per preference pair: (chosen, rejected) label positions
    flops: float = 0.0  # the data pipeline's estimate of this micro-batch's FLOPs (what balancing evens out)

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])


def _concat_vision(items: Sequence[VisionInputs | None]) -> VisionInputs | None:
    present = [item for item in items if item is not None]
    if not present:
        return None
    return VisionInputs(
        patches=torch.cat([item.patches for item in present]),  # (ΣN, 3, P, P)
        grid_thw=torch.cat([item.grid_thw for item in present]),  # (ΣK, 3)
    )


def _causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril_()


def collate_pack(samples: Sequence[TokenSample], seq_len: int, pad_id: int = 0) -> MicroBatch:
    """Pack ``samples`` (in order) into one row of ``seq_len`` positions."""
    lengths = [len(sample) for sample in samples]
    total = sum(lengths)
    if total > seq_len:
        raise ValueError(f"samples {[s.key for s in samples]} need {total} positions, more than seq_len {seq_len}")
    pad = seq_len - total
    input_ids = torch.cat([s.input_ids for s in samples] + [torch.full((pad,), pad_id, dtype=torch.long)])
    labels = torch.cat([s.labels for s in samples] + [torch.full((pad,), IGNORE, dtype=torch.long)])
    position_ids = torch.cat(
        [s.position_ids for s in samples] + [torch.arange(pad, dtype=torch.long).expand(3, pad)], dim=1
    )  # (3, T)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.long)
    answer_segments, pairs, blocks = [], [], {}
    for start, sample in zip(cu_seqlens.tolist(), samples):
        if sample.answer_mask is not None and bool(sample.answer_mask.any()):
            answer_segments.append(torch.nonzero(sample.answer_mask).flatten() + start)
        if sample.attention is not None and not torch.equal(sample.attention, _causal(len(sample))):
            blocks[start] = sample.attention  # a causal one stays implicit, so the row keeps its thd form
        if sample.rejected_mask is not None:
            pairs.append((torch.nonzero(sample.answer_mask).flatten() + start,
                          torch.nonzero(sample.rejected_mask).flatten() + start))
    loss_mask = (labels != IGNORE).float()
    return MicroBatch(
        input_ids=input_ids.unsqueeze(0),
        labels=labels.clamp(min=0).unsqueeze(0),
        loss_mask=loss_mask.unsqueeze(0),
        position_ids=position_ids.unsqueeze(1),
        attention_mask=PackedMask(F.pad(cu_seqlens, (0, 1), value=seq_len) if pad else cu_seqlens, blocks),
        cu_seqlens=cu_seqlens,
        answer_segments=answer_segments,
        images=_concat_vision([s.images for s in samples]),
        videos=_concat_vision([s.videos for s in samples]),
        keys=[s.key for s in samples],
        pairs=pairs,
    )
