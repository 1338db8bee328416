"""The ``decord`` and ``pyav`` video decoders on real mp4 files written here with PyAV.

Each test video shows a white square that moves 2 px right per frame, so the pixels say which frame a
decoder returned, independently of its own index bookkeeping.
"""

import os
from pathlib import Path

import av
import numpy as np
import pytest

import keye_plugins.video_decoder.decord as decord_plugin
import keye_plugins.video_decoder.pyav as pyav_plugin
from keye.data.video import VideoDecoder, frame_size
from keye.data.vision import num_tokens
from keye_plugins.video_decoder.decord import DecordVideoDecoder
from keye_plugins.video_decoder.pyav import PyAVVideoDecoder

DECODERS = [DecordVideoDecoder, PyAVVideoDecoder]
SQUARE = 4


def write_video(path: Path, codec: str, frames: int, fps: int, width: int = 64, height: int = 48, **options) -> Path:
    container = av.open(str(path), "w", options=options.pop("container_options", {}))
    stream = container.add_stream(codec, rate=fps, options=options)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i in range(frames):
        rgb = np.zeros((height, width, 3), np.uint8)
        x = (2 * i) % (width - SQUARE - 1)  # wraps around after 29 frames at 64 px
        rgb[20 : 20 + SQUARE, x : x + SQUARE] = 255
        for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def square_frame_index(rgb: np.ndarray) -> int:
    """Which frame this is, from the square's left edge (x = 2·index)."""
    columns = rgb[20 : 20 + SQUARE].mean(axis=(0, 2))  # (W,) brightness per column
    return int(np.flatnonzero(columns > 128)[0]) // 2


def pts_seconds(path: Path) -> list[float]:
    """Presentation time of every frame, in presentation order, read independently with PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sorted(float(frame.pts * stream.time_base) for frame in container.decode(stream))


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    """3 s of 64×48 at 10 fps (30 frames) in two codecs; x264 with B-frames, so decode order ≠ display order."""
    root = tmp_path_factory.mktemp("videos")
    return {
        "x264": write_video(root / "x264.mp4", "libx264", 30, 10, crf="10", bf="2"),
        "mpeg4": write_video(root / "mpeg4.mp4", "mpeg4", 30, 10, qscale="2"),
    }


@pytest.mark.parametrize("codec", ["x264", "mpeg4"])
@pytest.mark.parametrize("decoder_cls", DECODERS)
def test_read_samples_at_2fps(videos, codec, decoder_cls):
    video = decoder_cls(decoder_cls.Config()).read(videos[codec])
    assert video.total_frames == 30 and video.video_fps == pytest.approx(10.0)
    assert video.indices.tolist() == [0, 6, 12, 17, 23, 29]  # 3 s · 2 fps = 6 over linspace(0, 29, 6)
    assert video.frames.shape == (6, 48, 64, 3) and video.frames.dtype == np.uint8
    assert [square_frame_index(f) for f in video.frames] == video.indices.tolist()
    pts = pts_seconds(videos[codec])
    np.testing.assert_allclose(video.timestamps, [pts[i] for i in video.indices], atol=1e-6)
    assert video.sample_fps == pytest.approx(2.0)


@pytest.mark.parametrize("codec", ["x264", "mpeg4"])
def test_decoders_agree(videos, codec):
    a = DecordVideoDecoder().read(videos[codec], fps=4.0)
    b = PyAVVideoDecoder().read(videos[codec], fps=4.0)
    assert len(a.indices) == 12 and np.array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.timestamps, b.timestamps, atol=1e-6)
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 2
    assert DecordVideoDecoder().probe(videos[codec]) == PyAVVideoDecoder().probe(videos[codec])


@pytest.mark.parametrize("decoder_cls", DECODERS)
def test_long_video_gets_fewer_frames_under_the_token_budget(tmp_path, decoder_cls):
    # 100 s at 4 fps: 2 fps wants 200 frames; 24576 tokens / 128 per frame allows 192
    path = write_video(tmp_path / "long.mp4", "libx264", 400, 4, width=32, height=32)
    video = decoder_cls().read(path)
    assert len(video.frames) == 192 and video.indices[-1] == 399
    assert video.sample_fps == pytest.approx(192 / 400 * 4)
    assert [square_frame_index(f) for f in video.frames[:5]] == video.indices[:5].tolist()
    assert 192 * num_tokens(*frame_size(32, 32, 192)) <= 24576  # each frame fits 128 tokens
    assert len(decoder_cls().read(path, max_video_tokens=None).frames) == 200  # the release's rule


@pytest.mark.parametrize("decoder_cls", DECODERS)
def test_unreadable_files_raise_a_clear_error(tmp_path, videos, decoder_cls):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    data = videos["mpeg4"].read_bytes()
    no_index = tmp_path / "no_index.mp4"  # moov atom is at the end: cut off
    no_index.write_bytes(data[: len(data) // 2])
    faststart = write_video(
        tmp_path / "fs.mp4", "mpeg4", 30, 10, width=160, height=120, container_options={"movflags": "faststart"}
    )
    data = faststart.read_bytes()
    truncated = tmp_path / "truncated.mp4"  # index intact, frames cut off
    truncated.write_bytes(data[: len(data) // 2])
    decoder = decoder_cls()
    for path in [garbage, no_index, truncated, tmp_path / "missing.mp4"]:
        with pytest.raises(ValueError, match=f"^cannot read video {path}: .+") as info:
            decoder.read(path)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=f"^cannot read video {garbage}"):
        decoder.probe(garbage)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("decoder_cls", DECODERS)
def test_special_files_are_refused_without_reading(tmp_path, decoder_cls):
    """A FIFO without a writer would block the decoder's open forever; /dev/zero never ends."""
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    link = tmp_path / "zero.mp4"
    link.symlink_to("/dev/zero")
    for path, what in [(fifo, "a FIFO"), (Path("/dev/zero"), "a character device"), (link, "a character device")]:
        for call in (decoder_cls().read, decoder_cls().probe):
            with pytest.raises(ValueError, match=f"^cannot read video {path}: not a regular file \\({what}\\)$"):
                call(path)


def test_too_short_video_raises(tmp_path):
    path = write_video(tmp_path / "one.mp4", "mpeg4", 1, 10)
    for decoder_cls in DECODERS:
        with pytest.raises(ValueError, match=f"cannot read video {path}: video has 1 frame"):
            decoder_cls().read(path)


def test_registered_as_video_decoders(keye_empty_host):
    keye_empty_host.add_plugin(decord_plugin, "decord")
    keye_empty_host.add_plugin(pyav_plugin, "pyav")
    registry = keye_empty_host.registry
    assert registry.cls("video_decoder", "decord") is DecordVideoDecoder
    assert registry.cls("video_decoder", "pyav") is PyAVVideoDecoder
    for cls in DECODERS:
        assert isinstance(cls(cls.Config()), VideoDecoder)
