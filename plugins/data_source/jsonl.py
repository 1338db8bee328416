"""``jsonl``: samples from a JSON Lines file, one sample dict (`keye.data.sample`) per line.

The simplest way to bring data: ``{"kind": "conversation", ..., "image": {"path": "images/0001.png"}}`` per
line, with media paths relative to the JSONL file. Media are read from disk when
the sample is read, so a missing or broken file is skipped and counted here like a bad line: a line that is
not JSON is ``invalid_json`` (logged as ``file:line``), a sample that breaks the schema ``invalid_sample``,
a file that is not there (or a URL: nothing is downloaded) ``missing_media``.

Media paths are data, not a way to read the machine: every path must resolve (symlinks and ``..``
followed) to a regular file inside the *media root*, the JSONL file's folder unless ``media_root`` names
another (``media_root: /`` allows any path, on purpose). Absolute paths are fine when they lie inside it.
A path outside, or a device, FIFO or socket, is skipped and counted as ``refused_media``; reads stop at
``max_media_bytes`` (`keye.data.sources.read_media_file`).

Lines are split across data-parallel ranks and loader workers by line number (`keye.data.sources`); every
reader scans the file, which is cheap next to decoding its media. Blank lines are ignored.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import MISSING

from keye import hookimpl
from keye.config import doc
from keye.data.sample import BadSampleError, Sample
from keye.data.sources import (
    DataSource,
    LoadedSample,
    MediaRefused,
    Skipped,
    SourceConfig,
    media_name,
    media_refs,
    read_media_file,
)
from keye.errors import KeyeUserError


class JsonlSource(DataSource):
    """Reads a JSONL file of samples and the media files they name; see the module docstring."""

    name = "jsonl"

    @dataclass
    class Config(SourceConfig):
        path: str = doc("JSONL file: one sample per line; media paths are relative to this file.", MISSING)
        media_root: Optional[str] = doc(
            "Folder that media paths are read from (relative paths) and must stay inside after symlinks and '..' "
            "are resolved (absolute paths too); null: the JSONL file's folder. '/' allows any path.",
            None,
        )

    def __init__(
        self, config: Config, ctx: Any = None, *, rank: int | None = None, world_size: int | None = None
    ) -> None:
        super().__init__(config, ctx, rank=rank, world_size=world_size)
        if config.path == MISSING or not config.path:
            raise KeyeUserError("data source 'jsonl': 'path' is required")
        self.path = Path(config.path)
        if not self.path.is_file():
            raise KeyeUserError(f"data source 'jsonl': file not found: {self.path}")
        self.media_root = Path(config.media_root) if config.media_root else self.path.parent
        if not self.media_root.is_dir():
            raise KeyeUserError(f"data source 'jsonl': media_root is not a folder: {self.media_root}")

    def _records(self, slot: tuple[int, int, int, int], rng: random.Random | None) -> Iterator[LoadedSample | Skipped]:
        with self.path.open("rb") as lines:
            for index, line in enumerate(lines):
                if not self.mine(index, slot) or not line.strip():
                    continue
                where = f"{self.path}:{index + 1}"
                try:
                    raw = json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    yield Skipped("invalid_json", where, f"line is not JSON: {e}")
                    continue
                try:
                    sample = Sample.from_dict(raw)
                except BadSampleError as e:
                    yield Skipped("invalid_sample", where, str(e))
                    continue
                yield self._with_media(sample, where)

    def _with_media(self, sample: Sample, where: str) -> LoadedSample | Skipped:
        media: dict[str, bytes] = {}
        for ref in media_refs(sample):
            name = media_name(ref)
            if ref.path is None:
                reason = f"{where}: {name!r} names a shard member; a JSONL sample needs a path"
                return Skipped("missing_media", sample.key, reason)
            if "://" in ref.path:
                reason = f"{where}: {ref.path!r} is a URL; the jsonl source reads local files only"
                return Skipped("missing_media", sample.key, reason)
            try:
                media[name] = read_media_file(ref.path, self.media_root, self.config.max_media_bytes)
            except MediaRefused as e:
                return Skipped(e.kind, sample.key, f"{where}: {e}")
        return LoadedSample(sample, media, origin=where)


@hookimpl
def keye_register_data_sources(register):
    register("jsonl", JsonlSource)
