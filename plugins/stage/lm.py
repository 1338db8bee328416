"""``lm``: next-token training of the composed model on packed multimodal sequences.

Stages 1-3 of pre-training (projector alignment, multi-task pre-training, annealing) and SFT are all
this loop with different trainable modules, data and schedules. Each rank builds the same micro-batches
as the other ranks of its tensor/pipeline group (the data depends only on the data-parallel rank), the
engine runs Megatron's pipeline schedule, and the loss reports sums so results do not depend on the
layout. Evaluation on held-out data reports the next-token loss and teacher-forced answer accuracy
(a sample counts as correct when every answer token is the model's argmax), overall and per thinking
mode; the summary's ``modes`` has the mix trained on (samples, share, loss tokens, mean response length).
With ``eval_swapped_images`` the same held-out samples are evaluated again, each with another sample's
image or clip (`keye.data.pipeline.swapped_media`): ``image_gain`` (swapped minus own loss) near 0 means the
model answers from the wording alone, whatever its accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import torch

from keye import hookimpl
from keye.config import doc
from keye.data.batch import MicroBatch
from keye.data.modes import NO_MODE
from keye.data.sample import THINKING_MODES
from keye.model.composition import KeyeVLModel, build_component
from keye.model.protocols import DTYPES, BuildContext
from keye.train.engine import TrainEngine
from keye.train.freezing import apply_freezing
from keye.train.loop import stage_summary, train_steps

def _loss_func(loss: Any, batch: MicroBatch, output: torch.Tensor):
    return loss(output, batch.loss_mask)


def _train_forward(loss: Any, data: Iterator[MicroBatch], model: torch.nn.Module):
    batch = next(data)
    output = model(batch.input_ids, batch.position_ids, batch.attention_mask, labels=batch.labels,
                   images=batch.images, videos=batch.videos,
                   loss_mask=batch.loss_mask)  # last stage: per-token loss (1, T), 0 where the mask is
    return output, partial(_loss_func, loss, batch)


def _eval_loss_func(batch: MicroBatch, logits: torch.Tensor, verdicts: list | None = None):
    """Loss and answer accuracy from full logits (gathered over TP ranks); each sample's ``(key, correct)``
    goes to ``verdicts`` for accuracy per thinking mode."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    logits = gather_from_tensor_model_parallel_region(logits).float()  # (1, T, V)
    per_token = torch.nn.functional.cross_entropy(logits[0], batch.labels[0], reduction="none")  # (T,)
    mask = batch.loss_mask[0]
    predictions = logits[0].argmax(-1)  # (T,)
    right = [bool((predictions[seg] == batch.labels[0][seg]).all()) for seg in batch.answer_segments]
    correct = sum(right)
    if verdicts is not None and len(batch.keys) == len(right):  # one answer per sample: conversations
        verdicts.extend(zip(batch.keys, right))
    loss_sum = (per_token * mask).sum()
    report = {
        "loss_sum": loss_sum.detach().clone(),  # a copy: Megatron rescales the returned loss in place
        "tokens": mask.sum(),
        "correct": torch.tensor(float(correct)),
        "answers": torch.tensor(float(len(batch.answer_segments))),
    }
    return loss_sum, mask.sum().to(torch.int), report


def _eval_forward(verdicts: list, data: Iterator[MicroBatch], model: torch.nn.Module):
    batch = next(data)
    logits = model(batch.input_ids, batch.position_ids, batch.attention_mask, images=batch.images, videos=batch.videos)
    return logits, partial(_eval_loss_func, batch, verdicts=verdicts)


def _pipeline_minimum(engine: TrainEngine) -> int:
    """The fewest micro-batches a pass can have: the pipeline size under an interleaved pipeline, else 1."""
    if len(engine.chunks) == 1:
        return 1
    from megatron.core import parallel_state as mpu

    return mpu.get_pipeline_model_parallel_world_size()


def _rider(batch: MicroBatch) -> MicroBatch:
    """A copy of ``batch`` that counts for nothing (no loss tokens, no answers, no keys), so a held-out pass of
    fewer batches than an interleaved pipeline needs can run without counting a sample twice."""
    from dataclasses import replace

    return replace(batch, loss_mask=torch.zeros_like(batch.loss_mask), answer_segments=[], keys=[])


