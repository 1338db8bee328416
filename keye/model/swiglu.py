"""SwiGLU as one autograd function: Megatron's gated MLP without the unfused activation's extra passes.

Why: without ``bias_activation_fusion`` (whose fused kernels Megatron compiles with ``torch.compile``, which
needs a C++ toolchain at run time on the CPU) Megatron's ``MLP`` computes ``silu(a) * (b + 0.0)`` on
``torch.chunk`` views of the fc1 output: a copy for the ``+ 0.0`` offset, silu and its backward on strided
halves, and a ``cat`` that joins the two halves' gradients. ``swiglu`` does the same math with the
gradients written straight into the halves of one buffer:

    y = [a, b],  out = silu(a) * b,  da = silu'(a) * (g * b),  db = silu(a) * g

These are the very ops autograd runs (``silu_backward``, two products), so results are bit-identical;
one step of the small benchmark model is about 20 ms (1.3%) faster on one CPU thread.

``SwiGLUMLP`` is Megatron's ``MLP`` (same submodules and state dict) that takes this path when the config
asks exactly for SwiGLU (gated, ``F.silu``, no clamp or offset, no TE activation or fused bias-activation,
no per-token scale); anything else is ``MLP.forward`` unchanged. ``to_swiglu_mlp`` switches the MLPs of a
built model, where `keye.model.backend.cpu_fast_paths` allows it (CPU, fp32/bf16, local layers).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:
        a, b = y.chunk(2, dim=-1)
        ctx.save_for_backward(y)
        return F.silu(a).mul_(b)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        a, b = y.chunk(2, dim=-1)
        grad_y = torch.empty_like(y)
        grad_a, grad_b = grad_y.chunk(2, dim=-1)  # views: written in place
        torch.mul(grad, b, out=grad_a)
        torch.ops.aten.silu_backward.grad_input(grad_a, a, grad_input=grad_a)  # silu'(a) * (g * b)
        torch.mul(F.silu(a), grad, out=grad_b)
        return grad_y


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """``[..., 2n] → [..., n]``: ``silu(y[..., :n]) * y[..., n:]``."""
    return _SwiGLU.apply(y)


class SwiGLUMLP(MLP):
    """Megatron's ``MLP`` with the SwiGLU activation as one autograd function (module docstring)."""

    def _plain_swiglu(self) -> bool:
        config = self.config
        return (config.gated_linear_unit and config.activation_func is F.silu
                and not config.use_te_activation_func and not config.bias_activation_fusion
                and config.glu_linear_offset == 0.0 and config.activation_func_clamp_value is None)

    def forward(self, hidden_states: torch.Tensor, per_token_scale: Any = None, **kwargs: Any) -> Any:
        if per_token_scale is not None or not self._plain_swiglu():
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)  # (s, b, 2 * ffn / tp)
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(swiglu(intermediate))  # (output, output bias)


def to_swiglu_mlp(model: torch.nn.Module) -> torch.nn.Module:
    """Switch every Megatron ``MLP`` of a built model to ``SwiGLUMLP`` in place (it adds no state).

    After the build, not in the layer spec: Megatron's ``TransformerLayer`` recognises its own ``MLP`` by
    identity (``submodules.mlp.module == MLP``) to hand it the tensor-parallel group, and logs "Unknown MLP
    type" once per layer for any other class, a subclass included. With ``MLP`` in the spec Megatron builds
    it as it always does; the switch only changes which ``forward`` runs.
    """
    for module in model.modules():
        if type(module) is MLP:
            module.__class__ = SwiGLUMLP
    return model
