"""FP8 for a keye run: which backend, whether this machine can run it, and the context a step runs in.

``precision.fp8`` picks one of two backends:

* ``te``: Transformer Engine's layer specs and ``fp8_autocast`` with a ``DelayedScaling`` recipe (HYBRID:
  e4m3 forward, e5m2 backward; amax history from the config). The GPU path; Megatron's transformer
  block enters TE's autocast by itself from the ``fp8*`` fields of its ``TransformerConfig``
  (``megatron_fp8_kwargs``).
* ``torch``: keye's scaled-FP8 linears (``keye.model.fp8_linear``) on ``torch._scaled_mm``, with the same
  recipe semantics. Runs on CPU and on Hopper/Ada GPUs.

``check_fp8_available`` fails early with one line a user can act on. Transformer Engine is detected
without trusting its import: the plain ``transformer-engine`` meta package raises RuntimeError (not
ImportError) on import and its core library needs the NVIDIA driver, so both are caught.

``fp8_context(precision)`` wraps one training step (forward and backward of every micro-batch): the torch
backend's step (amax history and scale update on exit), or nothing. For ``te`` it is nothing on purpose:
FP8 is scoped as Megatron scopes it, each ``TransformerBlock`` entering TE's autocast around its own
layers from its config's ``fp8`` fields, so the ViT (unless chosen), the embedding, the output layer, the
loss and the backward pass outside the blocks stay in high precision.

The ViT's FP8 is a separate choice, ``precision.fp8.vision`` (default off): ``vision_fp8`` gives a vision
encoder the fp8 node only when it is on. A tower in FP8 pads its packed patches to a multiple of
``FP8_ROWS`` (TE's FP8 GEMMs refuse other row counts; `keye.model.loss_rows.aligned_rows` does the same
for the LLM's loss rows).
Every function takes the ``precision`` section or just its ``fp8`` node (or None: FP8 off).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from keye.errors import KeyeUserError

BACKENDS = ("te", "torch")
FP8_ROWS = 16  # rows of an FP8 GEMM: TE wants the leading dims a multiple of 8 and the last of 16; cuBLASLt 16


def _fp8_node(cfg: Any) -> Any:
    """The ``fp8`` node of a ``PrecisionConfig``, an ``FP8Config`` itself, or None."""
    return getattr(cfg, "fp8", cfg)


def transformer_engine_available() -> bool:
    """Transformer Engine's PyTorch API imports and CUDA is there to run it."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError, OSError):  # meta package: RuntimeError; no libcuda: OSError
        return False
    return True


def check_fp8_available(cfg: Any) -> None:
    """Raise ``KeyeUserError`` (one line) if FP8 is enabled with a backend this machine cannot run."""
    fp8 = _fp8_node(cfg)
    if fp8 is None or not fp8.enabled:
        return
    if fp8.backend not in BACKENDS:
        raise KeyeUserError(f"precision.fp8.backend {fp8.backend!r} is unknown; known: {', '.join(BACKENDS)}")
    if fp8.amax_history < 1:
        raise KeyeUserError(f"precision.fp8.amax_history must be >= 1, got {fp8.amax_history}")
    if fp8.backend == "te" and not transformer_engine_available():
        raise KeyeUserError(
            "precision.fp8 backend 'te' needs Transformer Engine with CUDA (pip install -e '.[gpu]' on a GPU"
            " machine); here, use precision.fp8.backend=torch (scaled-FP8 linears on torch._scaled_mm)"
        )
    if fp8.backend == "torch":
        if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
            raise KeyeUserError(f"precision.fp8 backend 'torch' needs torch._scaled_mm (torch {torch.__version__})")
        if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
            raise KeyeUserError(
                "precision.fp8 backend 'torch' needs an FP8 GPU (compute capability 8.9+: Ada, Hopper)"
            )


def fp8_backend(cfg: Any) -> str | None:
    """'te' or 'torch' when FP8 is on and can run here, None when it is off (``KeyeUserError`` otherwise)."""
    check_fp8_available(cfg)
    fp8 = _fp8_node(cfg)
    return fp8.backend if fp8 is not None and fp8.enabled else None


def vision_fp8(cfg: Any) -> Any:
    """The ``fp8`` node for a vision encoder: the run's when ``precision.fp8.vision`` is on, else None."""
    fp8 = _fp8_node(cfg)
    return fp8 if fp8 is not None and fp8.enabled and getattr(fp8, "vision", False) else None


def megatron_fp8_kwargs(cfg: Any) -> dict[str, Any]:
    """``TransformerConfig`` fields for the TE backend (Megatron then enters TE's autocast per block)."""
    if fp8_backend(cfg) != "te":
        return {}
    return {
        "fp8": "hybrid",  # e4m3 forward, e5m2 backward
        "fp8_recipe": "delayed",
        "fp8_amax_history_len": _fp8_node(cfg).amax_history,
        "fp8_amax_compute_algo": "max",
    }


def _megatron_group(name: str, **kwargs: Any) -> Any:
    """A Megatron process group when Megatron's parallel state is up, else None."""
    from megatron.core import parallel_state as mpu

    if not mpu.model_parallel_is_initialized():
        return None
    return getattr(mpu, name)(**kwargs)


def fp8_context(cfg: Any) -> contextlib.AbstractContextManager:
    """The context one training step runs in (enter it around forward *and* backward of the step): the torch
    backend's scaling step; nothing for ``te`` (Megatron's blocks enter TE's autocast themselves) or off."""
    backend = fp8_backend(cfg)  # checks that this machine can run it, for te too
    if backend != "torch":
        return contextlib.nullcontext()
    history = _fp8_node(cfg).amax_history
    from keye.model.fp8_linear import DelayedScaling as TorchDelayedScaling
    from keye.model.fp8_linear import fp8_autocast

    # Within a step, amaxes are reduced over TP by each layer; across data-parallel replicas here.
    group = _megatron_group("get_data_parallel_group", with_context_parallel=True)
    return fp8_autocast(TorchDelayedScaling(amax_history_len=history), amax_reduction_group=group)
