"""Scaled-FP8 tensor-parallel linears on ``torch._scaled_mm``: keye's FP8 path without Transformer Engine.

What Transformer Engine's ``Linear`` does with a ``DelayedScaling`` recipe, written in plain torch so it
runs on CPU (tests, laptops) and on Hopper/Ada GPUs alike:

* **master weights stay high precision** (fp32 or bf16 parameters, optimizer untouched); only the
  matmul inputs are cast, per call: activations and weights to e4m3 in forward, output gradients to
  e5m2 in backward (TE's HYBRID format: gradients need range more than mantissa);
* **per-tensor scaling**: ``q = saturate(t * scale).to(fp8)`` with ``scale = fp8_max / amax``, and the
  matmul ``torch._scaled_mm(qa, qb, 1/scale_a, 1/scale_b)`` accumulates in fp32 (on CPU its fp32 output
  equals the fp32 matmul of the dequantised inputs exactly);
* **forward and backward in FP8** (one autograd Function): ``y = x W^T``, ``dgrad = g W``,
  ``wgrad = g^T x``, each one scaled matmul; the FP8 copies of ``x`` and ``W`` are what backward keeps;
* **scales.** Inside ``fp8_autocast`` (``keye.parallel.fp8.fp8_context``) every call records each
  tensor's amax; leaving the outermost context closes a *step*: the amaxes are reduced over the given
  group (data parallel) and each scale becomes ``fp8_max / max(last N step amaxes)`` (delayed scaling,
  TE's ``amax_compute_algo="max"``), used unchanged through the next step, so a recomputed forward
  (activation checkpointing) quantises exactly like the first one. Until a tensor has a history (the
  first step, or a model never run under ``fp8_autocast``) its scale comes from its own amax ("current
  scaling"), so step one is as accurate as any. Values above a delayed scale's range saturate.
* **tensor parallelism.** Every amax is all-reduced (max) over the layer's TP group before it is used
  or recorded: a TP shard of a weight (or of a row-parallel input, or of a column-parallel output
  gradient) then gets the scale of the whole tensor, so TP=2 quantises exactly like TP=1 and the two
  layouts agree to fp32 rounding, not to FP8 rounding.

The amax history is not saved in checkpoints (a resumed run re-warms it in one step with current scaling).
``Fp8ColumnParallelLinear``/``Fp8RowParallelLinear`` replace only Megatron's local matmul
(``_forward_impl``); ``fp8_layer_spec`` swaps them into a local layer spec.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.spec_utils import ModuleSpec

from keye.errors import KeyeUserError
from keye.model.spec_swap import swap_spec_modules

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
INPUT, WEIGHT, GRAD = 0, 1, 2  # the three tensors a linear quantises; columns of the amax history
FORMATS = (E4M3, E4M3, E5M2)
FP8_MAX = torch.tensor([torch.finfo(dtype).max for dtype in FORMATS])  # (3,): 448, 448, 57344


@dataclass(frozen=True)
class DelayedScaling:
    """The torch backend's recipe: scales from the max amax of the last ``amax_history_len`` steps."""

    amax_history_len: int = 16


class _Autocast:
    """One outermost ``fp8_autocast``: the recipe, and the metas that recorded amaxes during it."""

    def __init__(self, recipe: DelayedScaling, group: Any) -> None:
        self.recipe = recipe
        self.group = group
        self.metas: dict[int, Fp8Meta] = {}  # insertion order = call order, the same on every rank


_ACTIVE: list[_Autocast] = []  # the stack of entered fp8_autocast contexts (nested ones share the outermost)


@contextmanager
def fp8_autocast(recipe: DelayedScaling = DelayedScaling(), amax_reduction_group: Any = None) -> Iterator[None]:
    """Run one training step (forward and backward of all its micro-batches) with delayed scaling.

    On leaving the outermost context each FP8 linear's step amaxes are reduced (max) over
    ``amax_reduction_group`` (data parallel: replicas keep identical scales), then scales are updated.
    """
    state = _ACTIVE[0] if _ACTIVE else _Autocast(recipe, amax_reduction_group)
    _ACTIVE.append(state)
    completed = False
    try:
        yield
        completed = True
    finally:
        _ACTIVE.pop()
        if not _ACTIVE and completed:  # the step is over: reduce amaxes, update scales
            _finish_step(state)
        elif not _ACTIVE:  # a step that raised leaves no trace in the history
            _discard_step(state)


