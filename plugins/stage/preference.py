"""``preference``: MPO (or another preference loss) on preference pairs, against a frozen reference.

The `lm` stage's loop (`keye.train.loop.train_steps`, `TrainEngine`, `stage_summary`) with three changes:

- **One forward per pair.** The data are preference samples only (the processor's ``preference`` path): each
  pair is one packed sample whose chosen and rejected replies share the prompt and its vision
  (`keye.data.preference`). The model returns the per-token loss −log p(label) on both replies' label
  positions; summed per reply it gives the sequence log-probs, and the chosen reply's token mean its NLL.
- **A reference.** r(y) = β·(log πθ − log π_ref) needs the frozen starting point's log-probs.
  ``reference: live`` keeps a second copy of the starting weights, in the same TP/PP layout, with no
  gradients and no optimiser state, and runs it forward-only over each step's micro-batches before the
  step. ``reference: precomputed`` runs that copy once over the training data (one pass, in order) and the
  held-out data before training, keeps each pair's two numbers by sample key (on the last pipeline stage,
  the only one with a loss) and frees the copy. Both give the same loss (tested); precomputed costs one
  pass and no memory during training, live suits data too large to pass over once. Sample keys must be
  unique within the stage's sources for ``precomputed``.
- **MPO's state.** The loss owns δ, the running mean of the BCO-pair term. It is updated on the last pipeline
  stage; after each step it is copied to every pipeline stage and saved with the data position in the
  resumable checkpoint (`_StreamWithLossState`: the checkpoint saves the stream's state dict), so a resumed
  run continues with the same δ.

The reference pass runs as a whole pipeline schedule between optimiser steps (`_PreferenceEngine`), never
inside the policy's schedule, whose point-to-point messages it would otherwise cross under PP > 1. Under an
interleaved pipeline (``parallel.virtual_pipeline``) the policy and the reference are each built as one model
chunk per virtual stage, and every forward-only pass goes through `keye.train.engine.schedule_data`.

Metrics each step: the loss, each MPO term, reward accuracy (r_c > r_r), margin, chosen and rejected rewards
and δ. Evaluation on held-out pairs before and after training reports reward accuracy, margin, rewards, and
the chosen replies' NLL and teacher-forced answer accuracy (the right answer must not be lost; in a thinking
mode, the final answer after the thought, as the `lm` stage scores it); the policy at the start *is* the
reference, so the "before" rewards are 0 and reward accuracy 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import torch
import torch.distributed as dist

from keye import hookimpl
from keye.config import doc
from keye.data.batch import MicroBatch
from keye.errors import KeyeUserError
from keye.model.composition import KeyeVLModel, build_component
from keye.model.protocols import DTYPES, BuildContext
from keye.parallel.fp8 import fp8_context
from keye.train.engine import TrainEngine
from keye.train.freezing import apply_freezing
from keye.train.loop import stage_summary, train_steps
from keye_plugins.stage.lm import LMStage

REFERENCE_MODES = ("live", "precomputed")
#: per-step sums reported by the training loss function (divided by ``pairs`` afterwards)
STEP_SUMS = ("pairs", "loss_sigmoid", "loss_bco_pair", "loss_sft", "reward_accuracy", "margin", "chosen_reward",
             "rejected_reward")
#: held-out sums (divided by ``pairs``)
EVAL_SUMS = ("pairs", "reward_accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_nll", "answer_accuracy")


# --- log-probs of the pairs of a micro-batch -------------------------------------------------------------


def pair_logps(per_token_loss: torch.Tensor, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: summed log-probs of the chosen and rejected replies, and the chosen reply's token-mean NLL.

    ``per_token_loss`` ``(1, T)`` is −log p(label) where the loss mask is set (Megatron's vocab-parallel
    cross entropy, fp32, whole over TP ranks). Returns three ``[B]`` tensors, B = pairs in the micro-batch.
    """
    if not batch.pairs:
        raise KeyeUserError(f"preference stage: micro-batch {batch.keys} has no preference pair")
    tokens = per_token_loss[0].float()  # (T,)
    chosen = torch.stack([-tokens[c].sum() for c, _ in batch.pairs])
    rejected = torch.stack([-tokens[r].sum() for _, r in batch.pairs])
    chosen_nll = torch.stack([tokens[c].mean() for c, _ in batch.pairs])
    return chosen, rejected, chosen_nll


