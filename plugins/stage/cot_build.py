"""``cot_build``: the CoT cold start's data, built by a teacher model inside a blueprint (`keye.data.cot`).

The questions are the stage's ``data.sources`` (conversations with ``meta.answer``, or RL prompts with their
reference answer), read in order, at most ``options.num_questions``. The teacher is an earlier stage of the run
(``options.stage``, default the stage before; its Megatron-Core checkpoint loaded into this run's layout, as
the ``eval`` stage does) or a released-format folder (``options.teacher``). For each question it samples
``k`` replies per mode, keeps the verified most frequent path, and rank 0 writes ``cot.jsonl`` (and
``media/``) in this stage's folder: a ``jsonl`` source for the next stage, e.g.
``{name: jsonl, path: <run.output_dir>/<this stage>/cot.jsonl}``. It trains nothing and writes no weights:
the stage after it needs an ``init_from``. Every rank generates every question (generation is collective over
the model-parallel group); data-parallel ranks repeat the work, which is cheap next to training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List

import torch.distributed as dist

from keye import hookimpl
from keye.config import doc


class CotBuildStage:
    #: report.md's headline (`keye.train.report`): verified paths written of the questions, replies right
    headline_keys = ("written", "questions", "reply_accuracy")

    @dataclass
    class Config:
        stage: str = doc("The earlier stage that is the teacher (empty: the stage before; see teacher).", "")
        teacher: str = doc("A released-format folder to use as the teacher instead of a stage of this run.", "")
        modes: List[str] = doc("Modes to sample paths in: think, auto.", default_factory=lambda: ["think"])
        k: int = doc("Replies sampled per question and mode.", 8)
        temperature: float = doc("Sampling temperature of the teacher.", 0.8)
        min_score: float = doc("Score (keye.eval.metrics, the question's metric) a final answer needs to count.", 1.0)
        num_questions: int = doc("Questions read from the data sources at most.", 256)
        max_new_tokens: int = doc("Tokens per reply at most.", 128)
        batch_size: int = doc("Questions generated together (each with k replies).", 8)
        require_thought: bool = doc("Think-mode replies must think (a non-empty <think>); off for a teacher "
                                    "that never learnt the tags.", True)

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        from keye.data.cot import COT_MODES

        index = check.stage_index
        check.trains_nothing("a cot_build stage")
        if config.teacher and config.stage:
            check.fail("teacher", "give a teacher folder or an earlier stage, not both")
        check.earlier_stage(config)
        if not config.stage and not config.teacher and index == 0:
            check.fail("stage", "the first stage has no stage before it to be the teacher; name one or a teacher folder")
        if not config.modes or any(mode not in COT_MODES for mode in config.modes):
            check.fail("modes", f"expected modes among {', '.join(COT_MODES)}, got {list(config.modes)!r}")
        check.count(config, "k", "num_questions", "max_new_tokens", "batch_size")
        if not config.temperature > 0:
            check.fail("temperature", f"must be > 0 to sample k different paths, got {config.temperature!r}")
        if not check.stage.data.sources:
            check.fail("", f"no questions: stages.{index}.data.sources is empty")

    #: the teacher model is built as one chunk per virtual pipeline stage (`keye.eval.model.stage_model`)
    supports_virtual_pipeline = True

    def __init__(self, config: Config, ctx: Any) -> None:
        self.config = config
        self.ctx = ctx

    def teacher(self) -> tuple[Any, str]:
        from keye.data.pipeline import build_processor
        from keye.eval.model import EvalModel, from_released, make_generator, stage_model

        ctx, config = self.ctx, self.config
        if config.teacher:
            return from_released(config.teacher, max_new_tokens=config.max_new_tokens), config.teacher
        source = Path(ctx.blueprint.run.output_dir) / config.stage if config.stage else Path(ctx.previous_output)
        model = stage_model(ctx.blueprint, source, ctx.registry, ctx.parallel)
        processor = build_processor(ctx)
        generator = make_generator(model, processor.tokenizer, ctx.parallel)
        return EvalModel(generator, processor, max_new_tokens=config.max_new_tokens), f"stage {source.name}"

    def questions(self, stats: Any):
        from keye.data.cot import question_of
        from keye.data.pipeline import build_sources

        left = self.config.num_questions
        for source in build_sources(self.ctx, "sources", read_all=True).values():
            for loaded in source:
                if left == 0:
                    return
                question = question_of(loaded)
                if isinstance(question, str):
                    stats.skipped[question] += 1
                    continue
                left -= 1
                yield question

    def run(self) -> dict[str, Any]:
        from keye.data.cot import CotStats, build_cot, write_jsonl

        ctx, config = self.ctx, self.config
        model, name = self.teacher()
        stats = CotStats()
        records = build_cot(model, self.questions(stats), k=config.k, modes=config.modes,
                            temperature=config.temperature, min_score=config.min_score,
                            batch_size=config.batch_size, teacher=name, require_thought=config.require_thought,
                            stats=stats)
        out = Path(ctx.output_dir) / "cot.jsonl"
        if not dist.is_initialized() or dist.get_rank() == 0:
            written = write_jsonl(records, out)
        else:
            written = sum(1 for _ in records)  # the collective generation runs on every rank
        summary = {"teacher": name, "output": str(out), "written": written, **stats.summary()}
        if not dist.is_initialized() or dist.get_rank() == 0:
            (Path(ctx.output_dir) / "cot_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if dist.is_initialized():
            dist.barrier()
        return summary


@hookimpl
def keye_register_stages(register):
    register("cot_build", CotBuildStage)