def _finish_step(state: _Autocast) -> None:
    metas = [meta for meta in state.metas.values() if meta.history is not None]
    if not metas:
        return
    group = state.group
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        current = torch.stack([meta.history[0] for meta in metas])  # (M, 3)
        dist.all_reduce(current, op=dist.ReduceOp.MAX, group=group)
        for meta, row in zip(metas, current):
            meta.history[0] = row
    for meta in metas:
        meta.roll()


def _discard_step(state: _Autocast) -> None:
    for meta in state.metas.values():
        if meta.history is not None:
            meta.history[0] = 0.0


def _scale_from(amax: torch.Tensor, fp8_max: torch.Tensor) -> torch.Tensor:
    """fp8_max / amax, or 1 for an all-zero tensor."""
    return torch.where(amax > 0, fp8_max / amax, torch.ones_like(amax))


class Fp8Meta:
    """Scaling state of one FP8 linear: amax history and delayed scales for (input, weight, grad)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group  # the layer's TP group: amaxes are reduced over it
        self.history: torch.Tensor | None = None  # (N, 3); row 0 is the running max of this step
        self.scale = torch.ones(3)  # (3,) delayed scales, meaningful where ``ready``
        self.ready = torch.zeros(3, dtype=torch.bool)  # (3,) a tensor has a history

    def scales(self, roles: tuple[int, ...], tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """One fp32 scale per tensor: delayed where a history exists, else from its own amax."""
        state = _ACTIVE[0] if _ACTIVE else None
        delayed = [bool(self.ready[role]) for role in roles]
        amax = None
        if state is not None or not all(delayed):
            amax = torch.stack([t.detach().abs().amax().float() for t in tensors])  # (R,)
            if self.group is not None and dist.is_initialized() and dist.get_world_size(self.group) > 1:
                dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.group)
            if state is not None:
                self._record(roles, amax, state)
        device = tensors[0].device
        return [
            self.scale[role].to(device) if use_delayed else _scale_from(amax[i], FP8_MAX[role].to(device))
            for i, (role, use_delayed) in enumerate(zip(roles, delayed))
        ]

    def _record(self, roles: tuple[int, ...], amax: torch.Tensor, state: _Autocast) -> None:
        length = state.recipe.amax_history_len
        if self.history is None or self.history.shape[0] != length:
            self.history = torch.zeros(length, 3)
        finite = torch.nan_to_num(amax.cpu(), nan=0.0, posinf=0.0)  # a bad step must not poison N steps
        index = list(roles)
        self.history[0, index] = torch.maximum(self.history[0, index], finite)
        state.metas.setdefault(id(self), self)

    def roll(self) -> None:
        """Close a step: scales from the max over the history, then open an empty row for the next step."""
        amax = self.history.max(dim=0).values  # (3,)
        seen = amax > 0
        self.scale = torch.where(seen, _scale_from(amax, FP8_MAX), self.scale)
        self.ready = self.ready | seen
        self.history = torch.roll(self.history, 1, dims=0)
        self.history[0] = 0.0


def quantize(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``saturate(t * scale)`` in ``dtype`` (e4m3 has no inf: out-of-range values clamp to ±max)."""
    fmax = torch.finfo(dtype).max
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, inv_a: torch.Tensor, inv_b: torch.Tensor,
              out_dtype: torch.dtype, pad: bool | None = None) -> torch.Tensor:
    """``(a·inv_a) @ (b·inv_b)`` for fp8 ``a (M, K)``, ``b (K, N)``: fp32 accumulation, ``out_dtype`` out.

    ``_scaled_mm`` wants ``a`` row-major and ``b`` column-major; cuBLASLt also wants every dimension a
    multiple of 16, so on CUDA (or with ``pad=True``) the operands are zero-padded, which leaves the
    product unchanged, and the result is cut back. CPU accepts any shape.
    """
    M, K = a.shape
    N = b.shape[1]
    pad = a.is_cuda if pad is None else pad
    if pad:
        a = F.pad(a, (0, -K % 16, 0, -M % 16))  # (M', K')
        b = F.pad(b, (0, -N % 16, 0, -K % 16))  # (K', N')
    a = a.contiguous()
    b = b.t().contiguous().t()  # column-major (K', N')
    out = torch._scaled_mm(a, b, scale_a=inv_a.float(), scale_b=inv_b.float(), out_dtype=out_dtype)
    return out[:M, :N]