def _model_forward(model: torch.nn.Module, batch: MicroBatch) -> torch.Tensor:
    return model(batch.input_ids, batch.position_ids, batch.attention_mask, labels=batch.labels,
                 images=batch.images, videos=batch.videos, loss_mask=batch.loss_mask)  # last stage: (1, T)


def _forward_only(chunks: list[torch.nn.Module], batches: list[MicroBatch], seq_len: int, precision: Any,
                  forward_step: Any) -> list[dict[str, torch.Tensor]] | None:
    """A forward-only pipeline schedule over ``batches`` (``chunks``: this rank's model chunks): what each loss
    function reported, on the last pipeline stage (None on the others)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from keye.train.engine import schedule_data

    for chunk in chunks:
        chunk.eval()
    data, count = schedule_data(chunks, batches, forward_only=True)
    with torch.no_grad(), fp8_context(precision):
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=list(chunks), num_microbatches=count,
            seq_length=seq_len, micro_batch_size=1, forward_only=True,
        )
    return outputs[:len(batches)] if mpu.is_pipeline_last_stage() else None


def forward_logps(chunks: list[torch.nn.Module], batches: list[MicroBatch], seq_len: int,
                  precision: Any = None) -> list[torch.Tensor | None]:
    """Per batch a ``(3, B)`` tensor (chosen log-probs, rejected log-probs, chosen NLL) on the last pipeline
    stage, None on the others."""
    if not batches:
        return []

    def loss_func(batch: MicroBatch, per_token_loss: torch.Tensor):
        values = torch.stack(pair_logps(per_token_loss, batch)).detach()  # (3, B)
        return per_token_loss.sum() * 0, torch.tensor(1, dtype=torch.int), {"logps": values}

    def forward_step(data: Iterator[MicroBatch], model: torch.nn.Module):
        batch = next(data)
        return _model_forward(model, batch), partial(loss_func, batch)

    outputs = _forward_only(chunks, batches, seq_len, precision, forward_step)
    return [None] * len(batches) if outputs is None else [out["logps"] for out in outputs]


def forward_answers_correct(chunks: list[torch.nn.Module], batches: list[MicroBatch], seq_len: int,
                            precision: Any = None, final_answer: Any = None) -> list[float | None]:
    """Per batch: how many pairs' chosen answers are the model's argmax at every token (teacher-forced, as the
    `lm` stage's answer accuracy), on the last pipeline stage; None on the others.

    ``final_answer(mask, labels)`` narrows a chosen reply's label mask ``(T,)`` to its final answer (the
    processor's, `keye.data.processor.Processor._final_answer`: after the last ``<answer>`` or ``</analysis>``),
    so a pair written in a thinking mode is scored on its answer given the thought, as the `lm` stage scores
    conversations; None scores the whole reply."""
    if not batches:
        return []

    def answer_positions(chosen: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if final_answer is None:
            return chosen
        mask = torch.zeros(len(labels), dtype=torch.bool)
        mask[chosen] = True
        return torch.nonzero(final_answer(mask, labels)).flatten()

    def loss_func(batch: MicroBatch, logits: torch.Tensor):
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        predictions = gather_from_tensor_model_parallel_region(logits)[0].argmax(-1)  # (T,)
        labels = batch.labels[0]
        answers = [answer_positions(c, labels) for c, _ in batch.pairs]
        correct = sum(bool((predictions[a] == labels[a]).all()) for a in answers)
        return logits.sum() * 0, torch.tensor(1, dtype=torch.int), {"correct": torch.tensor(float(correct))}

    def forward_step(data: Iterator[MicroBatch], model: torch.nn.Module):
        batch = next(data)
        logits = model(batch.input_ids, batch.position_ids, batch.attention_mask, images=batch.images, videos=batch.videos)
        return logits, partial(loss_func, batch)

    outputs = _forward_only(chunks, batches, seq_len, precision, forward_step)
    return [None] * len(batches) if outputs is None else [float(out["correct"]) for out in outputs]


def _sum_everywhere(values: torch.Tensor, is_last: bool, over_data: bool = True) -> torch.Tensor:
    """Sums known on the last pipeline stage → summed over data-parallel ranks (optional), on every rank."""
    from megatron.core import parallel_state as mpu

    values = values if is_last else torch.zeros_like(values)
    if mpu.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(values, group=mpu.get_pipeline_model_parallel_group())
    if over_data and mpu.get_data_parallel_world_size() > 1:
        dist.all_reduce(values, group=mpu.get_data_parallel_group())
    return values


# --- the reference ---------------------------------------------------------------------------------------


class Reference:
    """Reference log-probs for micro-batches: from a frozen live copy, or looked up after one precomputing pass."""

    def __init__(self, model: KeyeVLModel | list[KeyeVLModel], seq_len: int, precision: Any) -> None:
        from keye.parallel.dist_checkpoint import model_chunks

        self.chunks: list[KeyeVLModel] | None = model_chunks(model)  # this rank's model chunks; None once precomputed
        for chunk in self.chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        self.seq_len = seq_len
        self.precision = precision
        self.table: dict[str, tuple[float, float]] = {}

    def precompute(self, streams: list[Iterator[MicroBatch]]) -> None:
        """One pass over each stream (in order, to its end); keeps each pair's reference log-probs by key.

        Every data-parallel rank passes over its own share; the tables are then joined, because with
        ``data.balance: flops`` a training pack may hold samples another rank read in this pass.
        """
        from megatron.core import parallel_state as mpu

        for stream in streams:
            batches = list(stream)
            for batch, logps in zip(batches, forward_logps(self.chunks, batches, self.seq_len, self.precision)):
                if logps is not None:
                    self.add(batch.keys, logps[0].tolist(), logps[1].tolist())
        if mpu.is_pipeline_last_stage() and mpu.get_data_parallel_world_size() > 1:
            tables: list[Any] = [None] * mpu.get_data_parallel_world_size()
            dist.all_gather_object(tables, self.table, group=mpu.get_data_parallel_group())
            self.table = {}
            for table in tables:  # a rank may have read nothing
                self.add(list(table), [c for c, _ in table.values()], [r for _, r in table.values()])
        self.chunks = None  # the copy is not needed any more: free it

    def add(self, keys: list[str], chosen: Any, rejected: Any) -> None:
        """Record reference log-probs by sample key; a key seen twice means two different samples share it."""
        for key, chosen_logp, rejected_logp in zip(keys, chosen, rejected):
            if key in self.table:
                raise KeyeUserError(f"preference stage: sample key {key!r} occurs twice in the stage's sources; "
                                    "reference: precomputed needs unique keys (or use reference: live)")
            self.table[key] = (float(chosen_logp), float(rejected_logp))

    def logps(self, batches: list[MicroBatch]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per batch: (chosen, rejected) reference log-probs ``[B]`` on the last pipeline stage, None elsewhere."""
        if self.chunks is not None:
            return [None if out is None else (out[0], out[1])
                    for out in forward_logps(self.chunks, batches, self.seq_len, self.precision)]
        from megatron.core import parallel_state as mpu

        if not mpu.is_pipeline_last_stage():
            return [None] * len(batches)
        result = []
        for batch in batches:
            missing = [key for key in batch.keys if key not in self.table]
            if missing:
                raise KeyeUserError(f"preference stage: no precomputed reference for sample {missing[0]!r} "
                                    "(sample keys must be unique and stable; or use reference: live)")
            values = torch.tensor([self.table[key] for key in batch.keys], dtype=torch.float32)  # (B, 2)
            result.append((values[:, 0], values[:, 1]))
        return result


class _PreferenceEngine(TrainEngine):
    """`TrainEngine` whose step first takes its micro-batches and their reference log-probs, so the reference
    pass is a whole schedule of its own before the policy's (see the module docstring)."""

    reference: Reference

    def train_step(self, forward_step, data, num_microbatches, seq_length, micro_batch_size):
        batches = [next(data) for _ in range(num_microbatches)]
        referenced = list(zip(batches, self.reference.logps(batches)))
        return super().train_step(forward_step, iter(referenced), num_microbatches, seq_length, micro_batch_size)


class _StreamWithLossState:
    """The training stream, with the loss's state (δ) saved and restored along with the data position."""

    def __init__(self, stream: Any, loss: Any) -> None:
        self.stream, self.loss = stream, loss

    def __iter__(self) -> "_StreamWithLossState":
        return self

    def __next__(self) -> MicroBatch:
        return next(self.stream)

    def stats(self) -> dict[str, Any]:
        return self.stream.stats()

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "loss": self.loss.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        self.loss.load_state_dict(state["loss"])


# --- the stage --------------------------------------------------------------------------------------------


class _StepMetrics:
    """Sums of the MPO metrics over a step's micro-batches (last pipeline stage), averaged per pair after it."""

    def __init__(self) -> None:
        self.sums = torch.zeros(len(STEP_SUMS), dtype=torch.float64)

    def add(self, pairs: int, metrics: dict[str, torch.Tensor]) -> None:
        for index, name in enumerate(STEP_SUMS):
            self.sums[index] += pairs if name == "pairs" else float(metrics.get(name, 0.0)) * pairs

    def take(self, is_last: bool) -> dict[str, float]:
        totals = _sum_everywhere(self.sums, is_last).tolist()
        self.sums.zero_()
        pairs = totals[0]
        return {name: value / pairs if pairs else float("nan") for name, value in zip(STEP_SUMS[1:], totals[1:])}


def _train_loss(loss: Any, batch: MicroBatch, reference: tuple[torch.Tensor, torch.Tensor], step: _StepMetrics,
                per_token_loss: torch.Tensor):
    from megatron.core import parallel_state as mpu

    chosen, rejected, chosen_nll = pair_logps(per_token_loss, batch)
    value, metrics = loss(chosen, rejected, reference[0], reference[1], chosen_nll, group=mpu.get_data_parallel_group())
    pairs = len(batch.pairs)
    step.add(pairs, metrics)
    total = value * pairs  # a sum over pairs: Megatron divides the gradient by the step's pairs (all ranks)
    return total, torch.tensor(pairs, dtype=torch.int), {"loss_sum": total.detach().clone(), "tokens": torch.tensor(float(pairs))}


def _train_forward(loss: Any, step: _StepMetrics, data: Iterator, model: torch.nn.Module):
    batch, reference = next(data)
    return _model_forward(model, batch), partial(_train_loss, loss, batch, reference, step)


class PreferenceStage(LMStage):
    """The ``preference`` stage kind; see the module docstring.

    The stage's loss (``mpo`` unless ``stages[i].loss`` names another) is called as
    ``loss(chosen, rejected, ref_chosen, ref_rejected, chosen_nll, group=data_parallel_group)`` with ``[B]``
    tensors and returns ``(loss, metrics)``; it has ``config.beta``, ``running.mean`` (δ) and a state dict,
    as `keye_plugins.loss.mpo.MPOLoss` does.
    """

    #: report.md's headline (`keye.train.report`): held-out preference (reward) accuracy and margin, answer accuracy
    headline_keys = ("heldout_reward_accuracy", "heldout_margin", "heldout_answer_accuracy")

    @dataclass
    class Config(LMStage.Config):
        reference: str = doc(
            "Reference log-probs: 'live' (a frozen copy of the starting weights, run before each step) or "
            "'precomputed' (that copy run once over the training and held-out data before training, then freed).",
            "live",
        )

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        """A language model, preference data for its steps, usable counts and a known reference mode."""
        check.count(config, "num_microbatches")
        check.count(config, "eval_batches", "max_bad_steps", minimum=0)
        check.one_of(config, "reference", REFERENCE_MODES)
        if check.blueprint.model.language_model is None:
            check.fail("", "the preference stage needs model.language_model")
        if check.blueprint.parallel.virtual_pipeline is not None and config.num_microbatches < check.pipeline:
            check.fail("num_microbatches", f"{config.num_microbatches}, but an interleaved pipeline (parallel.virtual_pipeline) "
                                           f"needs at least parallel.pipeline = {check.pipeline} per step")
        if check.stage.steps > 0 and not check.stage.data.sources:
            check.fail("", f"{check.stage.steps} steps but no data (stages.{check.stage_index}.data.sources is empty)")

    #: the policy and the frozen reference are built as one model chunk per virtual pipeline stage
    supports_virtual_pipeline = True

    def run(self) -> dict[str, Any]:
        from megatron.core import parallel_state as mpu

        from keye.data.pipeline import micro_batches
        from keye.train.stage_weights import load_stage_weights, save_stage_weights

        ctx, stage, config = self.ctx, self.ctx.stage, self.config
        dtype, precision = DTYPES[ctx.blueprint.precision.dtype], ctx.blueprint.precision
        seq_len = stage.data.max_tokens
        model = self.build_chunks()  # one per virtual pipeline stage (one without an interleaved pipeline)
        initialised_from = load_stage_weights(model, ctx)
        frozen = self.build_chunks()  # the reference: the starting point, same layout, never trained
        for copy, chunk in zip(frozen, model):
            copy.load_state_dict(chunk.state_dict())
        reference = Reference(frozen, seq_len, precision)
        if config.reference == "precomputed":
            streams = [micro_batches(ctx, split="train", preference=True, once=True)]
            if stage.data.heldout:
                streams.append(micro_batches(ctx, split="heldout", preference=True))
            reference.precompute(streams)
        trainable = apply_freezing(model, stage.train)
        loss = build_component("loss", stage.loss or {"name": "mpo"}, ctx.registry, BuildContext(ctx.parallel, dtype))
        engine = _PreferenceEngine(model, stage, dtype, max_bad_steps=config.max_bad_steps, precision=precision)
        engine.reference = reference
        is_last = mpu.is_pipeline_last_stage()
        train = micro_batches(ctx, split="train", preference=True)
        stream = _StreamWithLossState(train, loss)
        step = _StepMetrics()

        before = self._evaluate_pairs(engine, reference, loss, seq_len, precision, is_last)

        def fields(result, seconds):
            stats = train.stats()
            self._share_loss_state(loss, is_last)  # every rank saves the same δ in a checkpoint
            return {"pairs_per_s": result.extras["tokens"] / seconds, "padding_efficiency": stats["packing_efficiency"],
                    "skipped_samples": stats["skipped"], **step.take(is_last), "delta": loss.running.mean}

        last, resumed_from = train_steps(ctx, model, engine, stream, partial(_train_forward, loss, step),
                                         num_microbatches=config.num_microbatches, seq_length=seq_len,
                                         micro_batch_size=1, fields=fields)
        after = self._evaluate_pairs(engine, reference, loss, seq_len, precision, is_last)
        save_stage_weights(model, ctx)
        summary = stage_summary(ctx, engine, last, resumed_from=resumed_from, initialised_from=initialised_from,
                                trainable=trainable, before=before, after=after, data=train.stats())
        summary["reference"] = config.reference
        summary["delta"] = loss.running.mean
        return summary

    @staticmethod
    def _share_loss_state(loss: Any, is_last: bool) -> None:
        """δ is updated on the last pipeline stage; give every pipeline stage its value."""
        values = torch.tensor([loss.running.mean, float(loss.running.count)], dtype=torch.float64)
        values = _sum_everywhere(values, is_last, over_data=False)
        loss.running.load_state_dict({"mean": float(values[0]), "count": int(values[1])})

    def _evaluate_pairs(self, engine: TrainEngine, reference: Reference, loss: Any, seq_len: int, precision: Any,
                        is_last: bool) -> dict[str, float]:
        """Held-out reward accuracy, margin and rewards of the policy against the reference; the chosen
        replies' NLL and answer accuracy (did training on preferences keep the right answers?)."""
        from keye.data.pipeline import micro_batches

        if not self.ctx.stage.data.heldout:
            return {}
        stream = micro_batches(self.ctx, split="heldout", preference=True)
        batches = stream.take(self.config.eval_batches)
        beta = float(loss.config.beta)
        sums = torch.zeros(len(EVAL_SUMS), dtype=torch.float64)
        chunks = list(engine.chunks)
        policy = forward_logps(chunks, batches, seq_len, precision)
        correct = forward_answers_correct(chunks, batches, seq_len, precision, stream.processor._final_answer)
        for logps, ref, right in zip(policy, reference.logps(batches), correct):
            if logps is None:
                continue
            chosen, rejected = beta * (logps[0] - ref[0]), beta * (logps[1] - ref[1])
            sums += torch.tensor([len(chosen), float((chosen > rejected).sum()), float((chosen - rejected).sum()),
                                  float(chosen.sum()), float(rejected.sum()), float(logps[2].sum()), right],
                                 dtype=torch.float64)
        totals = _sum_everywhere(sums, is_last).tolist()
        pairs = totals[0]
        if not pairs:
            return {}
        result = {f"heldout_{name}": value / pairs for name, value in zip(EVAL_SUMS[1:], totals[1:])}
        result["heldout_pairs"] = int(pairs)
        return {name: (round(value, 6) if isinstance(value, float) and math.isfinite(value) else value)
                for name, value in result.items()}


@hookimpl
def keye_register_stages(register):
    register("preference", PreferenceStage)
