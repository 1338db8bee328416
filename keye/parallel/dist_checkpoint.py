"""Megatron-Core distributed checkpoints (``torch_dist``) for keye's models: one format for everything.

Stage weights, resumable training state and ``keye-launch convert`` all write Megatron-Core's
``dist_checkpointing`` format: *global* tensors stored with their shard offsets, so a checkpoint is not
tied to the tensor/pipeline/data-parallel layout that wrote it, and Megatron-LM tools read it. Every checkpoint is published atomically with a manifest and verified before
it is read (`keye.parallel.checkpoint_folder`): :func:`save` and :func:`load` are the only ways in and out.

keye's models are plain ``nn.Module`` s holding Megatron modules (the ViT's transformer block, the GPT
model) and plain ones (the patch embedding, the projector, a loss's temperature), so their sharded state
dict is assembled here by :func:`sharded_state_dict`. Megatron's local layer spec maps its layer-norm
names onto Transformer Engine's fused ones (``input_layernorm.weight`` →
``self_attention.linear_qkv.layer_norm_weight``) in the sharded state dict, so a checkpoint written
without TE loads into a TE model and back.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from keye.parallel import checkpoint_folder


def sharded_state_dict(module: nn.Module, prefix: str = "", metadata: dict | None = None) -> dict[str, Any]:
    """Megatron-Core's sharded state dict for any mix of Megatron and plain modules.

    A module with its own ``sharded_state_dict`` (Megatron's) says how its tensors are split over TP ranks
    and where its layers sit among all PP stages. A plain module's own parameters and persistent buffers
    are the same on every rank: replicated ``ShardedTensor``s (one main replica is written). Children are
    visited the same way, so a plain module holding a Megatron block (the ViT) keeps the block's TP axes.
    """
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

    metadata = ensure_metadata_has_dp_cp_group(metadata)  # Megatron's layers read the data-parallel group here
    if hasattr(module, "sharded_state_dict"):
        return module.sharded_state_dict(prefix=prefix, metadata=metadata)
    own: dict[str, Any] = {}
    module._save_to_state_dict(own, "", keep_vars=True)  # this module's tensors, not its children's
    out = make_sharded_tensors_for_checkpoint(own, prefix)
    for name, child in module.named_children():
        out.update(sharded_state_dict(child, f"{prefix}{name}.", metadata))
    return out


def save_strategy() -> Any:
    """Megatron's default writer where it can run, else :func:`serial_torch_dist_strategy`."""
    return None if importlib.util.find_spec("psutil") is not None else serial_torch_dist_strategy()


@contextlib.contextmanager
def _writer_failures_told_once() -> Iterator[None]:
    """Megatron's writer logs a worker's failure (a full disk) as an error before raising it; :func:`save`
    reports every failure itself, in one line naming the folder, so the writer's own line is held back."""
    log = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def serial_torch_dist_strategy() -> Any:
    """Megatron's ``torch_dist`` format (v1), written in this process by torch DCP's ``FileSystemWriter``.

    Why: Megatron-Core 0.16's own torch_dist writer forks one writer process per bucket, and each calls
    ``psutil`` *before* its error handling. psutil is not a dependency of megatron-core; without it the
    writer dies silently and ``dist_checkpointing.save`` waits forever. The files written here are what
    Megatron's writer writes (same state-dict translation, same planner, same metadata), so
    ``dist_checkpointing.load`` reads them with its default ``torch_dist`` strategy. Only main replicas
    are written, as Megatron does.
    """
    from collections import defaultdict

    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.mapping import ShardedObject, is_main_replica
    from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        flatten_state_dict,
        mcore_to_pyt_state_dict,
    )

    class SerialTorchDistSave(SaveShardedStrategy):
        @property
        def can_handle_sharded_objects(self) -> bool:
            return True

        def save(self, sharded_state_dict: dict, checkpoint_dir: str | Path) -> None:
            flat, _ = flatten_state_dict(sharded_state_dict)
            by_key: dict[str, list] = defaultdict(list)  # global key → this rank's main-replica shards
            for shard in flat.values():
                if is_main_replica(shard.replica_id):
                    by_key[shard.unique_key if isinstance(shard, ShardedObject) else shard.key].append(shard)
            dcp.save(mcore_to_pyt_state_dict(dict(by_key), False),
                     storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1),
                     planner=MCoreSavePlanner(flatten_state_dict=False))

    return SerialTorchDistSave("torch_dist", 1)


