"""``none``: no rotary positions, for a model part whose encoder needs none.

A vision encoder with learned absolute position embeddings only, or a language model trained without
positional information (NoPE), selects ``position_encoding: {name: none}``. It serves both roles of the
contract (`keye.model.protocols.TokenPositions` and `PatchPositions`): the angles are None, so Megatron's
attention rotates nothing; token position ids still count 0, 1, 2, ... per sample (packing and decoding
need ids, and a learned absolute table would read them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from keye import hookimpl
from keye.config import doc
from keye.model.protocols import next_position_ids, sequential_position_ids


class NoPositions(nn.Module):
    """Rotates nothing; counts token positions (module docstring)."""

    @dataclass
    class Config:
        spatial_merge_size: int = doc("ViT patches per LLM token along each side (the projector's merge): how "
                                      "many pad tokens the data pipeline writes per image or video.", 2)

    def __init__(self, config: Config | None = None, ctx: Any = None) -> None:
        super().__init__()
        self.config = config or self.Config()

    @property
    def spatial_merge_size(self) -> int:
        return self.config.spatial_merge_size

    def position_ids(self, input_ids: Tensor, **vision: Any) -> Tensor:
        return sequential_position_ids(input_ids.shape[-1]).to(input_ids.device)

    def decode_position_ids(self, position_ids: Tensor, count: int) -> Tensor:
        return next_position_ids(position_ids, count)

    def rotary_pos_emb(self, position_ids: Tensor) -> None:
        return None

    def patch_rotary_pos_emb(self, grid_thw: Tensor) -> None:
        return None


@hookimpl
def keye_register_position_encodings(register) -> None:
    register("none", NoPositions)
