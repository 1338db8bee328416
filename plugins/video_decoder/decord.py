"""``decord`` video decoder (the default): random access to just the sampled frames.

decord indexes the file once (packet timestamps, keyframes) and then seeks and decodes only the frames
`keye.data.video.sample_frame_indices` chose, which makes it the fast path for long videos. Frames are
counted and ordered by presentation time; a frame's timestamp is its pts · time_base in seconds.

decord is imported inside the methods, so listing plugins never loads it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from keye import hookimpl
from keye.config import doc
from keye.data.video import FPS, DecodedVideo, VideoInfo, check_video_file, sample_frame_indices


def _reason(exc: BaseException) -> str:
    """decord's first error line without its ``[hh:mm:ss] src/file.cc:123:`` prefix."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", lines[0]).strip()


class DecordVideoDecoder:
    """Decodes the sampled frames of a video file with decord (see `keye.data.video.VideoDecoder`)."""

    @dataclass
    class Config:
        num_threads: int = doc("Decoding threads per video; 0 lets decord choose.", 0)

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def _open(self, path: str | os.PathLike):
        import decord

        check_video_file(path)  # before FFmpeg opens it: a FIFO would block, /dev/zero never ends
        try:
            return decord.VideoReader(os.fspath(path), ctx=decord.cpu(0), num_threads=self.config.num_threads)
        except Exception as e:  # decord raises DECORDError / RuntimeError with a multi-line message
            raise ValueError(f"cannot read video {path}: {_reason(e)}") from e

    def probe(self, path: str | os.PathLike) -> VideoInfo:
        reader = self._open(path)
        height, width = reader[0].shape[:2] if len(reader) else (0, 0)
        return VideoInfo(total_frames=len(reader), video_fps=float(reader.get_avg_fps()), height=height, width=width)

    def read(self, path: str | os.PathLike, fps: float = FPS, **limits: int | None) -> DecodedVideo:
        reader = self._open(path)
        total_frames, video_fps = len(reader), float(reader.get_avg_fps())
        try:
            indices = sample_frame_indices(total_frames, video_fps, fps, **limits)
        except ValueError as e:
            raise ValueError(f"cannot read video {path}: {e}") from None
        try:
            frames = reader.get_batch(indices.tolist()).asnumpy()  # (T, H, W, 3) uint8
            timestamps = reader.get_frame_timestamp(indices.tolist())[:, 0].astype("float64")  # (T,) start times
        except Exception as e:
            raise ValueError(f"cannot read video {path}: {_reason(e)}") from e
        return DecodedVideo(frames, timestamps, video_fps, total_frames, indices)


@hookimpl
def keye_register_video_decoders(register):
    register("decord", DecordVideoDecoder)
