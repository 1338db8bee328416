"""Video side of the data pipeline: frame-count rule, sampled indices, token budgets, preprocess_video.

Decoders (real files) are tested in tests/plugins/test_video_decoders.py.
"""

import numpy as np
import pytest
import torch

from keye.data.vision import num_tokens, patchify, preprocess_image, resize_frames
from keye.data.video import (
    VIDEO_MAX_PIXELS,
    VIDEO_MAX_TOTAL_TOKENS,
    VIDEO_MIN_PIXELS,
    frame_size,
    preprocess_video,
    sample_frame_indices,
    smart_nframes,
)


def released_nframes(total_frames: int, video_fps: float, fps: float = 2.0) -> int:
    """keye-vl-utils' smart_nframes written out from the spec (no whole-video budget)."""
    min_frames = -(-4 // 2) * 2
    max_frames = min(768, total_frames) // 2 * 2
    n = min(min(max(total_frames / video_fps * fps, min_frames), max_frames), total_frames)
    return int(n // 2 * 2)


def test_budget_constants():
    assert (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS, VIDEO_MAX_TOTAL_TOKENS) == (100_352, 602_112, 24576)


@pytest.mark.parametrize(
    "total_frames, video_fps, expected",
    [
        (30, 10.0, 6),  # 3 s at 2 fps
        (90, 30.0, 6),  # 3 s at 30 fps
        (35, 10.0, 6),  # 3.5 s → 7 → floored to even
        (30, 30.0, 4),  # 1 s → 2 frames, raised to the minimum 4
        (3, 30.0, 2),  # fewer frames than the minimum: floor_even(3) = 2
        (18000, 30.0, 192),  # 10 min: 1200 wanted, 768 released cap, 24576 / 128 = 192 budget cap
        (5760, 30.0, 192),  # 192 s → 384 wanted → 192
        (2700, 29.97, 180),  # 90.09 s → 180.18 → 180: under the budget cap
    ],
)
def test_smart_nframes_by_hand(total_frames, video_fps, expected):
    assert smart_nframes(total_frames, video_fps) == expected


def test_smart_nframes_matches_release_without_budget():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        total = int(rng.integers(2, 40000))
        video_fps = float(rng.choice([1.0, 7.5, 23.976, 24.0, 25.0, 29.97, 30.0, 60.0]))
        fps = float(rng.choice([0.5, 1.0, 2.0, 4.0]))
        assert smart_nframes(total, video_fps, fps, max_video_tokens=None) == released_nframes(total, video_fps, fps)
        budgeted = smart_nframes(total, video_fps, fps)
        assert budgeted == min(released_nframes(total, video_fps, fps), 192)


def test_smart_nframes_options_and_errors():
    assert smart_nframes(18000, 30.0, max_video_tokens=None) == 768
    assert smart_nframes(18000, 30.0, max_frames=64) == 64
    assert smart_nframes(18000, 30.0, fps=1.0, max_video_tokens=4096) == 32  # 4096 / 128
    assert smart_nframes(30, 10.0, fps=4.0) == 12
    with pytest.raises(ValueError, match="1 frame"):
        smart_nframes(1, 30.0)
    with pytest.raises(ValueError, match="no frames"):
        smart_nframes(0, 30.0)
    with pytest.raises(ValueError, match="frame rate"):
        smart_nframes(10, 0.0)


def test_sample_frame_indices():
    assert sample_frame_indices(30, 10.0).tolist() == [0, 6, 12, 17, 23, 29]  # 0, 5.8, 11.6, 17.4, 23.2, 29
    assert sample_frame_indices(3, 30.0).tolist() == [0, 2]
    assert sample_frame_indices(14, 2.0, fps=0.5).tolist() == [0, 4, 9, 13]  # 0, 4.33, 8.67, 13
    rng = np.random.default_rng(1)
    for _ in range(500):
        total = int(rng.integers(2, 20000))
        video_fps = float(rng.choice([10.0, 25.0, 29.97]))
        idx = sample_frame_indices(total, video_fps)
        n = smart_nframes(total, video_fps)
        released = torch.linspace(0, total - 1, n).round().long().numpy()  # the release: torch float32
        assert idx.dtype == np.int64 and np.array_equal(idx, released), (total, n)
        assert idx[0] == 0 and idx[-1] == total - 1 and np.all(np.diff(idx) >= 1)  # distinct, increasing


@pytest.mark.parametrize(
    "size, nframes, expected",
    [
        ((48, 64), 6, (280, 392)),  # upscaled to >= 128 tokens: 140 tokens
        ((720, 1280), 6, (560, 1008)),  # cap 768 tokens: beta = 1.2372 → floor 20, 36 → 720 tokens
        ((720, 1280), 64, (392, 728)),  # cap 384 tokens: 14·26 = 364
        ((48, 64), 192, (252, 364)),  # cap 128: the min-side ceil (140 tokens) is scaled back to 9·13 = 117
    ],
)
def test_frame_size_by_hand(size, nframes, expected):
    assert frame_size(*size, nframes) == expected


def test_frame_size_enforces_the_video_budget():
    rng = np.random.default_rng(2)
    for _ in range(3000):
        h, w = (int(x) for x in rng.integers(16, 4000, 2))
        if max(h, w) / min(h, w) > 50:
            continue
        n = int(rng.integers(1, 97)) * 2
        rh, rw = frame_size(h, w, n)
        tokens = num_tokens(rh, rw)
        assert rh % 28 == 0 and rw % 28 == 0
        assert tokens <= 768 and n * tokens <= VIDEO_MAX_TOTAL_TOKENS, (h, w, n)
        if n <= 24576 // 768:  # cap is the per-frame maximum: the per-frame minimum holds too
            assert tokens >= 128, (h, w, n)


def test_frame_size_too_many_frames():
    message = "194 frames do not fit 24576 tokens at 128 tokens per frame; sample at most 192 frames$"
    with pytest.raises(ValueError, match=message):
        frame_size(48, 64, 194)
    assert frame_size(48, 64, 194, max_video_tokens=None) == (280, 392)  # the release has no hard cap


def test_preprocess_video_shapes_and_time():
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (6, 48, 64, 3), dtype=np.uint8)
    timestamps = [0.0, 0.6, 1.2, 1.7, 2.3, 2.9]
    out = preprocess_video(frames, timestamps, video_fps=10.0, total_frames=30)
    assert out.grid_thw == (6, 20, 28)  # 280 × 392
    assert out.patches.shape == (6 * 20 * 28, 3, 14, 14) and out.patches.dtype == torch.float32
    assert out.second_per_grid_ts == pytest.approx(0.5)  # sample_fps = 6 / 30 · 10 = 2
    np.testing.assert_allclose(out.timestamps, timestamps)
    # independent path: resize each frame, normalise by formula, patchify frame by frame
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2)
    resized = resize_frames(pixels, 280, 392)
    assert torch.equal(resized, resized.round()) and resized.min() >= 0 and resized.max() <= 255
    per_frame = [patchify((resized[i : i + 1] / 255 - 0.5) / 0.5)[0] for i in range(6)]
    torch.testing.assert_close(out.patches, torch.cat(per_frame), atol=1e-6, rtol=0)


