"""The SigLIP text tower on Megatron-Core, for the contrastive stage 0 (image-text sigmoid loss).

``forward(input_ids [B, L]) -> [B, out_dim]``, what transformers' ``SiglipTextModel`` returns as
``pooler_output``:

1. token embedding (Megatron's vocab-parallel embedding) + learned absolute position embedding
   (``LanguageModelEmbedding`` with ``learned_absolute``), positions 0..L-1;
2. pre-LN **bidirectional** transformer layers (the same layer spec as the ViT, ``keye.model.siglip_tower``:
   LayerNorm, qkv with bias, GELU-tanh MLP with bias), then the final LayerNorm;
3. the hidden state of the **last** token goes through ``head`` (Linear hidden → projection_size).

There is no attention mask, as in SigLIP training: texts are padded to a fixed length
(``max_position_embeddings``, 64 for so400m) with the pad token, and the last position (a pad or the
end-of-text token) is the pooled one. Pass every text in a batch at the same length.

Tensor parallelism comes from Megatron (vocab-parallel embedding, column/row-parallel linears); the
small position table, norms and ``head`` are replicated. The tower lives whole on one pipeline stage.
Weights load from a transformers ``SiglipModel`` checkpoint (``text_model.*``) with
``hf_to_keye_state_dict``; the class carries the key map `keye.hf.contract` describes (``hf_to_keye``...).

**Tokenizer.** SigLIP's text tower was trained on SigLIP's own tokenizer (so400m: a 32,000-piece
SentencePiece model), not on the LLM's: ``tokenizer`` names its directory, and :meth:`SiglipText.tokenize`
turns captions into ids as SigLIP's processor does (``padding="max_length"`` to the tower's
``max_position_embeddings``, truncation, the tokenizer's own end-of-text token), so the pooled last position is
what SigLIP pooled. With no ``tokenizer`` the contrastive stage tokenizes captions with the blueprint's
``model.tokenizer``, which is only right when its ids fit the table (the tiny blueprints: a 1,024-entry
tokenizer and table); the stage checks that and names this key when they do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from keye import hookimpl
from keye.config import doc
from keye.errors import KeyeUserError
from keye.model import backend, hf_keys, siglip_tower
from keye.parallel import tp_weights
from keye.model.protocols import BuildContext

# transformers SiglipTextModel names → this module's (the encoder layers map in keye.model.hf_keys).
_HF_TO_KEYE = {
    "embeddings.token_embedding.weight": "embedding.word_embeddings.weight",
    "embeddings.position_embedding.weight": "embedding.position_embeddings.weight",
    "final_layer_norm.weight": "decoder.final_layernorm.weight",
    "final_layer_norm.bias": "decoder.final_layernorm.bias",
    "head.weight": "head.weight",
    "head.bias": "head.bias",
}
_KEYE_TO_HF = {v: k for k, v in _HF_TO_KEYE.items()}


class SiglipText(nn.Module):
    """``forward(input_ids [B, L]) -> [B, out_dim]`` (see the module docstring)."""

    SIZES = {
        "tiny": dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, vocab_size=128,
                     max_position_embeddings=16),
        "small": dict(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, vocab_size=4096,
                      max_position_embeddings=64),
        # google/siglip-so400m-patch14-384's text tower: the tower paired with Keye's ViT initialisation.
        "keye_vl_8b": dict(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16,
                           vocab_size=32000, max_position_embeddings=64),
    }

    @dataclass
    class Config(siglip_tower.SiglipTowerConfig):
        vocab_size: int = doc("Token vocabulary (so400m: 32000); divisible by the tensor-parallel size.", 32000)
        max_position_embeddings: int = doc("Rows of the learned position table: the longest (padded) text.", 64)
        projection_size: Optional[int] = doc("Output width of ``head``; null: hidden_size (as SigLIP).", None)
        tokenizer: Optional[str] = doc(
            "Directory of the tokenizer this tower was trained with (SigLIP's, e.g. /models/siglip-so400m-patch14-384: "
            "a transformers tokenizer, loaded offline); captions are padded to max_position_embeddings as SigLIP "
            "pads them. null: captions use the blueprint's model.tokenizer (its ids must be below vocab_size).", None,
        )

    @classmethod
    def check_config(cls, config: Config, check: object) -> None:
        """What the tower's TransformerConfig and vocab-parallel embedding would refuse when built."""
        siglip_tower.check_tower_config(config, check)
        check.count(config, "vocab_size", "max_position_embeddings")
        check.divisible(config, "vocab_size", check.tensor, "parallel.tensor")
        if config.projection_size is not None:
            check.count(config, "projection_size")

    def __init__(self, config: Config | None = None, ctx: BuildContext | None = None) -> None:
        super().__init__()
        from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
        from megatron.core.transformer.transformer_block import TransformerBlock

        self.config = config = config or self.Config()
        ctx = ctx or BuildContext()
        self.out_dim = config.projection_size or config.hidden_size
        self.vocab_size = config.vocab_size
        self.tokenizer = load_caption_tokenizer(config.tokenizer, config.vocab_size) if config.tokenizer else None
        self.impl = backend.resolve_transformer_impl(config.transformer_impl)
        self.transformer_config = siglip_tower.tower_transformer_config(config, ctx, "siglip_text")
        self.embedding = LanguageModelEmbedding(
            config=self.transformer_config,
            vocab_size=config.vocab_size,
            max_sequence_length=config.max_position_embeddings,
            position_embedding_type="learned_absolute",
        )
        self.decoder = TransformerBlock(
            config=self.transformer_config,
            spec=siglip_tower.encoder_block_spec(config.num_layers, self.impl, config.attention, ctx.dtype),
            post_layer_norm=True,  # SigLIP's final_layer_norm
            pre_process=True,
            post_process=True,
        )
        device = backend.param_device(self.transformer_config)
        # Megatron builds the learned position table as a plain fp32 CPU nn.Embedding (its training loop
        # casts the whole model later); put it where and in the dtype the rest of the tower is.
        self.embedding.position_embeddings.to(device=device, dtype=ctx.dtype)
        self.head = nn.Linear(config.hidden_size, self.out_dim, device=device, dtype=ctx.dtype)
        nn.init.normal_(self.head.weight, std=config.init_std)
        nn.init.zeros_(self.head.bias)

    def hidden_states(self, input_ids: Tensor) -> Tensor:
        """``[B, L]`` token ids → final-normed hidden states ``[L, B, D]`` (Megatron's sequence-first layout)."""
        batch, length = input_ids.shape
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"siglip_text: {length} tokens, but the position table has {self.config.max_position_embeddings} rows"
            )
        position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)  # (B, L)
        x = self.embedding(input_ids=input_ids, position_ids=position_ids)  # (L, B, D)
        return self.decoder(hidden_states=x, attention_mask=None)  # (L, B, D); no mask: bidirectional

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(self.hidden_states(input_ids)[-1])  # last token (B, D) → (B, out_dim)

    def tokenize(self, texts: list[str]) -> Tensor | None:
        """Captions → ``[B, max_position_embeddings]`` ids with this tower's own tokenizer, as SigLIP's processor
        makes them (padded to the full length, truncated, end-of-text kept); None when ``tokenizer`` is not set."""
        if self.tokenizer is None:
            return None
        length = self.config.max_position_embeddings
        return self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=length,
                              return_tensors="pt")["input_ids"]

    # --- Hugging Face weights ------------------------------------------------------------------
    # The component's key map (keye.hf.contract.HFWeights), names relative to ``text_model.`` of a SiglipModel.

    @classmethod
    def hf_weight_shapes(cls, config: Config) -> dict[str, tuple[int, ...]]:
        """Every weight of a transformers ``SiglipTextModel`` with this config, and its shape (written out from
        SigLIP's layout, not derived from the mapping)."""
        d, inner, out = config.hidden_size, config.intermediate_size, config.projection_size or config.hidden_size
        shapes = {"embeddings.token_embedding.weight": (config.vocab_size, d),
                  "embeddings.position_embedding.weight": (config.max_position_embeddings, d),
                  "final_layer_norm.weight": (d,), "final_layer_norm.bias": (d,),
                  "head.weight": (out, d), "head.bias": (out,)}
        layer = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d), "self_attn.v_proj": (d, d),
                 "self_attn.out_proj": (d, d), "layer_norm1": (d,), "layer_norm2": (d,),
                 "mlp.fc1": (inner, d), "mlp.fc2": (d, inner)}  # each with a bias of the first dim
        for i in range(config.num_layers):
            for name, shape in layer.items():
                shapes[f"encoder.layers.{i}.{name}.weight"] = shape
                shapes[f"encoder.layers.{i}.{name}.bias"] = shape[:1]
        return shapes

    @classmethod
    def hf_to_keye(cls, hf: dict[str, Tensor], config: Config) -> dict[str, Tensor]:
        """``text_model.``-relative tensors → this module's parameter names."""
        return hf_to_keye_state_dict(hf, config.num_heads, "")

    @classmethod
    def keye_to_hf(cls, state: dict[str, Tensor], config: Config) -> dict[str, Tensor]:
        """The inverse of :meth:`hf_to_keye`, tensor by tensor."""
        return keye_to_hf_state_dict(state, config.num_heads, "")

    def load_hf_state_dict(self, hf: dict[str, Tensor], prefix: str = "text_model.") -> None:
        """Load SigLIP text weights (full tensors, HF names); each TP rank takes its slice."""
        tp_weights.load_full_state_dict(self, hf_to_keye_state_dict(hf, self.config.num_heads, prefix))

    def hf_state_dict(self, prefix: str = "text_model.") -> dict[str, Tensor]:
        """Full tensors under HF names (TP shards gathered: call it on every TP rank)."""
        return keye_to_hf_state_dict(tp_weights.full_state_dict(self), self.config.num_heads, prefix)