class _Fp8Matmul(torch.autograd.Function):
    """``x (T, K) @ W (N, K)^T → (T, N)``, forward and backward through scaled FP8 matmuls."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, meta: Fp8Meta) -> torch.Tensor:
        scale_x, scale_w = meta.scales((INPUT, WEIGHT), (x, weight))
        xq = quantize(x, scale_x, E4M3)  # (T, K)
        wq = quantize(weight, scale_w, E4M3)  # (N, K)
        ctx.save_for_backward(xq, wq, scale_x, scale_w)
        ctx.meta, ctx.dtypes = meta, (x.dtype, weight.dtype)
        return scaled_mm(xq, wq.t(), 1.0 / scale_x, 1.0 / scale_w, x.dtype)  # (T, N)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        xq, wq, scale_x, scale_w = ctx.saved_tensors
        (scale_g,) = ctx.meta.scales((GRAD,), (grad,))
        gq = quantize(grad, scale_g, E5M2)  # (T, N)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = scaled_mm(gq, wq, 1.0 / scale_g, 1.0 / scale_w, ctx.dtypes[0])  # (T, N) @ (N, K)
        if ctx.needs_input_grad[1]:
            grad_w = scaled_mm(gq.t(), xq, 1.0 / scale_g, 1.0 / scale_x, ctx.dtypes[1])  # (N, T) @ (T, K)
        return grad_x, grad_w, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, meta: Fp8Meta) -> torch.Tensor:
    """``x (..., K) @ weight (N, K)^T → (..., N)`` in scaled FP8 (no bias, no communication)."""
    out = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, meta)  # (T, N)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class _Fp8LocalMatmul:
    """Mixin for Megatron's tensor-parallel linears: only the local matmul becomes FP8.

    The parent's ``forward`` still does all TP communication around ``_forward_impl`` (the input copy,
    the output gather, the row-parallel all-reduce). The one collective the parent runs *inside* its
    autograd Function, the column-parallel all-reduce of the input gradient (``allreduce_dgrad``), is
    done here with Megatron's own ``copy_to_tensor_model_parallel_region`` (identity forward,
    all-reduce backward): the same communication, not overlapped with the weight gradient.
    """

    def _init_fp8(self) -> None:
        if self.config.gradient_accumulation_fusion:
            raise KeyeUserError("precision.fp8 backend 'torch' needs gradient_accumulation_fusion off")
        if self.sequence_parallel:
            raise KeyeUserError(
                "precision.fp8 backend 'torch' does not support sequence parallelism; use backend 'te' or turn it off"
            )
        self.fp8_meta = Fp8Meta(self.tp_group)

    def _forward_impl(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      gradient_accumulation_fusion: bool = False, allreduce_dgrad: bool = False,
                      sequence_parallel: bool = False, grad_output_buffer: list | None = None,
                      wgrad_deferral_limit: int | None = None, tp_group: Any = None) -> torch.Tensor:
        if sequence_parallel or grad_output_buffer is not None:
            raise KeyeUserError("precision.fp8 backend 'torch': sequence parallel and deferred wgrad are not supported")
        if allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=tp_group or self.tp_group)
        output = fp8_linear(input, weight, self.fp8_meta)  # (S, B, N_local)
        return output + bias if bias is not None else output


class Fp8ColumnParallelLinear(_Fp8LocalMatmul, ColumnParallelLinear):
    """Megatron's ``ColumnParallelLinear`` with a scaled-FP8 local matmul."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_fp8()


class Fp8RowParallelLinear(_Fp8LocalMatmul, RowParallelLinear):
    """Megatron's ``RowParallelLinear`` with a scaled-FP8 local matmul."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_fp8()


_SWAPS = {ColumnParallelLinear: Fp8ColumnParallelLinear, RowParallelLinear: Fp8RowParallelLinear}


def fp8_layer_spec(spec: ModuleSpec) -> ModuleSpec:
    """A copy of a local layer spec (e.g. ``get_gpt_layer_local_spec``) with FP8 linears.

    Every ``ColumnParallelLinear``/``RowParallelLinear`` in the tree (linear_qkv, linear_proj,
    linear_fc1, linear_fc2) is swapped; norms, attention and the model's output layer (built outside
    the layer spec) stay in high precision, as with Transformer Engine.
    """
    spec, swapped = swap_spec_modules(spec, _SWAPS)
    if not swapped:
        raise ValueError("fp8_layer_spec: the spec has no local Column/RowParallelLinear to swap (a TE spec?)")
    return spec
