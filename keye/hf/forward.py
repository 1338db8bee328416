"""``KeyeVL``: a loaded released checkpoint, and the released model's forward on the released processor's tensors.

:meth:`KeyeVL.hf_forward` is the released prefill (logits of every position) for a model whole in one process
(TP allowed, PP = 1); :meth:`KeyeVL.hf_generate` is Hugging Face ``generate`` on those tensors (left-padded
batches), run by the built-in ``megatron`` generator's KV-cache loop (`keye.hf.generate`). Position ids come
from the format's position encoding, built through the registry (`keye.hf.config.KeyeVLConfigs.position_encoding`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from keye.hf.config import hf_configs


def causal_padding_mask(attention_mask: Tensor | None, batch: int, length: int) -> Tensor:
    """Megatron's attention mask ``[B, 1, L, L]`` bool, True = masked: causal, padded keys hidden.

    A padded query row would hide every key (all earlier keys are padding too under left padding), which
    softmax turns into NaN in some kernels: each token always sees itself, so no row is fully masked.
    Rows of real tokens are unchanged (their diagonal is a real, visible key anyway).
    """
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)  # (L, L): True above the diagonal
    mask = causal.expand(batch, 1, length, length)
    if attention_mask is not None:
        padded_keys = (attention_mask == 0).cpu().view(batch, 1, 1, length)
        mask = mask | padded_keys
    return mask & ~torch.eye(length, dtype=torch.bool)  # (B, 1, L, L)


class KeyeVL(nn.Module):
    """A loaded released checkpoint: ``model`` (``KeyeVLModel``), ``config`` (config.json dict), ``configs``.

    ``unused`` holds the released tensors the model has no use for (written back by `keye.hf.keye_vl.save_keye_vl`);
    ``generation_config`` is the checkpoint's generation_config.json, if it had one.
    """

    def __init__(self, model: nn.Module, config: dict, unused: dict[str, Tensor] | None = None,
                 generation_config: dict | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.configs = hf_configs(config)
        self.unused = dict(unused or {})
        self.generation_config = generation_config

    @property
    def skipped(self) -> list[str]:
        """Names of the released weights that were not loaded (unused by the model)."""
        return sorted(self.unused)

    @staticmethod
    def _vision(pixels: Tensor | None, grid_thw: Tensor | None, patch: int, what: str) -> Any:
        from keye.model.composition import VisionInputs

        if pixels is None:
            return None
        if grid_thw is None:
            raise ValueError(f"{what} given without its grid_thw")
        pixels = pixels.reshape(pixels.shape[0], 3, patch, patch)  # (N, 3*P*P) or (N, 3, P, P) → (N, 3, P, P)
        return VisionInputs(patches=pixels, grid_thw=torch.as_tensor(grid_thw, dtype=torch.long).reshape(-1, 3))

    @torch.no_grad()
    def hf_forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                   image_grid_thw: Tensor | None = None, pixel_values_videos: Tensor | None = None,
                   video_grid_thw: Tensor | None = None, second_per_grid_ts: Tensor | None = None) -> Tensor:
        """The released model's prefill on the released processor's tensors: logits ``[B, L, V]`` (full vocab)."""
        from megatron.core import parallel_state as mpu
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        if mpu.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError("hf_forward needs the whole model in this process (pipeline parallel size 1)")
        patch = self.configs.vision.patch_size
        images = self._vision(pixel_values, image_grid_thw, patch, "pixel_values")
        videos = self._vision(pixel_values_videos, video_grid_thw, patch, "pixel_values_videos")
        batch, length = input_ids.shape
        position_ids, _ = self.configs.position_encoding().get_rope_index(
            input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask)  # (3, B, L)
        device = next(self.model.parameters()).device
        mask = causal_padding_mask(attention_mask, batch, length).to(device)
        logits = self.model(input_ids.to(device), position_ids.to(device), mask, images=images, videos=videos)
        if mpu.get_tensor_model_parallel_world_size() > 1:
            logits = gather_from_tensor_model_parallel_region(logits)  # (B, L, V/TP) → (B, L, V)
        return logits

    @torch.no_grad()
    def hf_generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                    image_grid_thw: Tensor | None = None, pixel_values_videos: Tensor | None = None,
                    video_grid_thw: Tensor | None = None, second_per_grid_ts: Tensor | None = None, *,
                    max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, min_p: float = 0.0, eos_token_id: int | list[int] | None = None,
                    pad_token_id: int | None = None, seed: int | None = None, on_token: Any = None) -> Tensor:
        """Hugging Face ``generate`` on the released processor's tensors: ids ``[B, L + new]``.

        The batch may be left-padded (``attention_mask``); each row is split off with its own images and videos
        (the grids are listed row after row) and M-RoPE ids from the released ``get_rope_index``, and the rows go
        to the built-in ``megatron`` generator in one call: the same KV-cache decode loop as everything else in
        keye, not a second one. Rows that stop early (an ``eos_token_id``; default: config/generation_config) are
        padded with ``pad_token_id`` up to the longest, as transformers does. ``do_sample=False`` is greedy; the
        filters' off values differ from transformers' defaults (``top_k=0``, not 50). ``on_token(row, token)``
        is called for each token as it is sampled.
        """
        from keye.hf.generate import hf_generate

        return hf_generate(self, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                           video_grid_thw, second_per_grid_ts, max_new_tokens=max_new_tokens, do_sample=do_sample,
                           temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, on_token=on_token)

    def _default(self, key: str) -> Any:
        """A generation setting from generation_config.json, else config.json."""
        for source in (self.generation_config or {}, self.config):
            if source.get(key) is not None:
                return source[key]
        return None

    forward = hf_forward