def test_preprocess_video_frame_is_an_image_when_not_resized():
    # a frame already at a valid size goes through untouched, exactly like the same image
    frames = np.random.default_rng(4).integers(0, 256, (2, 336, 336, 3), dtype=np.uint8)  # 144 tokens
    out = preprocess_video(frames, [0.0, 1.0], video_fps=1.0, total_frames=2)
    image_patches, grid = preprocess_image(frames[1])
    assert out.grid_thw == (2, 24, 24) and grid == (1, 24, 24)
    assert torch.equal(out.patches[24 * 24 :], image_patches)
    assert out.second_per_grid_ts == pytest.approx(1.0)


def test_preprocess_video_enforces_a_small_budget_end_to_end():
    # per frame 8..64 tokens, 1200 per video: 40 frames get at most 30 tokens each
    frames = np.random.default_rng(5).integers(0, 256, (40, 240, 320, 3), dtype=np.uint8)
    budget = dict(min_pixels=8 * 784, max_pixels=64 * 784)
    out = preprocess_video(frames, np.arange(40) / 2.0, 2.0, 40, max_video_tokens=1200, **budget)
    # beta = sqrt(76800 / 23520) = 1.807: floor(132.8 / 28) = 4, floor(177.1 / 28) = 6 → 112 × 168, 24 tokens
    assert out.grid_thw == (40, 8, 12) and out.patches.shape[0] // 4 == 40 * 24 <= 1200
    # without the whole-video cap (the release) each frame gets 6·9 = 54 tokens: 2160 in all
    assert frame_size(240, 320, 40, max_video_tokens=None, **budget) == (168, 252)
    too_many = frames[:1].repeat(152, 0)  # 152 · 8 > 1200
    message = "^clip-7: 152 frames do not fit 1200 tokens at 8 tokens per frame; sample at most 150 frames$"
    with pytest.raises(ValueError, match=message):
        preprocess_video(too_many, np.zeros(152), 2.0, 152, max_video_tokens=1200, name="clip-7", **budget)


def test_preprocess_video_bad_input_names_the_sample():
    with pytest.raises(ValueError, match=r"^v\.mp4: expected frames uint8 \[T, H, W, 3\]"):
        preprocess_video(np.zeros((2, 28, 28, 3), np.float32), [0, 1], 2.0, 2, name="v.mp4")
    with pytest.raises(ValueError, match=r"^v\.mp4: 2 frames with timestamps of shape \(3,\)"):
        preprocess_video(np.zeros((2, 28, 28, 3), np.uint8), [0, 1, 2], 2.0, 2, name="v.mp4")
    with pytest.raises(ValueError, match=r"^v\.mp4: image size 2x500"):
        preprocess_video(np.zeros((2, 2, 500, 3), np.uint8), [0, 1], 2.0, 2, name="v.mp4")
