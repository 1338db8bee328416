"""Media paths in a data set are data, not a way to read the machine: real special files, a real FIFO,
symlinks and ``..`` paths, read through the ``jsonl`` source as a user's JSONL file would name them.

Each refused sample is skipped and counted as ``refused_media`` with a reason naming the file; nothing hangs
(a FIFO without a writer would block a plain ``open``) and nothing grows without bound (``/dev/zero``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from keye.data.sources import MediaRefused, read_media_file
from keye.data.synthetic_images import png_bytes
from keye_plugins.data_source.jsonl import JsonlSource

PNG = png_bytes(Image.new("RGB", (28, 28)))


def _jsonl(folder: Path, paths: list[str]) -> Path:
    """One pair sample per media path, keys s0, s1, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"kind": "pair", "key": f"s{i}", "caption": "x", "image": {"path": p}}) for i, p in enumerate(paths)]
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _read(path: Path, **config) -> tuple[list[str], JsonlSource]:
    source = JsonlSource(JsonlSource.Config(path=str(path), max_bad_fraction=1.0, **config))
    return [item.sample.key for item in source], source


@pytest.fixture
def outside(tmp_path) -> Path:
    """A real image outside the data set's folder."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.png").write_bytes(PNG)
    return tmp_path / "elsewhere" / "secret.png"


def test_paths_leaving_the_data_folder_are_refused(tmp_path, outside, caplog):
    data = tmp_path / "data"
    (data / "media").mkdir(parents=True)
    (data / "media" / "ok.png").write_bytes(PNG)
    (data / "media" / "link.png").symlink_to(outside)  # a symlink inside that points outside
    path = _jsonl(data, ["media/ok.png", "../elsewhere/secret.png", str(outside), "media/link.png",
                         str(data / "media" / "ok.png"), "media/../media/ok.png"])
    with caplog.at_level(logging.WARNING, logger="keye.data"):
        keys, source = _read(path)
    assert keys == ["s0", "s4", "s5"]  # inside the folder, absolute or with a harmless '..', is fine
    assert source.bad_inputs.counts == {"refused_media": 3}
    assert f"skipped 's1' (refused_media): {path}:2: '../elsewhere/secret.png' resolves to {outside}, " in caplog.text
    assert f"outside the media root {data}" in caplog.text
    assert "'media/link.png' resolves to" in caplog.text


def test_media_root_names_another_folder(tmp_path, outside):
    path = _jsonl(tmp_path / "lists", ["secret.png", str(outside), "../data/other.png"])
    keys, source = _read(path, media_root=str(outside.parent))
    assert keys == ["s0", "s1"]  # relative paths are read from media_root, absolute ones must be inside it
    assert source.bad_inputs.counts == {"refused_media": 1}


@pytest.mark.timeout(30)
def test_a_fifo_is_refused_without_blocking(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.mkfifo(data / "pipe.png")  # no writer: a plain open() would wait forever
    keys, source = _read(_jsonl(data, ["pipe.png"]))
    assert keys == [] and source.bad_inputs.counts == {"refused_media": 1}
    with pytest.raises(MediaRefused, match=r"pipe.png is not a regular file \(a FIFO\)"):
        read_media_file("pipe.png", data, 1 << 20)


@pytest.mark.timeout(30)
def test_devices_are_refused_even_where_the_root_allows_them(tmp_path):
    """``media_root: /`` lets paths go anywhere, yet ``/dev/zero`` (endless) and ``/dev/null`` are no images."""
    keys, source = _read(_jsonl(tmp_path, ["/dev/zero", "/dev/null"]), media_root="/")
    assert keys == [] and source.bad_inputs.counts == {"refused_media": 2}
    with pytest.raises(MediaRefused, match=r"/dev/zero is not a regular file \(a character device\)"):
        read_media_file("/dev/zero", Path("/"), 1 << 20)


def test_reads_stop_at_max_media_bytes(tmp_path):
    (tmp_path / "big.png").write_bytes(PNG + bytes(4096))
    with pytest.raises(MediaRefused) as refused:
        read_media_file("big.png", tmp_path, 1024)
    assert refused.value.kind == "over_budget" and "over max_media_bytes 1024" in str(refused.value)
    assert read_media_file("big.png", tmp_path, 1 << 20) == PNG + bytes(4096)
    keys, source = _read(_jsonl(tmp_path, ["big.png"]), max_media_bytes=1024)
    assert keys == [] and source.bad_inputs.counts == {"over_budget": 1}


def test_missing_files_stay_missing_media(tmp_path):
    keys, source = _read(_jsonl(tmp_path, ["nothing.png"]))
    assert keys == [] and source.bad_inputs.counts == {"missing_media": 1}
