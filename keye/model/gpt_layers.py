"""The layers of a Megatron-Core ``GPTModel`` in keye: Megatron's spec for the chosen backend, plus keye's
CPU fast paths where they are tested.

A language model on Megatron's GPT (``qwen3``, or a third party's Llama-style one) builds its layer spec with
:func:`gpt_layer_spec` and, once ``GPTModel`` is built, calls :func:`finish_gpt_model`. What runs follows
`keye.model.backend.Backend`, chosen in one place:

* Transformer Engine: Megatron's TE spec as it is (fused norms and linears, TE attention, TE's FP8).
* local: Megatron's local spec with keye's attention (``keye.model.sdpa_attention``: SDPA, RoPE inside, or
  Megatron's own with ``attention: megatron``), and FP8 ``torch`` as keye's scaled-FP8 linears.
* CPU fast paths (local, CPU, fp32/bf16 only; ``Backend.fast``): the linears on oneDNN
  (``keye.model.onednn_linear``), the closed-form RMSNorm gradient (``keye.model.rms_norm``), SwiGLU as one
  autograd function (``keye.model.swiglu``) and the loss-row selection of the last layer and the output
  layer (``keye.model.loss_rows``). Each is a subclass of the Megatron/torch module it replaces with the
  same parameters and state dict, and is tested equal to it; anywhere else the plain modules run.
"""

from __future__ import annotations

from typing import Any

from keye.model.backend import Backend


def gpt_layer_spec(backend: Backend, attention: str = "sdpa") -> Any:
    """The ``ModuleSpec`` of one GPT layer (pre-RMSNorm, q/k norms, SwiGLU, no biases) for ``backend``.

    ``attention``: the local path's core attention ('sdpa' or 'megatron'; checked on the TE path too).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from keye.model.sdpa_attention import local_core_attention, local_self_attention

    core_attention = local_core_attention(attention)  # checks the name on the TE path too
    if backend.impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    # Core attention on SDPA (keye.model.sdpa_attention), which also applies the RoPE (KeyeSelfAttention:
    # same submodules and state dict), unless attention=megatron.
    spec.submodules.self_attention.module = local_self_attention(attention)
    spec.submodules.self_attention.submodules.core_attention = core_attention
    if backend.fp8 == "torch":  # keye's scaled-FP8 linears (keye.model.fp8_linear)
        from keye.model.fp8_linear import fp8_layer_spec

        spec = fp8_layer_spec(spec)
    elif backend.fast:  # fp32 CPU matmuls on oneDNN (keye.model.onednn_linear; same parameters)
        from keye.model.onednn_linear import onednn_layer_spec

        spec = onednn_layer_spec(spec)
    if backend.fast and spec.module is TransformerLayer:  # its MLP can skip rows without a loss
        from keye.model.loss_rows import LossRowsTransformerLayer

        spec.module = LossRowsTransformerLayer
    return spec


def finish_gpt_model(gpt: Any, backend: Backend) -> Any:
    """Switch a built ``GPTModel``'s modules to the CPU fast paths where ``backend.fast`` (none add state):
    SwiGLU MLPs, RMSNorms with the closed-form gradient, the output layer on oneDNN and ready for
    ``keye.model.loss_rows.only_loss_rows``."""
    if not backend.fast:
        return gpt
    from keye.model.loss_rows import install_output_rows_hook
    from keye.model.onednn_linear import to_onednn
    from keye.model.rms_norm import to_keye_rms_norm
    from keye.model.swiglu import to_swiglu_mlp

    to_swiglu_mlp(gpt)
    to_keye_rms_norm(gpt)
    if gpt.post_process:
        to_onednn(gpt.output_layer)
        install_output_rows_hook(gpt.output_layer)
    return gpt
