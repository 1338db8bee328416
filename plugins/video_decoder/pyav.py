"""``pyav`` video decoder: the fallback where decord is missing (it has no wheels off x86-64) or fails.

PyAV (FFmpeg bindings) decodes sequentially from the start, keeping only the frames
`keye.data.video.sample_frame_indices` chose and stopping after the last one. That is slower than
decord's seeking on long videos but needs nothing beyond ``av``. Frames are numbered in presentation
order, as decord numbers them, so both decoders choose the same frames; a frame's timestamp is its
pts · time_base in seconds.

av is imported inside the methods, so listing plugins never loads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from keye import hookimpl
from keye.config import doc
from keye.data.video import FPS, DecodedVideo, VideoInfo, check_video_file, sample_frame_indices


class PyAVVideoDecoder:
    """Decodes the sampled frames of a video file with PyAV (see `keye.data.video.VideoDecoder`)."""

    @dataclass
    class Config:
        thread_type: str = doc("FFmpeg decoding threads: AUTO, FRAME, SLICE or NONE.", "AUTO")

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def _open(self, path: str | os.PathLike):
        """The open container and its first video stream, with the stream's frame count and rate."""
        import av

        check_video_file(path)  # before FFmpeg opens it: a FIFO would block, /dev/zero never ends
        try:
            container = av.open(os.fspath(path))
        except Exception as e:  # av.error.FFmpegError and friends
            raise ValueError(f"cannot read video {path}: {getattr(e, 'strerror', None) or e}") from e
        if not container.streams.video:
            container.close()
            raise ValueError(f"cannot read video {path}: no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        total_frames = stream.frames or self._count_packets(container, stream)
        if not rate or total_frames <= 0 or not stream.width:
            container.close()
            raise ValueError(f"cannot read video {path}: no frames or no frame rate in the header")
        return container, stream, float(rate), total_frames

    @staticmethod
    def _count_packets(container, stream) -> int:
        """Frame count for containers whose header does not say it (one packet per frame), then rewind."""
        count = sum(1 for packet in container.demux(stream) if packet.size)
        container.seek(0)
        return count

    def probe(self, path: str | os.PathLike) -> VideoInfo:
        container, stream, video_fps, total_frames = self._open(path)
        with container:
            return VideoInfo(total_frames=total_frames, video_fps=video_fps, height=stream.height, width=stream.width)

    def read(self, path: str | os.PathLike, fps: float = FPS, **limits: int | None) -> DecodedVideo:
        container, stream, video_fps, total_frames = self._open(path)
        with container:
            try:
                indices = sample_frame_indices(total_frames, video_fps, fps, **limits)
            except ValueError as e:
                raise ValueError(f"cannot read video {path}: {e}") from None
            stream.thread_type = self.config.thread_type
            wanted = set(indices.tolist())  # distinct: smart_nframes never asks for more than total_frames
            frames: list[np.ndarray] = []
            timestamps: list[float] = []
            decoded = 0
            try:
                for index, frame in enumerate(container.decode(stream)):
                    decoded = index + 1
                    if index in wanted:
                        frames.append(frame.to_ndarray(format="rgb24"))  # (H, W, 3) uint8
                        timestamps.append(float(frame.pts * stream.time_base) if frame.pts is not None else frame.time)
                    if index >= indices[-1]:
                        break
            except Exception as e:  # av.error.InvalidDataError etc. from a damaged stream
                raise ValueError(f"cannot read video {path}: {e}") from e
        if len(frames) < len(indices):
            raise ValueError(
                f"cannot read video {path}: decoded {decoded} of {total_frames} frames (truncated or damaged file)"
            )
        return DecodedVideo(np.stack(frames), np.asarray(timestamps), video_fps, total_frames, indices)


@hookimpl
def keye_register_video_decoders(register):
    register("pyav", PyAVVideoDecoder)
