"""``contrastive``: stage 0, SigLIP-loss training of the vision encoder against a text tower.

Images of a micro-batch go through the vision encoder packed NaViT-style (one sequence, one attention
block per image). Each image's embedding is SigLIP's own: the vision encoder's attention-pooling head
(``siglip_navit`` with ``pooling_head: true``; any encoder with a ``head(features, grid_thw) -> [K, D]``
module). SigLIP's image-text alignment lives in that head together with both towers and the loss's
temperature and bias, so a stage continuing from a ``SiglipModel`` checkpoint (`keye.hf.siglip`) starts
aligned: at step 0 its logits are SigLIP's. The head belongs to the encoder, not to this stage, so it goes
on through later stages and into the export (the released ``visual.vision_model.head.*``). An encoder
without one (the tiny blueprints' ``siglip_navit``, third-party towers) gets this stage's fallback: patch
features mean-pooled, then a fresh Linear to the text tower's width (``vision_head``; stage 0 only).

Captions are tokenized for the *text tower*: with its own tokenizer when it names one
(``model.text_encoder.tokenizer``: SigLIP's, padded to the tower's length as SigLIP pads), else with the
blueprint's ``model.tokenizer`` (the tiny blueprints: its 1,024 ids fit the tower's table). An id the
table does not have is a one-line error naming that key, checked before the first step and on every batch
(a vocab-parallel embedding would otherwise map it silently to zeros).

The SigLIP sigmoid loss runs across data-parallel ranks (`siglip_sigmoid`). Evaluation: zero-shot image→text
and text→image retrieval top-1 on held-out pairs (chance = 1 / number of pairs).

The vision and text towers are whole on every pipeline rank, so this stage needs pipeline size 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from keye import hookimpl
from keye.config import doc
from keye.data.filters import pooled_images, tower_caption_ids
from keye.data.processor import PairItem
from keye.errors import KeyeUserError
from keye.model.composition import VisionInputs, build_component
from keye.model.protocols import DTYPES, BuildContext
from keye.train.engine import TrainEngine
from keye.train.freezing import apply_freezing
from keye.train.loop import stage_summary, train_steps


class ContrastiveModel(torch.nn.Module):
    """Vision encoder (with its pooling head, or this stage's mean-pool + ``vision_head``) + text encoder + the
    loss's learnable temperature and bias."""

    uses_vision_head = True  # the encoder's pooling head trains here (keye.train.freezing)

    def __init__(self, vision_encoder: torch.nn.Module, text_encoder: torch.nn.Module, loss: torch.nn.Module) -> None:
        super().__init__()
        self.vision_encoder = vision_encoder
        self.text_encoder = text_encoder
        pooling_head = getattr(vision_encoder, "head", None)  # the encoder's own (its parameters stay there)
        self.vision_head = torch.nn.Linear(vision_encoder.out_dim, text_encoder.out_dim) if pooling_head is None else None
        if pooling_head is not None and vision_encoder.out_dim != text_encoder.out_dim:
            raise KeyeUserError(f"model.vision_encoder: its pooling head gives {vision_encoder.out_dim}-wide "
                                f"embeddings, model.text_encoder {text_encoder.out_dim}-wide (SigLIP's are equal)")
        self.loss = loss
        self.config = vision_encoder.transformer_config if hasattr(vision_encoder, "transformer_config") else text_encoder.transformer_config
        self.model_type = None
        self.share_embeddings_and_output_weights = False

    def set_input_tensor(self, tensor: Any) -> None:  # pipeline size 1: nothing comes in
        pass

    def embed_images(self, images: VisionInputs) -> torch.Tensor:
        return pooled_images(self.vision_encoder, self.vision_head, images)  # (K, D)

    def caption_ids(self, items: list[PairItem]) -> torch.Tensor:
        """``[B, L]`` caption ids for the text tower: its own tokenizer's, else the blueprint tokenizer's (the
        processor's); an id outside the tower's table is one line naming the sample and the key."""
        ids = tower_caption_ids(self.text_encoder, items)
        vocab = getattr(self.text_encoder, "vocab_size", None)
        if vocab is not None and ids.numel() and int(ids.max()) >= vocab:
            row = int((ids >= vocab).any(dim=1).nonzero()[0])
            raise KeyeUserError(f"model.text_encoder.tokenizer: the caption of sample '{items[row].key}' has token id "
                                f"{int(ids[row].max())}, but the text tower's table has {vocab} rows "
                                "(model.text_encoder.vocab_size); name the tower's own tokenizer")
        return ids

    def forward(self, images: VisionInputs, caption_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss(self.embed_images(images), self.text_encoder(caption_ids), group=_data_group())


def _data_group():
    from megatron.core import parallel_state as mpu

    return mpu.get_data_parallel_group()


def _batch(items: list[PairItem], caption_ids: Callable[[list[PairItem]], torch.Tensor]) -> tuple[VisionInputs, torch.Tensor]:
    images = VisionInputs(torch.cat([i.images.patches for i in items]), torch.cat([i.images.grid_thw for i in items]))
    return images, caption_ids(items)


def check_caption_tokenizer(text_encoder: torch.nn.Module, tokenizer: Any) -> None:
    """Before the first step: captions tokenized with the blueprint's ``tokenizer`` (the text tower names none)
    must fit the tower's table; else one line naming the key to set (the 8B blueprint once fed Qwen's ids,
    up to 151,668, to SigLIP's 32,000 rows)."""
    if getattr(text_encoder, "tokenizer", None) is not None:
        return  # its own, checked against its table when it loaded (siglip_text)
    vocab = getattr(text_encoder, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise KeyeUserError(f"model.text_encoder.tokenizer is not set, so captions use model.tokenizer ({len(tokenizer)} "
                            f"tokens), but the text tower's table has {vocab} rows (model.text_encoder.vocab_size): "
                            "name the text tower's own tokenizer (SigLIP's)")


def _loss_func(output: tuple[torch.Tensor, torch.Tensor]):
    loss_sum, count = output
    return loss_sum, count, {"loss_sum": loss_sum.detach().clone(), "tokens": count.float()}


def _forward(data: Iterator[list[PairItem]], model: torch.nn.Module, caption_ids: Callable):
    """``model`` is the DDP-wrapped ContrastiveModel; ``caption_ids`` the unwrapped one's (bound by ``run``)."""
    images, captions = _batch(next(data), caption_ids)
    return model(images, captions), _loss_func


class ContrastiveStage:
    #: report.md's headline (`keye.train.report`): held-out retrieval top-1 both ways, and chance
    headline_keys = ("image_to_text_top1", "text_to_image_top1", "chance")

    @dataclass
    class Config:
        batch_size: int = doc("Image-text pairs per micro-batch on each data-parallel rank.", 32)
        num_microbatches: int = doc("Micro-batches per optimiser step.", 1)
        eval_pairs: int = doc("Held-out pairs per retrieval evaluation (per data-parallel rank).", 64)
        caption_length: int = doc("Caption tokens (padded/truncated; the text tower pools the last one). A text "
                                  "tower with its own tokenizer (siglip_text's tokenizer) pads to its own length.", 16)

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        """What ``__init__`` refuses (no pipeline, both towers), data to train on, captions the text tower fits."""
        check.count(config, "batch_size", "num_microbatches", "caption_length")
        check.count(config, "eval_pairs", minimum=0)
        if check.pipeline != 1:
            check.fail("", f"the contrastive stage needs parallel.pipeline=1, got {check.pipeline}")
        model = check.blueprint.model
        if model.vision_encoder is None or model.text_encoder is None:
            check.fail("", "the contrastive stage needs model.vision_encoder and model.text_encoder")
        longest = model.text_encoder.get("max_position_embeddings")
        own_tokenizer = model.text_encoder.get("tokenizer")  # then captions are the tower's length, not caption_length
        if isinstance(longest, int) and config.caption_length > longest and not own_tokenizer:
            check.fail("caption_length", f"{config.caption_length} tokens, but model.text_encoder.max_position_embeddings "
                                         f"is {longest}")
        if check.stage.steps > 0 and not check.stage.data.sources:
            check.fail("", f"{check.stage.steps} steps but no data (stages.{check.stage_index}.data.sources is empty)")

    def __init__(self, config: Config, ctx: Any) -> None:
        self.config = config
        self.ctx = ctx
        if ctx.parallel.pp_size != 1:
            raise KeyeUserError(f"stages.{ctx.index}: the contrastive stage needs parallel.pipeline=1, got {ctx.parallel.pp_size}")
        bp = ctx.blueprint
        if bp.model.vision_encoder is None or bp.model.text_encoder is None:
            raise KeyeUserError(f"stages.{ctx.index}: the contrastive stage needs model.vision_encoder and model.text_encoder")

    def run(self) -> dict[str, Any]:
        from keye.data.pipeline import micro_batches
        from keye.train.stage_weights import load_stage_weights, save_stage_weights

        ctx, stage, config = self.ctx, self.ctx.stage, self.config
        dtype = DTYPES[ctx.blueprint.precision.dtype]
        build = BuildContext(ctx.parallel, dtype, seed=ctx.blueprint.run.seed, fp8=ctx.blueprint.precision.fp8)
        model = ContrastiveModel(
            build_component("vision_encoder", ctx.blueprint.model.vision_encoder, ctx.registry, build),
            build_component("text_encoder", ctx.blueprint.model.text_encoder, ctx.registry, build),
            build_component("loss", stage.loss or {"name": "siglip_sigmoid"}, ctx.registry, build),
        )
        initialised_from = load_stage_weights(model, ctx)
        trainable = apply_freezing(model, stage.train)
        engine = TrainEngine([model], stage, dtype, precision=ctx.blueprint.precision)
        train = micro_batches(ctx, split="train", pairs=True, pair_batch=config.batch_size, caption_length=config.caption_length)
        check_caption_tokenizer(model.text_encoder, train.processor.tokenizer)
        before = self._evaluate(model)

        def fields(result, seconds):
            return {"pairs_per_s": result.extras["tokens"] / seconds, "skipped_samples": train.stats()["skipped"],
                    "temperature": float(model.loss.logit_scale.detach().exp()),
                    "bias": float(model.loss.logit_bias.detach())}  # reported, not differentiated

        step = partial(_forward, caption_ids=model.caption_ids)
        last, resumed_from = train_steps(ctx, model, engine, train, step, num_microbatches=config.num_microbatches,
                                         seq_length=1, micro_batch_size=config.batch_size, fields=fields)
        after = self._evaluate(model)
        save_stage_weights(model, ctx)
        return stage_summary(ctx, engine, last, resumed_from=resumed_from, initialised_from=initialised_from,
                             trainable=trainable, before=before, after=after, data=train.stats())

    @torch.no_grad()
    def _evaluate(self, model: ContrastiveModel) -> dict[str, float]:
        from keye.data.pipeline import micro_batches

        ctx = self.ctx
        if not ctx.stage.data.heldout:
            return {}
        batches = micro_batches(ctx, split="heldout", pairs=True, pair_batch=self.config.eval_pairs,
                                caption_length=self.config.caption_length).take(1)
        if not batches:
            return {}
        was_training = model.training
        model.eval()
        images, captions = _batch(batches[0], model.caption_ids)
        image_emb = torch.nn.functional.normalize(model.embed_images(images), dim=-1)
        text_emb = torch.nn.functional.normalize(model.text_encoder(captions), dim=-1)
        model.train(was_training)
        image_emb, text_emb = _gather(image_emb), _gather(text_emb)
        scores = image_emb @ text_emb.t()  # (P, P)
        target = torch.arange(len(scores))
        return {
            "pairs": len(scores),
            "image_to_text_top1": float((scores.argmax(1) == target).float().mean()),
            "text_to_image_top1": float((scores.argmax(0) == target).float().mean()),
            "chance": 1.0 / len(scores),
        }


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    """Held-out embeddings of every data-parallel rank (small: evaluation only)."""
    group = _data_group()
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


@hookimpl
def keye_register_stages(register):
    register("contrastive", ContrastiveStage)
