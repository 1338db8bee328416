"""Video → sampled frames → ViT patches, under the paper's token budgets.

Frame sampling follows the released ``keye-vl-utils`` (spec §1.5): at ``fps`` = 2.0 the frame count is
``floor_even(clamp(duration·fps, ceil_even(4), floor_even(min(768, total_frames))))``, the frames are
``linspace(0, total-1, n).round()`` (n is even, so no index lands on a .5 tie), and the sampling rate
is recomputed as ``sample_fps = n / total_frames · video_fps``. Keye uses temporal_patch_size 1, so every
sampled frame is one temporal grid step and the LLM's time-aligned M-RoPE gets
``second_per_grid_ts = 1 / sample_fps``.

Per-frame budget: 128..768 tokens (``VIDEO_MIN_PIXELS`` / ``VIDEO_MAX_PIXELS``), one token = 784 pixels.
Whole-video budget: the paper's 24576 tokens, **enforced** (the release only approximates it through
``VIDEO_TOTAL_PIXELS`` with Qwen's ×2 frame factor, which lets a video reach about twice the budget).
Two rules keep every video inside it:

1. Frame count: at most ``max_video_tokens // min_tokens_per_frame`` frames (192 by default) are sampled.
   A longer video therefore gets *fewer frames*, not an error: the paper recomputes the FPS from the
   budget, and refusing every video over 96 s (192 frames at 2 fps) would discard most long-video data.
   The frames still span the whole video and ``second_per_grid_ts`` reflects the lower rate.
2. Frame size: the per-frame maximum shrinks to ``max_video_tokens // n`` tokens (never above 768), and
   the frame is resized with the image rule `smart_resize`. If the min-side rounding of a tiny video
   overshoots that cap (ceil of both sides), the frame is scaled back down under it: the total budget
   wins over the per-frame minimum.

`preprocess_video` does not drop frames itself: frames it is given that cannot fit even at the minimum
size are a caller error (sample with `sample_frame_indices`), reported as a ``ValueError``.

Decoders (plugins of kind ``video_decoder``: ``decord``, the default, and ``pyav``) implement the
`VideoDecoder` protocol below and all sample with `sample_frame_indices`, so they choose the same frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from keye.data.sources import special_file_kind
from keye.data.vision import IMAGE_FACTOR, PIXELS_PER_TOKEN, normalize, patchify, resize_frames, smart_resize

FPS = 2.0
FRAME_FACTOR = 2  # frame counts are even (inherited from Qwen's 2-frame temporal patches; kept as released)
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768

VIDEO_MIN_TOKENS = 128  # per frame [P1 §2.2]
VIDEO_MAX_TOKENS = 768  # per frame
VIDEO_MIN_PIXELS = VIDEO_MIN_TOKENS * PIXELS_PER_TOKEN  # 100,352
VIDEO_MAX_PIXELS = VIDEO_MAX_TOKENS * PIXELS_PER_TOKEN  # 602,112
VIDEO_MAX_TOTAL_TOKENS = 24576  # per video [P1 §2.2]


def _ceil_even(x: float) -> int:
    return int(np.ceil(x / FRAME_FACTOR)) * FRAME_FACTOR


def _floor_even(x: float) -> int:
    return int(np.floor(x / FRAME_FACTOR)) * FRAME_FACTOR


def smart_nframes(
    total_frames: int,
    video_fps: float,
    fps: float = FPS,
    *,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int = FPS_MAX_FRAMES,
    max_video_tokens: int | None = VIDEO_MAX_TOTAL_TOKENS,
    min_tokens_per_frame: int = VIDEO_MIN_TOKENS,
) -> int:
    """How many frames to sample: ``duration · fps`` clamped to [4, min(768, total, budget)], floored to even.

    ``max_video_tokens`` = None turns off the whole-video budget (the release's behaviour).
    """
    if total_frames <= 0:
        raise ValueError(f"video has no frames (total_frames={total_frames})")
    if not video_fps > 0:
        raise ValueError(f"video frame rate must be positive, got {video_fps}")
    upper = min(max_frames, total_frames)
    if max_video_tokens is not None:
        upper = min(upper, max_video_tokens // min_tokens_per_frame)
    wanted = total_frames / video_fps * fps
    nframes = _floor_even(min(max(wanted, _ceil_even(min_frames)), _floor_even(upper)))
    if nframes < FRAME_FACTOR:
        raise ValueError(f"video has {total_frames} frame(s); at least {FRAME_FACTOR} are needed")
    return nframes


def sample_frame_indices(total_frames: int, video_fps: float, fps: float = FPS, **limits: int | None) -> np.ndarray:
    """Indices ``[n]`` of the frames to decode: ``linspace(0, total-1, n).round()``.

    ``limits`` are the keyword arguments of `smart_nframes` (min_frames, max_frames, max_video_tokens,
    min_tokens_per_frame).
    """
    n = smart_nframes(total_frames, video_fps, fps, **limits)
    return np.linspace(0, total_frames - 1, n).round().astype(np.int64)


def frame_size(
    height: int,
    width: int,
    nframes: int,
    *,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    max_video_tokens: int | None = VIDEO_MAX_TOTAL_TOKENS,
) -> tuple[int, int]:
    """The resized ``(h, w)`` of every frame of an ``nframes`` video, so that ``nframes · tokens <= budget``."""
    cap = max_pixels
    if max_video_tokens is not None:
        cap = min(max_pixels, max_video_tokens // nframes * PIXELS_PER_TOKEN)
        if cap < min_pixels:
            raise ValueError(
                f"{nframes} frames do not fit {max_video_tokens} tokens at {min_pixels // PIXELS_PER_TOKEN} tokens "
                f"per frame; sample at most {max_video_tokens * PIXELS_PER_TOKEN // min_pixels} frames"
            )
    h, w = smart_resize(height, width, IMAGE_FACTOR, min_pixels, cap)
    if h * w > cap:  # the min-side ceil overshot the cap: scale back down below it
        h, w = smart_resize(h, w, IMAGE_FACTOR, IMAGE_FACTOR * IMAGE_FACTOR, cap)
    if h * w > cap:  # only for extreme aspect ratios, where a side is clamped to 28
        raise ValueError(f"frame size {height}x{width} cannot fit {cap // PIXELS_PER_TOKEN} tokens per frame")
    return h, w


@dataclass
class DecodedVideo:
    """What a decoder returns: the sampled frames and where they sit in the video."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    timestamps: np.ndarray  # (T,) float64 seconds: each frame's presentation time (pts · time_base)
    video_fps: float  # the container's average frame rate
    total_frames: int  # frames in the whole video
    indices: np.ndarray  # (T,) int64: which frames of the video these are

    @property
    def sample_fps(self) -> float:
        """The recomputed sampling rate, as released: ``T / total_frames · video_fps``."""
        return len(self.frames) / self.total_frames * self.video_fps


@dataclass
class VideoInfo:
    """What `VideoDecoder.probe` reports without decoding pixels."""

    total_frames: int
    video_fps: float
    height: int
    width: int

    @property
    def duration(self) -> float:
        return self.total_frames / self.video_fps


@runtime_checkable
class VideoDecoder(Protocol):
    """A ``video_decoder`` component, built as ``Cls(config)``.

    ``read`` samples with `sample_frame_indices` (``fps`` and ``limits`` are passed to it) and decodes only
    those frames. ``probe`` reads the header only. Both raise ``ValueError("cannot read video <path>: ...")``
    for a missing, truncated or otherwise unreadable file, so a data loader can skip and count the sample,
    and call `check_video_file` before opening anything (no FIFO, device or socket is ever opened).
    """

    def read(self, path: str | os.PathLike, fps: float = FPS, **limits: int | None) -> DecodedVideo: ...

    def probe(self, path: str | os.PathLike) -> VideoInfo: ...


def check_video_file(path: str | os.PathLike) -> None:
    """Raise the decoders' ``ValueError`` unless ``path`` is a regular file (symlinks followed).

    Decoders open paths with FFmpeg, which would block forever on a FIFO without a writer and read
    ``/dev/zero`` without end; every decoder calls this before it opens anything.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ValueError(f"cannot read video {path}: {e.strerror or 'no such file'}") from None
    what = special_file_kind(mode)
    if what is not None:
        raise ValueError(f"cannot read video {path}: not a regular file ({what})")


@dataclass
class VideoInputs:
    """One video ready for the ViT."""

    patches: torch.Tensor  # (T·h/14·w/14, 3, 14, 14) float32, raster order per frame
    grid_thw: tuple[int, int, int]  # (T, h/14, w/14)
    second_per_grid_ts: float  # seconds between temporal grid steps = 1 / sample_fps
    timestamps: np.ndarray  # (T,) seconds of each frame in the source video


def preprocess_video(
    frames: np.ndarray,
    timestamps: np.ndarray | list[float],
    video_fps: float,
    total_frames: int,
    *,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    max_video_tokens: int | None = VIDEO_MAX_TOTAL_TOKENS,
    name: str = "video",
) -> VideoInputs:
    """Sampled frames ``uint8 [T, H, W, 3]`` → `VideoInputs` within the per-frame and whole-video budgets.

    ``video_fps`` and ``total_frames`` describe the source video (for a list of images: the rate they
    stand for, e.g. 2.0, and their count). ``name`` (a file or sample id) is used in error messages.
    """
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        shape = getattr(frames, "shape", None)
        raise ValueError(f"{name}: expected frames uint8 [T, H, W, 3], got {type(frames).__name__} {shape}")
    timestamps = np.asarray(timestamps, dtype=np.float64)
    t, height, width = frames.shape[:3]
    if t == 0 or timestamps.shape != (t,):
        raise ValueError(f"{name}: {t} frames with timestamps of shape {timestamps.shape}")
    if total_frames <= 0 or not video_fps > 0:
        raise ValueError(f"{name}: bad source video rate {video_fps} fps / {total_frames} frames")
    try:
        h, w = frame_size(
            height, width, t, min_pixels=min_pixels, max_pixels=max_pixels, max_video_tokens=max_video_tokens
        )
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if not frames.flags.writeable:  # torch wants writable memory (decoders may hand out read-only views)
        frames = frames.copy()
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (T, 3, H, W)
    patches, grid_thw = patchify(normalize(resize_frames(pixels, h, w)))
    sample_fps = t / total_frames * video_fps
    return VideoInputs(patches, grid_thw, 1.0 / sample_fps, timestamps)
