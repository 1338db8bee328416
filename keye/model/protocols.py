"""The contracts between the model composition and its components (the model-part kinds).

Third parties implement these; keep them stable. Every model part is an ``nn.Module`` with a nested
``Config`` dataclass, built as ``Cls(config, ctx)`` with a `BuildContext`. A part that holds another
component (a language model's ``position_encoding`` node) builds it with ``ctx.build(kind, node)``, so it
never imports another plugin. The registry checks the methods named here when a plugin registers a class
(`keye.contracts`); attributes are set in ``__init__`` and are checked on the built object.
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
    initialisations that must not depend on the parallel layout (`keye.parallel.weight_init`).
    """

    parallel: Any = None
    dtype: torch.dtype = torch.float32
    pre_process: bool = True
    post_process: bool = True
    vp_stage: int | None = None
    seed: int = 1234
    fp8: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    #: where nested component nodes are looked up (None: the process-wide registry, `keye.plugins.get_registry`)
    registry: Any = None

    def build(self, kind: str, node: Any, **owner: Any) -> Any:
        """Build the nested component ``node`` (``{name: ..., ...}``) of ``kind`` as ``Cls(config, self)``.

        How a component builds the components its Config holds (``keye.config.component`` fields), without
        importing them: the registry finds the class, the node (completed by validation) its Config.
        ``owner`` values replace the Config fields of the same name that the built class has (a language
        model passes ``head_dim=...`` to its position encoding); other keys are ignored.
        """
        import dataclasses

        from keye.config import build_component_config

        registry = self.registry
        if registry is None:
            from keye.plugins import get_registry

            registry = get_registry()
        cls, config = build_component_config(kind, node, registry)
        fields = {field.name for field in dataclasses.fields(config)}
        config = dataclasses.replace(config, **{key: value for key, value in owner.items() if key in fields})
        return cls(config, self)


@runtime_checkable
class VisionEncoder(Protocol):
    """patches ``[N, 3, P, P]`` (SigLIP-normalised, raster order frame by frame) and ``grid_thw [K, 3]``
    (t, h, w in patches per image/video) → features ``[N, out_dim]``, one per patch.

    Must provide ``out_dim`` and ``forward``. May ignore: tensor parallelism (a plain PyTorch encoder that
    knows nothing of Megatron is fine: it is replicated across TP ranks), ``ctx.pre_process``/``post_process``
    (it is only built on the first pipeline stage), ``ctx.fp8``. Its own positions are its business; a
    ``position_encoding`` node in its Config (`PatchPositions`) is the way to make them swappable.
    """

    out_dim: int

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Projector(Protocol):
    """features ``[N, in_dim]`` with ``grid_thw [K, 3]`` → LLM embeddings ``[N / merge², out_dim]``, in order.

    Must provide ``forward``; the number of rows it returns per image/video must be the number of pad
    tokens the data pipeline wrote for it (``t * h * w / merge²`` with the language model's
    ``position_encoding.spatial_merge_size``). May ignore tensor parallelism (replicated).
    """

    def forward(self, features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class TextEncoder(Protocol):
    """token ids ``[B, L]`` (padded captions) → one embedding per caption ``[B, out_dim]`` (contrastive stage 0).

    Must provide ``out_dim`` and ``forward``; may ignore pipeline parallelism (stage 0 runs without it).
    """

    out_dim: int

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class LanguageModel(Protocol):
    """A decoder LM on Megatron-Core: embeddings in (or token ids), logits or per-token loss out.

    Everything the composition (`keye.model.composition.KeyeVLModel`), the trainer and the generators use:

    - ``vocab_size``: rows of the output head (over all TP ranks);
    - ``position_encoding``: the built `TokenPositions` of its ``position_encoding`` node; the data pipeline
      builds the same node for position ids and a generator asks it for decode positions;
    - ``transformer_config``: Megatron's ``TransformerConfig`` (its pipeline schedules read it);
    - ``gpt``: the Megatron ``GPTModel`` or None (``model_type`` and ``share_embeddings_and_output_weights``
      are read from it when present);
    - ``embed(input_ids [B, L]) -> [L, B, H]``: token embeddings on the first pipeline stage, into which the
      vision embeddings are scattered;
    - ``set_input_tensor(tensor)``: a later pipeline stage's input (Megatron's schedules call it);
    - ``forward(input_ids [B, L], position_ids [3, B, L], attention_mask, decoder_input=None, labels=None)``;
      with labels it returns the per-token loss ``[B, L]`` (Megatron's convention), else logits
      ``[B, L, V/TP]``. Training also passes ``loss_mask=[B, L]`` (nonzero where the loss counts) with the
      labels: a model may skip the work that only feeds positions where it is 0 and return 0 there
      (``qwen3`` does, ``keye.model.loss_rows``), or accept and ignore it. Generators may pass
      ``inference_context`` and ``logits_at`` (see ``qwen3``); a model without them works with the
      no-cache path only.

    Built as ``Cls(config, ctx)`` on every pipeline stage: ``ctx.pre_process``/``post_process`` say whether
    this stage holds the embedding / output head, ``ctx.vp_stage`` the virtual chunk.
    """

    vocab_size: int
    position_encoding: Any
    transformer_config: Any
    gpt: Any

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def set_input_tensor(self, tensor: torch.Tensor) -> None: ...

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: Any, **kwargs: Any) -> torch.Tensor: ...


