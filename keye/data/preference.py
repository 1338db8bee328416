"""A preference pair as one packed sample: the prompt once, the chosen and the rejected reply as two branches.

Why: MPO needs log πθ(y_c|x) and log πθ(y_r|x) for the same prompt x. Packing [x, y_c] and [x, y_r] as two
ordinary samples would run the prompt's images (or video) through the vision encoder twice and the prompt
through the LLM twice. Instead the pair is laid out as one sample (``p`` = prompt length)::

    x[0 : p-1]  |  x[p-1] y_c  |  x[p-1] y_r
    shared         chosen         rejected

with a tree-shaped attention mask: the shared prefix is causal; each branch sees the whole prefix and
itself, causally, and never the other branch. The prompt's last token (the ``\\n`` of
``<|im_start|>assistant\\n``, never a vision token) is written once per branch because its logits predict
the first reply token, and each branch needs its own label there; both copies keep the prompt's position
id. Every branch token therefore sees exactly what it would see in [x, y] alone, with the same M-RoPE ids,
so the log-probabilities equal two separate forwards (within float rounding), while the vision encoder and
the prompt's LLM layers run once. The images/videos are the prompt's, so the model's ``masked_scatter``
needs no change.

Labels are the shifted targets of each branch (``IGNORE`` on the prefix); ``answer_mask`` marks the
chosen reply's label positions and ``rejected_mask`` the rejected one's; `keye.data.batch.collate_pack`
turns them into the micro-batch's ``pairs``.
"""

from __future__ import annotations

import torch

from keye.data.batch import IGNORE, TokenSample
from keye.model.composition import VisionInputs


def _shifted(targets: torch.Tensor) -> torch.Tensor:
    """Targets (token id where trained, IGNORE elsewhere) → labels: the target of token t+1 at position t."""
    return torch.cat([targets[1:], torch.tensor([IGNORE], dtype=torch.long)])


def tree_attention(prefix: int, chosen: int, rejected: int) -> torch.Tensor:
    """``(L, L)`` bool, True = may attend, for ``L = prefix + chosen + rejected`` (module docstring)."""
    length = prefix + chosen + rejected
    keep = torch.ones(length, length, dtype=torch.bool).tril_()  # causal everywhere ...
    keep[prefix + chosen :, prefix : prefix + chosen] = False  # ... but rejected never sees chosen
    return keep


def shared_prompt_sample(
    key: str,
    prompt_length: int,
    chosen_ids: torch.Tensor,
    chosen_targets: torch.Tensor,
    chosen_positions: torch.Tensor,
    rejected_ids: torch.Tensor,
    rejected_targets: torch.Tensor,
    rejected_positions: torch.Tensor,
    images: VisionInputs | None = None,
    videos: VisionInputs | None = None,
) -> TokenSample:
    """The pair's `TokenSample` from the two encoded conversations [x, y_c] and [x, y_r].

    ``*_ids`` and ``*_targets`` are ``(p + reply,)`` (targets: the token id where the loss counts, IGNORE
    elsewhere), ``*_positions`` ``(3, p + reply)``; both conversations must start with the same ``p``
    prompt tokens and position ids (ValueError otherwise: the prompt was not tokenised alike).
    """
    p = prompt_length
    if p < 1 or len(chosen_ids) <= p or len(rejected_ids) <= p:
        raise ValueError(f"sample '{key}': a reply must follow a non-empty prompt of {p} tokens")
    if not torch.equal(chosen_ids[:p], rejected_ids[:p]) or not torch.equal(chosen_positions[:, :p], rejected_positions[:, :p]):
        raise ValueError(f"sample '{key}': the chosen and rejected conversations do not share the prompt's tokens")
    prefix = p - 1
    chosen_labels, rejected_labels = _shifted(chosen_targets), _shifted(rejected_targets)
    branch_c, branch_r = len(chosen_ids) - prefix, len(rejected_ids) - prefix
    input_ids = torch.cat([chosen_ids[:prefix], chosen_ids[prefix:], rejected_ids[prefix:]])  # (L,)
    labels = torch.cat([torch.full((prefix,), IGNORE, dtype=torch.long), chosen_labels[prefix:], rejected_labels[prefix:]])
    positions = torch.cat([chosen_positions[:, :prefix], chosen_positions[:, prefix:], rejected_positions[:, prefix:]], dim=1)
    chosen_mask = torch.zeros(len(input_ids), dtype=torch.bool)
    chosen_mask[prefix : prefix + branch_c] = True
    trained = labels != IGNORE
    return TokenSample(
        key=key,
        input_ids=input_ids,
        labels=labels,
        position_ids=positions,  # (3, L)
        images=images,
        videos=videos,
        answer_mask=trained & chosen_mask,
        rejected_mask=trained & ~chosen_mask,
        attention=tree_attention(prefix, branch_c, branch_r),
    )
