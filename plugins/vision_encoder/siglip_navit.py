"""Keye's vision encoder: a SigLIP-so400m ViT at native resolution (NaViT packing) on Megatron-Core (spec §1.1).

``forward(patches [N, 3, 14, 14], grid_thw [K, 3]) -> [N, hidden]``, one feature per patch, in the order
the patches came (raster order ``(t, h, w)`` per image/video, images/videos one after another).

1. **Patch embedding**: ``Conv2d(3, D, 14, stride 14)`` on each ``[3, 14, 14]`` patch. A convolution
   whose kernel is its whole input is a matmul, so it runs as a linear layer over the flattened patch (on
   oneDNN for fp32 CPU tensors, ``keye.model.onednn_linear``); the parameter keeps the Conv2d shape
   ``[D, 3, 14, 14]`` so SigLIP/Keye weights load unchanged.
2. **Absolute position embedding**: the learned ``S x S`` table (S = image_size // patch_size: 27 for
   384/14) is bilinearly interpolated (``align_corners=False``) to each grid's ``(h, w)`` and repeated
   ``t`` times (every frame of a video gets the same table). A grid of exactly ``S x S`` gets the table
   unchanged. The released code keeps an LFU cache of 20 grids; here the interpolation is recomputed per
   forward (it is cheap, and a cache across steps would hold tensors from an old autograd graph while
   the table trains).
3. **Encoder**: Megatron-Core ``TransformerBlock`` of pre-LN, non-causal layers (``keye.model.siglip_tower``):
   qkv with bias, GELU-tanh MLP with bias, and the block's final LayerNorm is SigLIP's ``post_layernorm``.
   Tensor parallelism comes from Megatron's column/row-parallel linears. The tower is never split across
   pipeline stages (it lives on the first stage).
4. **2D RoPE** in every layer, from the ``position_encoding`` node (``rope2d_vision``; ``none`` turns it off;
   any scheme with ``patch_rotary_pos_emb``, `keye.model.protocols.PatchPositions`): per patch the ``head_dim/2`` angles
   ``[row * inv_freq, col * inv_freq]``, duplicated to ``head_dim`` and given to Megatron's attention as
   ``rotary_pos_emb`` ``[N, 1, 1, head_dim]``. Megatron's unfused RoPE is ``t * cos + rotate_half(t) * sin``
   over the last ``freqs.shape[-1]`` dims with ``rotate_half([x1, x2]) = [-x2, x1]``: with freqs of the
   full head width that is exactly flash-attn's non-interleaved ``apply_rotary_emb`` of the released code
   (dims i and i + head_dim/2 turn together by angle i: row angles first, then column angles). One
   difference: Megatron casts cos/sin to the activation dtype before rotating, flash-attn rotates in
   float32; in bf16 that can move a value by about one bf16 ulp (identical in fp32).
5. **Packing**: the whole batch is one sequence ``[sum N, 1, D]`` with block-diagonal attention, one block
   per image or per *whole video* (all frames of a video see each other). The block structure is
   ``PackedSeqParams`` (``thd``, cu_seqlens) for Transformer Engine's varlen flash attention and for the
   local path's SDPA attention (``keye.model.sdpa_attention``, one SDPA call per block), which also feeds
   RoPE per token (freqs of length ``cu_seqlens[-1]``, token by token); with Megatron's own local attention
   (``attention: megatron``) it is a boolean mask ``[1, 1, N, N]`` (True = masked). The TE path cannot run
   on a CPU machine and is untested here.
6. **Pooling head** (``pooling_head: true``): SigLIP's attention-pooling ``head`` (`keye.model.pooling_head`),
   ``head(features, grid_thw) -> [K, D]``, one embedding per packed image. Keye-VL's forward never calls it;
   the contrastive stage 0 does: it is SigLIP's own image embedding, so continuing from SigLIP keeps the
   pretrained image-text alignment at step 0. It lives *here*, in the tower, rather than in the stage, so
   that one ``model.vision_encoder`` node gives every stage the same parameter set: stage 0's trained head
   goes through stages 1-3 with the tower (stage weights load module by module, and a module must match
   exactly) and is exported as the released ``visual.vision_model.head.*``. Off by default (the tiny
   blueprints pool by mean in stage 0); the 8B blueprints turn it on.
7. **FP8** only when ``precision.fp8.vision`` is on (`keye.parallel.fp8.vision_fp8`; otherwise the tower stays in
   high precision while the LLM's blocks run FP8): TE's through the config, or keye's scaled-FP8 linears. The
   pack is then padded with one block of zero patches to a multiple of 16 rows (FP8 GEMMs refuse other
   counts); the block attends only to itself and its outputs are dropped.

Not built: the ``packing_position_embedding`` table, which the released model carries but never uses
(``hf_to_keye_state_dict`` skips it; export writes one, `hf_released_extras`), and the pooling head when
``pooling_head`` is off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keye import hookimpl
from keye.config import component, doc
from keye.model import backend, hf_keys, packing_masks, siglip_tower
from keye.model.pooling_head import AttentionPoolingHead, head_weight_shapes
from keye.parallel import fp8 as keye_fp8
from keye.parallel import tp_weights
from keye.model.protocols import BuildContext

# Released weights (spec §1.7): keys the module has no use for (the head's are used with ``pooling_head``).
_UNUSED_HF_PREFIXES = ("head.", "embeddings.packing_position_embedding.")
#: Rows of the released, unused ``packing_position_embedding`` table (modeling_keye.py: ``nn.Embedding(32768, D)``).
PACKING_TABLE_ROWS = 32768


class SiglipNaViT(nn.Module):
    """``forward(patches [N, 3, P, P], grid_thw [K, 3]) -> [N, out_dim]`` (see the module docstring)."""

    SIZES = {
        "tiny": dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=56),
        "small": dict(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, image_size=224),
        "keye_vl_8b": dict(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, image_size=384),
    }

    @dataclass
    class Config(siglip_tower.SiglipTowerConfig):
        num_heads: int = doc("Attention heads; head_dim = hidden_size / num_heads must divide by 4 (2D RoPE).", 16)
        patch_size: int = doc("Side of a square patch in pixels.", 14)
        image_size: int = doc("Pre-training resolution: the position table is (image_size // patch_size)².", 384)
        position_encoding: Dict[str, Any] = component(
            "position_encoding", "Rotary positions of the patches inside attention, built with this encoder's "
            "head_dim: rope2d_vision (Keye's 2D RoPE, rows and cols), none, or any scheme with "
            "patch_rotary_pos_emb.", {"name": "rope2d_vision"},
        )
        pooling_head: bool = doc(
            "Build SigLIP's attention-pooling head (probe + multi-head attention + MLP): the contrastive stage's "
            "image embedding, exported as visual.vision_model.head.*; unused by the Keye-VL forward. Set it in the "
            "blueprint's model section, so every stage holds it.", False,
        )

    @classmethod
    def check_config(cls, config: Config, check: object) -> None:
        """What the tower's TransformerConfig, patch embedding and 2D RoPE would refuse when built."""
        siglip_tower.check_tower_config(config, check)
        check.count(config, "patch_size")
        check.count(config, "image_size", minimum=config.patch_size)
        head_dim, scheme = config.hidden_size // config.num_heads, (config.position_encoding or {}).get("name")
        if scheme == "rope2d_vision" and config.hidden_size % config.num_heads == 0 and head_dim % 4:
            check.fail("num_heads", f"head_dim = hidden_size / num_heads = {head_dim} must divide by 4 for "
                                    "rope2d_vision (2D RoPE: rows and cols, pairs on each)")

    def __init__(self, config: Config | None = None, ctx: BuildContext | None = None) -> None:
        super().__init__()
        from megatron.core.transformer.transformer_block import TransformerBlock

        self.config = config = config or self.Config()
        ctx = ctx or BuildContext()
        self.head_dim = config.hidden_size // config.num_heads
        self.out_dim = config.hidden_size
        self.table_side = config.image_size // config.patch_size
        fp8 = keye_fp8.vision_fp8(ctx.fp8)  # None unless precision.fp8.vision
        self.backend = backend.choose_backend(ctx.dtype, fp8, config.transformer_impl)
        self.impl = self.backend.impl
        self.fp8_rows = keye_fp8.FP8_ROWS if fp8 is not None else 1

        self.transformer_config = siglip_tower.tower_transformer_config(config, ctx, "siglip_navit", fp8)
        device = backend.param_device(self.transformer_config)
        side, width = config.patch_size, config.hidden_size
        self.patch_embedding = nn.Conv2d(3, width, side, stride=side, device=device, dtype=ctx.dtype)
        self.position_embedding = nn.Embedding(self.table_side**2, width, device=device, dtype=ctx.dtype)
        nn.init.normal_(self.position_embedding.weight, std=config.init_std)
        # holds no parameters (rope2d_vision: only the inverse frequencies)
        self.rope = ctx.build("position_encoding", config.position_encoding, head_dim=self.head_dim)
        if isinstance(self.rope, nn.Module):
            self.rope.to(device)
        self.decoder = TransformerBlock(
            config=self.transformer_config,
            spec=siglip_tower.encoder_block_spec(config.num_layers, self.impl, config.attention, ctx.dtype,
                                                 self.backend.fp8),
            post_layer_norm=True,  # SigLIP's post_layernorm
            pre_process=True,
            post_process=True,
        )
        self.head = None
        if config.pooling_head:
            self.head = AttentionPoolingHead(width, config.num_heads, config.intermediate_size, config.layer_norm_eps,
                                             device=device, dtype=ctx.dtype)

    # --- pieces of the forward pass ------------------------------------------------------------

    def embed_patches(self, patches: Tensor) -> Tensor:
        """``[N, 3, P, P]`` → ``[N, D]``: the Conv2d as a matmul over each flattened patch."""
        from keye.model.onednn_linear import linear  # imports Megatron: not at plugin load

        weight = self.patch_embedding.weight  # (D, 3, P, P)
        return linear(patches.to(weight.dtype).flatten(1), weight.flatten(1), self.patch_embedding.bias)

    def position_embeddings(self, grid_thw: Tensor) -> Tensor:
        """``[N, D]``: the table interpolated to each grid (bilinear, align_corners=False), repeated t times."""
        side, width = self.table_side, self.config.hidden_size
        table = self.position_embedding.weight.view(1, side, side, width).permute(0, 3, 1, 2)  # (1, D, S, S)
        resized: dict[tuple[int, int], Tensor] = {}
        out = []
        for t, h, w in grid_thw.tolist():
            if (h, w) not in resized:
                grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=False)  # (1, D, h, w)
                resized[(h, w)] = grid[0].permute(1, 2, 0).reshape(h * w, width)  # (h*w, D), raster order
            out.append(resized[(h, w)].repeat(t, 1))  # (t*h*w, D)
        return torch.cat(out, dim=0)

    def rotary_pos_emb(self, grid_thw: Tensor) -> Tensor | None:
        """``[N, 1, 1, head_dim]`` angles for Megatron's rotate-half RoPE from the position encoding (rope2d_vision:
        ``[rows, cols, rows, cols]`` per patch), or None for no rotation."""
        return self.rope.patch_rotary_pos_emb(grid_thw)

    def attention_layout(self, seqlens: list[int], device: torch.device) -> tuple[Tensor | None, object | None]:
        """(mask, packed_seq_params) that make attention block-diagonal over ``seqlens``."""
        if len(seqlens) == 1 and self.impl != "transformer_engine":
            return None, None  # one block: full attention, no mask needed
        if self.impl == "transformer_engine" or self.config.attention == "sdpa":
            return None, packing_masks.packed_seq_params(seqlens, device)  # cu_seqlens: no [N, N] mask to build or scan
        return packing_masks.block_diagonal_mask(seqlens, device), None  # Megatron's DotProductAttention

    # --- forward -------------------------------------------------------------------------------

    def forward(self, patches: Tensor, grid_thw: Tensor) -> Tensor:
        grid_thw = torch.as_tensor(grid_thw, dtype=torch.long).reshape(-1, 3).cpu()
        seqlens = grid_thw.prod(dim=-1).tolist()  # patches per image / video
        if sum(seqlens) != patches.shape[0]:
            raise ValueError(
                f"siglip_navit: grid_thw {grid_thw.tolist()} covers {sum(seqlens)} patches, got {patches.shape[0]}"
            )
        x = self.embed_patches(patches)  # (N, D)
        x = x + self.position_embeddings(grid_thw).to(x.device)
        rotary = self.rotary_pos_emb(grid_thw)
        rotary = rotary.to(x.device) if rotary is not None else None
        count, pad = x.shape[0], -x.shape[0] % self.fp8_rows
        if pad:  # FP8 GEMM rows: one more block of zero patches, seen by nothing else (module docstring, 7.)
            seqlens = [*seqlens, pad]
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])  # (N + pad, D)
            rotary = None if rotary is None else torch.cat([rotary, rotary.new_zeros(pad, *rotary.shape[1:])])
        mask, packed = self.attention_layout(seqlens, x.device)
        hidden = self.decoder(
            hidden_states=x[:, None, :],  # (N, 1, D): Megatron is sequence-first, the pack is one sequence
            attention_mask=mask,
            rotary_pos_emb=rotary,
            packed_seq_params=packed,
        )
        return hidden[:count, 0, :]  # (N, D)

    # --- Hugging Face weights ------------------------------------------------------------------
    # The component's key map (keye.hf.contract.HFWeights): names relative to where a format puts the tower
    # (``visual.vision_model.`` in Keye-VL, ``vision_model.`` in SiglipModel, nothing in SiglipVisionModel).

    #: released weights the tower does not use (SigLIP's pooling head unless ``pooling_head``, Keye's packing
    #: table): kept, not loaded
    HF_UNUSED = _UNUSED_HF_PREFIXES

    @classmethod
    def hf_weight_shapes(cls, config: Config) -> dict[str, tuple[int, ...]]:
        """Every released weight of a tower with this config (unused ones aside) and its shape, written out
        from SigLIP's layout (not derived from the mapping), so a checkpoint is checked before converting."""
        d, inner, patch = config.hidden_size, config.intermediate_size, config.patch_size
        layer = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d), "self_attn.v_proj": (d, d),
                 "self_attn.out_proj": (d, d), "layer_norm1": (d,), "layer_norm2": (d,),
                 "mlp.fc1": (inner, d), "mlp.fc2": (d, inner)}  # each with a bias of the first dim
        shapes = {"embeddings.patch_embedding.weight": (d, 3, patch, patch), "embeddings.patch_embedding.bias": (d,),
                  "embeddings.position_embedding.weight": ((config.image_size // patch) ** 2, d),
                  "post_layernorm.weight": (d,), "post_layernorm.bias": (d,)}
        for i in range(config.num_layers):
            for name, shape in layer.items():
                shapes[f"encoder.layers.{i}.{name}.weight"] = shape
                shapes[f"encoder.layers.{i}.{name}.bias"] = shape[:1]
        if config.pooling_head:
            shapes.update({f"head.{name}": shape for name, shape in head_weight_shapes(d, inner).items()})
        return shapes

    @classmethod
    def hf_released_extras(cls, config: Config, seed: int = 0) -> dict[str, Tensor]:
        """Released weights a tower with this config does not hold, initialised as the released code initialises
        them (modeling_keye.py ``_init_weights``, SigLIP's): the pooling head when ``pooling_head`` is off, and
        the ``packing_position_embedding`` table (32768 rows, ``N(0, 1/hidden_size)``). Keye-VL never uses
        either; the released ``KeyeForConditionalGeneration`` builds both, so an export writes them (names
        relative to the tower, fp32, drawn from ``seed``: the same export gives the same files)."""
        generator = torch.Generator().manual_seed(seed)
        d = config.hidden_size
        table = torch.empty(PACKING_TABLE_ROWS, d).normal_(0.0, d ** -0.5, generator=generator)
        extras = {"embeddings.packing_position_embedding.weight": table}
        if not config.pooling_head:
            head = AttentionPoolingHead(d, config.num_heads, config.intermediate_size, config.layer_norm_eps)
            head.reset_parameters(generator)
            extras.update({f"head.{name}": t.detach() for name, t in head.state_dict().items()})
        return extras

    @classmethod
    def hf_to_keye(cls, hf: dict[str, Tensor], config: Config) -> dict[str, Tensor]:
        """Released tensors (names as in :meth:`hf_weight_shapes`) → this module's parameter names."""
        return hf_to_keye_state_dict(hf, config.num_heads, "", config.pooling_head)

    @classmethod
    def keye_to_hf(cls, state: dict[str, Tensor], config: Config) -> dict[str, Tensor]:
        """This module's full tensors → released names, tensor by tensor (the inverse of :meth:`hf_to_keye`)."""
        return keye_to_hf_state_dict(state, config.num_heads, "")

    def load_hf_state_dict(self, hf: dict[str, Tensor], prefix: str = "visual.vision_model.") -> None:
        """Load SigLIP/Keye ViT weights (full tensors, HF names); each TP rank takes its slice."""
        tp_weights.load_full_state_dict(self, hf_to_keye_state_dict(hf, self.config.num_heads, prefix,
                                                                     self.config.pooling_head))

    def hf_state_dict(self, prefix: str = "visual.vision_model.") -> dict[str, Tensor]:
        """Full tensors under HF names (TP shards gathered: call it on every TP rank)."""
        return keye_to_hf_state_dict(tp_weights.full_state_dict(self), self.config.num_heads, prefix)


def hf_to_keye_state_dict(
    hf: dict[str, Tensor], num_heads: int, prefix: str = "visual.vision_model.", pooling_head: bool = False
) -> dict[str, Tensor]:
    """Released names (spec §1.7) → this module's, full tensors.

    ``prefix`` is ``visual.vision_model.`` in a Keye-VL checkpoint, ``vision_model.`` in a SiglipModel one,
    ``""`` for a bare ``SiglipVisionModel``. Keys outside the prefix are ignored; the packing table is
    skipped, and so is the pooling head unless the tower has one (``pooling_head``); anything else unknown
    is an error.
    """
    body = {name[len(prefix):]: t for name, t in hf.items() if name.startswith(prefix)}
    out = hf_keys.hf_encoder_to_megatron(body, num_heads)
    direct = {
        "embeddings.patch_embedding.weight": "patch_embedding.weight",
        "embeddings.patch_embedding.bias": "patch_embedding.bias",
        "embeddings.position_embedding.weight": "position_embedding.weight",
        "post_layernorm.weight": "decoder.final_layernorm.weight",
        "post_layernorm.bias": "decoder.final_layernorm.bias",
    }
    for name, tensor in body.items():
        if name in direct:
            out[direct[name]] = tensor
        elif name.startswith("head.") and pooling_head:
            out[name] = tensor  # the module's own names are SigLIP's (keye.model.pooling_head)
        elif not name.startswith("encoder.layers.") and not name.startswith(_UNUSED_HF_PREFIXES):
            raise KeyError(f"siglip_navit: unknown weight {prefix}{name}")
    return out


def keye_to_hf_state_dict(
    state: dict[str, Tensor], num_heads: int, prefix: str = "visual.vision_model."
) -> dict[str, Tensor]:
    """This module's full tensors → released names (the inverse of ``hf_to_keye_state_dict``)."""
    direct = {
        "patch_embedding.weight": "embeddings.patch_embedding.weight",
        "patch_embedding.bias": "embeddings.patch_embedding.bias",
        "position_embedding.weight": "embeddings.position_embedding.weight",
        "decoder.final_layernorm.weight": "post_layernorm.weight",
        "decoder.final_layernorm.bias": "post_layernorm.bias",
    }
    out = hf_keys.megatron_encoder_to_hf(state, num_heads)
    out.update({direct[name]: tensor for name, tensor in state.items() if name in direct})
    out.update({name: tensor for name, tensor in state.items() if name.startswith("head.")})  # SigLIP's names
    return {prefix + name: tensor for name, tensor in out.items()}


@hookimpl
def keye_register_vision_encoders(register) -> None:
    register("siglip_navit", SiglipNaViT)