@runtime_checkable
class TokenPositions(Protocol):
    """A ``position_encoding`` for a language model: position ids of tokens and their rotary angles.

    Position ids are always three rows ``[3, L]`` (temporal, height, width; the batch format of the data
    pipeline): a 1D scheme gives three equal rows and reads row 0. Built as ``Cls(config, ctx)`` by the
    language model and, without weights, by the data pipeline; ``head_dim`` is the owner's (a Config
    ``head_dim`` left null is filled in by the owner).

    - ``spatial_merge_size``: ViT patches per LLM token along each side (the projector's merge): the data
      pipeline writes ``t * h * w / merge²`` pad tokens per image or video;
    - ``position_ids(input_ids [L], *, image_token_id, video_token_id, image_grid_thw, video_grid_thw,
      second_per_grid_ts) -> [3, L]`` long: one sample on its own, from 0 (packing keeps each sample's ids);
    - ``decode_position_ids(position_ids [3, L], count) -> [3, count]``: the ids of the next ``count``
      generated tokens after a prompt with those ids (the "rope deltas" of decoding);
    - ``rotary_pos_emb(position_ids [3, B, L]) -> [L, B, 1, head_dim]`` float32 angles in Megatron's
      layout (rotate-half, cos/sin taken by Megatron's attention), or None for no rotation.

    May ignore the vision arguments (a text-only scheme counts every token as one position).
    """

    spatial_merge_size: int

    def position_ids(self, input_ids: torch.Tensor, **vision: Any) -> torch.Tensor: ...

    def decode_position_ids(self, position_ids: torch.Tensor, count: int) -> torch.Tensor: ...

    def rotary_pos_emb(self, position_ids: torch.Tensor) -> torch.Tensor | None: ...


@runtime_checkable
class PatchPositions(Protocol):
    """A ``position_encoding`` for a vision encoder: rotary angles of patches from their grids.

    ``patch_rotary_pos_emb(grid_thw [K, 3]) -> [N, 1, 1, head_dim]`` float32 angles, one row per patch in
    the encoder's order (raster order per frame, images/videos one after another), Megatron's layout; or
    None for no rotation. Built as ``Cls(config, ctx)`` by the encoder, which fills a null ``head_dim``.
    """

    def patch_rotary_pos_emb(self, grid_thw: torch.Tensor) -> torch.Tensor | None: ...


def sequential_position_ids(length: int) -> torch.Tensor:
    """``[3, length]``: 0, 1, 2, ... on all three rows (text, or a scheme that counts every token once)."""
    return torch.arange(length).expand(3, length).clone()


def next_position_ids(position_ids: torch.Tensor, count: int) -> torch.Tensor:
    """``[3, count]``: the ids of ``count`` tokens generated after a prompt with ``position_ids [3, L]``, each
    one past the largest id so far on all three rows (Qwen2-VL's ``rope_deltas`` rule: after an image or a
    video the text continues from the largest id any axis reached)."""
    start = int(position_ids.max()) + 1 if position_ids.numel() else 0
    return (start + torch.arange(count)).expand(3, count).clone()

