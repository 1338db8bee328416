"""Which Megatron layers every keye component is built from: Transformer Engine or Megatron's local ones.

One setting, ``transformer_impl``, decides it for every Megatron-built component (the SigLIP towers, the
Qwen3 LM): ``auto`` (the default) is Transformer Engine where it imports *and* CUDA exists, else Megatron's
local layers; ``local`` forces the local layers; ``transformer_engine`` (or ``te``) asks for TE and fails in
one line where it cannot run. A component's ``transformer_impl`` key, when set, overrides it for that
component; otherwise the process-wide choice applies: the blueprint's ``model.transformer_impl``
(:func:`use_blueprint_impl`, called where a run or an evaluation starts from a blueprint), else
``KEYE_TRANSFORMER_IMPL`` (default auto). The blueprint's value is written to that variable, so processes a
run starts (ranks, writers) make the same choice.
FP8 is a separate choice on top (``precision.fp8``, `keye.parallel.fp8`): TE's FP8 needs the TE layers.

The CPU fast paths (oneDNN linears, the closed-form RMSNorm gradient, the fused SwiGLU function, the
loss-row selection of the last layer) are subclasses of Megatron's local modules, tested on CPU in fp32
and bf16 only. :func:`cpu_fast_paths` is the one switch they go through: on CUDA, with TE or with another
dtype, the plain Megatron modules run.

Also here: the ``TransformerConfig`` settings every keye tower shares (:func:`common_transformer_kwargs`)
and where a config's parameters live (:func:`param_device`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from keye.errors import KeyeUserError

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
_ALIASES = {"te": "transformer_engine"}
ENV = "KEYE_TRANSFORMER_IMPL"
FAST_PATH_DTYPES = (torch.float32, torch.bfloat16)


def transformer_engine_usable() -> bool:
    """Transformer Engine's PyTorch API imports and CUDA is there to run it (`keye.parallel.fp8`'s check)."""
    from keye.parallel.fp8 import transformer_engine_available

    return transformer_engine_available()


def use_blueprint_impl(blueprint: Any) -> None:
    """Make the blueprint's ``model.transformer_impl`` (when set) this process's choice (module docstring)."""
    impl = blueprint.model.get("transformer_impl") if blueprint is not None else None
    if impl is not None:
        os.environ[ENV] = str(impl)


def check_impl_name(impl: str) -> str | None:
    """None for a known impl name (or alias), else what is wrong, for validation messages."""
    if _ALIASES.get(impl, impl) in TRANSFORMER_IMPLS:
        return None
    return f"unknown {impl!r}; known: {', '.join(TRANSFORMER_IMPLS)} (or te)"


def effective_impl_name(blueprint: Any) -> str:
    """The impl a run of ``blueprint`` asks for, before 'auto' is resolved: its own, else the environment's."""
    impl = blueprint.model.get("transformer_impl") if blueprint is not None else None
    impl = impl if impl is not None else os.environ.get(ENV, "auto")
    return _ALIASES.get(impl, impl)


def resolve_transformer_impl(impl: str | None = None) -> str:
    """'local' or 'transformer_engine' for a requested impl (None: ``$KEYE_TRANSFORMER_IMPL``, default auto).

    'auto' → TE where it imports and CUDA exists, else local. An explicit TE request on a machine that
    cannot run it is a one-line ``KeyeUserError``.
    """
    from_env = impl is None
    requested = os.environ.get(ENV, "auto") if from_env else impl
    impl = _ALIASES.get(requested, requested)
    if impl not in TRANSFORMER_IMPLS:
        where = f"${ENV}" if from_env else "transformer_impl"
        raise KeyeUserError(f"{where}: unknown {requested!r}; known: {', '.join(TRANSFORMER_IMPLS)} (or te)")
    if impl == "auto":
        return "transformer_engine" if transformer_engine_usable() else "local"
    if impl == "transformer_engine" and not transformer_engine_usable():
        raise KeyeUserError("transformer_impl 'transformer_engine' needs Transformer Engine with CUDA (pip install "
                            "-e '.[gpu]' on a GPU machine); use transformer_impl=local or auto here")
    return impl


def spec_provider(impl: str) -> Any:
    """Megatron's backend provider for a resolved impl: where layer specs get their norms, linears, attention."""
    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    from megatron.core.models.backends import LocalSpecProvider

    return LocalSpecProvider()


def cpu_fast_paths(impl: str, dtype: torch.dtype, device: torch.device | str | None = None) -> bool:
    """Whether keye's CPU-only fast modules may replace Megatron's: local layers, parameters on the CPU, fp32
    or bf16 (where they are tested). Elsewhere the plain Megatron modules run."""
    on_cpu = torch.device(device).type == "cpu" if device is not None else not torch.cuda.is_available()
    return impl == "local" and on_cpu and dtype in FAST_PATH_DTYPES


@dataclass(frozen=True)
class Backend:
    """What a Megatron-built component is made of: ``impl`` ('local' or 'transformer_engine'), ``fp8`` (None,
    'te' or 'torch': `keye.parallel.fp8`) and ``fast`` (keye's CPU fast paths on: :func:`cpu_fast_paths`)."""

    impl: str
    fp8: str | None = None
    fast: bool = False


def choose_backend(dtype: torch.dtype, fp8: Any = None, impl: str | None = None) -> Backend:
    """The one decision: TE or local layers (``impl``; None: the process-wide setting), FP8 on top (``fp8``: a
    ``precision`` section, its ``fp8`` node or None) and whether the CPU fast paths run. FP8 'te' runs on TE's
    layers and 'torch' replaces the local ones: a mismatch with the layers is a one-line ``KeyeUserError``."""
    from keye.parallel.fp8 import fp8_backend

    scaled = fp8_backend(fp8)
    impl = resolve_transformer_impl(impl)
    if scaled == "te" and impl != "transformer_engine":
        raise KeyeUserError("precision.fp8.backend te runs on Transformer Engine layers, but transformer_impl is "
                            f"{impl}: set {ENV}=auto (or transformer_engine), or precision.fp8.backend=torch")
    if scaled == "torch" and impl == "transformer_engine":
        raise KeyeUserError("precision.fp8.backend torch replaces Megatron's local linears; with Transformer "
                            f"Engine layers use precision.fp8.backend=te (or {ENV}=local)")
    return Backend(impl, scaled, cpu_fast_paths(impl, dtype))


def param_device(transformer_config: Any) -> torch.device:
    """Where Megatron puts this config's parameters (so a tower's own parameters go there too)."""
    if transformer_config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def common_transformer_kwargs(dtype: torch.dtype, recompute: bool) -> dict[str, Any]:
    """TransformerConfig settings every keye tower shares: no dropout, no fused kernels (unfused paths are
    exact and run everywhere; apply_rope_fusion would also mis-index packed RoPE), dtype and recompute."""
    return dict(
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )
