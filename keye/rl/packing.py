"""Rollouts as training rows: prompt + reply packed into micro-batches, the loss on the reply's tokens only.

A rollout becomes one `TokenSample`: the prompt ids the generator was given followed by the generated ids (a
stop token included: ending is an action too), the label at position t the id at t + 1 over the reply, and
IGNORE elsewhere (the prompt is not the policy's doing). Its M-RoPE ids are the prompt's followed by
``max(prompt ids) + 1 + k`` for the k-th generated token on all three axes, the positions the generator decoded
it at (`keye.generate.contract.GenerationRequest`), so the training forward scores exactly what was sampled.
The rollout's images and videos travel with it (G rollouts of a prompt each encode its vision again: simple,
and small next to the LLM for short prompts; a shared-prompt tree as the preference stage uses is the
optimisation left).

Samples are packed first-fit-decreasing into rows of ``max_tokens`` (`keye.data.packing`) and collated with
`collate_pack`; each pack remembers which rollouts it holds, in row order, with their advantages and a
weight (1: trains; 0: only there so that a data-parallel rank with nothing to learn still runs the step's
schedule). ``batch.answer_segments[j]`` are the label positions of the pack's j-th rollout, ascending, so the
concatenated segments are the order in which ``logits_at=batch.loss_mask`` returns the reply positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from keye.data.batch import IGNORE, MicroBatch, TokenSample, collate_pack
from keye.data.packing import PackItem, pack_samples
from keye.rl.rollouts import Rollout


@dataclass
class RolloutPack:
    batch: MicroBatch
    rollouts: list[int]  # index of each rollout in the step's list, in row order
    advantages: torch.Tensor  # [n] float
    weights: torch.Tensor  # [n] float: 1 trains, 0 rides along (module docstring)
    old_logp: torch.Tensor | None = None  # [K] per reply token, in segment order (last pipeline stage)
    ref_logp: torch.Tensor | None = None  # [K] under the frozen reference, when there is one

    @property
    def lengths(self) -> list[int]:
        return [len(segment) for segment in self.batch.answer_segments]


def rollout_sample(rollout: Rollout, key: str) -> TokenSample:
    """Prompt + reply of ``rollout`` as one training sample (module docstring)."""
    request = rollout.rendered.request
    prompt = request.prompt_ids  # (P,)
    reply = torch.tensor(rollout.token_ids, dtype=torch.long)  # (R,)
    if reply.numel() == 0:
        raise ValueError(f"rollout {key} generated no token")
    ids = torch.cat([prompt, reply])  # (P + R,)
    labels = torch.full_like(ids, IGNORE)
    labels[prompt.numel() - 1 : prompt.numel() - 1 + reply.numel()] = reply  # position t predicts id t + 1
    start = int(request.position_ids.max()) + 1
    generated = torch.arange(start, start + reply.numel(), dtype=torch.long).expand(3, -1)  # (3, R)
    positions = torch.cat([request.position_ids, generated], dim=1)  # (3, P + R)
    return TokenSample(key, ids, labels, positions, images=request.images, videos=request.videos,
                       answer_mask=labels != IGNORE)


def _vision_patches(sample: TokenSample) -> int:
    return sum(int(v.patches.shape[0]) for v in (sample.images, sample.videos) if v is not None)


def pack_rollouts(rollouts: Sequence[Rollout], chosen: Sequence[int], advantages: torch.Tensor,
                  weights: torch.Tensor, max_tokens: int, *, max_vision_patches: int | None = None,
                  pad_id: int = 0) -> list[RolloutPack]:
    """The rollouts ``chosen`` (indices into ``rollouts``; ``advantages``/``weights`` indexed like ``rollouts``)
    packed into rows of ``max_tokens``. A rollout that does not fit a row is an error: the caller keeps prompt +
    ``max_new_tokens`` within ``max_tokens``, and a row holding one image needs no more patches than that."""
    samples = [rollout_sample(rollouts[i], str(i)) for i in chosen]
    items = [PackItem(s.key, len(s), _vision_patches(s)) for s in samples]
    result = pack_samples(items, max_tokens, max_vision_patches)
    if result.rejected:
        raise ValueError(f"rollout {result.rejected[0].key} does not fit a training row: {result.rejected[0].reason}")
    packs = []
    for pack in result.packs:
        members = [samples[i] for i in pack.indices]
        index = [int(s.key) for s in members]
        packs.append(RolloutPack(collate_pack(members, max_tokens, pad_id=pad_id), index,
                                 advantages[index].float(), weights[index].float()))
    return packs
