"""Compute the end of a Megatron GPT model only at the positions whose loss counts.

Why: in training, the output layer, the cross-entropy and the last layer's MLP of a position only feed
that position's own loss. Where the loss mask is 0 (image/video pads in pre-training, the prompt in SFT:
often more than half of a packed row) that work is thrown away. The attention of the last layer still
runs at every position (later positions read their keys and values); after it each position is
independent, so the rows without a loss can be dropped there.

``only_loss_rows(gpt, keep)`` drops them for one forward: the last layer's MLP input when that layer is a
``LossRowsTransformerLayer`` and is not recomputed (full recompute runs the layer again in backward,
after the selection has ended), otherwise the output layer's input (a forward pre-hook installed by
``install_output_rows_hook``). The model's output is then the ``K`` kept rows as a ``(K, 1, ...)``
sequence, batch-major (``labels[keep]`` order). Parameters, state dicts and all kept numbers are those
of the full computation; only the GEMMs' blocking, and so fp32 rounding, can differ.

FP8 GEMMs want row counts that are multiples of 16 (Transformer Engine refuses others, cuBLASLt's
``_scaled_mm`` needs them). ``aligned_rows(keep, 16)`` adds rows whose loss does not count (the earliest
unkept positions) until the count is a multiple; the caller computes them and drops their loss.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer


def select_rows(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Sequence-first ``(L, B, H)`` hidden states → the kept rows ``(K, 1, H)``, batch-major; ``keep (B, L)`` bool."""
    return hidden.transpose(0, 1)[keep][:, None, :]


def aligned_rows(keep: torch.Tensor, multiple: int) -> torch.Tensor:
    """``keep (B, L)`` bool plus the fewest unkept positions (earliest first, batch-major) that make the
    count a multiple of ``multiple``, or every position when there are not enough. A new tensor."""
    count = int(keep.sum())
    missing = min(-count % multiple, keep.numel() - count)
    flat = keep.reshape(-1).clone()  # batch-major, the order select_rows keeps
    if missing:
        flat[torch.nonzero(~flat).flatten()[:missing]] = True
    return flat.view(keep.shape)


class LossRowsTransformerLayer(TransformerLayer):
    """Megatron's ``TransformerLayer`` whose MLP (and everything after its attention) can run on the kept
    rows only: set ``loss_rows`` (``(B, L)`` bool) for one forward. Same submodules and state dict."""

    loss_rows: torch.Tensor | None = None

    def _forward_mlp(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.loss_rows is not None:
            hidden_states = select_rows(hidden_states, self.loss_rows)  # attention output + residual, kept rows
        return super()._forward_mlp(hidden_states, *args, **kwargs)


def _output_rows_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    rows = getattr(module, "loss_rows", None)
    if rows is None:
        return None
    hidden, *rest = args
    return (select_rows(hidden, rows), *rest), kwargs


def install_output_rows_hook(output_layer: torch.nn.Module) -> None:
    """Let ``only_loss_rows`` select the output layer's input rows (a forward pre-hook; no state)."""
    output_layer.loss_rows = None
    output_layer.register_forward_pre_hook(_output_rows_hook, with_kwargs=True)


@contextlib.contextmanager
def only_loss_rows(gpt: Any, keep: torch.Tensor) -> Iterator[str]:
    """Within the block, ``gpt``'s forward computes its last layer's MLP, final norm and output layer on
    the rows where ``keep (B, L)`` is True only. Yields where the rows are dropped: 'last_layer' or
    'output_layer'. ``gpt`` is a Megatron ``GPTModel`` on its last pipeline stage, without sequence
    parallelism, whose output layer went through ``install_output_rows_hook``."""
    layers = gpt.decoder.layers
    last = layers[-1] if len(layers) else None
    if isinstance(last, LossRowsTransformerLayer) and gpt.config.recompute_granularity != "full":
        target, where = last, "last_layer"
    else:
        target, where = gpt.output_layer, "output_layer"
    target.loss_rows = keep
    try:
        yield where
    finally:
        target.loss_rows = None
