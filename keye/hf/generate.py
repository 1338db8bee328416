"""``KeyeVL.hf_generate``: Hugging Face ``generate`` on the released processor's tensors, through the built-in
``megatron`` generator (the same KV-cache decode loop as everything else in keye, not a second one).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from keye.hf.forward import KeyeVL


def hf_generate(model: Any, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                image_grid_thw: Tensor | None = None, pixel_values_videos: Tensor | None = None,
                video_grid_thw: Tensor | None = None, second_per_grid_ts: Tensor | None = None, *,
                max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, min_p: float = 0.0, eos_token_id: int | list[int] | None = None,
                pad_token_id: int | None = None, seed: int | None = None, on_token: Any = None) -> Tensor:
    """`keye.hf.forward.KeyeVL.hf_generate` for ``model`` (a `KeyeVL`); see there."""
    from keye.generate.contract import GenerationRequest, GeneratorContext, SamplingSettings
    from keye.plugins import get_registry

    batch, length = input_ids.shape
    keep = (attention_mask.bool() if attention_mask is not None
            else torch.ones(batch, length, dtype=torch.bool)).cpu()  # (B, L)
    positions, _ = model.configs.position_encoding().get_rope_index(
        input_ids.cpu(), image_grid_thw, video_grid_thw, second_per_grid_ts, keep.long())  # (3, B, L)
    patch = model.configs.vision.patch_size
    images = _RowSplitter(pixel_values, image_grid_thw, None, model.configs.projector.merge, patch, "pixel_values")
    videos = _RowSplitter(pixel_values_videos, video_grid_thw, second_per_grid_ts, model.configs.projector.merge,
                          patch, "pixel_values_videos")
    requests = []
    for b in range(batch):
        ids = input_ids[b].cpu()[keep[b]]  # (L_b,)
        row_images, _ = images.take(int((ids == model.configs.mrope.image_token_id).sum()), b)
        row_videos, seconds = videos.take(int((ids == model.configs.mrope.video_token_id).sum()), b)
        requests.append(GenerationRequest(ids, images=row_images, videos=row_videos, video_seconds=seconds,
                                          position_ids=positions[:, b][:, keep[b]]))
    eos = eos_token_id if eos_token_id is not None else model._default("eos_token_id")
    stops = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    pad = pad_token_id if pad_token_id is not None else model._default("pad_token_id")
    pad = int(pad if pad is not None else (stops[0] if stops else 0))
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                                top_k=top_k, top_p=top_p, min_p=min_p, stop_token_ids=stops, seed=seed)
    Generator = get_registry().cls("generator", "megatron")
    generator = Generator(Generator.Config(), GeneratorContext(model=model.model))
    stream = (lambda request, _sample, token: on_token(request, token)) if on_token is not None else None
    outputs = generator.generate(requests, settings, on_token=stream)
    new = max(len(o.samples[0].token_ids) for o in outputs)
    out = torch.full((batch, length + new), pad, dtype=torch.long)
    out[:, :length] = input_ids.cpu()
    for b, output in enumerate(outputs):
        tokens = output.samples[0].token_ids
        out[b, length:length + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out.to(input_ids.device)


class _RowSplitter:
    """Hands out a batch's packed images (or videos) row by row: the grids are listed in reading order, row
    after row, so a row with ``n`` vision tokens takes the next grids whose merged token counts add up to ``n``."""

    def __init__(self, pixels: Tensor | None, grid_thw: Tensor | None, seconds: Tensor | None, merge: int, patch: int,
                 what: str) -> None:
        self.pixels = KeyeVL._vision(pixels, grid_thw, patch, what)
        self.seconds = [float(s) for s in torch.as_tensor(seconds).reshape(-1)] if seconds is not None else None
        self.merge, self.what = merge, what
        self.grid, self.patch = 0, 0  # next grid row, next patch

    def take(self, tokens: int, row: int) -> tuple[Any, list[float] | None]:
        from keye.model.composition import VisionInputs

        if tokens == 0:
            return None, None
        start_grid, start_patch, found = self.grid, self.patch, 0
        grids = self.pixels.grid_thw if self.pixels is not None else torch.zeros(0, 3, dtype=torch.long)
        while found < tokens and self.grid < len(grids):
            size = int(grids[self.grid].prod())
            found += size // self.merge**2
            self.patch += size
            self.grid += 1
        if found != tokens:
            raise ValueError(f"{self.what}: row {row} has {tokens} vision tokens but its grids give {found}")
        seconds = None
        if self.seconds is not None:
            seconds = self.seconds[start_grid:self.grid]
        elif self.what == "pixel_values_videos":
            seconds = [1.0] * (self.grid - start_grid)  # get_rope_index's default
        inputs = VisionInputs(self.pixels.patches[start_patch:self.patch], grids[start_grid:self.grid])
        return inputs, seconds