def save(state: dict[str, Any], folder: str | Path) -> None:
    """``dist_checkpointing.save`` of a sharded state dict, on every rank, published atomically.

    Every rank writes into ``.<name>.partial`` beside ``folder``; when all are done, rank 0 adds the
    manifest and renames it into place (`keye.parallel.checkpoint_folder.publish`), replacing an older
    ``folder`` whole, so a checkpoint written before by another layout leaves no stale shards and a
    reader never sees half a checkpoint. A full disk (or file-size limit) is one line naming the folder;
    the partial folder is removed and whatever was published before stays as it was.
    """
    import shutil

    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: caught by name

    folder = Path(folder)
    partial = checkpoint_folder.partial_folder(folder)
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while writing
        partial.mkdir(parents=True)
    dist.barrier()
    error: BaseException | None = None
    try:
        with _writer_failures_told_once():
            dist_checkpointing.save(state, str(partial), sharded_strategy=save_strategy())
        checkpoint_folder.hook("shards-written", folder)  # Megatron's save ends with a barrier: every rank is done
        if rank == 0:
            checkpoint_folder.publish(partial, folder)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - every rank learns of it below, then it is raised
        error = exc
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    failed = next((message for message in errors if message is not None), None)
    if failed is None:
        return
    full = error is not None and checkpoint_folder.out_of_space(error, partial)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    if full or "No space left on device" in failed or "File too large" in failed:
        raise checkpoint_folder.CheckpointWriteError(
            f"{folder}: no space left on device while writing this checkpoint (or the file-size limit was "
            "reached); nothing was published, the previous checkpoint is intact; free space and --resume") from None
    if error is not None:
        raise error
    raise RuntimeError(f"{folder}: another rank failed writing the checkpoint: {failed.splitlines()[0]}")


def is_checkpoint(folder: str | Path) -> bool:
    """A published distributed checkpoint is there (it may still fail `verify`)."""
    return (Path(folder) / "metadata.json").is_file() or (Path(folder) / checkpoint_folder.MANIFEST).is_file()


def load(template: dict[str, Any], folder: str | Path, *, require_manifest: bool = True) -> dict[str, Any]:
    """``dist_checkpointing.load`` of ``template`` from ``folder``, after `checkpoint_folder.verify`."""
    from megatron.core import dist_checkpointing

    checkpoint_folder.verify(folder, require_manifest=require_manifest)
    return dist_checkpointing.load(template, str(folder))


def load_common(folder: str | Path, *, require_manifest: bool = True) -> dict[str, Any]:
    """The checkpoint's common values (``common.pt``), after `checkpoint_folder.verify`."""
    from megatron.core import dist_checkpointing

    checkpoint_folder.verify(folder, require_manifest=require_manifest)
    return dist_checkpointing.load_common_state_dict(str(folder))


def saved_tensors(folder: str | Path, *, require_manifest: bool = True) -> dict[str, Any]:
    """Global key → a ``ShardedTensor`` describing the saved tensor (global shape, dtype; no data)."""
    from megatron.core import dist_checkpointing

    checkpoint_folder.verify(folder, require_manifest=require_manifest)
    return dist_checkpointing.load_tensors_metadata(str(folder))


def tensors_only(state: dict[str, Any]) -> dict[str, Any]:
    """A sharded state dict without its ``ShardedObject`` s (per-layer ``_extra_state``: TE's FP8 scaling
    history, None in the local spec): the weights alone, as stages hand them on. Nested dicts (the
    chunks of `model_state`) are filtered alike."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {name: tensors_only(value) if isinstance(value, dict) else value
            for name, value in state.items() if not isinstance(value, ShardedObject)}


def model_chunks(model: nn.Module | list[nn.Module]) -> list[nn.Module]:
    """The model chunks of this rank: a list of them (interleaved pipeline), or a lone model as one."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def model_state(model: nn.Module | list[nn.Module]) -> dict[str, Any]:
    """`sharded_state_dict` of a model, or of each chunk under ``chunk<i>`` when there are several.

    The chunks of an interleaved pipeline number their layers from 0 each (``decoder.layers.0`` is in
    every chunk), so their state dicts cannot be merged flat; the global keys inside (which the checkpoint
    stores) are distinct. One chunk keeps the flat form, so layouts without a virtual pipeline are as before.
    """
    chunks = model_chunks(model)
    if len(chunks) == 1:
        return sharded_state_dict(chunks[0])
    return {f"chunk{index}": sharded_state_dict(chunk) for index, chunk in enumerate(chunks)}


def load_model_state(model: nn.Module | list[nn.Module], state: dict[str, Any], strict: bool = True) -> None:
    """``load_state_dict`` of what `model_state` described, chunk by chunk."""
    chunks = model_chunks(model)
    if len(chunks) == 1:
        chunks[0].load_state_dict(state, strict=strict)
        return
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"chunk{index}"], strict=strict)


def read_full_tensors(folder: str | Path) -> dict[str, Any]:
    """Every tensor of a checkpoint, whole, keyed by its global key, in any process (no process group).

    Read with torch DCP's own reader, which is what ``torch_dist`` is underneath: for tests, tools and
    small models (it holds the whole model). Layers are stacked along a leading axis, as Megatron saves them.
    """
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = checkpoint_folder.verify(folder, require_manifest=False).state_dict_metadata
    reader = dcp.FileSystemReader(str(folder))
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in stored.items() if isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # intended: one process
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state
