"""The files of a released Keye-VL checkpoint directory: config.json and the safetensors weights.

Weights are one ``model.safetensors``, or shards listed in ``model.safetensors.index.json``. Everything a
user can get wrong here (no directory, no config.json, bad JSON, a shard the index lists but the folder
lacks) is a one-line ``KeyeUserError`` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from keye.errors import KeyeUserError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_config(path: str | Path) -> dict:
    """config.json of a checkpoint directory, parsed; one-line errors for a missing dir or bad JSON."""
    file = Path(path) / "config.json"
    if not file.is_file():
        what = "no config.json (not a Hugging Face Keye-VL checkpoint)" if file.parent.is_dir() else "not a directory"
        raise KeyeUserError(f"{file.parent}: {what}")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise KeyeUserError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise KeyeUserError(f"{file}: expected a JSON object")
    return cfg


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those the index lists, or the single ``model.safetensors``."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise KeyeUserError(f"{index}: not a safetensors index ({exc})") from None
        files = [path / name for name in names]
    else:
        files = [path / WEIGHTS_NAME] if (path / WEIGHTS_NAME).is_file() else sorted(path.glob("*.safetensors"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise KeyeUserError(f"{path}: weight file missing: {missing[0] if missing else WEIGHTS_NAME}")
    return files


def read_weights(path: Path) -> dict[str, Tensor]:
    """Every tensor of the checkpoint's safetensors files, by name."""
    from safetensors.torch import load_file

    return {name: tensor for file in weight_files(path) for name, tensor in load_file(str(file)).items()}


def write_weights(tensors: dict[str, Tensor], path: Path, max_shard_bytes: int | None = None) -> list[str]:
    """One ``model.safetensors``, or shards plus ``model.safetensors.index.json`` past ``max_shard_bytes``."""
    from safetensors.torch import save_file

    shards: list[dict[str, Tensor]] = [{}]
    size = total = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size, total = size + nbytes, total + nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        return [WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(path / name), metadata={"format": "pt"})
    weight_map = {tensor: name for name, shard in zip(names, shards) for tensor in shard}
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names
