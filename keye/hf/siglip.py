"""A transformers ``SiglipModel`` checkpoint (e.g. google/siglip-so400m-patch14-384) as stage 0's starting point.

The recipe's stage 0 continues SigLIP: its vision tower, its text tower, its attention-pooling head and its
learned logit scale and bias together are SigLIP's image-text alignment, so all four are loaded. The
directory holds (transformers names):

- ``vision_model.*``: the ViT, with ``vision_model.head.*`` the pooling head, into ``model.vision_encoder``
  (``siglip_navit`` with ``pooling_head: true``, whose head keeps SigLIP's names);
- ``text_model.*``: the text tower, into ``model.text_encoder`` (``siglip_text``);
- ``logit_scale``, ``logit_bias`` (t' and b, shape [1]), into the stage's loss (``siglip_sigmoid``), which
  means the same by them.

Each of the three classes carries its key map (`keye.hf.contract`: ``hf_weight_shapes``, ``hf_to_keye``); the
format, which module lives under which prefix, is the ``siglip`` entry of `keye.hf.sources.HF_FORMATS`, the
dispatch behind a stage's ``init_from`` naming a SigLIP directory. :func:`load_siglip_into` is that same path
for a model in hand (checks of config.json against the towers' Configs and of every weight's shape first).

At step 0 the loaded stage 0 reproduces ``SiglipModel(...).logits_per_image`` when the ViT's 2D RoPE is off
(``position_encoding: {name: none}``) and an image is ``image_size`` square (SigLIP then adds its position
table as is; other sizes are interpolated, bilinearly here as in Keye, bicubically in transformers), with
captions tokenized by SigLIP's tokenizer (``model.text_encoder.tokenizer``). Keye's stage 0 turns the RoPE on,
which is a deliberate departure from SigLIP's alignment (spec §3.2: "+ 2D RoPE").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from keye.errors import KeyeUserError


def tower_nodes(config: dict) -> dict[str, dict[str, Any]]:
    """Blueprint nodes for ``model.vision_encoder`` / ``model.text_encoder`` that hold a ``SiglipModel`` with
    this config.json (parsed): what to write in a blueprint that continues this checkpoint."""
    v, t = config.get("vision_config", {}), config.get("text_config", {})

    def tower(c: dict) -> dict[str, Any]:  # transformers' SiglipVisionConfig / SiglipTextConfig defaults
        return {"hidden_size": c.get("hidden_size", 768), "intermediate_size": c.get("intermediate_size", 3072),
                "num_layers": c.get("num_hidden_layers", 12), "num_heads": c.get("num_attention_heads", 12),
                "layer_norm_eps": c.get("layer_norm_eps", 1e-6)}

    vision = {"name": "siglip_navit", **tower(v), "patch_size": v.get("patch_size", 16),
              "image_size": v.get("image_size", 224), "pooling_head": True}
    text = {"name": "siglip_text", **tower(t), "vocab_size": t.get("vocab_size", 32000),
            "max_position_embeddings": t.get("max_position_embeddings", 64),
            "projection_size": t.get("projection_size") or t.get("hidden_size", 768)}
    return {"vision_encoder": vision, "text_encoder": text}


def load_siglip_into(model: nn.Module, hf_dir: str | Path) -> None:
    """Load a transformers ``SiglipModel`` directory into a contrastive model (``vision_encoder`` with its
    pooling head, ``text_encoder``, ``loss``) through the stages' own dispatch (`keye.hf.sources`): each
    tensor-parallel rank its slice. Call it on every rank."""
    from keye.hf.sources import load_module, open_hf_directory

    where = str(hf_dir)
    directory = open_hf_directory(hf_dir, where)
    if directory.model_type != "siglip":
        raise KeyeUserError(f"{Path(hf_dir) / 'config.json'}: model_type {directory.model_type!r} is not 'siglip' "
                            "(a transformers SiglipModel checkpoint)")
    for module in directory.modules:
        load_module(model, directory, module, where)
