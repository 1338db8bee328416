"""Hugging Face checkpoints as starting points for single keye modules (a stage's ``init_from``).

Why: the recipe does not start from random weights. Stage 0 continues SigLIP-so400m (a transformers
``SiglipModel`` directory); stage 1 puts that ViT together with Qwen3-8B (a ``Qwen3ForCausalLM`` directory)
and a fresh projector. Neither is the released Keye-VL format (`keye.hf.config`), and neither is loaded
whole: each *module* of a stage's model is filled from whichever checkpoint holds it.

A directory is recognised by its config.json ``model_type``. `HF_FORMATS` says, per model type, which keye
module lives under which prefix of the checkpoint's weight names; the module's component class converts
them (its ``hf_to_keye``, `keye.hf.contract`), and `keye.hf.weights.load_hf_into` gives each tensor-parallel
rank its slice and each pipeline stage its layers. Adding a format (or a module of one) is an entry in the
tables below; the component it feeds brings the key map.

Before anything is read, a module is checked against the directory (:func:`check_module`): the config.json
keys in `CONFIG_KEYS` must equal the module's Config fields (one line naming both keys: a Qwen3-1.7B
directory for an 8B language model fails here), then every expected weight must be there with its shape,
read from the safetensors headers alone. Only the module's own tensors are read (memory: one module, not
the checkpoint); note that every rank reads its module whole before slicing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from keye.errors import KeyeUserError
from keye.hf.config import FORMAT
from keye.hf.contract import hf_weights
from keye.hf.files import read_config, weight_files

#: model_type (config.json) → {keye module: prefix of its weight names in the checkpoint}. A module with the
#: empty prefix takes the names no other module of the format claims.
HF_FORMATS: dict[str, dict[str, str]] = {
    "qwen3": {"language_model": ""},  # Qwen3ForCausalLM: model.*, lm_head.weight
    "Keye": {slot.kind: slot.prefix for slot in FORMAT},  # the released Keye-VL-8B-Preview
    # SiglipModel; logit_scale/logit_bias (top level) are the contrastive stage's loss (siglip_sigmoid's key map)
    "siglip": {"vision_encoder": "vision_model.", "text_encoder": "text_model.", "loss": ""},
}

_QWEN3_KEYS = {
    "hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads", "head_dim": "head_dim", "ffn_hidden_size": "intermediate_size",
    "vocab_size": "vocab_size", "rms_norm_eps": "rms_norm_eps",
    "position_encoding.theta": ("rope_theta", "rope_parameters.rope_theta"),  # transformers 4 / 5 spelling
}


def _tower_keys(section: str) -> dict[str, Any]:
    keys = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size", "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads", "layer_norm_eps": "layer_norm_eps"}
    return {field: section + key for field, key in keys.items()}


#: model_type → {keye module: {its Config field (dotted into nested nodes): config.json key, or keys tried in
#: order}}. A key config.json leaves out (transformers writes defaults sparsely) is not compared; the weight
#: shapes still are.
CONFIG_KEYS: dict[str, dict[str, dict[str, Any]]] = {
    "qwen3": {"language_model": _QWEN3_KEYS},
    "Keye": {"language_model": _QWEN3_KEYS,
             "vision_encoder": {**_tower_keys("vision_config."), "patch_size": "vision_config.patch_size"}},
    "siglip": {"vision_encoder": {**_tower_keys("vision_config."), "patch_size": "vision_config.patch_size",
                                  "image_size": "vision_config.image_size"},
               "text_encoder": {**_tower_keys("text_config."), "vocab_size": "text_config.vocab_size",
                                "max_position_embeddings": "text_config.max_position_embeddings"}},
}

#: model_type → {config.json key: the only value keye's component for it implements} (anything else is
#: another architecture: biases in attention, another activation, sliding windows).
FIXED: dict[str, dict[str, Any]] = {
    "qwen3": {"hidden_act": "silu", "attention_bias": False, "use_sliding_window": False},
}

#: model_type → {weight name: the weight it equals when config.json says tie_word_embeddings} (the smaller
#: Qwen3 models share the input embedding with the output head and do not store lm_head.weight).
TIED: dict[str, dict[str, str]] = {"qwen3": {"lm_head.weight": "model.embed_tokens.weight"}}


@dataclass(frozen=True)
class HFDirectory:
    """A Hugging Face checkpoint directory of a known format."""

    path: Path
    model_type: str
    config: dict  #: config.json, parsed

    @property
    def modules(self) -> dict[str, str]:
        """keye module → prefix of its weights here."""
        return HF_FORMATS[self.model_type]


def is_hf_directory(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def open_hf_directory(path: str | Path, where: str) -> HFDirectory:
    """The directory's format from its config.json; an unknown ``model_type`` is one line naming the known ones."""
    path = Path(path)
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in HF_FORMATS:
        raise KeyeUserError(f"{where}: {path / 'config.json'}: model_type {model_type!r} is not one keye imports "
                            f"(known: {', '.join(HF_FORMATS)}; keye.hf.sources.HF_FORMATS)")
    return HFDirectory(path, model_type, config)


def module_prefix(source: HFDirectory, module: str, where: str) -> str:
    if module not in source.modules:
        raise KeyeUserError(f"{where}: {source.path} (model_type {source.model_type!r}) holds no {module} "
                            f"(it holds {', '.join(source.modules)})")
    return source.modules[module]


def _claims(source: HFDirectory, module: str, name: str) -> bool:
    """``name`` belongs to ``module``: under its prefix and not under another module's longer one."""
    prefix = source.modules[module]
    return name.startswith(prefix) and not any(
        other != prefix and other.startswith(prefix) and name.startswith(other) for other in source.modules.values())


