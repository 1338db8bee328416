"""Megatron-Core pieces shared by keye's bidirectional (encoder) towers: the SigLIP ViT and text tower.

What is here, and why:

* ``encoder_layer_spec`` / ``encoder_block_spec``: a pre-LN, **non-causal** transformer layer (LayerNorm,
  qkv with bias, GELU-tanh MLP with bias). Megatron's own ``get_vit_layer_with_local_spec()`` is
  *causal* in 0.16, so it cannot be used as is. The layer is built from a backend provider: Megatron's
  local modules everywhere, Transformer Engine modules where TE and CUDA exist. The norms stay separate
  modules in both (no fused LayerNorm+Linear), so the parameter names, and the Hugging Face mapping,
  are the same for both backends.
* ``encoder_transformer_config``: the ``TransformerConfig`` of such a tower. It says
  ``pipeline_model_parallel_size=1`` on purpose: an encoder tower lives whole on the first pipeline
  stage (Megatron's LLaVA does the same), so under PP=2 the LLM is split but the tower is not (the block
  spec lists every layer, and with PP=1 in its config Megatron numbers them 1..n on any stage).
* packing: NaViT puts every image/video of a batch in one sequence ``[sum N, 1, D]`` with block-diagonal
  attention. ``packed_seq_params`` is the ``thd`` form (cu_seqlens) that TE's fused attention and, without
  TE, ``keye.model.sdpa_attention.SDPAAttention`` (``attention: sdpa``, the default: SDPA per block, the
  RoPE applied inside it by ``KeyeSelfAttention``) take; ``block_diagonal_mask`` is the boolean mask
  (True = masked) for Megatron's own dense attention (``attention: megatron``), which SDPAAttention also
  reads (it finds the blocks in the mask).
* linears: on the local path Megatron's column/row-parallel linears run their fp32 CPU matmuls on oneDNN
  (``keye.model.onednn_linear``: same parameters, faster GEMMs); ``swap_spec_modules`` swaps such classes
  in a spec.
* weights: Megatron fuses q, k, v into one ``linear_qkv`` whose output rows are interleaved per head
  group ``[q_h, k_h, v_h]`` (``fuse_qkv``/``split_qkv``), and HF encoder-layer names map 1:1 onto
  Megatron's (``hf_encoder_to_megatron``). ``load_full_state_dict``/``full_state_dict`` move full
  (unsharded) tensors in and out of a tensor-parallel module by global parameter name.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from keye.config import doc

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")

# HF SigLIP encoder-layer names → Megatron TransformerLayer names (q/k/v are fused separately).
_HF_TO_MEGATRON_LAYER = {
    "layer_norm1": "input_layernorm",
    "self_attn.out_proj": "self_attention.linear_proj",
    "layer_norm2": "pre_mlp_layernorm",
    "mlp.fc1": "mlp.linear_fc1",
    "mlp.fc2": "mlp.linear_fc2",
}
_MEGATRON_TO_HF_LAYER = {v: k for k, v in _HF_TO_MEGATRON_LAYER.items()}
_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_MEGATRON_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


# --- layer specs and config ------------------------------------------------------------------------


def resolve_transformer_impl(impl: str = "auto") -> str:
    """'auto' → transformer_engine where TE imports and CUDA exists, else local."""
    if impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"unknown transformer_impl {impl!r}; known: {', '.join(TRANSFORMER_IMPLS)}")
    if impl != "auto":
        return impl
    if not torch.cuda.is_available():
        return "local"
    try:
        import transformer_engine  # noqa: F401
    except (ImportError, RuntimeError):  # the TE meta package raises RuntimeError without its extension
        return "local"
    return "transformer_engine"


def _backend(impl: str) -> Any:
    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    from megatron.core.models.backends import LocalSpecProvider

    return LocalSpecProvider()


def encoder_layer_spec(impl: str = "local", attention: str = "sdpa") -> Any:
    """A pre-LN bidirectional transformer layer: LN → self-attention (no causal mask) → LN → MLP.

    ``attention`` picks the local path's core attention: 'sdpa' (``keye.model.sdpa_attention``: per-block
    SDPA on the packed block-diagonal mask) or 'megatron' (its unfused ``DotProductAttention``). TE ignores it.
    """
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from keye.model.sdpa_attention import local_core_attention, local_self_attention

    impl = resolve_transformer_impl(impl)
    backend = _backend(impl)
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
    if impl == "transformer_engine":
        return spec
    from keye.model.onednn_linear import onednn_layer_spec

    return onednn_layer_spec(spec)  # local linears: fp32 CPU matmuls on oneDNN (keye.model.onednn_linear)


def encoder_block_spec(num_layers: int, impl: str = "local", attention: str = "sdpa") -> Any:
    """``num_layers`` encoder layers and the final LayerNorm (SigLIP's post_layernorm / final_layer_norm)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    impl = resolve_transformer_impl(impl)
    return TransformerBlockSubmodules(
        layer_specs=[encoder_layer_spec(impl, attention)] * num_layers, layer_norm=_backend(impl).layer_norm()
    )


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
) -> Any:
    """``TransformerConfig`` of a SigLIP-style tower (biases, LayerNorm, GELU-tanh, no dropout).

    ``ctx`` is a ``BuildContext``; its parallel layout gives TP size and CPU initialisation. Pipeline
    size is forced to 1 (the tower is not split across stages); fusions that need CUDA kernels are off
    (rope fusion must stay off anyway: TE's fused ``thd`` rope indexes freqs per sequence, not per token).
    """
    from megatron.core.transformer import TransformerConfig

    layout = ctx.parallel.model_parallel_kwargs(ctx.dtype) if ctx.parallel is not None else {}
    layout.update(pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None)
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
    transformer_impl: str = doc(
        "auto | local | transformer_engine. auto: Transformer Engine where it and CUDA exist, else local.", "auto"
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
    check.one_of(config, "transformer_impl", TRANSFORMER_IMPLS)
    check.one_of(config, "attention", ("sdpa", "megatron"))  # keye.model.sdpa_attention.ATTENTION_IMPLS
    check.divisible(config, "hidden_size", config.num_heads, "num_heads")
    for name in ("num_heads", "intermediate_size"):
        check.divisible(config, name, check.tensor, "parallel.tensor")


def tower_transformer_config(config: SiglipTowerConfig, ctx: Any, name: str) -> Any:
    """The TransformerConfig of a SigLIP-style tower from its Config (the fields both towers share)."""
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
    )


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


