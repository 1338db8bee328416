"""The SigLIP-style transformer tower on Megatron-Core, shared by keye's bidirectional encoders
(``siglip_navit``, ``siglip_text``): its layer spec, its ``TransformerConfig`` and the settings both share.

* ``encoder_layer_spec`` / ``encoder_block_spec``: a pre-LN, **non-causal** transformer layer (LayerNorm,
  qkv with bias, GELU-tanh MLP with bias). Megatron's own ``get_vit_layer_with_local_spec()`` is
  *causal* in 0.16, so it cannot be used as is. The layer comes from the backend chosen in
  `keye.model.backend` (Megatron's local modules, or Transformer Engine's). The norms stay separate
  modules in both (no fused LayerNorm+Linear), so the parameter names, and the Hugging Face mapping
  (`keye.model.hf_keys`), are the same for both backends. On the local path the linears run their CPU
  matmuls on oneDNN where `keye.model.backend.cpu_fast_paths` allows it.
* ``encoder_transformer_config``: the ``TransformerConfig`` of such a tower. It says
  ``pipeline_model_parallel_size=1`` on purpose: an encoder tower lives whole on the first pipeline
  stage (Megatron's LLaVA does the same), so under PP=2 the LLM is split but the tower is not (the block
  spec lists every layer, and with PP=1 in its config Megatron numbers them 1..n on any stage).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from keye.config import doc
from keye.model.backend import (
    TRANSFORMER_IMPLS,
    common_transformer_kwargs,
    cpu_fast_paths,
    resolve_transformer_impl,
    spec_provider,
)


def encoder_layer_spec(impl: str | None = "local", attention: str = "sdpa", dtype: torch.dtype = torch.float32,
                       fp8: str | None = None) -> Any:
    """A pre-LN bidirectional transformer layer: LN → self-attention (no causal mask) → LN → MLP.

    ``impl``: see `keye.model.backend.resolve_transformer_impl` (None: the process-wide setting). ``attention``
    picks the local path's core attention: 'sdpa' (``keye.model.sdpa_attention``: per-block SDPA on the packed
    block-diagonal mask) or 'megatron' (its unfused ``DotProductAttention``). TE ignores it. ``dtype``: the
    parameters' dtype, which decides with the device whether the oneDNN linears replace Megatron's. ``fp8``:
    'torch' swaps in keye's scaled-FP8 linears (`keye.model.fp8_linear`); TE's FP8 comes from the config.
    """
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from keye.model.sdpa_attention import local_core_attention, local_self_attention

    impl = resolve_transformer_impl(impl)
    backend = spec_provider(impl)
    # Local path only: SDPA (or Megatron's own) core attention, which with SDPA also applies the RoPE
    # (KeyeSelfAttention); the TE spec keeps TE's fused attention and Megatron's SelfAttention.
    core_attention, self_attention = local_core_attention(attention), local_self_attention(attention)
    if impl == "transformer_engine":
        core_attention, self_attention = backend.core_attention(), SelfAttention
    spec = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=backend.layer_norm(),
            self_attention=ModuleSpec(
                module=self_attention,
                # no_mask: nothing causal. The local attention still applies a mask passed to it
                # (packing); TE turns no_mask into "padding" when it gets thd PackedSeqParams.
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_linear(),
                    core_attention=core_attention,
                    linear_proj=backend.row_parallel_linear(),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=backend.layer_norm(),
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=backend.column_parallel_linear(),
                    linear_fc2=backend.row_parallel_linear(),
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    if fp8 == "torch":
        from keye.model.fp8_linear import fp8_layer_spec

        return fp8_layer_spec(spec)
    if not cpu_fast_paths(impl, dtype):
        return spec
    from keye.model.onednn_linear import onednn_layer_spec

    return onednn_layer_spec(spec)  # local linears: fp32 CPU matmuls on oneDNN (keye.model.onednn_linear)


def encoder_block_spec(num_layers: int, impl: str | None = "local", attention: str = "sdpa",
                       dtype: torch.dtype = torch.float32, fp8: str | None = None) -> Any:
    """``num_layers`` encoder layers and the final LayerNorm (SigLIP's post_layernorm / final_layer_norm)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    impl = resolve_transformer_impl(impl)
    layer = encoder_layer_spec(impl, attention, dtype, fp8)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=spec_provider(impl).layer_norm())