#: the modes held-out accuracy is reported for, in a fixed order (every rank sums the same table)
_MODES = (*THINKING_MODES, NO_MODE)


def _accuracy_by_mode(verdicts: list[tuple[str, bool]], mode_of: dict[str, str], is_last_stage: bool) -> dict:
    """``answer_accuracy_by_mode`` and ``answers_by_mode`` (how many answers each accuracy is over: packing
    puts long replies first, so a few eval batches can hold few short ones), summed over pipeline and
    data-parallel ranks."""
    from keye.train.engine import _sum_over_pipeline_and_data

    table = torch.zeros(len(_MODES), 2, dtype=torch.float64)  # (mode, [correct, answers])
    for key, right in verdicts:
        row = _MODES.index(mode_of.get(key, NO_MODE))
        table[row, 0] += float(right)
        table[row, 1] += 1
    table = _sum_over_pipeline_and_data(table.flatten(), is_last_stage).view(len(_MODES), 2)
    rows = [(mode, c, n) for mode, (c, n) in zip(_MODES, table.tolist()) if n > 0]
    return {"answer_accuracy_by_mode": {mode: c / n for mode, c, n in rows},
            "answers_by_mode": {mode: int(n) for mode, _, n in rows}}


class LMStage:
    #: report.md's headline (`keye.train.report`): held-out answer accuracy (per think mode), image_gain, loss
    headline_keys = ("answer_accuracy", "answer_accuracy_by_mode.*", "image_gain", "heldout_loss")

    @dataclass
    class Config:
        num_microbatches: int = doc("Micro-batches per optimiser step on each data-parallel rank.", 1)
        eval_batches: int = doc("Held-out micro-batches per evaluation (per data-parallel rank).", 8)
        max_bad_steps: int = doc("Stop after this many consecutive steps with a non-finite loss/grad.", 5)
        eval_swapped_images: bool = doc(
            "Evaluate the held-out samples a second time, each with another sample's image (video: another clip), "
            "and report heldout_loss_swapped_images, answer_accuracy_swapped_images and image_gain (swapped minus "
            "own loss): how much the model answers from its images rather than the wording. One extra pass.", False)

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        """A language model to train, data to train on, and counts the step loop can use."""
        check.count(config, "num_microbatches")
        check.count(config, "eval_batches", "max_bad_steps", minimum=0)
        if check.blueprint.model.language_model is None:
            check.fail("", "the lm stage needs model.language_model")
        if config.eval_swapped_images and check.blueprint.model.vision_encoder is None:
            check.fail("eval_swapped_images", "needs model.vision_encoder (a model without images has none to swap)")
        if check.blueprint.parallel.virtual_pipeline is not None and config.num_microbatches < check.pipeline:
            check.fail("num_microbatches", f"{config.num_microbatches}, but an interleaved pipeline (parallel.virtual_pipeline) "
                                           f"needs at least parallel.pipeline = {check.pipeline} per step")
        if check.stage.steps > 0 and not check.stage.data.sources:
            check.fail("", f"{check.stage.steps} steps but no data (stages.{check.stage_index}.data.sources is empty)")

    def __init__(self, config: Config, ctx: Any) -> None:
        self.config = config
        self.ctx = ctx

    #: this class's run() builds one model chunk per virtual pipeline stage (`build_chunks`); a stage kind
    #: declares it in its own class body (`keye.config.semantics`), a subclass does not inherit it
    supports_virtual_pipeline = True

    def build_model(self) -> KeyeVLModel:
        """The model of this rank (one chunk; `build_chunks` for an interleaved pipeline)."""
        return self._build_chunk(None, self.ctx.parallel.is_first_stage, self.ctx.parallel.is_last_stage)

    def build_chunks(self) -> list[KeyeVLModel]:
        """One model per virtual pipeline stage this rank holds (`keye.model.pipeline_split.virtual_stages`)."""
        from keye.model.pipeline_split import virtual_stages

        return [self._build_chunk(*chunk) for chunk in virtual_stages(self.ctx.parallel)]

    def _build_chunk(self, vp_stage: int | None, pre_process: bool, post_process: bool) -> KeyeVLModel:
        from keye.data.pipeline import load_tokenizer, vocab_size
        from keye.data.tokenizer import SpecialTokens

        bp, parallel = self.ctx.blueprint, self.ctx.parallel
        special = SpecialTokens.from_tokenizer(load_tokenizer(bp.model.tokenizer, vocab_size(bp.model)))
        build = BuildContext(parallel, DTYPES[bp.precision.dtype], pre_process, post_process, vp_stage=vp_stage,
                             seed=bp.run.seed, fp8=bp.precision.fp8)
        return KeyeVLModel(bp.model, self.ctx.registry, build,
                           image_token_id=special.image_pad, video_token_id=special.video_pad)

    def run(self) -> dict[str, Any]:
        from keye.data.pipeline import micro_batches
        from keye.train.stage_weights import load_stage_weights, save_stage_weights

        ctx, stage, config = self.ctx, self.ctx.stage, self.config
        parallel, dtype = ctx.parallel, DTYPES[ctx.blueprint.precision.dtype]
        model = self.build_chunks()  # one per virtual pipeline stage (one without an interleaved pipeline)
        initialised_from = load_stage_weights(model, ctx)
        trainable = apply_freezing(model, stage.train)
        loss = build_component("loss", stage.loss or {"name": "next_token"}, ctx.registry, BuildContext(parallel, dtype))
        engine = TrainEngine(model, stage, dtype, max_bad_steps=config.max_bad_steps, precision=ctx.blueprint.precision)
        seq_len = stage.data.max_tokens
        train = micro_batches(ctx, split="train")
        step_fn = partial(_train_forward, loss)

        before = self._evaluate(engine, ctx, seq_len)

        def fields(result, seconds):
            stats = train.stats()
            return {"tokens_per_s": result.extras["tokens"] / seconds, "padding_efficiency": stats["packing_efficiency"],
                    "skipped_samples": stats["skipped"]}

        last, resumed_from = train_steps(ctx, model, engine, train, step_fn, num_microbatches=config.num_microbatches,
                                         seq_length=seq_len, micro_batch_size=1, fields=fields)
        after = self._evaluate(engine, ctx, seq_len)
        save_stage_weights(model, ctx)
        summary = stage_summary(ctx, engine, last, resumed_from=resumed_from, initialised_from=initialised_from,
                                trainable=trainable, before=before, after=after, data=train.stats())
        summary["modes"] = train.processor.modes.summary()  # the mix trained on, tokens per mode (this run)
        return summary

    def _evaluate(self, engine: TrainEngine, ctx: Any, seq_len: int) -> dict[str, float]:
        from keye.data.pipeline import swapped_media

        if not ctx.stage.data.heldout:
            return {}
        out, keys = self._evaluate_pass(engine, ctx, seq_len)
        if out and self.config.eval_swapped_images:
            swapped, _ = self._evaluate_pass(engine, ctx, seq_len, view=partial(swapped_media, keys=keys))
            out["heldout_loss_swapped_images"] = swapped["heldout_loss"]
            out["image_gain"] = swapped["heldout_loss"] - out["heldout_loss"]
            if "answer_accuracy" in swapped:
                out["answer_accuracy_swapped_images"] = swapped["answer_accuracy"]
        return out

    def _evaluate_pass(self, engine: TrainEngine, ctx: Any, seq_len: int, view: Any = None) -> tuple[dict, set]:
        """One held-out pass: its metrics and the keys of the samples it covered (the swapped-images pass
        covers the same ones, whose packing differs as the image sizes do)."""
        from keye.data.pipeline import micro_batches

        stream = micro_batches(ctx, split="heldout", view=view)
        stream.processor.modes.keep_keys = True
        batches = stream.take(self.config.eval_batches if view is None else 1 << 30)
        if not batches:
            return {}, set()
        batches = batches + [_rider(batches[-1])] * (_pipeline_minimum(engine) - len(batches))
        verdicts: list[tuple[str, bool]] = []
        result = engine.eval_step(partial(_eval_forward, verdicts), iter(batches), len(batches), seq_len, 1)
        out = {"heldout_loss": result["loss"]}
        if "answer_accuracy" in result:
            out["answer_accuracy"] = result["answer_accuracy"]
            out.update(_accuracy_by_mode(verdicts, stream.processor.modes.mode_of, ctx.parallel.is_last_stage))
        return out, {key for batch in batches for key in batch.keys}


@hookimpl
def keye_register_stages(register):
    register("lm", LMStage)