def swap_spec_modules(spec: Any, swaps: dict[type, type]) -> tuple[Any, list[type]]:
    """A deep copy of a ``ModuleSpec`` tree with each module class in ``swaps`` replaced (e.g. Megatron's
    local linears by subclasses with the same parameters), and the classes that were found."""
    import copy
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec

    swapped: list[type] = []

    def swap(node: Any) -> Any:
        if isinstance(node, type) and node in swaps:
            swapped.append(node)
            return swaps[node]
        if isinstance(node, ModuleSpec):
            node.module = swap(node.module)
            node.submodules = swap(node.submodules)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for field in dataclasses.fields(node):
                setattr(node, field.name, swap(getattr(node, field.name)))
        elif isinstance(node, list):
            node[:] = [swap(item) for item in node]
        return node

    return swap(copy.deepcopy(spec)), swapped


def param_device(transformer_config: Any) -> torch.device:
    """Where Megatron puts this config's parameters (so a tower's own parameters go there too)."""
    if transformer_config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


# --- packing --------------------------------------------------------------------------------------


def block_diagonal_mask(seqlens: Iterable[int], device: torch.device | None = None) -> Tensor:
    """``[1, 1, N, N]`` bool, True where attention is *masked*: token i sees token j only in its own block."""
    seqlens = torch.as_tensor(list(seqlens), dtype=torch.long)
    block = torch.repeat_interleave(torch.arange(len(seqlens)), seqlens).to(device)  # (N,) block id per token
    return (block[:, None] != block[None, :])[None, None]  # (1, 1, N, N)


def packed_seq_params(seqlens: Iterable[int], device: torch.device | None = None) -> Any:
    """Megatron ``PackedSeqParams`` (``thd``) for blocks of these lengths: TE's varlen attention."""
    from megatron.core.packed_seq_params import PackedSeqParams

    seqlens = torch.as_tensor(list(seqlens), dtype=torch.int32)
    cu_seqlens = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0)).to(device)  # (K + 1,)
    longest = int(seqlens.max()) if len(seqlens) else 0
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


