"""The contracts between the model composition and its components.

Third parties implement these; keep them stable. Every component is an ``nn.Module`` with a nested
``Config`` dataclass, built as ``Cls(config, ctx)`` with a `BuildContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


#: Blueprint ``precision.dtype`` names → torch dtypes.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class BuildContext:
    """What a component needs to know about where it is built.

    ``parallel`` is a `keye.parallel.ParallelContext` (None: a plain single process without Megatron
    parallel state). ``pre_process``/``post_process`` say whether this pipeline stage holds the
    model's input embedding / output head (Megatron's names). ``seed`` is the run seed, for
    initialisations that must not depend on the parallel layout (`keye.parallel.init`).
    """

    parallel: Any = None
    dtype: torch.dtype = torch.float32
    pre_process: bool = True
    post_process: bool = True
    vp_stage: int | None = None
    seed: int = 1234
    fp8: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class VisionEncoder(Protocol):
    """patches ``[N, 3, P, P]`` (SigLIP-normalised, raster order frame by frame) and ``grid_thw [K, 3]``
    (t, h, w in patches per image/video) → features ``[N, out_dim]``, one per patch.

    A plain PyTorch encoder that knows nothing of Megatron is fine: it is replicated across TP ranks.
    """

    out_dim: int

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Projector(Protocol):
    """features ``[N, in_dim]`` with ``grid_thw [K, 3]`` → LLM embeddings ``[N / merge², out_dim]``."""

    def forward(self, features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class LanguageModel(Protocol):
    """A decoder LM on Megatron-Core: embeddings in (or token ids), logits or per-token loss out.

    ``forward(input_ids [B, L], position_ids [3, B, L] or [B, L], attention_mask, decoder_input=None,
    labels=None)``; with labels it returns the per-token loss ``[B, L]`` (Megatron's convention). Training
    also passes ``loss_mask=[B, L]`` (nonzero where the loss counts) with the labels: a model may skip the
    work that only feeds positions where it is 0 and return 0 there (``qwen3`` does,
    ``keye.model.loss_rows``), or accept and ignore it.
    """

    vocab_size: int

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: Any, **kwargs: Any) -> torch.Tensor: ...
