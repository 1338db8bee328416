"""The synthetic world's videos: a shape that moves, shapes that appear, and questions on time.

A video is 64×64 pixels at 4 fps, 2, 3 or 4 seconds long (8-16 frames), encoded as MPEG-4 Part 2 in an
MP4 container with PyAV (about 2 ms a video; decord and PyAV both read it). Three question families:

- direction: "Which way does the red circle move?" → left / right / up / down;
- order: "Which appears first, the red circle or the blue square?" → "the blue square";
- when: "When does the green triangle appear?" → "at 1.5 seconds", which exercises the time-aligned M-RoPE.

Appearance times are multiples of 0.5 s, the M-RoPE's time step (2 positions per second, spec §1.4), and are
chosen (`event_times`) so the answer is exactly what the model can see: the decoder samples frames with
`keye.data.video.sample_frame_indices` at its default 2 fps, the k-th sampled frame sits at ``k / sample_fps``
seconds on the M-RoPE time axis, and a shape appearing at t is first visible in the sampled frame at exactly
t on that axis. (Its container timestamp can be up to 0.25 s later, because the release's ``linspace``
spreads the sampled frames over the whole clip.) A decoder set to another fps would see other times.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from keye.data.synthetic_images import BACKGROUND, COLORS, QA, SHAPES, draw_in_split, draw_shape, list_phrase
from keye.data.video import sample_frame_indices

VIDEO_SIZE = 64
VIDEO_FPS = 4
VIDEO_SECONDS = (2, 3, 4)
DIRECTIONS = ("left", "right", "up", "down")
_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@dataclass(frozen=True)
class Track:
    """One shape in a video: it is visible from frame ``appear`` on and moves linearly ``start`` → ``end``
    (top-left corners at the first and the last frame)."""

    shape: str
    color: str
    side: int
    start: tuple[int, int]
    end: tuple[int, int]
    appear: int = 0

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class VideoSpec:
    seconds: int
    tracks: tuple[Track, ...]

    @property
    def num_frames(self) -> int:
        return self.seconds * VIDEO_FPS


def render_frames(spec: VideoSpec) -> list[np.ndarray]:
    """The frames ``[H, W, 3]`` uint8 of a video; later tracks are drawn over earlier ones."""
    frames = []
    last = spec.num_frames - 1
    for f in range(spec.num_frames):
        image = Image.new("RGB", (VIDEO_SIZE, VIDEO_SIZE), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for t in spec.tracks:
            if f >= t.appear:
                x = round(t.start[0] + (t.end[0] - t.start[0]) * f / last)
                y = round(t.start[1] + (t.end[1] - t.start[1]) * f / last)
                draw_shape(draw, t.shape, t.color, (x, y, x + t.side, y + t.side))
        frames.append(np.asarray(image))
    return frames


def mp4_bytes(frames: list[np.ndarray], fps: int = VIDEO_FPS) -> bytes:
    """Encode RGB frames as an MP4 (MPEG-4 Part 2, yuv420p). One encoder thread: the bytes are reproducible."""
    import av  # heavy; only the video tasks need it

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 400_000  # plenty for 64×64: colours survive the round trip
        stream.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


@lru_cache(maxsize=None)
def event_times(num_frames: int, fps: int = VIDEO_FPS) -> tuple[float, ...]:
    """Appearance times (seconds, multiples of 0.5, > 0) that the default 2-fps sampling sees exactly.

    A shape appearing at t (frame ``t·fps``) is first visible in the first sampled frame k whose index is
    ``>= t·fps``; t qualifies when that frame's M-RoPE time ``k / sample_fps`` equals t.
    """
    indices = sample_frame_indices(num_frames, float(fps)).tolist()
    sample_fps = len(indices) / num_frames * fps
    times = []
    for half_seconds in range(1, 2 * num_frames // fps):
        t = half_seconds / 2
        frame = round(t * fps)
        seen = [k for k, index in enumerate(indices) if index >= frame]
        if seen and abs(seen[0] / sample_fps - t) < 1e-9:
            times.append(t)
    return tuple(times)


def seconds_phrase(t: float) -> str:
    return f"at {t:.1f} seconds"


def _kinds(rng: random.Random, n: int) -> list[tuple[str, str]]:
    kinds: list[tuple[str, str]] = []
    while len(kinds) < n:
        kind = (rng.choice(SHAPES), rng.choice(list(COLORS)))
        if kind not in kinds:
            kinds.append(kind)
    return kinds


def _static(
    rng: random.Random, kind: tuple[str, str], x_range: tuple[int, int], y_range: tuple[int, int], appear: int = 0
) -> Track:
    """A shape that stays where it is, inside the given pixel ranges, from frame ``appear`` on."""
    side = rng.randint(12, 18)
    x = rng.randint(x_range[0], x_range[1] - side)
    y = rng.randint(y_range[0], y_range[1] - side)
    return Track(kind[0], kind[1], side, (x, y), (x, y), appear)


def _video_qa(rng: random.Random, split: str, make) -> tuple[VideoSpec, bytes]:
    spec = draw_in_split(rng, split, make, lambda s: s)
    return spec, mp4_bytes(render_frames(spec))


# --- question families --------------------------------------------------------------------------------


def direction_qa(rng: random.Random, split: str) -> QA:
    """A shape crosses the frame; half the time a still shape sits in the other half as a distractor."""
    direction = rng.choice(DIRECTIONS)

    def make() -> VideoSpec:
        kinds = _kinds(rng, 2)
        side = rng.randint(12, 18)
        near, far = 2, VIDEO_SIZE - side - 2
        lane_top = rng.random() < 0.5  # the mover's half (top/bottom, or left/right for vertical motion)
        lane = rng.randint(2, 30 - side) if lane_top else rng.randint(34, VIDEO_SIZE - side - 2)
        a, b = {"right": (near, far), "left": (far, near), "down": (near, far), "up": (far, near)}[direction]
        if direction in ("left", "right"):
            mover = Track(kinds[0][0], kinds[0][1], side, (a, lane), (b, lane))
            other_half = ((0, VIDEO_SIZE), (34, 62) if lane_top else (2, 30))
        else:
            mover = Track(kinds[0][0], kinds[0][1], side, (lane, a), (lane, b))
            other_half = ((34, 62) if lane_top else (2, 30), (0, VIDEO_SIZE))
        tracks = (mover,) if rng.random() < 0.5 else (_static(rng, kinds[1], *other_half), mover)
        return VideoSpec(rng.choice(VIDEO_SECONDS), tracks)

    spec, data = _video_qa(rng, split, make)
    mover = spec.tracks[-1]
    where = {"right": ("left", "right"), "left": ("right", "left"), "down": ("top", "bottom"), "up": ("bottom", "top")}
    first, last = where[direction]
    reasoning = (
        f"At the start the {mover.name} is at the {first}. At the end it is at the {last}. It moves {direction}."
    )
    return QA(
        "video_direction", data, "video", f"Which way does the {mover.name} move?", direction,
        _OPPOSITE[direction], reasoning=reasoning, meta={"target": mover.name, "seconds": spec.seconds},
    )  # fmt: skip


def order_qa(rng: random.Random, split: str) -> QA:
    """Two still shapes, one per half of the frame, appear at different times (the first maybe at 0 s)."""

    def make() -> VideoSpec:
        seconds = rng.choice(VIDEO_SECONDS)
        t1, t2 = sorted(rng.sample((0.0,) + event_times(seconds * VIDEO_FPS), 2))
        kinds = _kinds(rng, 2)
        halves = [(2, 30), (34, 62)]
        rng.shuffle(halves)
        first = _static(rng, kinds[0], halves[0], (2, 62), round(t1 * VIDEO_FPS))
        second = _static(rng, kinds[1], halves[1], (2, 62), round(t2 * VIDEO_FPS))
        return VideoSpec(seconds, (first, second))

    spec, data = _video_qa(rng, split, make)
    first, second = spec.tracks
    names = [first.name, second.name]
    rng.shuffle(names)
    reasoning = (
        f"The {first.name} appears {seconds_phrase(first.appear / VIDEO_FPS)}. "
        f"The {second.name} appears {seconds_phrase(second.appear / VIDEO_FPS)}. So the first is the {first.name}."
    )
    return QA(
        "video_order", data, "video", f"Which appears first, the {names[0]} or the {names[1]}?",
        f"the {first.name}", f"the {second.name}", reasoning=reasoning, meta={"seconds": spec.seconds},
    )  # fmt: skip


def when_qa(rng: random.Random, split: str) -> QA:
    """A shape appears at t > 0; half the time another shape is there from the start."""

    def make() -> VideoSpec:
        seconds = rng.choice(VIDEO_SECONDS)
        t = rng.choice(event_times(seconds * VIDEO_FPS))
        kinds = _kinds(rng, 2)
        halves = [(2, 30), (34, 62)]
        rng.shuffle(halves)
        target = _static(rng, kinds[0], halves[0], (2, 62), round(t * VIDEO_FPS))
        tracks = (target,) if rng.random() < 0.5 else (_static(rng, kinds[1], halves[1], (2, 62)), target)
        return VideoSpec(seconds, tracks)

    spec, data = _video_qa(rng, split, make)
    target = spec.tracks[-1]
    t = target.appear / VIDEO_FPS
    times = event_times(spec.num_frames)
    neighbours = [u for u in times if abs(u - t) == 0.5] or [u for u in times if u != t]
    before = [f"{k / 2:.1f}" for k in range(round(t * 2))]
    reasoning = (
        f"The {target.name} is not there at {list_phrase(before)} seconds. "
        f"It is there {seconds_phrase(t)}."
    )
    return QA(
        "video_when", data, "video", f"When does the {target.name} appear?", seconds_phrase(t),
        seconds_phrase(rng.choice(neighbours)), reasoning=reasoning, meta={"seconds": spec.seconds, "time": t},
    )  # fmt: skip


#: question families about videos, by name
VIDEO_FAMILIES = {"video_direction": direction_qa, "video_order": order_qa, "video_when": when_qa}
