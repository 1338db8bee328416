"""``webdataset``: samples from webdataset tar shards, split across data-parallel ranks and loader workers.

A shard groups members by key, webdataset's way (``<key>.json``, ``<key>.png``, ``<key>.mp4``): the ``json``
member is the sample dict of `keye.data.sample`, and a media reference ``{"key": "<key>.png"}`` names a member
of the same group (a bare extension, ``{"key": "png"}``, works too). A group without ``json`` but with an image
and a ``txt``/``caption`` member, the common image-text layout, becomes a pair sample.

Shards are local files only: paths, brace patterns (``data/train-{000000..000009}.tar``), several joined
by ``::``, and ``file:`` URLs. A blueprint is data, never code, and webdataset's ``gopen`` runs a shell for
``pipe:`` URLs and ``curl``/``gsutil``/``ais``/``hf`` subprocesses for its other schemes (and rewrites any URL
by the ``GOPEN_REWRITE`` environment variable), so every scheme is refused when the blueprint is validated
(`WebDatasetSource.check_config`) and again when the source is built, and shards are opened here with
``open()``, never through ``gopen``. Remote data is mounted or copied first. Special files (a FIFO, a
device) are refused as well: a shard must be a regular file.

The tar stream is read here rather than through ``wds.WebDataset``: its
error handlers are not told which member failed, and a member cut short would yield the rest of its sample
without the image. Here the whole sample is dropped and counted as ``truncated_member`` under its key (the
stream cannot continue past the cut, so the rest of that shard is lost, and the log says so). JSON that does
not parse is ``invalid_json``, JSON that is not a sample is ``invalid_sample``; the next sample goes on.

Sharding is explicit slicing of the shard list (`keye.data.sources`: ranks first, then workers), which is
what ``split_by_node`` + ``split_by_worker`` do, but deterministic without torch.distributed being up.
There must be at least as many shards as data-parallel ranks; a worker without a shard yields nothing.
With ``shuffle_buffer`` > 0 each pass also visits its shards in a new order.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote

from omegaconf import MISSING

from keye import hookimpl
from keye.config import doc
from keye.data.sample import BadSampleError, ImageRef, PairSample, Sample
from keye.data.sources import DataSource, LoadedSample, Skipped, SourceConfig, media_name, media_refs
from keye.errors import KeyeUserError

logger = logging.getLogger("keye.data")

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


class WebDatasetSource(DataSource):
    """Reads webdataset shards; see the module docstring."""

    name = "webdataset"

    @dataclass
    class Config(SourceConfig):
        urls: list[str] = doc(
            "Shards: local paths (or file: URLs), each may be a brace pattern such as "
            "'data/train-{000000..000009}.tar'. No other URL scheme: pipe:, http: ... would run programs.",
            MISSING,
        )

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        """Every shard is a local path: no scheme that webdataset would hand to a subprocess or the network."""
        if config.urls == MISSING or not config.urls:
            check.fail("urls", "at least one shard path or brace pattern is needed")
        for index, url in enumerate(config.urls):
            try:
                expand_url(url)
            except KeyeUserError as exc:
                check.fail(f"urls.{index}", str(exc))

    def __init__(
        self, config: Config, ctx: Any = None, *, rank: int | None = None, world_size: int | None = None
    ) -> None:
        super().__init__(config, ctx, rank=rank, world_size=world_size)
        self.shards = expand_shards(config.urls)
        if len(self.shards) < self.world_size:
            raise KeyeUserError(
                f"data source 'webdataset': {len(self.shards)} shard(s) cannot feed {self.world_size} data-parallel "
                "ranks; write at least one shard per rank"
            )

    def _records(self, slot: tuple[int, int, int, int], rng: random.Random | None) -> Iterator[LoadedSample | Skipped]:
        mine = [shard for i, shard in enumerate(self.shards) if self.mine(i, slot)]
        if not mine:
            rank, world, worker, workers = slot
            logger.warning(
                "data source 'webdataset': rank %d worker %d has no shard (%d shards for %d ranks x %d workers)",
                rank, worker, len(self.shards), world, workers,
            )  # fmt: skip
        if rng is not None:
            rng.shuffle(mine)
        for url in mine:
            yield from read_shard(url)


#: Most shards one brace pattern may expand to (a typo such as {0..99999999999} would never finish).
MAX_SHARDS = 1_000_000
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def expand_url(url: str) -> list[str]:
    """One ``urls`` entry as local shard paths: split on ``::``, braces expanded; any URL scheme but
    ``file:`` is refused (KeyeUserError naming it)."""
    from braceexpand import braceexpand

    paths: list[str] = []
    for part in str(url).split("::"):
        for shard in itertools.islice(braceexpand(part), MAX_SHARDS + 1):
            paths.append(local_path(shard))
            if len(paths) > MAX_SHARDS:
                raise KeyeUserError(f"'{url[:80]}' expands to more than {MAX_SHARDS} shards")
    return paths


def local_path(url: str) -> str:
    """The file a shard names; a URL with any scheme but ``file:`` is refused (it would run a program)."""
    scheme = _SCHEME.match(url)
    if scheme is None:
        if not url.strip() or url == "-":
            raise KeyeUserError(f"shard '{url}' is not a file path")
        return url
    if scheme.group(1).lower() != "file":
        raise KeyeUserError(
            f"shard '{url[:80]}': URL scheme '{scheme.group(1)}:' is not allowed (webdataset would run a program "
            "or reach the network for it); shards are local paths or file: URLs"
        )
    rest = url[len(scheme.group(0)) :]
    if rest.startswith("//"):  # file://host/path: only the local host
        host, _, rest = rest[2:].partition("/")
        if host not in ("", "localhost"):
            raise KeyeUserError(f"shard '{url[:80]}': file URLs name this machine only, got host '{host}'")
        rest = "/" + rest
    return unquote(rest)


def expand_shards(urls: list[str]) -> list[str]:
    """The shard list: each entry brace-expanded (webdataset's rules); each must be an existing regular file."""
    if urls == MISSING or not urls:
        raise KeyeUserError("data source 'webdataset': 'urls' is required (shard paths or brace patterns)")
    if isinstance(urls, str):
        urls = [urls]
    try:
        shards = [shard for url in urls for shard in expand_url(url)]
    except KeyeUserError as exc:
        raise KeyeUserError(f"data source 'webdataset': {exc}") from None
    missing = [s for s in shards if not Path(s).exists()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise KeyeUserError(f"data source 'webdataset': shard not found: {', '.join(missing[:3])}{more}")
    special = next((s for s in shards if not Path(s).is_file()), None)  # a folder, a FIFO, a device
    if special is not None:
        raise KeyeUserError(f"data source 'webdataset': shard {special} is not a regular file")
    return shards


def open_shard(path: str):
    """A local shard opened for reading; anything but a regular file is refused (a FIFO would block)."""
    try:
        fd = os.open(local_path(path), os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO does not wait
    except OSError as e:
        raise KeyeUserError(f"data source 'webdataset': cannot open shard {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise KeyeUserError(f"data source 'webdataset': shard {path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_shard(url: str) -> Iterator[LoadedSample | Skipped]:
    """Samples of one shard, in order; a damaged tail ends the shard with one ``truncated_member`` skip."""
    from webdataset.tariterators import base_plus_ext

    with open_shard(url) as stream:
        key: str | None = None
        members: dict[str, bytes] = {}
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
            for info in tar:
                prefix, suffix = base_plus_ext(info.name)
                if not info.isreg() or prefix is None or Path(info.name).name.startswith("__"):
                    continue
                if prefix != key:
                    if key is not None:
                        yield assemble(url, key, members)
                    key, members = prefix, {}
                try:
                    members[suffix.lower()] = tar.extractfile(info).read()
                except _TAR_ERRORS as e:
                    reason = f"{url}: member {info.name} is cut short ({e}); rest of shard lost"
                    yield Skipped("truncated_member", prefix, reason)
                    return
        except _TAR_ERRORS as e:  # a header cut short or garbage: the group being read may be incomplete
            where = f"after {key!r}" if key else "at its start"
            yield Skipped("truncated_member", key or url, f"{url}: shard damaged {where} ({e}); rest of shard lost")
            return
        if key is not None:
            yield assemble(url, key, members)


def assemble(url: str, key: str, members: dict[str, bytes]) -> LoadedSample | Skipped:
    """One group of members (by extension) → a sample with its media, or why it cannot be one."""
    if "json" in members:
        try:
            raw = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return Skipped("invalid_json", key, f"{url}: {key}.json is not JSON: {e}")
        try:
            sample = Sample.from_dict(raw)
        except BadSampleError as e:
            return Skipped("invalid_sample", key, f"{url}: {e}")
    else:
        image = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
        text = members.get("txt", members.get("caption", b"")).decode("utf-8", errors="replace").strip()
        if image is None or not text:
            return Skipped("invalid_sample", key, f"{url}: no .json member, and not an image with a .txt caption")
        sample = PairSample(key, ImageRef(key=f"{key}.{image}"), text)
    media = {f"{key}.{ext}": data for ext, data in members.items() if ext != "json"}
    for ref in media_refs(sample):
        name = media_name(ref)
        if name not in media and ref.key is not None and ref.key.lower() in members:
            media[name] = members[ref.key.lower()]
    return LoadedSample(sample, media, origin=f"{url}:{key}")


@hookimpl
def keye_register_data_sources(register):
    register("webdataset", WebDatasetSource)
