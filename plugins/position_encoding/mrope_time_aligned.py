"""Time-aligned 3D M-RoPE of the Keye LLM (spec §1.4): position ids and the rotary application.

Position ids are ``[3, B, L]`` (temporal, height, width):

- text: the three axes are equal and grow by 1;
- a vision block (the run of ``<|image_pad|>`` / ``<|video_pad|>`` tokens of one image or video) starts at
  ``st = max(previous ids) + 1``; its token (t, i, j), with (i, j) in the **merged** grid (h/2, w/2),
  gets ``T = st + floor(t * second_per_grid_t * tokens_per_second)``, ``H = st + i``, ``W = st + j``.
  Images use ``second_per_grid_t = 0`` (T constant). With ``tokens_per_second = 2`` one temporal step is
  0.5 s of video, whatever the sampling fps;
- text after a block resumes at ``max + 1``.

This is Qwen2.5-VL's original ``get_rope_index``, which Keye's remote code copies. Two places where
transformers 5.24's rewrite of it differs, and where this module follows the original (and the spec):

- text after a video resumes at ``max(all ids) + 1``; 5.24 resumes at ``st + max(h, w) / merge`` even
  when the temporal ids went further (long videos at low fps);
- padding (``attention_mask == 0``) keeps position id 1 and ``rope_deltas = max + 1 - L`` with L the
  padded row length, so the k-th generated token of a row (slot ``L + k``) sits at ``L + k + delta``.
  5.24 fills padding with 0 and measures the delta against the unpadded length.

Blocks are found by counting pad tokens against the grids (``t * h * w / merge**2`` tokens each, in
order), not by looking at ``<|vision_start|>``: adjacent blocks without separators work, and a grid/token
mismatch is an error instead of silently shifted positions. Keye-1.5 puts text (timestamps) between the
frames of a video; listing one ``(1, h, w)`` grid per frame then gives each frame ``T = H0 = W0 = max + 1``,
which is how spec §3.6 describes 1.5 (not checked against vLLM's code).

Packing: :func:`packed_position_ids` computes the ids of several samples sharing one row, each
restarting from 0 (as if run alone).

Rotary: angles ``pos * inv_freq`` per axis (``[3, B, L, D/2]``, duplicated to D), then the channel
split ``mrope_section * 2 = [16, 24, 24, 16, 24, 24]`` where chunk c takes axis ``c % 3``
(Qwen2-VL style, not interleaved), then ``x * cos + rotate_half(x) * sin``.

Megatron-Core: ``GPTModel(position_embedding_type="mrope")`` with ``TransformerConfig.mrope_section``
does exactly this split in ``MultimodalRotaryEmbedding`` and the same rotate-half rotation, taking
``position_ids [3, B, L]`` as made here. :func:`megatron_rotary_pos_emb` gives the same ``[L, B, 1, D]``
tensor, and is what a language model that selects this scheme (``position_encoding: {name:
mrope_time_aligned}``, `keye.model.protocols.TokenPositions`) hands Megatron's attention. The data
pipeline builds the same node for the ids of every sample, so ``mrope_section``, ``tokens_per_second``
and ``spatial_merge_size`` in a blueprint reach both; generators ask it for decode positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from keye import hookimpl
from keye.config import doc
from keye.model.protocols import next_position_ids

#: Padding positions keep this id (as in Qwen2.5-VL); attention never looks at them.
PAD_POSITION = 1


# --- position ids --------------------------------------------------------------------------------------


class _Grids:
    """Hands out image and video grids in order, across samples of a batch or a packed row."""

    def __init__(self, image_grid_thw: Tensor | None, video_grid_thw: Tensor | None,
                 second_per_grid_ts: Tensor | Sequence[float] | None) -> None:
        self.images = _as_grids(image_grid_thw)
        self.videos = _as_grids(video_grid_thw)
        if second_per_grid_ts is None:
            seconds = torch.ones(len(self.videos), dtype=torch.float32)  # Qwen2.5-VL's default: 1.0
        else:
            # float32 like the processor's tensor, so floor() rounds exactly as the reference does
            seconds = torch.as_tensor(second_per_grid_ts, dtype=torch.float32).reshape(-1)
            if len(seconds) != len(self.videos):
                raise ValueError(f"{len(seconds)} second_per_grid_ts for {len(self.videos)} videos")
        self.seconds = seconds
        self.next_image = 0
        self.next_video = 0

    def take(self, is_video: bool) -> tuple[list[int], Tensor]:
        """The next (t, h, w) of that modality and its seconds per temporal grid step (0 for images)."""
        if is_video:
            index, self.next_video = self.next_video, self.next_video + 1
            self._check(index, self.videos, "video")
            return self.videos[index], self.seconds[index]
        index, self.next_image = self.next_image, self.next_image + 1
        self._check(index, self.images, "image")
        return self.images[index], torch.zeros((), dtype=torch.float32)

    @staticmethod
    def _check(index: int, grids: list[list[int]], kind: str) -> None:
        if index >= len(grids):
            raise ValueError(f"more {kind} tokens in input_ids than {kind}_grid_thw describes ({len(grids)} {kind}s)")

    def check_all_used(self) -> None:
        if self.next_image != len(self.images) or self.next_video != len(self.videos):
            raise ValueError(
                f"input_ids hold {self.next_image} images and {self.next_video} videos, but "
                f"image_grid_thw has {len(self.images)} and video_grid_thw has {len(self.videos)}"
            )


def _as_grids(grid_thw: Tensor | None) -> list[list[int]]:
    if grid_thw is None:
        return []
    return torch.as_tensor(grid_thw, dtype=torch.long).reshape(-1, 3).tolist()


def _runs(token_type: Tensor) -> list[tuple[int, int, int]]:
    """``(type, start, end)`` of each maximal run of equal values in a 1-D tensor."""
    n = token_type.numel()
    if n == 0:
        return []
    change = (torch.nonzero(token_type[1:] != token_type[:-1]).flatten() + 1).tolist()
    starts, ends = [0] + change, change + [n]
    types = token_type[starts].tolist()
    return list(zip(types, starts, ends))


def _vision_block(grid: list[int], seconds: Tensor, start: int, cfg: MRopeTimeAligned.Config) -> Tensor:
    """Position ids ``[3, t * h/m * w/m]`` of one image or video whose first id is ``start``."""
    t, h, w = grid
    m = cfg.spatial_merge_size
    if h % m or w % m:
        raise ValueError(f"grid (t={t}, h={h}, w={w}) is not divisible by spatial_merge_size {m}")
    gh, gw = h // m, w // m
    # same operation order and dtype as Qwen2.5-VL: (t * seconds) * tokens_per_second in float32, floored
    temporal = (torch.arange(t) * seconds * cfg.tokens_per_second).long()  # (t,)
    tt = temporal.view(-1, 1, 1).expand(t, gh, gw)
    hh = torch.arange(gh).view(1, -1, 1).expand(t, gh, gw)
    ww = torch.arange(gw).view(1, 1, -1).expand(t, gh, gw)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start  # (3, t*gh*gw)


def _sample_position_ids(input_ids: Tensor, grids: _Grids, cfg: MRopeTimeAligned.Config) -> Tensor:
    """Position ids ``[3, n]`` of one unpadded sample ``[n]``, starting from 0."""
    token_type = torch.zeros_like(input_ids)
    token_type[input_ids == cfg.image_token_id] = 1
    token_type[input_ids == cfg.video_token_id] = 2
    chunks: list[Tensor] = []
    start = 0  # max(ids so far) + 1
    for kind, lo, hi in _runs(token_type):
        if kind == 0:
            chunks.append(torch.arange(start, start + hi - lo).expand(3, -1))
            start += hi - lo
            continue
        # a run of pad tokens can hold several consecutive images (or videos): take grids until it is used up
        at = lo
        while at < hi:
            grid, seconds = grids.take(is_video=kind == 2)
            block = _vision_block(grid, seconds, start, cfg)
            if at + block.shape[1] > hi:
                name = "video" if kind == 2 else "image"
                raise ValueError(
                    f"{name} grid (t, h, w) = {tuple(grid)} needs {block.shape[1]} <|{name}_pad|> tokens "
                    f"but only {hi - at} follow at position {at}"
                )
            chunks.append(block)
            start = int(block.max()) + 1
            at += block.shape[1]
    if not chunks:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(chunks, dim=1)


def get_rope_index(
    input_ids: Tensor,
    image_grid_thw: Tensor | None = None,
    video_grid_thw: Tensor | None = None,
    second_per_grid_ts: Tensor | Sequence[float] | None = None,
    attention_mask: Tensor | None = None,
    config: MRopeTimeAligned.Config | None = None,
) -> tuple[Tensor, Tensor]:
    """M-RoPE position ids ``[3, B, L]`` and ``rope_deltas`` ``[B, 1]`` for a (padded) batch ``[B, L]``.

    ``image_grid_thw`` ``[n_images, 3]`` and ``video_grid_thw`` ``[n_videos, 3]`` are in ViT patches and
    listed in the order the blocks appear, row after row. ``second_per_grid_ts`` ``[n_videos]`` is
    ``temporal_patch_size / fps`` of each video (default 1.0). Tokens with ``attention_mask == 0`` are
    skipped (left or right padding) and get id 1. ``rope_deltas = max + 1 - L`` per row (L = padded length).
    """
    cfg = config or MRopeTimeAligned.Config()
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    grids = _Grids(image_grid_thw, video_grid_thw, second_per_grid_ts)
    position_ids = torch.full((3, batch, length), PAD_POSITION, dtype=torch.long)
    deltas = torch.zeros(batch, 1, dtype=torch.long)
    for b in range(batch):
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones(length, dtype=torch.bool)
        ids = _sample_position_ids(input_ids[b].cpu()[keep.cpu()], grids, cfg)
        position_ids[:, b, keep.cpu()] = ids
        top = int(ids.max()) if ids.numel() else -1
        deltas[b, 0] = top + 1 - length
    grids.check_all_used()
    return position_ids.to(input_ids.device), deltas.to(input_ids.device)


def packed_position_ids(
    input_ids: Tensor,
    cu_seqlens: Tensor | Sequence[int],
    image_grid_thw: Tensor | None = None,
    video_grid_thw: Tensor | None = None,
    second_per_grid_ts: Tensor | Sequence[float] | None = None,
    config: MRopeTimeAligned.Config | None = None,
) -> Tensor:
    """Position ids ``[3, L]`` of one packed row ``[L]`` holding several samples.

    Sample s is ``input_ids[cu_seqlens[s]:cu_seqlens[s+1]]``; its ids start at 0, exactly as if it ran
    alone. Grids are listed in order across all samples. Tokens after ``cu_seqlens[-1]`` are padding (id 1).
    Megatron takes this as ``position_ids[:, None, :]`` (``[3, 1, L]``).
    """
    cfg = config or MRopeTimeAligned.Config()
    if input_ids.dim() != 1:
        raise ValueError(f"packed input_ids must be one row [L], got shape {tuple(input_ids.shape)}")
    bounds = torch.as_tensor(cu_seqlens, dtype=torch.long).cpu().tolist()
    length = input_ids.numel()
    if not bounds or bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds)) or bounds[-1] > length:
        raise ValueError(f"cu_seqlens must rise from 0 to at most {length}, got {bounds}")
    grids = _Grids(image_grid_thw, video_grid_thw, second_per_grid_ts)
    ids = input_ids.cpu()
    position_ids = torch.full((3, length), PAD_POSITION, dtype=torch.long)
    for lo, hi in zip(bounds, bounds[1:]):
        position_ids[:, lo:hi] = _sample_position_ids(ids[lo:hi], grids, cfg)
    grids.check_all_used()
    return position_ids.to(input_ids.device)


# --- rotary application --------------------------------------------------------------------------------


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim: pairs (i, i + D/2) rotate together."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def select_sections(x: Tensor, mrope_section: Sequence[int]) -> Tensor:
    """Pick each channel's axis: ``x`` ``[3, ..., D]`` → ``[..., D]``.

    D is split as ``mrope_section * 2`` (e.g. [16, 24, 24, 16, 24, 24]); chunk c comes from axis c % 3.
    """
    chunks = x.split(list(mrope_section) * 2, dim=-1)
    return torch.cat([chunk[c % 3] for c, chunk in enumerate(chunks)], dim=-1)


def mrope_angles(position_ids: Tensor, inv_freq: Tensor) -> Tensor:
    """Per-axis angles ``[3, B, L, D]`` (``pos * inv_freq``, duplicated to D), float32."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # (3, B, L, D/2)
    return torch.cat([freqs, freqs], dim=-1)  # (3, B, L, D)


