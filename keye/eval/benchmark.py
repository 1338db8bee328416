"""Benchmark files: JSONL (one question a line) and VLMEvalKit-style TSV (base64 images), as `EvalItem`s.

JSONL, one object a line::

    {"id": "q1", "question": "How many circles?", "media": ["img/1.png", {"video": "clips/2.mp4"}],
     "answer": "3", "task": "count", "metric": "exact", "choices": ["2", "3"]}

``question`` and ``answer`` are required; ``task`` defaults to the file's stem, ``metric`` to ``exact``
(`keye.eval.metrics.METRICS`); ``media`` paths are relative to the file's folder and read through
`keye.data.sources.read_media_file`, which refuses anything outside that folder (a benchmark's paths are data);
``choices`` (a list, lettered A, B, …, or a ``{letter: text}`` object) make a multiple-choice question.

TSV (VLMEvalKit's layout): columns ``index``, ``question``, ``answer``, optional ``image`` (base64, one
image), ``A``…``J`` (options: the metric is then ``choice``) and ``category`` (the task).

A file that cannot be read, has an unknown suffix or holds no sample is a `BenchmarkError` (one line naming
it). A bad line or row (not JSON, a missing field, an unknown metric, bad base64) is skipped and counted as a
`BadItem`; so are media that cannot be read, when the item is prepared (`item_messages`).
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keye.errors import KeyeUserError
from keye.eval.metrics import METRICS

LETTERS = string.ascii_uppercase[:10]
MAX_MEDIA_BYTES = 64 << 20


class BenchmarkError(KeyeUserError):
    """A benchmark file that cannot be evaluated at all."""


@dataclass
class EvalItem:
    """One question. ``key`` is ``<file name>:<id>`` (unique in a run); ``media`` holds inline bytes (TSV)."""

    key: str
    file: Path
    task: str
    metric: str
    question: str
    answer: Any
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    choices: dict[str, str] | None = None
    media: dict[str, bytes] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The user text: the question, then the options (VLMEvalKit's wording) when there are any."""
        if not self.choices:
            return self.question
        options = "\n".join(f"{letter}. {text}" for letter, text in self.choices.items())
        return f"{self.question}\nOptions:\n{options}\nAnswer with the option's letter from the given choices directly."


@dataclass
class BadItem:
    key: str
    kind: str
    reason: str

    def line(self) -> str:
        return f"{self.key}: {self.kind}: {self.reason}"


def read_benchmark(path: str | Path) -> tuple[list[EvalItem], list[BadItem]]:
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such benchmark file")
    readers = {".jsonl": _read_jsonl, ".tsv": _read_tsv}
    if path.suffix not in readers:
        raise BenchmarkError(f"{path}: unknown benchmark format {path.suffix!r} (known: .jsonl, .tsv)")
    try:
        items, bad = readers[path.suffix](path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BenchmarkError(f"{path}: cannot read ({exc})") from None
    if not items and not bad:
        raise BenchmarkError(f"{path}: empty benchmark (no samples)")
    return items, bad


def _read_jsonl(path: Path) -> tuple[list[EvalItem], list[BadItem]]:
    items, bad = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key = f"{path.name}:{number}"
        try:
            raw = json.loads(line)
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            key = f"{path.name}:{raw.get('id', number)}"
            items.append(_item(path, key, raw))
        except ValueError as exc:
            bad.append(BadItem(key, "bad_line", str(exc).splitlines()[0]))
    return items, bad


def _item(path: Path, key: str, raw: dict) -> EvalItem:
    for name in ("question", "answer"):
        if raw.get(name) is None:
            raise ValueError(f"missing '{name}'")
    metric = raw.get("metric", "exact")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    images, videos = [], []
    for entry in raw.get("media") or []:
        if isinstance(entry, str):
            images.append(entry)
        elif isinstance(entry, dict) and len(entry) == 1 and set(entry) <= {"image", "video"}:
            (images if "image" in entry else videos).append(str(next(iter(entry.values()))))
        else:
            raise ValueError(f"media entry {entry!r}: a path, {{'image': path}} or {{'video': path}}")
    choices = raw.get("choices")
    if isinstance(choices, list):
        choices = dict(zip(LETTERS, map(str, choices)))
    elif choices is not None and not isinstance(choices, dict):
        raise ValueError("'choices' must be a list or an object")
    return EvalItem(key, path, str(raw.get("task") or path.stem), metric, str(raw["question"]), raw["answer"],
                    images, videos, choices)


def _read_tsv(path: Path) -> tuple[list[EvalItem], list[BadItem]]:
    csv.field_size_limit(sys.maxsize)
    items, bad = [], []
    with path.open(newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.DictReader(handle, delimiter="\t"), 1):
            key = f"{path.name}:{row.get('index') or number}"
            try:
                choices = {letter: row[letter] for letter in LETTERS if (row.get(letter) or "").strip()}
                raw = {"question": row.get("question") or None, "answer": row.get("answer") or None,
                       "task": row.get("category"), "metric": "choice" if choices else "exact",
                       "choices": choices or None}
                item = _item(path, key, raw)
                if (row.get("image") or "").strip():
                    name = f"{key}.png"
                    item.media[name] = base64.b64decode(row["image"], validate=True)
                    item.images.append(name)
                items.append(item)
            except (ValueError, binascii.Error) as exc:
                bad.append(BadItem(key, "bad_line", str(exc).splitlines()[0]))
    return items, bad


def item_media(item: EvalItem) -> dict[str, bytes]:
    """Every media file of ``item`` by its name, read safely from the benchmark's folder (`MediaRefused`
    from `keye.data.sources` if one cannot be)."""
    from keye.data.sources import read_media_file

    media = dict(item.media)
    for name in [*item.images, *item.videos]:
        if name not in media:
            media[name] = read_media_file(name, item.file.parent, MAX_MEDIA_BYTES)
    return media


def item_messages(item: EvalItem) -> list:
    """The question as a one-turn conversation: its images and videos, then the prompt text."""
    from keye.data.sample import ImagePart, ImageRef, Message, TextPart, VideoPart, VideoRef

    parts: list = [ImagePart(ImageRef(path=name)) for name in item.images]
    parts += [VideoPart(VideoRef(path=name)) for name in item.videos]
    parts.append(TextPart(item.prompt))
    return [Message("user", parts)]
