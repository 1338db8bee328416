"""The released Keye-VL format's config.json ↔ the Configs of the components it is made of.

The released format (spec §1.7, §2): ``config.json`` with ``model_type: "Keye"``, Qwen3 keys at the top level,
``rope_scaling.mrope_section``, vision settings under ``vision_config``. It fixes the architecture, which
keye composes from registered components: `FORMAT` names, per component kind, the one the format is (the
built-ins ``siglip_navit``, ``patch_merge_mlp`` with norm pre_merge and act gelu, ``qwen3`` with M-RoPE, and
the ``mrope_time_aligned`` position encoding), and where its weights live. The classes are looked up in the
plugin registry (`keye.plugins.get_registry`), never imported, so plugin isolation (``KEYE_BLOCK_PLUGINS``,
``KEYE_OVERRIDE``) holds for ``convert`` and ``export`` as for any run.

- :func:`hf_configs` / :func:`hf_config_dict`: config.json ↔ :class:`KeyeVLConfigs`;
- :func:`configs_of`: the same for a blueprint-built ``KeyeVLModel``, whatever components it holds (their
  classes then provide the key maps, `keye.hf.contract`);
- :func:`remote_code_auto_map`: config.json's ``auto_map``, which makes ``AutoModel.from_pretrained(dir,
  trust_remote_code=True)`` run the released modeling code (spec §2: ``configuration_keye.KeyeConfig``,
  ``modeling_keye.KeyeForConditionalGeneration``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from keye.errors import KeyeUserError


@dataclass(frozen=True)
class Slot:
    """One part of the format: a component kind, the registered component the format is, where its weights live."""

    kind: str
    component: str
    prefix: str  #: of its released weight names


#: The parts of the released format whose weights it holds, in the order their weights are claimed (the
#: language model's names are top level: it takes what the others leave).
FORMAT = (
    Slot("vision_encoder", "siglip_navit", "visual.vision_model."),
    Slot("projector", "patch_merge_mlp", "mlp_AR."),
    Slot("language_model", "qwen3", ""),
)
#: The position encoding of the format's language model (time-aligned 3D M-RoPE: position ids of a batch).
POSITION_ENCODING = "mrope_time_aligned"

#: The public repository whose remote code (configuration_keye.py, modeling_keye.py) loads the format.
REMOTE_CODE_REPO = "Kwai-Keye/Keye-VL-8B-Preview"
#: The released config.json's ``auto_map`` and its ``vision_config.auto_map`` (module.Class in that repository).
AUTO_MAP = {"AutoConfig": "configuration_keye.KeyeConfig", "AutoModel": "modeling_keye.KeyeForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_keye.KeyeForConditionalGeneration"}
VISION_AUTO_MAP = {"AutoConfig": "configuration_keye.KeyeVisionConfig", "AutoModel": "modeling_keye.SiglipVisionModel"}


def remote_code_auto_map(auto_map: dict, directory: str | Path) -> dict:
    """``auto_map`` for a checkpoint written to ``directory``. The released one names modules beside config.json
    (``modeling_keye.KeyeForConditionalGeneration``); where ``directory`` lacks that module file (keye writes
    weights and config, not Kwai's code), a reference becomes transformers' cross-repository form
    ``Kwai-Keye/Keye-VL-8B-Preview--modeling_keye.KeyeForConditionalGeneration``, which fetches the public
    remote code, so ``trust_remote_code=True`` loads the folder either way. References that already name a
    repository (``--``) are kept."""
    out = {}
    for key, reference in auto_map.items():
        module = reference.split(".", 1)[0]
        local = "--" in reference or (Path(directory) / f"{module}.py").is_file()
        out[key] = reference if local else f"{REMOTE_CODE_REPO}--{reference}"
    return out


def component_class(kind: str, name: str) -> type:
    """A registered component class, found in the process-wide registry (a miss lists the known names)."""
    from keye.plugins import get_registry

    return get_registry().cls(kind, name)


@dataclass
class KeyeVLConfigs:
    """The component settings one released config.json describes (or a blueprint-built model holds)."""

    vision: Any
    projector: Any
    language: Any
    mrope: Any  #: the position encoding's Config
    #: component kind → class, for a model built from a blueprint; empty: the format's, from the registry
    classes: dict[str, type] = field(default_factory=dict)

    def cls(self, kind: str) -> type:
        """The class of this model's ``kind`` part (its own, else the format's registered one)."""
        if kind in self.classes:
            return self.classes[kind]
        names = {slot.kind: slot.component for slot in FORMAT} | {"position_encoding": POSITION_ENCODING}
        return component_class(kind, names[kind])

    def config(self, kind: str) -> Any:
        return {"vision_encoder": self.vision, "projector": self.projector, "language_model": self.language,
                "position_encoding": self.mrope}[kind]

    def position_encoding(self) -> Any:
        """The language model's position encoding, built (no weights): position ids of released batches."""
        return self.cls("position_encoding")(self.mrope)

    def model_section(self) -> SimpleNamespace:
        """What ``KeyeVLModel`` takes as a blueprint ``model`` section: one registry node per slot."""
        return SimpleNamespace(**{slot.kind: {"name": slot.component, **asdict(self.config(slot.kind))}
                                  for slot in FORMAT})