def apply_mrope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, mrope_section: Sequence[int],
                unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """Rotate q, k ``[B, heads, L, D]`` by per-axis ``cos``/``sin`` ``[3, B, L, D]``.

    ``unsqueeze_dim`` is where the heads axis goes in cos/sin (1 for ``[B, H, L, D]``, 2 for ``[B, L, H, D]``),
    as in Qwen2-VL's ``apply_multimodal_rotary_pos_emb``.
    """
    cos = select_sections(cos, mrope_section).unsqueeze(unsqueeze_dim)  # (B, 1, L, D)
    sin = select_sections(sin, mrope_section).unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def megatron_rotary_pos_emb(position_ids: Tensor, inv_freq: Tensor, mrope_section: Sequence[int]) -> Tensor:
    """Megatron-Core's ``rotary_pos_emb`` for these ids: angles ``[L, B, 1, D]`` (Megatron takes cos/sin itself).

    Equal to ``MultimodalRotaryEmbedding(kv_channels=D, rotary_base=theta)(position_ids, mrope_section)``;
    pass it to Megatron attention as ``rotary_pos_emb`` (bshd, or thd with ``B = 1`` and one id per packed token).
    """
    emb = select_sections(mrope_angles(position_ids, inv_freq), mrope_section)  # (B, L, D)
    return emb.transpose(0, 1)[:, :, None, :].contiguous()  # (L, B, 1, D)


