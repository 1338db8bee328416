"""``KeyeVLModel``: vision encoder → projector → language model, built from the registry.

The first pipeline stage holds the vision encoder and projector and the LLM's input embedding: it
embeds the tokens, runs the images/videos through the encoder and projector, and scatters the vision
embeddings into the image/video pad positions (``masked_scatter``, as the released model does). Later
pipeline stages only run their share of the LLM layers. Position ids come from the data pipeline
(3D M-RoPE ids ``[3, B, L]``, time axis aligned to seconds) so packing and decoding own them.

Components are found by name in the registry and built as ``Cls(config, BuildContext)``; nothing here
knows which encoder or LLM it is holding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from keye.config import build_component_config
from keye.contracts import check_built
from keye.errors import KeyeUserError
from keye.model.protocols import BuildContext
from keye.registry import Registry

IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656


@dataclass
class VisionInputs:
    """Packed patches of all images (or all videos) of a micro-batch, and their grids."""

    patches: torch.Tensor  # (N, 3, P, P)
    grid_thw: torch.Tensor  # (K, 3)


def build_component(kind: str, node: Any, registry: Registry, ctx: BuildContext) -> torch.nn.Module:
    cls, config = build_component_config(kind, node, registry)
    if ctx.registry is None:  # nested nodes (a position_encoding) are found where this component was
        ctx = dataclasses.replace(ctx, registry=registry)
    component = cls(config, ctx)
    check_built(kind, node["name"], component)  # the attributes its Protocol names (keye.contracts)
    return component


class KeyeVLModel(torch.nn.Module):
    """The composed model. ``model_cfg`` is a validated blueprint ``model`` section."""

    def __init__(
        self,
        model_cfg: Any,
        registry: Registry,
        ctx: BuildContext,
        *,
        image_token_id: int = IMAGE_TOKEN_ID,
        video_token_id: int = VIDEO_TOKEN_ID,
    ) -> None:
        super().__init__()
        if model_cfg.language_model is None:
            raise KeyeUserError("model.language_model: a Keye-VL model needs a language model")
        self.pre_process = ctx.pre_process
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        has_vision = model_cfg.vision_encoder is not None
        if has_vision != (model_cfg.projector is not None):
            raise KeyeUserError("model: vision_encoder and projector go together (set both or neither)")
        self.vision_encoder = None
        self.projector = None
        if has_vision and ctx.pre_process:  # vision lives on the first pipeline stage only
            self.vision_encoder = build_component("vision_encoder", model_cfg.vision_encoder, registry, ctx)
            self.projector = build_component("projector", model_cfg.projector, registry, ctx)
        self.language_model = build_component("language_model", model_cfg.language_model, registry, ctx)
        self.config = getattr(self.language_model, "transformer_config", None)  # Megatron schedules read it
        # Attributes Megatron's schedules and finalize_model_grads read from the model they are given.
        gpt = getattr(self.language_model, "gpt", None)
        self.model_type = getattr(gpt, "model_type", None)
        self.share_embeddings_and_output_weights = getattr(gpt, "share_embeddings_and_output_weights", False)
        self.post_process = ctx.post_process

    def set_input_tensor(self, tensor: torch.Tensor) -> None:
        self.language_model.set_input_tensor(tensor)

    def embed_vision(self, vision: VisionInputs) -> torch.Tensor:
        """Patches → LLM embeddings, one per merged token: ``(N / merge², H)``."""
        features = self.vision_encoder(vision.patches, vision.grid_thw)  # (N, D_vit)
        return self.projector(features, vision.grid_thw)

    def embed(
        self,
        input_ids: torch.Tensor,
        images: VisionInputs | None = None,
        videos: VisionInputs | None = None,
    ) -> torch.Tensor:
        """Token embeddings with vision embeddings scattered in: ``(L, B, H)`` (sequence first)."""
        embeddings = self.language_model.embed(input_ids)  # (L, B, H)
        for inputs, token_id, what in ((images, self.image_token_id, "image"), (videos, self.video_token_id, "video")):
            count = int((input_ids == token_id).sum())
            if inputs is None:
                if count:
                    raise ValueError(f"{count} {what} pad tokens in input_ids but no {what} inputs")
                continue
            if self.vision_encoder is None:
                raise ValueError(f"{what} inputs given to a model without a vision encoder")
            vision = self.embed_vision(inputs).to(embeddings.dtype)  # (T, H)
            if vision.shape[0] != count:
                raise ValueError(
                    f"{what} features and {what} pad tokens do not match: {vision.shape[0]} features, {count} tokens"
                )
            # Features are in (B, L) reading order, so scatter batch-first.
            mask = (input_ids == token_id).unsqueeze(-1)  # (B, L, 1)
            batch_first = embeddings.transpose(0, 1)  # (B, L, H)
            embeddings = batch_first.masked_scatter(mask.expand_as(batch_first), vision).transpose(0, 1)
        return embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Any = None,
        labels: torch.Tensor | None = None,
        images: VisionInputs | None = None,
        videos: VisionInputs | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, L, V/TP)``, or the per-token loss ``(B, L)`` with ``labels``. A ``loss_mask``
        ``(B, L)`` lets the language model skip the output layer where the loss does not count (0 there)."""
        decoder_input = self.embed(input_ids, images, videos) if self.pre_process else None
        extra = {} if loss_mask is None else {"loss_mask": loss_mask}
        return self.language_model(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels, **extra
        )
