"""``merge``: combine the weights of earlier stages (Keye-VL's stage-3 model merging).

Options name the stages to merge, their weights and the merger component. Each rank merges its own
tensor/pipeline shard (the layout the stages were trained with) and writes the result as this stage's
weights, so the next stage or an export reads it like any other stage's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist

from keye import hookimpl
from keye.config import component, doc
from keye.config.validate import build_component_config
from keye.errors import KeyeUserError
from keye.train.stage_weights import weights_file


class MergeStage:
    @dataclass
    class Config:
        inputs: List[str] = doc("Stages (by name) whose final weights are merged.", default_factory=list)
        weights: List[float] = doc("One weight per input; empty = equal weights.", default_factory=list)
        merger: Dict[str, Any] = component("merger", "How the weights are combined.", {"name": "linear_soup"})

    def __init__(self, config: Config, ctx: Any) -> None:
        if len(config.inputs) < 2:
            raise KeyeUserError(f"stages.{ctx.index}.options.inputs: a merge needs at least two stages, got {list(config.inputs)}")
        if config.weights and len(config.weights) != len(config.inputs):
            raise KeyeUserError(
                f"stages.{ctx.index}.options.weights: {len(config.weights)} weights for {len(config.inputs)} inputs"
            )
        self.config = config
        self.ctx = ctx

    def run(self) -> dict[str, Any]:
        ctx = self.ctx
        cls, merger_config = build_component_config("merger", self.config.merger, ctx.registry)
        merger = cls(merger_config, None)
        weights = list(self.config.weights) or [1.0] * len(self.config.inputs)
        run_dir = Path(ctx.blueprint.run.output_dir)
        files = [weights_file(run_dir / name, ctx.parallel) for name in self.config.inputs]
        missing = [str(path) for path in files if not path.is_file()]
        if missing:
            raise KeyeUserError(f"stages.{ctx.index}: merge inputs have no weights yet: {', '.join(missing)}")
        saved = [torch.load(path, map_location="cpu", weights_only=True) for path in files]
        merged = merger([s["model"] for s in saved], weights)
        out = weights_file(ctx.output_dir, ctx.parallel)
        if ctx.parallel.dp_rank == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"layout": saved[0]["layout"], "model": merged, "splits": saved[0]["splits"]}, out)
        if dist.is_initialized():
            dist.barrier()
        return {"inputs": list(self.config.inputs), "weights": weights, "tensors": len(merged)}


@hookimpl
def keye_register_stages(register):
    register("merge", MergeStage)
