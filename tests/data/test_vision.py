"""Image side of the data pipeline: smart_resize, patch order, normalisation, the whole image path.

References are independent of keye: transformers' own Qwen2-VL ``smart_resize`` and image processor
(PIL backend: the torchvision one needs torchvision), and index formulas written here.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from keye.data.vision import (
    MAX_PIXELS,
    MIN_PIXELS,
    PROCESSOR_MAX_PIXELS,
    PROCESSOR_MIN_PIXELS,
    num_tokens,
    patchify,
    preprocess_image,
    resize_frames,
    smart_resize,
)

BUDGETS = [  # (min_pixels, max_pixels)
    (MIN_PIXELS, MAX_PIXELS),  # paper: 4..16384 tokens
    (PROCESSOR_MIN_PIXELS, PROCESSOR_MAX_PIXELS),  # released HF processor: ..1280 tokens
    (102400, PROCESSOR_MAX_PIXELS),  # HF hub "fix preprocessor" min
    (128 * 784, 768 * 784),  # video frame bounds
    (128 * 784, 128 * 784),  # a squeezed video frame
]


def test_budget_constants():
    assert (MIN_PIXELS, MAX_PIXELS) == (3136, 12_845_056)
    assert (PROCESSOR_MIN_PIXELS, PROCESSOR_MAX_PIXELS) == (3136, 1_003_520)


@pytest.mark.parametrize(
    "size, budget, expected",
    [
        ((224, 224), (MIN_PIXELS, MAX_PIXELS), (224, 224)),  # already multiples of 28
        ((100, 100), (MIN_PIXELS, MAX_PIXELS), (112, 112)),  # round(100/28) = 4
        ((4000, 3000), (MIN_PIXELS, MAX_PIXELS), (4004, 2996)),  # 143·28 × 107·28 = 11,995,984 fits
        # 1008² is over 1,003,520: beta = sqrt(1e6 / 1003520); floor(1001.76 / 28) = 35 → 980 (1225 tokens)
        ((1000, 1000), (PROCESSOR_MIN_PIXELS, PROCESSOR_MAX_PIXELS), (980, 980)),
        ((10, 10), (MIN_PIXELS, MAX_PIXELS), (56, 56)),  # 28² < 3136: beta = 5.6 → 56
        ((48, 64), (128 * 784, 768 * 784), (280, 392)),  # beta = 5.7155: 274.3 → 280, 365.8 → 392 (140 tokens)
        ((1, 200), (MIN_PIXELS, MAX_PIXELS), (28, 196)),  # ratio 200 is allowed
    ],
)
def test_smart_resize_by_hand(size, budget, expected):
    assert smart_resize(*size, 28, *budget) == expected


def test_smart_resize_matches_transformers_qwen2_vl():
    rng = np.random.default_rng(0)
    sides = np.concatenate([np.arange(15, 120), rng.integers(15, 6000, 300)])
    checked = 0
    for _ in range(3000):
        h, w = (int(x) for x in rng.choice(sides, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in BUDGETS:
            assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
            checked += 1
    assert checked > 10_000


def test_smart_resize_differs_from_transformers_only_below_half_a_factor():
    # keye-vl-utils rounds a side under 14 px up to 28 first; transformers' copy rounds it to 0 and then
    # takes the scale-up branch. 10 × 2000: keye keeps 28 × 1988 (71 tokens); transformers upsizes to 28 × 812.
    assert smart_resize(10, 2000) == (28, 1988)
    assert hf_smart_resize(10, 2000, 28, MIN_PIXELS, MAX_PIXELS) == (28, 812)


def test_smart_resize_properties():
    rng = np.random.default_rng(1)
    for _ in range(2000):
        h, w = (int(x) for x in rng.integers(1, 8000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo, hi = BUDGETS[int(rng.integers(len(BUDGETS)))]
        rh, rw = smart_resize(h, w, 28, lo, hi)
        assert rh % 28 == 0 and rw % 28 == 0 and rh >= 28 and rw >= 28
        rounded = max(28, round(h / 28) * 28) * max(28, round(w / 28) * 28)
        if rounded > hi:  # scaled down: under the budget unless a side had to stay at 28
            assert rh * rw <= hi or min(rh, rw) == 28
        elif rounded < lo:  # scaled up: at least the minimum
            assert rh * rw >= lo
        else:  # only rounded
            assert rh * rw == rounded


def test_smart_resize_rejects_extreme_aspect_ratio_and_empty():
    with pytest.raises(ValueError, match=r"1x201 \(HxW\) has aspect ratio 201.0"):
        smart_resize(1, 201)
    with pytest.raises(ValueError, match="empty"):
        smart_resize(0, 10)


def test_patchify_raster_order_against_index_formula():
    t, gh, gw, p = 3, 4, 5, 14
    frames = torch.randn(t, 3, gh * p, gw * p)
    patches, grid = patchify(frames)
    assert grid == (t, gh, gw) and patches.shape == (t * gh * gw, 3, p, p)
    for n in range(t * gh * gw):
        ti, row, col = n // (gh * gw), (n % (gh * gw)) // gw, n % gw
        assert torch.equal(patches[n], frames[ti, :, row * p : (row + 1) * p, col * p : (col + 1) * p])


def test_patchify_by_hand():
    # pixel value = 10000·t + 100·y + x: a patch's top-left pixel says where it came from
    t, h, w = 2, 28, 42
    ts, ys, xs = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    frames = (10000 * ts + 100 * ys + xs).float()[:, None].expand(t, 3, h, w)
    patches, grid = patchify(frames)
    assert grid == (2, 2, 3)
    top_left = patches[:, 0, 0, 0].long().tolist()
    assert top_left == [0, 14, 28, 1400, 1414, 1428, 10000, 10014, 10028, 11400, 11414, 11428]


def test_patchify_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify(torch.zeros(1, 3, 28, 30))
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
        patchify(torch.zeros(3, 28, 28))


def _keye_released_processor(min_pixels: int, max_pixels: int) -> Qwen2VLImageProcessorPil:
    """transformers' Qwen2-VL processor set up as Keye's: temporal patch 1, mean = std = 0.5."""
    return Qwen2VLImageProcessorPil(
        patch_size=14,
        temporal_patch_size=1,
        merge_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )


@pytest.mark.parametrize("shape", [(100, 150), (224, 224), (1200, 900), (30, 500)])
def test_preprocess_image_matches_transformers_processor(shape):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    out = _keye_released_processor(PROCESSOR_MIN_PIXELS, PROCESSOR_MAX_PIXELS)(images=[image], return_tensors="np")
    t, gh, gw = (int(x) for x in out["image_grid_thw"][0])
    # Qwen2-VL orders patches by 2×2 merge block (t, bh, bw, i, j); Keye by raster (t, row = 2bh+i, col = 2bw+j).
    ref = torch.from_numpy(out["pixel_values"]).reshape(t, gh // 2, gw // 2, 2, 2, 3, 14, 14)
    ref = ref.permute(0, 1, 3, 2, 4, 5, 6, 7).reshape(-1, 3, 14, 14)
    patches, grid = preprocess_image(image, PROCESSOR_MIN_PIXELS, PROCESSOR_MAX_PIXELS)
    assert grid == (t, gh, gw) and patches.dtype == torch.float32
    torch.testing.assert_close(patches, ref, atol=1e-6, rtol=0)


def test_preprocess_image_values_and_budget():
    # 224×224 is kept as is: values are exactly (x / 255 - 0.5) / 0.5
    image = np.random.default_rng(3).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    patches, grid = preprocess_image(image)
    assert grid == (1, 16, 16) and patches.shape == (256, 3, 14, 14)
    expected = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(patches[17], expected[:, 14:28, 14:28])  # row 1, col 1
    assert patches.min() >= -1 and patches.max() <= 1

    # white 1080p PIL image: every value 1.0. The 1280-token processor budget scales it by 1/1.43746:
    # floor(751.3 / 28) = 26, floor(1335.7 / 28) = 47 → 728 × 1316, 1222 tokens.
    white = Image.new("RGB", (1920, 1080), (255, 255, 255))
    patches, grid = preprocess_image(white, PROCESSOR_MIN_PIXELS, PROCESSOR_MAX_PIXELS)
    assert grid == (1, 52, 94) and num_tokens(728, 1316) == 1222 and torch.all(patches == 1.0)
    # the paper budget keeps it near native size: 39·28 × 69·28 = 1092 × 1932, 2691 tokens
    _, grid = preprocess_image(white)
    assert grid == (1, 78, 138)


def test_preprocess_image_modes():
    rgba = Image.new("RGBA", (56, 56), (0, 0, 0, 0))  # fully transparent → white background
    patches, _ = preprocess_image(rgba)
    assert torch.all(patches == 1.0)
    gray = np.zeros((56, 56), dtype=np.uint8)  # black grayscale array → -1 on all 3 channels
    patches, grid = preprocess_image(gray)
    assert grid == (1, 4, 4) and torch.all(patches == -1.0)


def test_preprocess_image_bad_input_names_the_sample():
    with pytest.raises(ValueError, match=r"^shard-3/0042\.jpg: expected uint8 pixels"):
        preprocess_image(np.zeros((28, 28, 3), np.float32), name="shard-3/0042.jpg")
    with pytest.raises(ValueError, match=r"^a\.png: expected an \[H, W, 3\]"):
        preprocess_image(np.zeros((28, 28, 4), np.uint8), name="a.png")
    with pytest.raises(ValueError, match=r"^b\.png: image size 2x500 .* aspect ratio 250"):
        preprocess_image(np.zeros((2, 500, 3), np.uint8), name="b.png")


def test_video_resize_agrees_with_pil_bicubic():
    # frames go through torch bicubic+antialias (torchvision's path); images through PIL bicubic
    rng = np.random.default_rng(4)
    small = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((64, 48), Image.Resampling.BILINEAR))  # smooth content
    for h, w in [(28, 56), (280, 392), (48, 64)]:
        pil = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC)).astype(int)
        frames = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
        ours = resize_frames(frames, h, w)[0].permute(1, 2, 0).numpy().astype(int)
        assert np.abs(ours - pil).max() <= 1