def load_caption_tokenizer(path: str, vocab_size: int) -> object:
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)``; a tokenizer that cannot load, has no pad
    token, or has more entries than the tower's table is one line naming ``model.text_encoder.tokenizer``."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise KeyeUserError(f"model.text_encoder.tokenizer: cannot load a tokenizer from '{path}': "
                            f"{str(exc).splitlines()[0]}") from None
    except ImportError:  # google/siglip-*: a SentencePiece model (spiece.model), transformers' SiglipTokenizer
        raise KeyeUserError(f"model.text_encoder.tokenizer: '{path}' needs the sentencepiece and protobuf packages "
                            "(SigLIP's tokenizer is a SentencePiece model): pip install 'keye[siglip]'") from None
    if tokenizer.pad_token_id is None:
        raise KeyeUserError(f"model.text_encoder.tokenizer: '{path}' has no pad token (SigLIP pads every caption "
                            "to the tower's length)")
    if len(tokenizer) > vocab_size:
        raise KeyeUserError(f"model.text_encoder.tokenizer: '{path}' has {len(tokenizer)} tokens, but "
                            f"model.text_encoder.vocab_size is {vocab_size}")
    return tokenizer


def hf_to_keye_state_dict(hf: dict[str, Tensor], num_heads: int, prefix: str = "text_model.") -> dict[str, Tensor]:
    """transformers names → this module's, full tensors.

    ``prefix``: ``text_model.`` in a ``SiglipModel`` checkpoint, ``""`` for a bare ``SiglipTextModel``.
    Keys outside the prefix are ignored (the vision tower, ``logit_scale``...); unknown keys inside it are errors.
    """
    body = {name[len(prefix):]: t for name, t in hf.items() if name.startswith(prefix)}
    out = hf_keys.hf_encoder_to_megatron(body, num_heads)
    for name, tensor in body.items():
        if name in _HF_TO_KEYE:
            out[_HF_TO_KEYE[name]] = tensor
        elif not name.startswith("encoder.layers."):
            raise KeyError(f"siglip_text: unknown weight {prefix}{name}")
    return out


def keye_to_hf_state_dict(state: dict[str, Tensor], num_heads: int, prefix: str = "text_model.") -> dict[str, Tensor]:
    """This module's full tensors → transformers names (the inverse of ``hf_to_keye_state_dict``)."""
    out = hf_keys.megatron_encoder_to_hf(state, num_heads)
    out.update({_KEYE_TO_HF[name]: tensor for name, tensor in state.items() if name in _KEYE_TO_HF})
    return {prefix + name: tensor for name, tensor in out.items()}


@hookimpl
def keye_register_text_encoders(register) -> None:
    register("siglip_text", SiglipText)