def encoder_transformer_config(
    *,
    hidden_size: int,
    ffn_hidden_size: int,
    num_layers: int,
    num_heads: int,
    layer_norm_eps: float,
    init_std: float,
    recompute: bool,
    ctx: Any,
    fp8: Any = None,
) -> Any:
    """``TransformerConfig`` of a SigLIP-style tower (biases, LayerNorm, GELU-tanh, no dropout).

    ``ctx`` is a ``BuildContext``; its parallel layout gives TP size and CPU initialisation. Pipeline
    size is forced to 1 (the tower is not split across stages); fusions that need CUDA kernels are off
    (rope fusion must stay off anyway: TE's fused ``thd`` rope indexes freqs per sequence, not per token).
    ``fp8``: an FP8 node for this tower (`keye.parallel.fp8.vision_fp8`), None for none.
    """
    from megatron.core.transformer import TransformerConfig

    from keye.parallel.fp8 import megatron_fp8_kwargs

    layout = ctx.parallel.model_parallel_kwargs(ctx.dtype) if ctx.parallel is not None else {}
    # whole on one stage, and its input is not split along the sequence (sequence parallelism is the LLM's)
    layout.update(pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None, sequence_parallel=False)
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        ffn_hidden_size=ffn_hidden_size,
        num_attention_heads=num_heads,
        kv_channels=hidden_size // num_heads,
        normalization="LayerNorm",
        layernorm_epsilon=layer_norm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=functools.partial(F.gelu, approximate="tanh"),  # HF gelu_pytorch_tanh
        init_method_std=init_std,
        **common_transformer_kwargs(ctx.dtype, recompute),
        **megatron_fp8_kwargs(fp8),  # TE backend only: Megatron's block enters TE's autocast
        **layout,
    )


@dataclass
class SiglipTowerConfig:
    """The settings both SigLIP towers (``siglip_navit``, ``siglip_text``) share; each tower's ``Config``
    extends it with its own (patches and RoPE; vocabulary and positions)."""

    size: Optional[str] = doc("Named size preset (tiny, small, keye_vl_8b); keys set beside it win.", None)
    hidden_size: int = doc("Width of the residual stream (SigLIP-so400m: 1152).", 1152)
    intermediate_size: int = doc("MLP inner width (fc1 → GELU-tanh → fc2).", 4304)
    num_layers: int = doc("Transformer layers.", 27)
    num_heads: int = doc("Attention heads.", 16)
    layer_norm_eps: float = doc("LayerNorm epsilon (layers and the final norm).", 1e-6)
    init_std: float = doc("Std of the normal initialisation (training normally starts from SigLIP weights).", 0.02)
    recompute: bool = doc("Recompute each layer's activations in backward (saves memory on long sequences).", False)
    transformer_impl: Optional[str] = doc(
        "auto | local | transformer_engine (te) for this tower; null: the run's choice (model.transformer_impl, "
        "else $KEYE_TRANSFORMER_IMPL, default auto: Transformer Engine where it and CUDA exist, else local). "
        "See keye.model.backend.", None
    )
    attention: str = doc(
        "Core attention of the local (non-TE) path: sdpa (PyTorch SDPA per packed block, the default) or "
        "megatron (Megatron's unfused DotProductAttention).", "sdpa"
    )


def check_tower_config(config: SiglipTowerConfig, check: Any) -> None:
    """What `tower_transformer_config` and the tower's tensor-parallel layers would refuse when built, for
    both towers' ``check_config`` (each adds its own fields)."""
    check.count(config, "hidden_size", "intermediate_size", "num_layers", "num_heads")
    check.number(config, "layer_norm_eps", above=0)
    check.number(config, "init_std", low=0)
    if config.transformer_impl is not None:
        check.one_of(config, "transformer_impl", (*TRANSFORMER_IMPLS, "te"))
    check.one_of(config, "attention", ("sdpa", "megatron"))  # keye.model.sdpa_attention.ATTENTION_IMPLS
    check.divisible(config, "hidden_size", config.num_heads, "num_heads")
    for name in ("num_heads", "intermediate_size"):
        check.divisible(config, name, check.tensor, "parallel.tensor")


def tower_transformer_config(config: SiglipTowerConfig, ctx: Any, name: str, fp8: Any = None) -> Any:
    """The TransformerConfig of a SigLIP-style tower from its Config (the fields both towers share); ``fp8``
    as in `encoder_transformer_config` (ctx.fp8 is not used: a tower's FP8 is its own choice)."""
    if config.hidden_size % config.num_heads:
        raise ValueError(f"{name}: hidden_size {config.hidden_size} not divisible by num_heads {config.num_heads}")
    return encoder_transformer_config(
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        layer_norm_eps=config.layer_norm_eps,
        init_std=config.init_std,
        recompute=config.recompute,
        ctx=ctx,
        fp8=fp8,
    )
