"""A transformers ``SiglipModel`` checkpoint (e.g. google/siglip-so400m-patch14-384) as stage 0's starting point.

The recipe's stage 0 continues SigLIP: its vision tower, its text tower, its attention-pooling head and its
learned logit scale and bias together are SigLIP's image-text alignment, so all four are loaded. The
directory holds (transformers names):

- ``vision_model.*``: the ViT, with ``vision_model.head.*`` the pooling head, into ``model.vision_encoder``
  (``siglip_navit`` with ``pooling_head: true``, whose head keeps SigLIP's names);
- ``text_model.*``: the text tower, into ``model.text_encoder`` (``siglip_text``);
- ``logit_scale``, ``logit_bias`` (t' and b, shape [1]), into the stage's loss (``siglip_sigmoid``), which
  means the same by them.

Each of the three classes carries its key map (`keye.hf.contract`: ``hf_weight_shapes``, ``hf_to_keye``), so
this module knows only the *format*: `SIGLIP_MODULES`, which module lives under which prefix. The same table
is the ``siglip`` entry of the stage-chaining dispatch (`keye.hf.sources.HF_FORMATS`: a stage's ``init_from``
naming a SigLIP directory); :func:`load_siglip_into` is the direct route for a contrastive stage's model.
Two things such a dispatch must do for it: route the top-level ``logit_scale`` / ``logit_bias`` to ``loss``
(prefix ``""``), and not drop a class's ``HF_UNUSED`` names that its ``hf_weight_shapes(config)`` lists:
``siglip_navit`` declares ``head.`` unused (the released Keye-VL format never loads it) but, built with
``pooling_head``, expects and loads ``head.*``.

At step 0 the loaded stage 0 reproduces ``SiglipModel(...).logits_per_image`` when the ViT's 2D RoPE is off
(``position_encoding: {name: none}``) and an image is ``image_size`` square (SigLIP then adds its position
table as is; other sizes are interpolated, bilinearly here as in Keye, bicubically in transformers), with
captions tokenized by SigLIP's tokenizer (``model.text_encoder.tokenizer``). Keye's stage 0 turns the RoPE on,
which is a deliberate departure from SigLIP's alignment (spec §3.2: "+ 2D RoPE").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from keye.errors import KeyeUserError

#: keye module of a contrastive model → prefix of its weights in a ``SiglipModel`` checkpoint. The loss takes
#: the top-level names no tower claims (``logit_scale``, ``logit_bias``).
SIGLIP_MODULES = {"vision_encoder": "vision_model.", "text_encoder": "text_model.", "loss": ""}


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


def siglip_to_keye_state(hf: dict[str, Tensor], model: nn.Module, where: str) -> dict[str, Tensor]:
    """A ``SiglipModel``'s tensors → the contrastive model's parameter names (``<module>.<parameter>``), each
    module converted by its own class; a missing, unexpected or misshapen weight is one line naming it."""
    out: dict[str, Tensor] = {}
    claimed: set[str] = set()
    for module, prefix in SIGLIP_MODULES.items():
        part = getattr(model, module)
        cls, config = type(part), part.config
        if not callable(getattr(cls, "hf_to_keye", None)):
            raise KeyeUserError(f"{where}: model.{module} ({cls.__qualname__}) has no Hugging Face key map "
                                "(keye.hf.contract)")
        expected = {prefix + name: tuple(shape) for name, shape in cls.hf_weight_shapes(config).items()}
        for name, shape in expected.items():
            if name not in hf:
                raise KeyeUserError(f"{where}: missing weight {name} (model.{module} expects it)")
            if tuple(hf[name].shape) != shape:
                raise KeyeUserError(f"{where}: {name} has shape {tuple(hf[name].shape)}, model.{module} wants {shape}")
        claimed |= set(expected)
        tensors = {name[len(prefix):]: hf[name] for name in expected}
        out.update({f"{module}.{name}": tensor for name, tensor in cls.hf_to_keye(tensors, config).items()})
    unexpected = sorted(set(hf) - claimed)
    if any(name.startswith("vision_model.head.") for name in unexpected):
        raise KeyeUserError(f"{where}: the checkpoint has SigLIP's pooling head (vision_model.head.*) but the vision "
                            "encoder has none: set model.vision_encoder.pooling_head: true")
    if unexpected:
        raise KeyeUserError(f"{where}: unexpected weight {unexpected[0]}" + (
            f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "") + " (a tower config differs?)")
    return out


def load_siglip_into(model: nn.Module, hf_dir: str | Path) -> None:
    """Load a transformers ``SiglipModel`` directory into a contrastive model (``vision_encoder`` with its
    pooling head, ``text_encoder``, ``loss``): each tensor-parallel rank its slice. Call it on every rank."""
    from keye.hf.files import read_config, read_weights
    from keye.hf.weights import load_hf_into

    path = Path(hf_dir)
    config = read_config(path)
    if config.get("model_type") != "siglip":
        raise KeyeUserError(f"{path / 'config.json'}: model_type {config.get('model_type')!r} is not 'siglip' "
                            "(a transformers SiglipModel checkpoint)")
    load_hf_into(model, siglip_to_keye_state(read_weights(path), model, str(path)))
