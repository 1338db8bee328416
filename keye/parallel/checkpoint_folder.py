"""A checkpoint folder you can trust: published whole, verified before anything reads it.

Every Megatron-Core distributed checkpoint keye writes (training checkpoints, a stage's ``weights/``, a
merge's result) is written into a temporary folder beside its target (``.<name>.partial``), then
:func:`publish` adds ``manifest.json`` (every file's size and SHA-256), fsyncs the files and the folder,
and renames it into place. A reader therefore sees a complete checkpoint or none: a kill, a full disk
or a crash while writing leaves at most a ``.partial`` folder, which the next save removes.

Reading a checkpoint folder is where a crafted one could run code: torch DCP reads ``.metadata`` with
``pickle``, its byte entries (RNG states, the data position) with ``torch.load(weights_only=False)``,
and Megatron reads ``common.pt`` with ``torch.load``. :func:`verify` runs before any of them and refuses,
in one line naming the file, anything that is not plain data:

- ``.metadata`` is unpickled by :class:`_MetadataUnpickler`, which resolves only torch DCP's metadata
  classes, dtypes, ``torch.Size`` and ``pathlib`` paths; any other global (``os.system``, ``eval``, a
  class of some package) is refused before it is looked up;
- every byte entry and ``common.pt`` must load with ``torch.load(weights_only=True)`` (tensors and
  Python containers only);
- with a manifest, every file must have its recorded size and checksum (a truncated or corrupted file is
  named); the shard files ``.metadata`` points at must exist.

Only then do Megatron's loaders read the same bytes. Checkpoints written by ``keye-launch convert`` have
no manifest (``require_manifest=False`` skips that part; the safety checks still run).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from keye.errors import KeyeUserError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "keye-checkpoint-manifest/1"
PARTIAL_SUFFIX = ".partial"
_CHUNK = 1 << 20


class CheckpointError(KeyeUserError):
    """A checkpoint folder that is incomplete, corrupted or unsafe to read; the message names the file."""


class CheckpointWriteError(KeyeUserError):
    """Writing a checkpoint failed for a reason the user can fix (a full disk); the previous one is intact."""


# --- writing ---------------------------------------------------------------------------------------------


def partial_folder(folder: Path) -> Path:
    """Where ``folder`` is written before it is published: beside it, on the same file system."""
    return folder.parent / f".{folder.name}{PARTIAL_SUFFIX}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_text_atomically(path: Path, text: str) -> None:
    """``path`` holds the old text or the new one, never a part: a temp file, fsync, ``os.replace``."""
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    _fsync(path.parent)


def publish(partial: Path, folder: Path) -> None:
    """Write ``partial``'s manifest, make it durable, and rename it to ``folder`` (replacing an older one).

    Called on one rank after every rank finished writing. A folder being replaced (a stage's weights
    written again) is first moved aside, so a kill in between leaves the new folder or the old one.
    """
    files = sorted(p for p in partial.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": MANIFEST_FORMAT,
                "files": {str(p.relative_to(partial)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
    for path in files:
        _fsync(path)
    write_text_atomically(partial / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    hook("before-rename", folder)
    if folder.exists():
        aside = folder.parent / f".{folder.name}.old"
        shutil.rmtree(aside, ignore_errors=True)
        folder.rename(aside)
        partial.rename(folder)
        shutil.rmtree(aside)
    else:
        partial.rename(folder)
    _fsync(folder.parent)


def out_of_space(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of room: ENOSPC/EFBIG anywhere in the exception's chain, or torch's
    zip writer (which drops errno: "unexpected pos 704 vs 598") failing while the file system is full
    or a file written reached the process's RLIMIT_FSIZE."""
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EFBIG):
            return True
        text = str(current)
        if "No space left on device" in text or "File too large" in text:
            return True
        failures = getattr(current, "failures", None)  # torch DCP's CheckpointException: rank → (exception, trace)
        for failure in failures.values() if isinstance(failures, dict) else []:
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
        todo.extend([current.__cause__, current.__context__])
    try:
        stats = os.statvfs(folder if folder.exists() else folder.parent)
        written = [p.stat().st_size for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    except OSError:
        return False
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]  # a process limit gives EFBIG, equally dropped
    at_limit = limit != resource.RLIM_INFINITY and any(size >= limit - _CHUNK for size in written)
    return at_limit or stats.f_bavail * stats.f_frsize < _CHUNK


_hook_counts: Counter = Counter()