def _tied(source: HFDirectory) -> dict[str, str]:
    return TIED.get(source.model_type, {}) if source.config.get("tie_word_embeddings") else {}


def _config_value(config: Any, field: str) -> Any:
    value = config
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
    return value


def _json_value(config: dict, keys: str | tuple[str, ...]) -> tuple[str, Any]:
    """The first of ``keys`` (dotted paths) config.json sets, and its value; (first key, None) if none is set."""
    for key in (keys,) if isinstance(keys, str) else keys:
        value: Any = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return key, value
    return (keys if isinstance(keys, str) else keys[0]), None


def check_config_keys(source: HFDirectory, module: str, config: Any, where: str) -> None:
    """config.json agrees with the module's Config on every key `CONFIG_KEYS` lists (that both set), and sets
    the keys of `FIXED` (when it sets them) to what keye implements."""
    for key, value in FIXED.get(source.model_type, {}).items():
        if source.config.get(key, value) != value:
            raise KeyeUserError(f"{where}: {source.path / 'config.json'}: {key} = {source.config[key]!r} is not "
                                f"supported (keye's model.{module} implements {value!r})")
    for field, keys in CONFIG_KEYS.get(source.model_type, {}).get(module, {}).items():
        key, theirs = _json_value(source.config, keys)
        ours = _config_value(config, field)
        if theirs is None or ours is None:
            continue
        same = abs(float(theirs) - float(ours)) <= 1e-9 * abs(float(ours)) if isinstance(ours, float) else theirs == ours
        if not same:
            raise KeyeUserError(f"{where}: {source.path / 'config.json'}: {key} = {theirs!r}, but "
                                f"model.{module}.{field} = {ours!r}")


def header_shapes(source: HFDirectory, module: str) -> dict[str, tuple[int, ...]]:
    """The module's weights in the checkpoint (names relative to its prefix) and their shapes, from the
    safetensors headers only; tied weights the checkpoint leaves out are listed with their source's shape."""
    from safetensors import safe_open

    prefix, shapes = source.modules[module], {}
    for file in weight_files(source.path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if _claims(source, module, name):
                    shapes[name[len(prefix):]] = tuple(f.get_slice(name).get_shape())
    for name, origin in _tied(source).items():
        if _claims(source, module, name) and name[len(prefix):] not in shapes and origin[len(prefix):] in shapes:
            shapes[name[len(prefix):]] = shapes[origin[len(prefix):]]
    return shapes


def check_module(source: HFDirectory, module: str, cls: type, config: Any, where: str) -> None:
    """Everything that can be checked without reading a tensor: the module's class has a key map, config.json
    agrees with its Config, and the checkpoint has exactly the weights that Config expects, with their shapes."""
    module_prefix(source, module, where)
    try:
        hf_weights(cls, module)
    except KeyeUserError as exc:
        raise KeyeUserError(f"{where}: {exc}") from None
    check_config_keys(source, module, config, where)
    expected = {name: tuple(shape) for name, shape in cls.hf_weight_shapes(config).items()}
    found = header_shapes(source, module)
    unused = tuple(getattr(cls, "HF_UNUSED", ()))
    prefix = source.modules[module]
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(name for name in set(found) - set(expected) if not name.startswith(unused))
    wrong = [f"{prefix}{name} {found[name]} (model.{module} wants {expected[name]})"
             for name in sorted(set(expected) & set(found)) if found[name] != expected[name]]
    for label, names in (("missing weight", [prefix + n for n in missing]), ("wrong shape", wrong),
                         ("unexpected weight", [prefix + n for n in unexpected])):
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise KeyeUserError(f"{where}: {source.path}: {label} {names[0]}{more}")


def read_module(source: HFDirectory, module: str, cls: type, config: Any) -> dict[str, Tensor]:
    """The module's full tensors under keye names (``<module>.<parameter>``, global layer numbers), converted
    by its class's ``hf_to_keye``; only its own weights are read."""
    from safetensors import safe_open

    prefix, unused = source.modules[module], tuple(getattr(cls, "HF_UNUSED", ()))
    expected = set(cls.hf_weight_shapes(config))  # read even under an unused prefix (siglip_navit pooling_head: head.*)
    hf: dict[str, Tensor] = {}
    for file in weight_files(source.path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                relative = name[len(prefix):]
                if _claims(source, module, name) and (relative in expected or not relative.startswith(unused)):
                    hf[name[len(prefix):]] = f.get_tensor(name)
    for name, origin in _tied(source).items():
        if _claims(source, module, name) and name[len(prefix):] not in hf and origin[len(prefix):] in hf:
            hf[name[len(prefix):]] = hf[origin[len(prefix):]]
    return {f"{module}.{name}": tensor for name, tensor in cls.hf_to_keye(hf, config).items()}


def load_module(model: Any, source: HFDirectory, module: str, where: str) -> bool:
    """Fill ``module`` of every model chunk on this rank that holds it (its TP slice, its PP layers) from the
    directory; False when no chunk here holds it (a later pipeline stage has no vision encoder). Not collective."""
    from keye.hf.weights import load_hf_into
    from keye.parallel.dist_checkpoint import model_chunks

    held = [getattr(chunk, module, None) for chunk in model_chunks(model)]
    built = next((part for part in held if part is not None), None)
    if built is None:
        return False
    cls, config = type(built), built.config
    check_module(source, module, cls, config, where)
    load_hf_into(model, read_module(source, module, cls, config), module=module)
    return True
