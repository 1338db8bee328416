"""The webdataset source reads local files only: no URL scheme that runs a program or reaches the network.

webdataset's ``gopen`` hands ``pipe:`` URLs to a shell and ``http:``/``gs:``/``ais:``/``hf:`` ... to
``curl``/``gsutil``/``ais`` subprocesses. A blueprint is data, never code: ``validate`` refuses them (one line
naming the key and the file), and so does the source when it is built, should a caller skip validation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from keye.errors import KeyeUserError
from keye.testing import write_blueprint
from keye_plugins.data_source.webdataset import WebDatasetSource, expand_url, open_shard, read_shard

LAUNCH = [sys.executable, "-m", "keye.launch.cli"]
TINY_MODEL = {
    "vision_encoder": {"name": "siglip_navit", "size": "tiny"},
    "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
    "language_model": {"name": "qwen3", "size": "tiny"},
}


def _blueprint(tmp_path: Path, url: str) -> Path:
    return write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "evil", "output_dir": str(tmp_path / "run")},
        "model": TINY_MODEL,
        "stages": [{"name": "s", "kind": "lm", "train": ["projector"], "steps": 1,
                    "data": {"sources": {"evil": {"name": "webdataset", "urls": [url]}}}}],
    })


def test_a_pipe_url_is_refused_by_validate_and_run_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    path = _blueprint(tmp_path, f"pipe:touch {marker}; cat /dev/null")
    for command in ("validate", "run"):
        result = subprocess.run([*LAUNCH, command, str(path)], capture_output=True, text=True, timeout=180)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"keye-launch: error: {path}: stages.0.data.sources.evil.urls.0: shard 'pipe:touch")
        assert "URL scheme 'pipe:' is not allowed" in lines[0]
    assert not marker.exists()


@pytest.mark.parametrize("url", [
    "pipe:cat shard.tar", "http://example.com/a.tar", "https://example.com/a.tar", "gs://bucket/a.tar",
    "ais://bucket/a.tar", "hf://datasets/x/a.tar", "scp://host/a.tar", "s3://bucket/a.tar",
    "{pipe,x}:touch /tmp/keye-wds-marker",  # a scheme made by brace expansion
    "data/a.tar::pipe:cat b.tar",  # webdataset's '::' joins several URLs in one entry
    "-",  # gopen reads stdin
    "file://otherhost/a.tar",
])
def test_every_scheme_but_file_is_refused_when_the_source_is_built(tmp_path, url):
    with pytest.raises(KeyeUserError, match="data source 'webdataset': shard"):
        WebDatasetSource(WebDatasetSource.Config(urls=[url]))
    with pytest.raises(KeyeUserError):
        list(read_shard(url))  # and when a shard is opened
    assert not Path("/tmp/keye-wds-marker").exists()


def _shard(path: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in (("k0.txt", b"a caption"), ("k0.png", b"not really a png")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))
    return path


def test_local_paths_brace_patterns_and_file_urls_read(tmp_path):
    for index in range(2):
        _shard(tmp_path / f"part-{index:06d}.tar")
    pattern = str(tmp_path / "part-{000000..000001}.tar")
    assert expand_url(pattern) == [str(tmp_path / "part-000000.tar"), str(tmp_path / "part-000001.tar")]
    assert expand_url(f"file://{tmp_path}/part-000000.tar") == [str(tmp_path / "part-000000.tar")]
    source = WebDatasetSource(WebDatasetSource.Config(urls=[pattern, f"file:{tmp_path}/part-000000.tar"]))
    assert len(source.shards) == 3
    assert [item.sample.key for item in read_shard(source.shards[0])] == ["k0"]


def test_special_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.tar"
    os.mkfifo(fifo)
    with pytest.raises(KeyeUserError, match="is not a regular file"):
        WebDatasetSource(WebDatasetSource.Config(urls=[str(fifo)]))
    start = time.monotonic()
    with pytest.raises(KeyeUserError, match="is not a regular file"):
        open_shard(str(fifo))  # opening a FIFO for reading would wait for a writer forever
    with pytest.raises(KeyeUserError, match="/dev/zero is not a regular file"):
        open_shard("/dev/zero")
    assert time.monotonic() - start < 5
