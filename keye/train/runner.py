"""Runs a blueprint's stages in order, on every rank.

A stage kind is a registered ``stage`` component: ``Cls(config, ctx)`` where ``config`` is its Config
(from ``stages[i].options``) and ``ctx`` a `StageContext`; ``run()`` does the step loop and returns a
summary dict. The runner owns what is common: distributed set-up, output folders, lifecycle hooks,
metrics and the run summary. It does not decide whether ``run.output_dir`` may be written: ``keye-launch run``
claims it first (a lock against live runs, no silent reuse of a finished one: `keye.train.output_dir`), and
a program that calls `run_blueprint` itself does the same with `keye.train.output_dir.claim_output_dir`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

from keye.config import build_component_config
from keye.errors import KeyeUserError
from keye.parallel.fp8 import check_fp8_available
from keye.parallel.state import seed_random_streams
from keye.plugins import PluginHost
from keye.train.metrics import MetricsWriter, write_summary
from keye.train.report import write_report


#: Written into a stage's folder when it finishes; ``--resume`` skips such stages.
DONE = "done.json"


@dataclass
class StageContext:
    """Everything a stage needs besides its own Config."""

    blueprint: DictConfig
    stage: DictConfig
    index: int
    host: PluginHost
    parallel: Any
    output_dir: Path
    previous_output: Path | None
    resume: bool
    metrics: MetricsWriter

    @property
    def registry(self):
        return self.host.registry


class Stage(Protocol):
    """What a stage component implements (see ``keye_register_stages``)."""

    def run(self) -> dict[str, Any]: ...


def run_blueprint(cfg: DictConfig, host: PluginHost, *, only_stage: str | None = None, resume: bool = False) -> dict:
    """Run every stage (or only ``only_stage``); write ``summary.json``; return the summary."""
    from keye.model.backend import use_blueprint_impl
    from keye.parallel import init_parallel

    use_blueprint_impl(cfg)  # model.transformer_impl: TE or local layers for every component built below
    check_fp8_available(cfg.precision)  # a clear error now, not deep inside the first model build
    try:
        parallel = init_parallel(
            tensor=cfg.parallel.tensor,
            pipeline=cfg.parallel.pipeline,
            virtual_pipeline=cfg.parallel.virtual_pipeline,
            backend=cfg.parallel.backend,
            seed=cfg.run.seed,
            sequence_parallel=cfg.parallel.sequence_parallel,
        )
    except ValueError as exc:  # a layout that does not fit the processes started
        raise KeyeUserError(f"parallel: {exc}") from None
    if cfg.parallel.data is not None and cfg.parallel.data != parallel.dp_size:
        raise KeyeUserError(
            f"parallel.data={cfg.parallel.data} but world size {parallel.world_size} / "
            f"(tensor {parallel.tp_size} x pipeline {parallel.pp_size}) gives {parallel.dp_size}"
        )
    is_main = parallel.rank == 0
    output_dir = Path(cfg.run.output_dir)
    metrics = MetricsWriter(output_dir, enabled=is_main)
    host.hook.keye_configure(blueprint=cfg)

    summary: dict[str, Any] = {"run": cfg.run.name, "world_size": parallel.world_size, "stages": {}}
    previous: Path | None = None
    for index, stage in enumerate(cfg.stages):
        stage_dir = output_dir / stage.name
        if only_stage is not None and stage.name != only_stage:
            previous = stage_dir
            continue
        done = stage_dir / DONE
        if resume and done.is_file():  # finished before the run was stopped: keep its result
            summary["stages"][stage.name] = json.loads(done.read_text())
            previous = stage_dir
            continue
        seed_random_streams(cfg.run.seed)  # as in a fresh process: a resumed or --stage run builds the same
        cls, config = build_component_config("stage", {"name": stage.kind, **OmegaConf.to_container(stage.options)}, host.registry)
        ctx = StageContext(cfg, stage, index, host, parallel, stage_dir, previous, resume, metrics)
        host.hook.keye_before_stage(stage=stage, blueprint=cfg)
        start = time.perf_counter()
        result = dict(cls(config, ctx).run() or {})
        result["wall_time_s"] = round(time.perf_counter() - start, 3)
        host.hook.keye_after_stage(stage=stage, blueprint=cfg, result=result)
        # the kind's headline keys, for report.md (`keye.train.report`); a stage's own summary may set them
        headline = list(getattr(cls, "headline_keys", ()))
        summary["stages"][stage.name] = {"kind": stage.kind, "headline_keys": headline, **result}
        if is_main:
            (stage_dir / DONE).parent.mkdir(parents=True, exist_ok=True)
            (stage_dir / DONE).write_text(json.dumps(summary["stages"][stage.name], indent=2, default=str))
            write_summary(output_dir, summary)
            write_report(output_dir, summary)
        previous = stage_dir
    if is_main:
        write_summary(output_dir, summary)
    return summary