def hook(moment: str, folder: Path) -> None:
    """Test hook for the fault-injection suite (``tools/fault_inject.py``), inert unless asked for.

    With ``KEYE_FAULT_KILL_AT=<moment>[:N][@TEXT]`` this process SIGKILLs itself the N-th time (default:
    the first) a checkpoint write reaches ``moment`` (``shards-written``: every rank wrote its shards,
    nothing published; ``before-rename``: the manifest is written, the folder not yet renamed), counting
    only writes to folders whose path contains TEXT, so instants a few milliseconds long are hit every
    time. Only rank ``KEYE_FAULT_KILL_RANK`` (default 0) does; it first creates the file
    ``KEYE_FAULT_FIRED`` names, if set, so the suite knows to kill the other ranks.
    """
    wanted, _, text = os.environ.get("KEYE_FAULT_KILL_AT", "").partition("@")
    point, _, count = wanted.partition(":")
    if point != moment or text not in str(folder):
        return
    if os.environ.get("RANK", "0") != os.environ.get("KEYE_FAULT_KILL_RANK", "0"):
        return
    _hook_counts[moment] += 1
    if _hook_counts[moment] == int(count or 1):
        import signal

        if os.environ.get("KEYE_FAULT_FIRED"):
            Path(os.environ["KEYE_FAULT_FIRED"]).touch()
        os.kill(os.getpid(), signal.SIGKILL)


# --- reading -----------------------------------------------------------------------------------------------

#: The globals a torch DCP ``.metadata`` pickle may name (torch 2.x), and nothing else. Megatron-Core's own
#: torch_dist writer (used when psutil is installed) also stores every rank's ``SavePlan`` in it
#: (``Metadata.all_local_plans``: write items and their tensor data), plain torch dataclasses.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {
        "LoadItemType", "WriteItemType", "SavePlan", "WriteItem", "TensorWriteData", "BytesIOWriteData",
    },
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "complex", "slice"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch DCP metadata and refuses every other global before importing it."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and not name.startswith("_"):
            import torch

            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise pickle.UnpicklingError(f"it names '{module}.{name}', which is not checkpoint metadata")


def read_metadata(folder: Path) -> Any:
    """torch DCP's ``Metadata`` of a checkpoint folder, unpickled with only its own classes allowed."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = folder / ".metadata"
    try:
        with open(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete distributed checkpoint)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise CheckpointError(f"{path}: refused to load: {exc or type(exc).__name__} (only torch checkpoint "
                              "metadata is read, never arbitrary pickled objects)") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: refused to load: holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


def _plain_data(blob: bytes, where: str) -> None:
    """``blob`` (a ``torch.save`` payload) must load as tensors and Python containers only."""
    import torch

    try:
        torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means: not plain data, so it is never unpickled
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{where}: refused to load: not plain tensors and containers ({reason[:200]})") from None


def _check_manifest(folder: Path) -> None:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"] if manifest.get("format") == MANIFEST_FORMAT else None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not published completely, or written by a keye without "
                              "checkpoint manifests: run that stage again)") from None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        files = None
    if not isinstance(files, dict):
        raise CheckpointError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    for name, expected in files.items():
        file = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{path}: names a file outside the checkpoint ({name})")
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != expected.get("size"):
            raise CheckpointError(f"{file}: {size} bytes, {expected.get('size')} when written (truncated or replaced)")
        if _sha256(file) != expected.get("sha256"):
            raise CheckpointError(f"{file}: checksum differs from the one written (corrupted)")


#: Folders verified in this process, by their files' names, sizes and mtimes (one load reads a folder
#: more than once: its tensor list, its common values, its tensors).
_verified: dict[tuple, Any] = {}


def verify(folder: str | Path, *, require_manifest: bool = False) -> Any:
    """Check a checkpoint folder is complete, intact and plain data (see the module docstring); returns
    its DCP ``Metadata``. Raises :class:`CheckpointError` naming the first file that fails. The manifest
    is checked whenever there is one; ``require_manifest`` makes its absence an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    key = (str(folder.resolve()), require_manifest, tuple(files))
    if key not in _verified:
        if len(_verified) > 64:
            _verified.clear()
        _verified[key] = _verify(folder, require_manifest)
    return _verified[key]


def _verify(folder: Path, require_manifest: bool) -> Any:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    if require_manifest or (folder / MANIFEST).exists():
        _check_manifest(folder)
    backend = folder / "metadata.json"
    try:
        config = json.loads(backend.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{backend}: missing (not a complete distributed checkpoint)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{backend}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or (config.get("sharded_backend"), config.get("common_backend")) != ("torch_dist", "torch"):
        raise CheckpointError(f"{backend}: not a torch_dist checkpoint (only that format is read)")
    metadata = read_metadata(folder)
    shards: dict[str, bytes] = {}
    for index, info in metadata.storage_data.items():
        shard = folder / info.relative_path
        if Path(info.relative_path).name != info.relative_path or not shard.is_file():
            raise CheckpointError(f"{folder / '.metadata'}: names shard '{info.relative_path}', which is missing")
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            if info.relative_path not in shards:
                shards[info.relative_path] = shard.read_bytes()
            blob = shards[info.relative_path][info.offset:info.offset + info.length]
            _plain_data(blob, f"{shard} (entry '{index.fqn}')")
    common = folder / "common.pt"
    if common.exists():
        _plain_data(common.read_bytes(), str(common))
    return metadata
