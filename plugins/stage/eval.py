"""``eval``: generation-based evaluation of an earlier stage's weights inside a blueprint.

The same evaluation as ``keye-launch eval`` (`keye.eval.run.evaluate`), run where the training ran: the
blueprint's model is built in the run's layout (TP/PP/DP as configured; generation is collective over the
model-parallel group, every rank runs it and rank 0 writes), the weights of ``options.stage`` (default:
the stage before) are loaded from its Megatron-Core checkpoint whatever layout wrote it, and this stage's
``data`` section gives the image and video token budgets. Benchmarks are files (``options.benchmarks``)
and/or held-out questions of the synthetic world (``options.synthetic_tasks``: written into this stage's
folder first, `keye.data.synthetic.benchmark_rows`), so a blueprint on the synthetic world needs no files.

Outputs in the stage folder: ``results.jsonl``, ``summary.json``, ``report.md`` (and ``scores.png``); the
stage's result in the run summary carries the overall and per-task scores. It trains nothing and writes no
weights: put it last, or give the stage after it an ``init_from``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import torch.distributed as dist

from keye import hookimpl
from keye.config import doc


class EvalStage:
    #: report.md's headline (`keye.train.report`): the generation score overall and per task, the think ratio
    headline_keys = ("score", "tasks.*", "think_ratio")

    @dataclass
    class Config:
        stage: str = doc("The earlier stage whose weights are evaluated (empty: the stage before this one).", "")
        benchmarks: List[str] = doc("Benchmark files (.jsonl, .tsv; keye.eval.benchmark).", default_factory=list)
        synthetic_tasks: List[str] = doc(
            "Synthetic-world tasks or groups to ask held-out questions of (e.g. [image_qa, video_qa]).",
            default_factory=list)
        synthetic_samples: int = doc("Held-out synthetic questions in all (tasks take turns).", 32)
        synthetic_seed: int = doc("World seed of the synthetic questions.", 0)
        mode: str = doc("Thinking mode of the prompts: think, no_think, auto or agentic.", "auto")
        max_samples: Optional[int] = doc("At most this many questions per benchmark file (null: all).", None)
        max_new_tokens: int = doc("Tokens per answer at most.", 64)
        batch_size: int = doc("Questions generated together.", 8)

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        from keye.data.synthetic import expand_tasks
        from keye.eval.model import MODES

        index = check.stage_index
        check.trains_nothing("an eval stage")
        check.earlier_stage(config)
        if not config.stage and index == 0:
            check.fail("stage", "the first stage has no stage before it to evaluate; name one")
        if not config.benchmarks and not config.synthetic_tasks:
            check.fail("benchmarks", "nothing to evaluate: give benchmark files or synthetic_tasks")
        if config.mode not in MODES:
            check.fail("mode", f"unknown mode {config.mode!r}; known: {', '.join(MODES)}")
        try:
            expand_tasks(config.synthetic_tasks or None)
        except ValueError as exc:
            check.fail("synthetic_tasks", str(exc))
        check.count(config, "synthetic_samples", "max_new_tokens", "batch_size")
        if config.max_samples is not None:
            check.count(config, "max_samples")

    #: the evaluated model is built as one chunk per virtual pipeline stage (`keye.eval.model.stage_model`)
    supports_virtual_pipeline = True

    def __init__(self, config: Config, ctx: Any) -> None:
        self.config = config
        self.ctx = ctx

    def run(self) -> dict[str, Any]:
        from keye.data.pipeline import build_processor
        from keye.eval.model import EvalModel, make_generator, stage_model
        from keye.eval.run import evaluate

        ctx, config = self.ctx, self.config
        source = Path(ctx.blueprint.run.output_dir) / config.stage if config.stage else ctx.previous_output
        writer = not dist.is_initialized() or dist.get_rank() == 0
        benchmarks = [*config.benchmarks, *self._synthetic(writer)]
        model = stage_model(ctx.blueprint, Path(source), ctx.registry, ctx.parallel)
        processor = build_processor(ctx)
        evaluator = EvalModel(make_generator(model, processor.tokenizer, ctx.parallel), processor,
                              max_new_tokens=config.max_new_tokens)
        summary = evaluate(benchmarks, evaluator, ctx.output_dir, config.mode, config.max_samples, config.batch_size,
                           writer=writer, source=f"stage {Path(source).name}")
        overall = summary["overall"]
        return {"evaluated": Path(source).name, "mode": config.mode, "score": overall["score"],
                "samples": overall["samples"], "bad_samples": summary["bad_samples"],
                "think_ratio": overall["think_ratio"], "mean_response_tokens": overall["mean_response_tokens"],
                "tasks": {name: task["score"] for name, task in summary["tasks"].items()}}

    def _synthetic(self, writer: bool) -> list[Path]:
        """The synthetic held-out questions as one benchmark file in this stage's folder (rank 0 writes it)."""
        from keye.data.synthetic import benchmark_rows

        config = self.config
        if not config.synthetic_tasks:
            return []
        folder = Path(self.ctx.output_dir) / "synthetic_benchmark"
        path = folder / "heldout.jsonl"
        if writer:
            (folder / "media").mkdir(parents=True, exist_ok=True)
            lines = []
            for row, media in benchmark_rows(config.synthetic_samples, tasks=config.synthetic_tasks,
                                             seed=config.synthetic_seed):
                for name, data in media.items():
                    (folder / "media" / name).write_bytes(data)
                row["media"] = [{kind: f"media/{name}" for kind, name in entry.items()} for entry in row["media"]]
                lines.append(json.dumps(row))
            path.write_text("\n".join(lines) + "\n")
        if dist.is_initialized():
            dist.barrier()
        return [path]


@hookimpl
def keye_register_stages(register):
    register("eval", EvalStage)
