"""What every data source shares: the item it yields, bad-input accounting, media checks, sharding.

A data source (a ``data_source`` component: ``webdataset``, ``jsonl``, ``synthetic``) is an iterable of
`LoadedSample`: a parsed `keye.data.sample.Sample` plus the bytes of every image and video it references,
keyed by the reference's name (``ref.key`` for a shard member, else ``ref.path`` as written). Resolving media
in the source keeps the processor free of I/O and lets the source check the media where it can still skip
the sample cheaply.

Bad input (DESIGN "Data flow"). Real data is never clean: a shard cut short by a failed copy, a JSON member
that is not JSON, an image that will not decode, an MP4 without its index. Each such sample is skipped,
counted by kind in a `BadInputCounter` and logged with its key and where it came from. The run fails, with
one line naming the counts, only when the bad share exceeds ``max_bad_fraction`` (over-budget samples are
counted and reported apart and never count toward it: they are usable input that does not fit the stage's
budgets): checked whenever a sample is skipped once `MIN_SEEN_BEFORE_FAILING` samples have been seen (so an
early streak in a large data set does not stop a run at the first bad file), and always at the end of a
pass. Each data-loader worker counts its own share. Media a source reads from disk go through `read_media_file`: paths that leave the data set's root and
files that are not regular files (devices, FIFOs, sockets) are skipped as ``refused_media``, never read.

Sharding. `DataSource` subclasses implement `DataSource._records` for one *slot*: data-parallel rank
``r`` of ``R`` and data-loader worker ``w`` of ``W`` read item ``i`` (a shard, a line, an index) when
``i % R == r`` and ``(i // R) % W == w``. Ranks are split first, so every rank gets work as soon as there are
at least ``R`` items, and the slots are disjoint and cover everything. The rank comes from the constructor
(``rank``, ``world_size``), else from ``ctx`` (a `keye.model.protocols.BuildContext` whose ``parallel`` is a
`keye.parallel.ParallelContext`, or a ParallelContext itself: its *data-parallel* rank, so tensor- and
pipeline-parallel peers read the same data), else rank 0 of 1.
"""

from __future__ import annotations

import io
import logging
import os
import random
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

import torch
from PIL import Image

from keye.config import doc
from keye.data.sample import (
    ConversationSample,
    ImageRef,
    PairSample,
    PreferenceSample,
    RLPromptSample,
    Sample,
    VideoRef,
)
from keye.data.vision import MAX_RATIO
from keye.errors import KeyeUserError

logger = logging.getLogger("keye.data")

#: kinds of bad input, in the order reports list them
BAD_KINDS = (
    "truncated_member",  # a tar member cut short (the shard ends inside it)
    "invalid_json",  # a JSON member or JSONL line that does not parse
    "invalid_sample",  # valid JSON that does not match the sample schema (keye.data.sample)
    "missing_media",  # a referenced image/video that is not in the shard or on disk
    "corrupt_image",  # image bytes that do not decode
    "unreadable_video",  # video bytes without a decodable video stream
    "over_budget",  # media too large (bytes) or too elongated to resize into the token budget
    "refused_media",  # a media path outside the data set's root, or not a regular file (device, FIFO, socket)
    "empty_reply",  # a preference pair whose chosen or rejected reply has no text
    "identical_replies",  # a preference pair whose chosen and rejected replies are the same text
    "no_assistant_turn",  # a conversation with no assistant reply: nothing to train on
)
#: kinds counted and reported but not toward ``max_bad_fraction`` (see `BadInputCounter.corrupt`)
NOT_CORRUPT = ("over_budget",)
MIN_SEEN_BEFORE_FAILING = 100


class BadInputError(KeyeUserError):
    """Too large a share of a source's input was bad; the message is one line with the counts."""


@dataclass
class LoadedSample:
    """A sample with its media bytes, by reference name; ``origin`` says where it was read (logs)."""

    sample: Sample
    media: dict[str, bytes] = field(default_factory=dict)
    origin: str | None = None


