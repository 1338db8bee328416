"""fp32 linears on the CPU through oneDNN: Megatron's local tensor-parallel linears, faster matmuls.

Why: on the CPU Megatron's local linears run ``torch.matmul``, which PyTorch hands to MKL's sgemm for fp32.
oneDNN (shipped inside PyTorch, ``torch.ops.mkldnn._linear_pointwise``) runs the same fp32 GEMMs ``x W^T``
and ``g W`` 10-15% faster on the shapes of keye's layers (measured on an AMD EPYC, AVX-512: 98-110 against
88-96 GFLOP/s, one thread), and adds the bias inside the GEMM. The weight gradient ``g^T x`` stays on MKL,
as Megatron computes it: there oneDNN is not faster (its transposed operands cost more than they save).
The math is the same fp32 matmul; only the order of the fp32 additions inside a dot product differs,
so results agree with MKL's to fp32 rounding.

``OneDnnColumnParallelLinear``/``OneDnnRowParallelLinear`` replace only Megatron's local matmul
(``_forward_impl``, like ``keye.model.fp8_linear``); parameters, state dict and all TP communication are
the parent's. The oneDNN path is taken per call, for fp32 CPU tensors without sequence parallelism,
gradient-accumulation fusion or deferred weight gradients, with oneDNN available; anything else (GPUs,
bf16, ...) runs the parent's ``_forward_impl`` unchanged. The column-parallel all-reduce of the input
gradient (``allreduce_dgrad``, TP > 1) is Megatron's ``copy_to_tensor_model_parallel_region``, as in
``fp8_linear``. ``onednn_layer_spec`` swaps them into a local layer spec, ``to_onednn`` switches one
built outside a spec (the LLM's output layer), and ``linear`` is ``F.linear`` on oneDNN for plain modules
(the ViT's patch embedding, the projector at TP=1).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.spec_utils import ModuleSpec

from keye.model.spec_swap import swap_spec_modules


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """oneDNN is built into this PyTorch and its linear op is registered."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (T, K) @ weight (N, K)^T + bias → (T, N)`` on oneDNN (weight may be a transposed view)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """``x (T, K) @ W (N, K)^T + b``: forward and input gradient on oneDNN, weight gradient on MKL."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return gemm(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = gemm(grad, weight.t(), None) if ctx.needs_input_grad[0] else None  # (T, N) @ (N, K)
        grad_w = grad.t().matmul(x) if ctx.needs_input_grad[1] else None  # (N, T) @ (T, K), as Megatron
        grad_b = grad.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., K) @ weight (N, K)^T + bias → (..., N)`` (fp32 CPU tensors; see ``usable``)."""
    # oneDNN wants plain row-major operands (rows of a strided view take a far slower path).
    out = _OneDnnLinear.apply(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)  # (T, N)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, on oneDNN where it applies (fp32 CPU tensors)."""
    return onednn_linear(x, weight, bias) if usable(x, weight) else F.linear(x, weight, bias)


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``onednn_linear`` applies: fp32 tensors on the CPU, oneDNN present."""
    return (x.numel() > 0 and x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.is_contiguous() and onednn_available())


class _OneDnnLocalMatmul:
    """Mixin for Megatron's tensor-parallel linears: the local matmul on oneDNN where it applies."""

    def _forward_impl(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      gradient_accumulation_fusion: bool = False, allreduce_dgrad: bool = False,
                      sequence_parallel: bool = False, grad_output_buffer: list | None = None,
                      wgrad_deferral_limit: int | None = None, tp_group: Any = None) -> torch.Tensor:
        plain = not (sequence_parallel or gradient_accumulation_fusion or grad_output_buffer is not None)
        if not (plain and usable(input, weight)):
            return super()._forward_impl(
                input=input, weight=weight, bias=bias, gradient_accumulation_fusion=gradient_accumulation_fusion,
                allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
                grad_output_buffer=grad_output_buffer, wgrad_deferral_limit=wgrad_deferral_limit, tp_group=tp_group,
            )
        if allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=tp_group or self.tp_group)
        return onednn_linear(input, weight, bias)


class OneDnnColumnParallelLinear(_OneDnnLocalMatmul, ColumnParallelLinear):
    """Megatron's ``ColumnParallelLinear`` with its local fp32 CPU matmul on oneDNN."""


class OneDnnRowParallelLinear(_OneDnnLocalMatmul, RowParallelLinear):
    """Megatron's ``RowParallelLinear`` with its local fp32 CPU matmul on oneDNN."""


_SWAPS = {ColumnParallelLinear: OneDnnColumnParallelLinear, RowParallelLinear: OneDnnRowParallelLinear}


def to_onednn(layer: torch.nn.Module) -> torch.nn.Module:
    """A Megatron local linear built outside a layer spec (GPTModel's output layer), switched in place to
    its oneDNN subclass: the subclass adds no state, so parameters and state dict stay as they are."""
    if type(layer) in _SWAPS:
        layer.__class__ = _SWAPS[type(layer)]
    return layer


def onednn_layer_spec(spec: ModuleSpec) -> ModuleSpec:
    """A copy of a local layer spec with the oneDNN linears (the spec unchanged if it has no local linear)."""
    return swap_spec_modules(spec, _SWAPS)[0]