# What the released format fixes: any other value is a different architecture.
_FIXED = {"hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False, "use_sliding_window": False,
          "vision_config.hidden_act": "gelu_pytorch_tanh"}


def _get(cfg: dict, key: str, default: Any = KeyError, where: str = "config.json") -> Any:
    """``cfg["a"]["b"]`` for ``key="a.b"``; a missing (or null) key gives ``default`` or a one-line error."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            if default is KeyError:
                raise KeyeUserError(f"{where}: missing key '{key}'")
            return default
        node = node[part]
    return node


def hf_configs(cfg: dict, where: str = "config.json") -> KeyeVLConfigs:
    """Component configs from a released config.json (parsed); a missing or bad key is a one-line error."""
    if cfg.get("model_type", "Keye") != "Keye":
        raise KeyeUserError(f"{where}: model_type {cfg.get('model_type')!r} is not 'Keye' (Keye-VL-8B-Preview)")
    for key, value in _FIXED.items():
        if _get(cfg, key, value, where) != value:
            found = _get(cfg, key, where=where)
            raise KeyeUserError(f"{where}: {key} = {found!r} is not supported (released: {value!r})")

    def num(key: str, default: Any = KeyError, kind: type = int) -> Any:
        value = _get(cfg, key, default, where)
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool) and value > 0
        if not ok:
            raise KeyeUserError(f"{where}: {key} must be a positive {kind.__name__}, got {value!r}")
        return kind(value)

    v = "vision_config."
    heads, hidden, vision_hidden, vision_heads = (num(k) for k in (
        "num_attention_heads", "hidden_size", v + "hidden_size", v + "num_attention_heads"))
    head_dim, merge = num("head_dim", hidden // heads), num(v + "spatial_merge_size", 2)
    theta = num("rope_theta", 1e6, float)
    section = _get(cfg, "rope_scaling.mrope_section", where=where)
    if not isinstance(section, list) or [type(x) for x in section] != [int] * 3 or 2 * sum(section) != head_dim:
        raise KeyeUserError(f"{where}: rope_scaling.mrope_section {section!r} must be 3 ints summing to head_dim/2")
    if vision_hidden % vision_heads or (vision_hidden // vision_heads) % 4:
        raise KeyeUserError(f"{where}: vision head_dim (hidden_size / num_attention_heads) must divide by 4 (2D RoPE)")
    vision = component_class("vision_encoder", "siglip_navit").Config(
        hidden_size=vision_hidden, intermediate_size=num(v + "intermediate_size"), num_heads=vision_heads,
        num_layers=num(v + "num_hidden_layers"), patch_size=num(v + "patch_size"), image_size=num(v + "image_size"),
        layer_norm_eps=num(v + "layer_norm_eps", 1e-6, float), position_encoding={"name": "rope2d_vision"},
    )
    projector = component_class("projector", "patch_merge_mlp").Config(
        in_dim=vision_hidden, out_dim=hidden, merge=merge, hidden=None, act="gelu", norm="pre_merge", norm_eps=1e-5
    )
    mrope = component_class("position_encoding", POSITION_ENCODING).Config(
        mrope_section=list(section), spatial_merge_size=merge, theta=theta, head_dim=head_dim,
        tokens_per_second=num(v + "tokens_per_second", cfg.get("tokens_per_second", 2.0), float),
        image_token_id=num("image_token_id", 151655), video_token_id=num("video_token_id", 151656),
        vision_start_token_id=num("vision_start_token_id", 151652),
    )
    language = component_class("language_model", "qwen3").Config(
        hidden_size=hidden, num_layers=num("num_hidden_layers"), num_attention_heads=heads,
        num_query_groups=num("num_key_value_heads", heads), head_dim=head_dim, ffn_hidden_size=num("intermediate_size"),
        vocab_size=num("vocab_size"), max_position_embeddings=num("max_position_embeddings", 40960),
        rms_norm_eps=num("rms_norm_eps", 1e-6, float),
        position_encoding={"name": POSITION_ENCODING, **asdict(mrope)},  # one source of the M-RoPE settings
    )
    return KeyeVLConfigs(vision, projector, language, mrope)


def hf_config_dict(configs: KeyeVLConfigs, base: dict | None = None, dtype: torch.dtype | None = None) -> dict:
    """A released-style config.json for these components; keys of ``base`` that are not ours are kept."""
    v, p, lm, mr = configs.vision, configs.projector, configs.language, configs.mrope
    schemes = (lm.position_encoding["name"], v.position_encoding["name"])
    if (p.norm, p.act, p.hidden or p.in_dim * p.merge**2, *schemes) != (
            "pre_merge", "gelu", p.in_dim * p.merge**2, POSITION_ENCODING, "rope2d_vision"):
        raise KeyeUserError("the Keye-VL-8B-Preview format needs patch_merge_mlp (norm pre_merge, act gelu, hidden "
                            f"null), qwen3 with position_encoding {POSITION_ENCODING}, siglip_navit with rope2d_vision")
    cfg = dict(base or {})
    cfg.update(
        architectures=cfg.get("architectures", ["KeyeForConditionalGeneration"]), model_type="Keye",
        hidden_size=lm.hidden_size, intermediate_size=lm.ffn_hidden_size, num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_attention_heads, num_key_value_heads=lm.num_query_groups, head_dim=lm.head_dim,
        hidden_act="silu", vocab_size=lm.vocab_size, max_position_embeddings=lm.max_position_embeddings,
        rms_norm_eps=lm.rms_norm_eps, rope_theta=mr.theta, attention_bias=False, tie_word_embeddings=False,
        use_sliding_window=False, image_token_id=mr.image_token_id, video_token_id=mr.video_token_id,
        vision_start_token_id=mr.vision_start_token_id,
    )
    cfg["rope_scaling"] = {**cfg.get("rope_scaling", {"type": "mrope"}), "mrope_section": list(mr.mrope_section)}
    cfg.setdefault("auto_map", dict(AUTO_MAP))
    cfg["vision_config"] = {
        "auto_map": dict(VISION_AUTO_MAP), **cfg.get("vision_config", {}), "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "patch_size": v.patch_size,
        "image_size": v.image_size, "layer_norm_eps": v.layer_norm_eps, "hidden_act": "gelu_pytorch_tanh",
        "spatial_merge_size": p.merge, "tokens_per_second": mr.tokens_per_second, "num_channels": 3,
    }
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    return cfg


def configs_of(model: nn.Module) -> KeyeVLConfigs:
    """The settings of a (blueprint-built) ``KeyeVLModel`` and the classes of its parts (their key maps): the
    M-RoPE settings are its language model's position encoding's, with the projector's merge and the model's
    pad token ids."""
    if getattr(model, "vision_encoder", None) is None or getattr(model, "projector", None) is None:
        raise KeyeUserError("save_keye_vl: the Keye-VL format needs a model with a vision encoder and a projector")
    lm = model.language_model.config
    scheme = model.language_model.position_encoding  # built: its config holds the model's settings
    if lm.position_encoding.get("name") != POSITION_ENCODING:
        raise KeyeUserError("save_keye_vl: the Keye-VL format needs language_model.position_encoding "
                            f"{POSITION_ENCODING}")
    mrope = replace(scheme.config, spatial_merge_size=model.projector.config.merge,
                    image_token_id=model.image_token_id, video_token_id=model.video_token_id)
    classes = {kind: type(getattr(model, kind)) for kind in ("vision_encoder", "projector", "language_model")}
    classes["position_encoding"] = type(scheme)
    return KeyeVLConfigs(model.vision_encoder.config, model.projector.config, lm, mrope, classes)
