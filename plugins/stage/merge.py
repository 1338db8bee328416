"""``merge``: combine the weights of earlier stages (Keye-VL's stage-3 model merging).

Options name the stages to merge, their weights and the merger component. The stages' weights are
Megatron-Core distributed checkpoints; each rank reads only its share of every tensor from each input,
merges it and writes it, so no process holds a whole model, and the result is this stage's weights, read
by the next stage or an export like any other stage's output.
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
from keye.parallel.dist_checkpoint import is_checkpoint, load, save, saved_tensors
from keye.train.stage_weights import weights_folder


class MergeStage:
    #: builds no model (it merges checkpoint files by global name), so any pipeline layout, interleaved too
    supports_virtual_pipeline = True

    @dataclass
    class Config:
        inputs: List[str] = doc("Stages (by name) whose final weights are merged.", default_factory=list)
        weights: List[float] = doc("One weight per input; empty = equal weights.", default_factory=list)
        merger: Dict[str, Any] = component("merger", "How the weights are combined.", {"name": "linear_soup"})

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        """Inputs are distinct earlier stages that produce weights, one finite weight each; a merge trains nothing."""
        stages, index = check.blueprint.stages, check.stage_index
        if check.stage.steps or check.stage.train:
            check.fail("", f"a merge stage trains nothing; leave stages.{index}.steps and stages.{index}.train unset")
        if len(config.inputs) < 2:
            check.fail("inputs", f"a merge needs at least two stages, got {list(config.inputs)}")
        names = [stage.name for stage in stages]
        for position, name in enumerate(config.inputs):
            key = f"inputs.{position}"
            if name in list(config.inputs)[:position]:
                check.fail(key, f"stage '{name}' is listed twice")
            if name not in names:
                check.fail(key, f"no stage named '{name}'; stages: {', '.join(names)}")
            source = stages[names.index(name)]
            if names.index(name) >= index:
                check.fail(key, f"stage '{name}' does not come before this merge")
            if source.kind != "merge" and source.steps == 0:
                check.fail(key, f"stage '{name}' trains no steps: its weights are the ones it started from")
        if config.weights and len(config.weights) != len(config.inputs):
            check.fail("weights", f"{len(config.weights)} weights for {len(config.inputs)} inputs")
        for position, weight in enumerate(config.weights):
            number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
            if not (number and 0 <= weight < float("inf")):  # also refuses nan
                check.fail(f"weights.{position}", f"must be a finite number >= 0, got {weight!r}")
        if config.weights and not sum(config.weights) > 0:
            check.fail("weights", "weights sum to 0; at least one input needs a positive weight")

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
        folders = [weights_folder(run_dir / name) for name in self.config.inputs]
        missing = [str(path) for path in folders if not is_checkpoint(path)]
        if missing:
            raise KeyeUserError(f"stages.{ctx.index}: merge inputs have no weights yet: {', '.join(missing)}")
        count = merge_checkpoints(folders, weights, merger, weights_folder(ctx.output_dir))
        return {"inputs": list(self.config.inputs), "weights": weights, "tensors": count}


def _shares(metadata: dict[str, Any], world: int) -> dict[str, tuple[int | None, int | None]]:
    """How each tensor is shared out among ``world`` ranks: ``(axis, None)``, cut into ``world`` equal
    pieces along ``axis``, or ``(None, owner)``, whole on rank ``owner``.

    A tensor is cut along its first axis that ``world`` divides; one that cannot be cut evenly goes whole to
    the rank with the fewest elements so far (the small ones: norms, biases, the temperature).
    """
    shares, load = {}, [0] * world
    for key in sorted(metadata):
        shape = tuple(metadata[key].global_shape)
        axis = next((a for a, size in enumerate(shape) if size >= world and size % world == 0), None)
        owner = None
        if axis is None:
            owner = min(range(world), key=load.__getitem__)
            load[owner] += max(1, torch.Size(shape).numel())
        shares[key] = (axis, owner)
    return shares


def merge_checkpoints(folders: list[Path], weights: list[float], merger: Any, out: Path) -> int:
    """Merge distributed checkpoints into ``out``, each rank reading and averaging only its share.

    Works from the checkpoints' metadata alone, so it needs no model and no layout: the inputs may have
    been written by any TP/PP/DP layout and the merge runs in any number of processes. Every input must
    hold the same tensors with the same shapes (one line names the first that differs).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    metadata = saved_tensors(folders[0])
    for folder in folders[1:]:
        other = saved_tensors(folder)
        differ = sorted(set(metadata).symmetric_difference(other)) or sorted(
            k for k in metadata if tuple(metadata[k].global_shape) != tuple(other[k].global_shape))
        if differ:
            raise KeyeUserError(f"{folder}: cannot be merged with {folders[0]}: tensors differ (e.g. {differ[:3]})")

    shares = _shares(metadata, world)

    def template(data: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """This rank's share as ShardedTensors (fresh buffers to load into, or ``data`` to save)."""
        out = {}
        for key, (axis, owner) in shares.items():
            if axis is None and owner != rank:
                continue
            shape = list(metadata[key].global_shape)
            if axis is not None:
                shape[axis] //= world
            tensor = data[key] if data is not None else torch.empty(shape, dtype=metadata[key].dtype)
            offsets = [(axis, rank, world)] if axis is not None else []
            out[key] = ShardedTensor.from_rank_offsets(key, tensor, *offsets, replica_id=0)
        return out

    states = [load(template(), folder) for folder in folders]  # each verified before it is read
    merged = merger(states, weights)
    save(template(merged), out)
    return len(metadata)


@hookimpl
def keye_register_stages(register):
    register("merge", MergeStage)
