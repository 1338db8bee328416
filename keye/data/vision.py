"""Images → ViT patches at native resolution: the token budget, the resize, the patch layout.

Keye-VL feeds the SigLIP ViT at (almost) native resolution. An image is resized so both sides are
multiples of 28 (= patch 14 × spatial merge 2), keeping its aspect ratio, with its area inside a pixel
budget; one LLM token is one 2×2 group of 14×14 patches, i.e. 28·28 = 784 pixels. The resize rule is
``smart_resize`` of the released ``keye-vl-utils`` (spec §1.5), which is Qwen2-VL's rule plus a
``max(factor, ·)`` guard on the first rounding (so a side under 14 px rounds up to 28, not to 0).

Then pixels are rescaled by 1/255, normalised with mean = std = 0.5 (SigLIP), and cut into 14×14
patches in **raster order** per frame: ``(t, row, col)``, each patch ``[3, 14, 14]`` (spec §1.1).
Keye's processor uses temporal_patch_size 1, so an image is one temporal slice (t = 1) and each video
frame is its own slice; `patchify` is shared by both. Note the order differs from Qwen2-VL's HF
processor, which interleaves 2×2 merge groups; in Keye the projector does the 2×2 grouping itself.

Budgets (tokens after the 2×2 merge):
- the paper's image budget is 4..16384 tokens (``MIN_PIXELS``/``MAX_PIXELS``, the default here);
- the released HF processor clamps to 1280 tokens (``PROCESSOR_MAX_PIXELS`` = 1,003,520) with
  min 3136 pixels; pass these to reproduce the released processor's inputs.

Images are resized with PIL bicubic (antialiased), exactly as ``keye-vl-utils`` does; video frames go
through `resize_frames` (torch bicubic with antialias, what torchvision does for the released video
path). The two agree to within one grey level.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

PATCH_SIZE = 14
MERGE_SIZE = 2
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: both sides are multiples of this
PIXELS_PER_TOKEN = IMAGE_FACTOR * IMAGE_FACTOR  # 784: one LLM token = one 2×2 group of patches
MAX_RATIO = 200  # longest side / shortest side

# Paper budget [P1 §2.2], also keye-vl-utils' defaults.
MIN_TOKENS = 4
MAX_TOKENS = 16384
MIN_PIXELS = MIN_TOKENS * PIXELS_PER_TOKEN  # 3136
MAX_PIXELS = MAX_TOKENS * PIXELS_PER_TOKEN  # 12,845,056

# The released HF processor's clamp (preprocessor_config.json): 1280 tokens.
PROCESSOR_MIN_PIXELS = 3136
PROCESSOR_MAX_TOKENS = 1280
PROCESSOR_MAX_PIXELS = PROCESSOR_MAX_TOKENS * PIXELS_PER_TOKEN  # 1,003,520

IMAGE_MEAN = 0.5  # same for R, G, B
IMAGE_STD = 0.5


def _round_by(x: float, factor: int) -> int:
    return round(x / factor) * factor


def _ceil_by(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def _floor_by(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """The size ``(h, w)`` an image is resized to: multiples of ``factor``, area in budget, aspect kept.

    Round each side to the nearest multiple of ``factor`` (at least ``factor``). If the area is then over
    ``max_pixels``, scale the original down by ``sqrt(area / max_pixels)`` and floor each side; if under
    ``min_pixels``, scale up and ceil. Flooring guarantees ``h·w <= max_pixels`` (except when a side is
    clamped to ``factor``); ceiling guarantees ``h·w >= min_pixels``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} (HxW) is empty")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise ValueError(f"image size {height}x{width} (HxW) has aspect ratio {ratio:.1f}, over the limit {MAX_RATIO}")
    h_bar = max(factor, _round_by(height, factor))
    w_bar = max(factor, _round_by(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, _floor_by(height / beta, factor))
        w_bar = max(factor, _floor_by(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_by(height * beta, factor)
        w_bar = _ceil_by(width * beta, factor)
    return h_bar, w_bar


def num_tokens(height: int, width: int) -> int:
    """LLM tokens of one resized image/frame: its 14×14 patches merged 2×2."""
    return (height // IMAGE_FACTOR) * (width // IMAGE_FACTOR)


def to_rgb_array(image: Image.Image | np.ndarray, name: str = "image") -> np.ndarray:
    """An image as uint8 ``[H, W, 3]``. RGBA is composited on white (as keye-vl-utils does)."""
    if isinstance(image, Image.Image):
        if image.mode == "RGBA":
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image, mask=image.split()[3])
            image = background
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"{name}: expected uint8 pixels, got dtype {image.dtype}")
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{name}: expected an [H, W, 3] or [H, W] array, got shape {tuple(image.shape)}")
        return image
    raise ValueError(f"{name}: expected a PIL image or a numpy array, got {type(image).__name__}")


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8-valued pixels ``[..., 3, H, W]`` → float32: rescale 1/255, then (x - 0.5) / 0.5."""
    return (pixels.to(torch.float32) * (1.0 / 255.0) - IMAGE_MEAN) / IMAGE_STD


def patchify(frames: torch.Tensor, patch_size: int = PATCH_SIZE) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Frames ``[T, 3, H, W]`` → patches ``[T·(H/p)·(W/p), 3, p, p]`` in raster order, and ``(T, H/p, W/p)``.

    Patch ``n`` is frame ``t = n // (gh·gw)``, row ``(n % (gh·gw)) // gw``, column ``n % gw``.
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"patchify expects frames [T, 3, H, W], got shape {tuple(frames.shape)}")
    t, c, h, w = frames.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"frame size {h}x{w} is not a multiple of the patch size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    patches = frames.reshape(t, c, gh, patch_size, gw, patch_size)  # (T, C, gh, p, gw, p)
    patches = patches.permute(0, 2, 4, 1, 3, 5)  # (T, gh, gw, C, p, p)
    return patches.reshape(t * gh * gw, c, patch_size, patch_size).contiguous(), (t, gh, gw)


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8-valued frames ``[T, 3, H, W]`` → ``[T, 3, height, width]`` float32 with integral values in [0, 255].

    Bicubic with antialias, rounded and clamped back to pixel levels, as torchvision's ``resize`` does on
    uint8 video (the released video path). Identity when the size already matches.
    """
    if frames.shape[-2:] == (height, width):
        return frames.to(torch.float32)
    out = torch.nn.functional.interpolate(
        frames.to(torch.float32), size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )
    return out.round_().clamp_(0, 255)


def preprocess_image(
    image: Image.Image | np.ndarray,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    *,
    name: str = "image",
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One image → ``(patches [N, 3, 14, 14] float32, grid_thw (1, h/14, w/14))``; N = h·w / 196.

    ``name`` (a file or sample id) is used in error messages.
    """
    pixels = to_rgb_array(image, name)  # (H, W, 3) uint8
    height, width = pixels.shape[:2]
    try:
        h, w = smart_resize(height, width, IMAGE_FACTOR, min_pixels, max_pixels)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if (h, w) != (height, width):
        pixels = np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.BICUBIC))
    frames = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None]  # (1, 3, h, w); copy: PIL arrays are read-only
    return patchify(normalize(frames))
