"""Toy components for tests: small, plain PyTorch, and knowing nothing of Megatron.

``toy_patch_encoder`` shows the encoder contract a third party implements (`keye.model.protocols`):
patches ``[N, 3, P, P]`` and ``grid_thw [K, 3]`` in, one feature per patch out. Under tensor parallelism
it is simply replicated on every TP rank. Tests add this module to a plugin host
(``host.add_plugin(keye.testing.toys, "toys")``) and select it with one blueprint line:
``model.vision_encoder: {name: toy_patch_encoder}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keye import hookimpl
from keye.config import doc


class ToyPatchEncoder(torch.nn.Module):
    @dataclass
    class Config:
        out_dim: int = doc("Feature width.", 32)
        patch_size: int = doc("Side of a square patch in pixels.", 14)

    def __init__(self, config: Config, ctx=None) -> None:
        super().__init__()
        self.out_dim = config.out_dim
        self.embed = torch.nn.Linear(3 * config.patch_size**2, config.out_dim)
        self.mix = torch.nn.Linear(config.out_dim, config.out_dim)

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        features = self.embed(patches.flatten(1))  # (N, D)
        return features + self.mix(torch.nn.functional.gelu(features))


@hookimpl
def keye_register_vision_encoders(register):
    register("toy_patch_encoder", ToyPatchEncoder)
