"""``next_token``: cross entropy on the next token, summed over label positions of packed sequences.

Megatron's GPT model returns the per-token loss (vocab-parallel cross entropy, fp32) when given labels.
This loss sums it over the positions whose label counts and reports the token count, so Megatron
(``calculate_per_token_loss``) divides gradients by the global number of label tokens: the result is the
same token-mean for any micro-batch split or data-parallel size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keye import hookimpl
from keye.config import doc


class NextTokenLoss:
    @dataclass
    class Config:
        label_smoothing: float = doc("Not supported by Megatron's vocab-parallel cross entropy; must be 0.", 0.0)

    @classmethod
    def check_config(cls, config: Config, check) -> None:
        if config.label_smoothing:
            check.fail("label_smoothing", "not supported (Megatron's vocab-parallel cross entropy); must be 0")

    def __init__(self, config: Config, ctx=None) -> None:
        if config.label_smoothing:
            raise ValueError("next_token: label_smoothing is not supported (Megatron's vocab-parallel cross entropy)")
        self.config = config

    def __call__(self, per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``per_token_loss`` and ``loss_mask`` are ``(B, T)``; returns (sum, token count, report)."""
        loss_sum = (per_token_loss.float() * loss_mask).sum()
        tokens = loss_mask.sum().to(torch.int)
        return loss_sum, tokens, {"loss_sum": loss_sum.detach().clone(), "tokens": tokens.detach().float()}


@hookimpl
def keye_register_losses(register):
    register("next_token", NextTokenLoss)