@dataclass
class Skipped:
    """What `DataSource._records` yields for an item it could not load."""

    kind: str
    key: str
    reason: str


class BadInputCounter:
    """Counts good and skipped samples of one source, logs each skip, and fails past ``max_bad_fraction``."""

    def __init__(self, source: str, max_bad_fraction: float, min_seen: int = MIN_SEEN_BEFORE_FAILING) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise KeyeUserError(f"data source '{source}': max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.source = source
        self.max_bad_fraction = max_bad_fraction
        self.min_seen = min_seen
        self.good = 0
        self.counts: dict[str, int] = {}

    @property
    def bad(self) -> int:
        """Every skipped sample, over-budget ones included."""
        return sum(self.counts.values())

    @property
    def corrupt(self) -> int:
        """Skipped samples that count toward ``max_bad_fraction``: all but `NOT_CORRUPT` (usable input that does
        not fit the stage's budgets is a data-selection choice, not broken data, so it never stops a run)."""
        return sum(count for kind, count in self.counts.items() if kind not in NOT_CORRUPT)

    @property
    def seen(self) -> int:
        return self.good + self.bad

    def ok(self) -> None:
        self.good += 1

    def skip(self, kind: str, key: str, reason: str) -> None:
        """Count one skipped sample and log it; raises `BadInputError` if the share is now too high."""
        if kind not in BAD_KINDS:
            raise ValueError(f"unknown bad-input kind {kind!r}; known: {', '.join(BAD_KINDS)}")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        logger.warning("data source '%s': skipped %r (%s): %s", self.source, key, kind, reason)
        if self.seen >= self.min_seen:
            self.check()

    def check(self) -> None:
        """Raise `BadInputError` when more than ``max_bad_fraction`` of the samples seen were bad."""
        if self.seen and self.corrupt / self.seen > self.max_bad_fraction:
            raise BadInputError(
                f"data source '{self.source}': {self.corrupt} of {self.seen} samples were bad "
                f"({self.corrupt / self.seen:.1%} > max_bad_fraction {self.max_bad_fraction:.1%}): {self.summary()}; "
                "the warnings above name each one"
            )

    def summary(self) -> str:
        parts = [f"{kind} {self.counts[kind]}" for kind in BAD_KINDS if self.counts.get(kind)]
        return ", ".join(parts) or "none bad"


# --- media ---------------------------------------------------------------------------------------------


def media_refs(sample: Sample) -> list[ImageRef | VideoRef]:
    """Every image and video reference of a sample, in reading order."""
    if isinstance(sample, PairSample):
        return [sample.image]
    if isinstance(sample, (ConversationSample, RLPromptSample)):
        messages = sample.messages
    elif isinstance(sample, PreferenceSample):
        messages = [*sample.prompt, sample.chosen, sample.rejected]
    else:
        return []
    refs: list[ImageRef | VideoRef] = []
    for message in messages:
        for part in message.content:
            ref = getattr(part, "image", None) or getattr(part, "video", None)
            if ref is not None:
                refs.append(ref)
    return refs


def media_name(ref: ImageRef | VideoRef) -> str:
    """The name a reference's bytes go by in `LoadedSample.media`."""
    return ref.key if ref.key is not None else ref.path  # type: ignore[return-value]


class MediaRefused(Exception):
    """A media file that `read_media_file` will not read; ``kind`` is a `BAD_KINDS` entry."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


_FILE_TYPES = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def special_file_kind(mode: int) -> str | None:
    """What a file of this ``st_mode`` is ("a FIFO", ...) when it is not a regular file, else None."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _FILE_TYPES if test(mode)), "not a plain file")


def read_media_file(path: str, root: Path, max_bytes: int) -> bytes:
    """The bytes of the media file ``path`` names (relative paths from ``root``), read safely.

    A data set's media paths are data, so a JSONL line must not read the machine: the path is resolved
    (symlinks and ``..`` followed) *before* it is checked to lie inside ``root``, which is resolved too;
    the file must be a regular file (``/dev/zero`` never ends, a FIFO without a writer blocks ``open``
    forever, a socket or device is never an image); and at most ``max_bytes`` are read, so a file that
    grows while it is read cannot take memory either. The type is checked with ``stat`` before opening (opening
    some devices has side effects) and again on the open descriptor, which is opened non-blocking (a file swapped
    for a FIFO in between cannot block).

    Raises `MediaRefused`: ``refused_media`` (outside ``root``, not a regular file), ``over_budget``
    (more than ``max_bytes``) or ``missing_media`` (not there, unreadable).
    """
    root = Path(root).resolve()
    try:
        target = (root / path).resolve()  # an absolute `path` replaces root here
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise MediaRefused("missing_media", f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not target.is_relative_to(root):  # before any stat: whether a file outside exists is not for data to probe
        raise MediaRefused("refused_media", f"{path!r} resolves to {target}, outside the media root {root}")
    try:
        kind = special_file_kind(os.stat(target).st_mode)
        if kind is not None:
            raise MediaRefused("refused_media", f"{target} is not a regular file ({kind})")
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as handle:
            kind = special_file_kind(os.fstat(fd).st_mode)
            if kind is not None:
                raise MediaRefused("refused_media", f"{target} is not a regular file ({kind})")
            data = handle.read(max_bytes + 1)
    except OSError as e:
        raise MediaRefused("missing_media", f"cannot read {target}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise MediaRefused("over_budget", f"{target} has more than {max_bytes} bytes, over max_media_bytes {max_bytes}")
    return data


def check_image(data: bytes) -> tuple[str, str] | None:
    """``(kind, reason)`` if the bytes are not a usable image, else None. Decodes the pixels fully:
    a PNG or JPEG cut short often opens fine and fails only when read."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
    except Image.DecompressionBombError as e:
        return "over_budget", str(e)
    except Exception as e:  # PIL raises many types for bad bytes
        return "corrupt_image", f"cannot decode image: {e}"
    if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_RATIO:
        return "over_budget", f"image size {width}x{height} cannot be resized into the token budget"
    return None


def check_video(data: bytes) -> tuple[str, str] | None:
    """``(kind, reason)`` if the bytes are not a decodable video (container, video stream, first frame)."""
    import av  # heavy; only sources that meet videos need it

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                return "unreadable_video", "no video stream"
            next(container.decode(video=0))
    except StopIteration:
        return "unreadable_video", "no decodable frame"
    except Exception as e:  # av.error.FFmpegError and friends
        return "unreadable_video", f"cannot decode video: {e}"
    return None


def check_media(loaded: LoadedSample, max_media_bytes: int, decode: bool) -> tuple[str, str] | None:
    """The first problem with a sample's media as ``(kind, reason)``, or None when all are usable."""
    for ref in media_refs(loaded.sample):
        name = media_name(ref)
        data = loaded.media.get(name)
        if data is None:
            return "missing_media", f"{name!r} is not in the sample's media"
        if len(data) > max_media_bytes:
            return "over_budget", f"{name!r} has {len(data)} bytes, over max_media_bytes {max_media_bytes}"
        if decode:
            problem = check_image(data) if isinstance(ref, ImageRef) else check_video(data)
            if problem is not None:
                return problem[0], f"{name!r}: {problem[1]}"
    return None


# --- the base class ----------------------------------------------------------------------------------------


@dataclass
class SourceConfig:
    """Fields every data source has; a source's own ``Config`` subclasses this."""

    max_bad_fraction: float = doc(
        "Largest share of bad samples (corrupt, truncated, unparsable) tolerated before the run stops.", 0.01
    )
    check_media: bool = doc(
        "Decode every image and the first frame of every video before yielding the sample, so broken media "
        "are skipped and counted here rather than failing later in the processor.",
        True,
    )
    max_media_bytes: int = doc(
        "Largest image/video file accepted, in bytes (larger ones are skipped as over_budget).", 1 << 28
    )
    shuffle_buffer: int = doc("Samples held for shuffling (0: read order). Bigger mixes better, costs memory.", 0)
    seed: int = doc("Seed of the shuffle (combined with the pass number and the reader slot).", 0)


def data_parallel_position(ctx: Any, rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process among data-parallel readers (see the module docstring)."""
    if rank is None and world_size is None and ctx is not None:
        parallel = getattr(ctx, "parallel", ctx)
        if parallel is not None and hasattr(parallel, "dp_rank"):
            rank, world_size = parallel.dp_rank, parallel.dp_size
    rank, world_size = (0 if rank is None else rank), (1 if world_size is None else world_size)
    if not 0 <= rank < world_size:
        raise KeyeUserError(f"data-parallel rank {rank} is not in [0, {world_size})")
    return rank, world_size


def shuffled(items: Iterable[Any], buffer: int, rng: random.Random) -> Iterator[Any]:
    """Buffer shuffle (webdataset's): fill ``buffer`` items, then yield a random one for each new item."""
    pool: list[Any] = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        i = rng.randrange(len(pool))
        pool[i], item = item, pool[i]
        yield item
    rng.shuffle(pool)
    yield from pool


class DataSource(torch.utils.data.IterableDataset):
    """Base of the built-in sources: slots, media checks, bad-input counting, shuffling.

    Subclasses set ``name`` and implement `_records`, which yields `LoadedSample` or `Skipped` items for
    one reader slot. Iterating a source again starts a new pass (with a new shuffle order). Data-loader
    workers iterate *copies*, so their pass count does not come back to the main process: call `set_epoch`
    before each epoch there, as with torch's ``DistributedSampler``, or every epoch shuffles alike.
    """

    name: ClassVar[str] = "data_source"

    def __init__(
        self, config: SourceConfig, ctx: Any = None, *, rank: int | None = None, world_size: int | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.rank, self.world_size = data_parallel_position(ctx, rank, world_size)
        self.bad_inputs = BadInputCounter(self.name, config.max_bad_fraction)
        self._passes = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass number ``epoch`` (it seeds that pass's shuffle order)."""
        self._passes = epoch

    def reader_slot(self) -> tuple[int, int, int, int]:
        """``(rank, world_size, worker, num_workers)`` of the calling process and data-loader worker."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank, self.world_size, worker, workers

    @staticmethod
    def mine(index: int, slot: tuple[int, int, int, int]) -> bool:
        """Whether item ``index`` belongs to ``slot``: ranks split first, then workers."""
        rank, world, worker, workers = slot
        return index % world == rank and (index // world) % workers == worker

    def _records(self, slot: tuple[int, int, int, int], rng: random.Random | None) -> Iterator[LoadedSample | Skipped]:
        """Items of ``slot`` for one pass; ``rng`` is the pass's shuffle generator (None: keep the order)."""
        raise NotImplementedError

    def _checked(self, slot: tuple[int, int, int, int], rng: random.Random | None) -> Iterator[LoadedSample]:
        for record in self._records(slot, rng):
            if isinstance(record, Skipped):
                self.bad_inputs.skip(record.kind, record.key, record.reason)
                continue
            problem = check_media(record, self.config.max_media_bytes, self.config.check_media)
            if problem is not None:
                where = f" in {record.origin}" if record.origin else ""
                self.bad_inputs.skip(problem[0], record.sample.key, problem[1] + where)
                continue
            self.bad_inputs.ok()
            yield record
        self.bad_inputs.check()

    def __iter__(self) -> Iterator[LoadedSample]:
        slot = self.reader_slot()
        rng = random.Random(f"{self.config.seed}:{self._passes}:{slot}") if self.config.shuffle_buffer > 0 else None
        records = self._checked(slot, rng)
        if rng is not None:
            records = shuffled(records, self.config.shuffle_buffer, rng)
        self._passes += 1
        return records
