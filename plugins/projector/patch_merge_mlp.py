"""2x2 patch-merge MLP projector, Keye's ``mlp_AR`` (spec §1.2): ViT patch features → LLM embeddings.

Per image or video, in raster order ``(t, h, w)`` of ViT patches, each ``merge x merge`` square becomes one
token: ``rearrange(x, "(t h p1 w p2) d -> (t h w) (p1 p2 d)", p1=merge, p2=merge)``; token (t, i, j) is the
concatenation of patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1). Then ``linear_1 → act → linear_2``.

Variants, all with the released parameter names (``pre_norm``, ``linear_1``, ``linear_2``) so HF weights
load 1:1 under ``mlp_AR.``:

- ``norm: pre_merge`` (Keye-VL-8B-Preview): ``LayerNorm(in_dim, eps=1e-5)`` on each patch before the merge;
- ``norm: post_merge`` (Keye-VL-1.5): ``LayerNorm(in_dim * merge**2, eps=1e-5)`` after the merge
  (still named ``pre_norm``: it precedes the MLP);
- ``act: gelu`` (released code: exact erf GELU) or ``act: swiglu`` (what the paper text says). SwiGLU has
  no released weights; its ``linear_1`` holds ``[gate; up]`` stacked (``2 * hidden`` outputs), Megatron's
  fused gated-linear layout, so it splits cleanly under tensor parallelism.

Tensor parallelism (``ctx.parallel.tp_size > 1``): ``linear_1`` is Megatron's ``ColumnParallelLinear``
(``gather_output=False``: each rank keeps its slice of the hidden units) and ``linear_2`` its
``RowParallelLinear`` (``input_is_parallel=True``: the partial products are summed over the TP group), the
Megatron MLP pattern, so the hidden activations are never gathered. The weights are those of TP=1: the full
``nn.Linear`` is drawn first (the same RNG draws as one process), and Megatron's CPU initialisation
(``use_cpu_initialization``) splits that master copy; biases are sliced alike (``linear_2``'s bias is
whole on every rank, added after the sum). With SwiGLU, ``linear_1`` is split with ``stride=2``: the
``[gate; up]`` rows fall into ``2 * tp`` pieces and rank r keeps ``[gate_r; up_r]``, so its local
``chunk(2)`` still pairs each gate unit with its own up unit. Without parallel state, or with TP=1, the
linears stay plain ``nn.Linear`` (identical parameter names either way: ``linear_1.weight`` etc.).
Everything else (the norm, the merge) is replicated on the TP ranks. The linears are built by
:meth:`PatchMergeMLP.build_linear`, the one place to override to use other linear layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keye import hookimpl
from keye.config import doc

ACTS = ("gelu", "swiglu")
NORMS = ("pre_merge", "post_merge")


def merge_index(grid_thw: Tensor, merge: int) -> Tensor:
    """Gather index ``[N]`` that puts the patches of each merge square next to each other.

    ``x[merge_index(grid, m)].reshape(-1, m * m * d)`` is the per-grid
    ``"(t h p1 w p2) d -> (t h w) (p1 p2 d)"`` rearrange, for all grids of a packed sequence at once.
    """
    grid_thw = torch.as_tensor(grid_thw, dtype=torch.long).reshape(-1, 3)
    index, offset = [], 0
    for t, h, w in grid_thw.tolist():
        if h % merge or w % merge:
            raise ValueError(f"grid (t={t}, h={h}, w={w}) is not divisible by merge {merge}")
        patches = torch.arange(t * h * w).view(t, h // merge, merge, w // merge, merge)  # (t, h', p1, w', p2)
        index.append(patches.permute(0, 1, 3, 2, 4).reshape(-1) + offset)  # (t, h', w', p1, p2) flattened
        offset += t * h * w
    if not index:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(index)


class PatchMergeMLP(nn.Module):
    """``forward(features [N, in_dim], grid_thw [K, 3]) -> [N / merge**2, out_dim]``."""

    @dataclass
    class Config:
        in_dim: int = doc("Width of the ViT features (SigLIP-so400m: 1152).", 1152)
        out_dim: int = doc("Width of the LLM embeddings (Qwen3-8B: 4096).", 4096)
        merge: int = doc("Side of the square of ViT patches merged into one token (2: 2x2).", 2)
        hidden: int | None = doc("Hidden width of the MLP; null: in_dim * merge**2 (4608, as released).", None)
        act: str = doc("gelu (exact erf, as released) | swiglu (as the paper text says; no released weights).", "gelu")
        norm: str = doc(
            "pre_merge: LayerNorm(in_dim) per patch (Preview) | post_merge: LayerNorm(in_dim * merge**2) (1.5).",
            "pre_merge",
        )
        norm_eps: float = doc("LayerNorm epsilon (released: 1e-5).", 1e-5)

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        """Choices, the TP split of the hidden width, and widths that match the towers on either side."""
        check.count(config, "in_dim", "out_dim", "merge")
        check.one_of(config, "act", ACTS)
        check.one_of(config, "norm", NORMS)
        check.number(config, "norm_eps", above=0)
        if config.hidden is not None:
            check.count(config, "hidden")
        hidden = config.hidden or config.in_dim * config.merge**2
        if hidden % check.tensor:
            check.fail("hidden", f"{hidden} is not divisible by parallel.tensor ({check.tensor})")
        model = check.blueprint.model
        for name, slot in (("in_dim", "vision_encoder"), ("out_dim", "language_model")):
            width = (model[slot] or {}).get("hidden_size")
            if isinstance(width, int) and width != getattr(config, name):
                check.fail(name, f"{getattr(config, name)}, but model.{slot}.hidden_size is {width}")
        # the data pipeline writes t*h*w / side² pad tokens per image with the language model's scheme's side
        side = ((model.language_model or {}).get("position_encoding") or {}).get("spatial_merge_size")
        if isinstance(side, int) and side != config.merge:
            check.fail("merge", f"{config.merge}, but model.language_model.position_encoding.spatial_merge_size is "
                                f"{side} (pad tokens per image are counted with it)")

    @classmethod
    def hf_weight_shapes(cls, config: Config) -> dict[str, tuple[int, ...]]:
        """The released ``mlp_AR`` weights of this config and their shapes (keye.hf.contract.HFWeights):
        the parameter names are the released ones, so the key map is the identity."""
        merged = config.in_dim * config.merge**2
        hidden = config.hidden or merged
        fc1 = 2 * hidden if config.act == "swiglu" else hidden  # [gate; up] stacked
        norm = config.in_dim if config.norm == "pre_merge" else merged
        return {"pre_norm.weight": (norm,), "pre_norm.bias": (norm,), "linear_1.weight": (fc1, merged),
                "linear_1.bias": (fc1,), "linear_2.weight": (config.out_dim, hidden), "linear_2.bias": (config.out_dim,)}

    @classmethod
    def hf_to_keye(cls, hf: dict[str, Tensor], config: Config) -> dict[str, Tensor]:
        """Released tensors → parameters: the same names."""
        return dict(hf)

    @classmethod
    def keye_to_hf(cls, state: dict[str, Tensor], config: Config) -> dict[str, Tensor]:
        """Parameters → released tensors: the same names."""
        return dict(state)

    def __init__(self, config: PatchMergeMLP.Config | None = None, ctx: Any = None) -> None:
        super().__init__()
        self.config = config = config or self.Config()
        if config.act not in ACTS:
            raise ValueError(f"patch_merge_mlp: act must be one of {', '.join(ACTS)}, got {config.act!r}")
        if config.norm not in NORMS:
            raise ValueError(f"patch_merge_mlp: norm must be one of {', '.join(NORMS)}, got {config.norm!r}")
        merged = config.in_dim * config.merge**2
        hidden = config.hidden or merged
        self.out_dim = config.out_dim
        self.parallel = getattr(ctx, "parallel", None)
        self.tp_size = self.parallel.tp_size if self.parallel is not None else 1
        gated = config.act == "swiglu"
        if hidden % self.tp_size:
            raise ValueError(
                f"patch_merge_mlp: hidden {hidden} is not divisible by the tensor-parallel size {self.tp_size}"
            )
        self.pre_norm = nn.LayerNorm(config.in_dim if config.norm == "pre_merge" else merged, eps=config.norm_eps)
        self.linear_1 = self.build_linear(merged, 2 * hidden if gated else hidden, "column", stride=2 if gated else 1)
        self.linear_2 = self.build_linear(hidden, config.out_dim, "row")
        if self.parallel is not None:  # where (and in which dtype) the rest of the model lives
            self.to(device=self.parallel.device, dtype=getattr(ctx, "dtype", torch.float32))

    def build_linear(
        self, in_features: int, out_features: int, split: Literal["column", "row"], stride: int = 1
    ) -> nn.Module:
        """One linear layer with bias (as released): plain under TP=1, Megatron's column/row-parallel
        linear under TP>1 (``split``), holding this rank's slice of the TP=1 weights."""
        full = nn.Linear(in_features, out_features, bias=True)  # the TP=1 draw, whatever the layout
        if self.tp_size == 1:
            return full
        from megatron.core import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        from keye.parallel.tp_weights import tp_slice

        config = ModelParallelConfig(
            tensor_model_parallel_size=self.tp_size,
            use_cpu_initialization=True,  # Megatron draws the master on the CPU and keeps this rank's slice
            perform_initialization=True,
            params_dtype=torch.float32,  # the module is cast to ctx.dtype afterwards, like the plain path
            gradient_accumulation_fusion=False,
            sequence_parallel=False,
        )
        master = lambda weight: weight.copy_(full.weight.detach())  # noqa: E731  the "draw": TP=1's weight
        if split == "column":
            layer = ColumnParallelLinear(
                in_features, out_features, config=config, init_method=master, bias=True,
                gather_output=False, stride=stride,
            )
        else:
            layer = RowParallelLinear(
                in_features, out_features, config=config, init_method=master, bias=True,
                input_is_parallel=True, skip_bias_add=False,
            )
        with torch.no_grad():  # Megatron zeroes biases; take the TP=1 ones (sliced where the bias is split)
            layer.bias.copy_(tp_slice(full.bias, layer.bias, self.parallel.tp_rank, self.tp_size))
        return layer

    @staticmethod
    def _linear(layer: nn.Module, x: Tensor) -> Tensor:
        """Megatron's parallel linears return ``(output, bias)``; the bias is already added here. A plain
        ``nn.Linear`` runs on oneDNN for fp32 CPU tensors (``keye.model.onednn_linear``: faster, same math)."""
        if type(layer) is nn.Linear:
            from keye.model.onednn_linear import linear  # imports Megatron: not at plugin load

            return linear(x, layer.weight, layer.bias)
        out = layer(x)
        return out[0] if isinstance(out, tuple) else out

    def merge_patches(self, features: Tensor, grid_thw: Tensor) -> Tensor:
        """The 2x2 merge alone: ``[N, d] -> [N / merge**2, merge**2 * d]``."""
        m = self.config.merge
        grid_thw = torch.as_tensor(grid_thw, dtype=torch.long).reshape(-1, 3)
        expected = int(grid_thw.prod(-1).sum())
        if features.shape[0] != expected:
            raise ValueError(
                f"patch_merge_mlp: {features.shape[0]} patch features but grid_thw {grid_thw.tolist()} "
                f"describes {expected}"
            )
        index = merge_index(grid_thw, m).to(features.device)
        return features[index].reshape(-1, m * m * features.shape[-1])

    def forward(self, features: Tensor, grid_thw: Tensor) -> Tensor:
        if self.config.norm == "pre_merge":
            x = self.merge_patches(self.pre_norm(features), grid_thw)  # (N/4, 4*in_dim)
        else:
            x = self.pre_norm(self.merge_patches(features, grid_thw))
        x = self._linear(self.linear_1, x)  # (N/4, hidden / tp), times 2 with SwiGLU
        if self.config.act == "gelu":
            x = F.gelu(x)  # exact erf, like HF's GELUActivation
        else:
            gate, up = x.chunk(2, dim=-1)  # this rank's [gate_r; up_r]
            x = F.silu(gate) * up
        return self._linear(self.linear_2, x)  # (N/4, out_dim), summed over TP ranks


@hookimpl
def keye_register_projectors(register) -> None:
    register("patch_merge_mlp", PatchMergeMLP)