# --- weights --------------------------------------------------------------------------------------


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> Tensor:
    """Separate q/k/v weights ``[H*d, in]`` (or biases ``[H*d]``) → Megatron's ``linear_qkv`` ``[3*H*d, ...]``.

    Megatron reads the fused output as ``[ng, (np/ng + 2) * d]`` per token: with as many key/value
    groups as heads (plain MHA, SigLIP) that is, head by head, ``[q_h; k_h; v_h]``. Column-parallel TP
    then gives each rank whole heads.
    """
    rest = q.shape[1:]
    per_head = [x.reshape(num_heads, -1, *rest) for x in (q, k, v)]  # 3 x (H, d, ...)
    return torch.stack(per_head, dim=1).reshape(-1, *rest)  # (H, 3, d, ...) → (3*H*d, ...)


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of ``fuse_qkv``."""
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(num_heads, 3, -1, *rest).unbind(dim=1)  # 3 x (H, d, ...)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def hf_encoder_to_megatron(hf: dict[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """HF ``encoder.layers.N.*`` tensors → Megatron ``decoder.layers.N.*`` (other keys are ignored)."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for name, tensor in hf.items():
        match = _HF_LAYER.match(name)
        if not match:
            continue
        layer, module, kind = match.groups()
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer, kind), {})[module[-6]] = tensor  # 'q', 'k' or 'v'
        elif module in _HF_TO_MEGATRON_LAYER:
            out[f"decoder.layers.{layer}.{_HF_TO_MEGATRON_LAYER[module]}.{kind}"] = tensor
        else:
            raise KeyError(f"unknown SigLIP encoder weight {name!r}")
    for (layer, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise KeyError(f"encoder.layers.{layer}: q/k/v {kind} incomplete, found {sorted(parts)}")
        out[f"decoder.layers.{layer}.self_attention.linear_qkv.{kind}"] = fuse_qkv(
            parts["q"], parts["k"], parts["v"], num_heads
        )
    return out


def megatron_encoder_to_hf(state: dict[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """Megatron ``decoder.layers.N.*`` tensors → HF ``encoder.layers.N.*`` (other keys are ignored)."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        match = _MEGATRON_LAYER.match(name)
        if not match:
            continue
        layer, module, kind = match.groups()
        if module == "self_attention.linear_qkv":
            for part, x in zip("qkv", split_qkv(tensor, num_heads)):
                out[f"encoder.layers.{layer}.self_attn.{part}_proj.{kind}"] = x
        else:
            out[f"encoder.layers.{layer}.{_MEGATRON_TO_HF_LAYER[module]}.{kind}"] = tensor
    return out


def tp_shard(full: Tensor, param: Tensor, tp_rank: int, tp_size: int) -> Tensor:
    """This TP rank's slice of a full tensor, as Megatron's CPU initialisation splits it.

    Tensor-parallel parameters carry ``partition_dim`` and ``partition_stride``: the full tensor is cut
    into ``tp_size * stride`` pieces along that dim and rank r holds pieces r, r + tp, ...
    """
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, param.partition_stride
    pieces = full.split(full.shape[dim] // (tp_size * stride), dim=dim)
    return torch.cat(pieces[tp_rank::tp_size], dim=dim)


def _tp() -> tuple[int, int, Any]:
    from megatron.core import parallel_state as mpu

    return (
        mpu.get_tensor_model_parallel_rank(),
        mpu.get_tensor_model_parallel_world_size(),
        mpu.get_tensor_model_parallel_group(),
    )


@torch.no_grad()
def load_full_state_dict(module: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Copy full (unsharded) tensors into ``module``'s parameters by name, each TP rank taking its slice.

    Every parameter must be given and every given tensor must be used (Transformer Engine's
    ``_extra_state`` entries are not parameters and are not needed).
    """
    tp_rank, tp_size, _ = _tp()
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    for name, param in params.items():
        shard = tp_shard(state[name], param, tp_rank, tp_size)
        if shard.shape != param.shape:
            raise ValueError(f"{name}: shape {tuple(shard.shape)} for TP rank {tp_rank}, expected {tuple(param.shape)}")
        param.copy_(shard)


@torch.no_grad()
def full_state_dict(module: torch.nn.Module) -> dict[str, Tensor]:
    """Every parameter of ``module`` as a full tensor (TP shards gathered; the inverse of loading)."""
    tp_rank, tp_size, group = _tp()
    out = {}
    for name, param in module.named_parameters():
        if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
            out[name] = param.detach().clone()
            continue
        dim, stride = param.partition_dim, param.partition_stride
        shards = [torch.empty_like(param) for _ in range(tp_size)]
        torch.distributed.all_gather(shards, param.detach().contiguous(), group=group)
        pieces = [shard.chunk(stride, dim=dim) for shard in shards]  # [rank][stride piece]
        out[name] = torch.cat([pieces[r][s] for s in range(stride) for r in range(tp_size)], dim=dim)
    return out