class MRopeTimeAligned(nn.Module):
    """Keye's time-aligned M-RoPE: position ids from tokens and grids, and the rotary cos/sin.

    ``forward(position_ids [3, B, L]) -> (cos, sin)``, each ``[3, B, L, head_dim]`` float32 (one per axis),
    to be combined by :meth:`apply_rotary` / :func:`apply_mrope`.
    """

    @dataclass
    class Config:
        mrope_section: list[int] = doc(
            "Frequencies per axis (temporal, height, width); sums to head_dim / 2.", default_factory=lambda: [16, 24, 24]
        )
        tokens_per_second: float = doc("Temporal ids per second of video (2: +1 id = 0.5 s).", 2.0)
        spatial_merge_size: int = doc("Side of the projector's patch merge (2: 2x2 ViT patches per token).", 2)
        theta: float = doc("RoPE base (Qwen3: 1e6; Keye-VL-1.5 raises it to 8e6 for 128K context).", 1_000_000.0)
        head_dim: Optional[int] = doc("Per-head width of the LLM attention; null: 2 * sum(mrope_section). A model "
                                      "part that selects this scheme sets it to its own head width.", None)
        image_token_id: int = doc("<|image_pad|>: one per merged image token.", 151655)
        video_token_id: int = doc("<|video_pad|>: one per merged video token.", 151656)
        vision_start_token_id: int = doc(
            "<|vision_start|>. Blocks are found by counting pad tokens against the grids, so this id is not "
            "needed to compute positions; it is kept so the settings mirror the HF config.",
            151652,
        )

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        section = config.mrope_section
        if len(section) != 3 or not all(isinstance(n, int) and n >= 0 for n in section):
            check.fail("mrope_section", f"{list(section)} must be three non-negative sizes (time, height, width)")
        check.number(config, "tokens_per_second", above=0)
        check.number(config, "theta", above=0)
        check.count(config, "spatial_merge_size")

    def __init__(self, config: MRopeTimeAligned.Config | None = None, ctx: Any = None) -> None:
        super().__init__()
        self.config = config = config or self.Config()
        if config.head_dim is None:  # built on its own (the data pipeline): the width its sections describe
            config = self.config = dataclasses.replace(config, head_dim=2 * sum(config.mrope_section))
        if 2 * sum(config.mrope_section) != config.head_dim:
            raise ValueError(
                f"mrope_time_aligned: 2 * sum(mrope_section) = {2 * sum(config.mrope_section)} "
                f"must equal head_dim = {config.head_dim}"
            )
        d = config.head_dim
        inv_freq = 1.0 / (config.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # (D/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def get_rope_index(self, input_ids: Tensor, image_grid_thw: Tensor | None = None,
                       video_grid_thw: Tensor | None = None, second_per_grid_ts: Tensor | None = None,
                       attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """See :func:`get_rope_index`."""
        return get_rope_index(input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, self.config)

    def packed_position_ids(self, input_ids: Tensor, cu_seqlens: Tensor, image_grid_thw: Tensor | None = None,
                            video_grid_thw: Tensor | None = None, second_per_grid_ts: Tensor | None = None) -> Tensor:
        """See :func:`packed_position_ids`."""
        return packed_position_ids(input_ids, cu_seqlens, image_grid_thw, video_grid_thw, second_per_grid_ts, self.config)

    # --- TokenPositions (a language model's position_encoding) --------------------------------------

    @property
    def spatial_merge_size(self) -> int:
        return self.config.spatial_merge_size

    def position_ids(self, input_ids: Tensor, *, image_token_id: int | None = None, video_token_id: int | None = None,
                     image_grid_thw: Tensor | None = None, video_grid_thw: Tensor | None = None,
                     second_per_grid_ts: Sequence[float] | None = None) -> Tensor:
        """``[3, L]`` ids of one sample ``[L]`` on its own; the pad token ids default to this config's."""
        config = dataclasses.replace(
            self.config,
            image_token_id=self.config.image_token_id if image_token_id is None else image_token_id,
            video_token_id=self.config.video_token_id if video_token_id is None else video_token_id,
        )
        return packed_position_ids(input_ids, [0, input_ids.shape[-1]], image_grid_thw, video_grid_thw,
                                   second_per_grid_ts, config)

    def decode_position_ids(self, position_ids: Tensor, count: int) -> Tensor:
        """Generated token k sits at ``max(prompt ids) + 1 + k`` on all axes (``rope_deltas``)."""
        return next_position_ids(position_ids, count)

    def rotary_pos_emb(self, position_ids: Tensor) -> Tensor:
        """Megatron's angles ``[L, B, 1, D]`` for ``position_ids [3, B, L]`` (``[B, L]``: equal axes)."""
        if position_ids.dim() == 2:
            position_ids = position_ids.expand(3, *position_ids.shape)
        return self.megatron_rotary_pos_emb(position_ids)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        emb = mrope_angles(position_ids.to(self.inv_freq.device), self.inv_freq)  # (3, B, L, D)
        return emb.cos(), emb.sin()

    def apply_rotary(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
        """See :func:`apply_mrope` (with this config's ``mrope_section``)."""
        return apply_mrope(q, k, cos, sin, self.config.mrope_section, unsqueeze_dim)

    def megatron_rotary_pos_emb(self, position_ids: Tensor) -> Tensor:
        """See :func:`megatron_rotary_pos_emb`."""
        return megatron_rotary_pos_emb(position_ids.to(self.inv_freq.device), self.inv_freq, self.config.mrope_section)


@hookimpl
def keye_register_position_encodings(register) -> None:
    register("mrope_time_aligned", MRopeTimeAligned)
