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
read from the safetensors headers alone.

Memory: a module is *streamed* (:func:`stream_module`, :func:`load_module`). Its checkpoint tensors are
grouped into load units, all tensors of one layer together (a fused q/k/v needs q, k and v of a layer) and
every other tensor alone; each unit is read, converted by the component's ``hf_to_keye`` on that unit alone
(the contract of `keye.hf.contract`), copied into this rank's slices and dropped before the next is read.
A unit whose keye names this rank does not hold is not read at all: a pipeline stage reads only its own
layers (global numbers), the embedding only on the stage with the embedding, the final norm and output head
only on the last. Under TP, a tensor the key map only renames into a plain row- or column-parallel weight
(embedding, output head, attention output, MLP down projection) is read as this rank's block alone
(safetensors ``get_slice``); fused ones (q/k/v, gate/up) are read whole and sliced after fusing.

So a rank's checkpoint tensors in memory at once are one unit (plus the fused copies of it): one layer or
the largest tensor outside the layers, not the module. Qwen3-8B in bf16 (16.4 GB) at TP=8 x PP=4: before,
every rank read and held the whole 16.4 GB before slicing (131 GB on an 8-GPU node at once); now a rank
reads 2.4 GB (9 layers of 0.27 GB: q/k/v and gate/up whole, 1/8 of o_proj and down_proj), 2.6 GB on the
first and last stage (1/8 of the embedding or output head, 0.16 GB), and holds at most one layer's 0.27 GB
(plus 0.25 GB of fused q/k/v and gate/up) besides its 1/32 of the parameters.
"""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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


@contextmanager
def _open_files(source: HFDirectory) -> Iterator[list]:
    """The checkpoint's safetensors files, open (headers are read; tensors only when asked for)."""
    from safetensors import safe_open

    with ExitStack() as files:
        yield [files.enter_context(safe_open(str(file), framework="pt")) for file in weight_files(source.path)]


def _claimed(source: HFDirectory, module: str, handles: list) -> dict[str, tuple[str, Any]]:
    """The module's tensors in the open files: name relative to its prefix → (stored name, file handle). A tied
    tensor the checkpoint leaves out is listed with its origin's entry."""
    prefix = source.modules[module]
    stored = {name[len(prefix):]: (name, handle)
              for handle in handles for name in handle.keys() if _claims(source, module, name)}
    for name, origin in _tied(source).items():
        relative, source_name = name[len(prefix):], origin[len(prefix):]
        if _claims(source, module, name) and relative not in stored and source_name in stored:
            stored[relative] = stored[source_name]
    return stored


def header_shapes(source: HFDirectory, module: str) -> dict[str, tuple[int, ...]]:
    """The module's weights in the checkpoint (names relative to its prefix) and their shapes, from the
    safetensors headers only; tied weights the checkpoint leaves out are listed with their source's shape."""
    with _open_files(source) as handles:
        return {relative: tuple(handle.get_slice(name).get_shape())
                for relative, (name, handle) in _claimed(source, module, handles).items()}


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


@dataclass
class ReadStats:
    """What a streamed load read on this rank: the memory claim of :func:`stream_module`, measured."""

    tensors: int = 0  #: checkpoint tensors read
    bytes: int = 0  #: their bytes, all together
    peak_bytes: int = 0  #: the largest unit read (the checkpoint tensors held at once)
    units_skipped: int = 0  #: units not read, since nothing of them is held here


#: ``…layers.<N>.`` in a checkpoint name: the tensors of one transformer layer (a unit of a streamed load)
_LAYER = re.compile(r"^(.*?\blayers\.\d+\.)")


def _units(source: HFDirectory, module: str, cls: type, config: Any,
           handles: list) -> list[list[tuple[str, str, Any]]]:
    """The module's tensors in the checkpoint as ``(name relative to its prefix, stored name, safetensors
    slice)``, grouped into load units: all tensors of one layer together (fused q/k/v and gate/up need them
    together), every other tensor alone. A tied tensor the checkpoint leaves out is read from its origin."""
    unused = tuple(getattr(cls, "HF_UNUSED", ()))
    expected = set(cls.hf_weight_shapes(config))  # read even under an unused prefix (siglip_navit pooling_head: head.*)
    stored = {relative: entry for relative, entry in _claimed(source, module, handles).items()
              if relative in expected or not relative.startswith(unused)}
    units: dict[str, list[tuple[str, str, Any]]] = {}
    for relative, (name, handle) in stored.items():
        layer = _LAYER.match(relative)
        units.setdefault(layer.group(1) if layer else relative, []).append((relative, name, handle))
    return list(units.values())


def _plan(cls: type, config: Any, module: str,
          unit: list[tuple[str, str, Any]]) -> tuple[dict[str, str | None], set[str]]:
    """What a unit makes, from shapes alone (meta tensors: nothing read): for each checkpoint tensor the keye
    name it becomes unchanged (a plain rename: ``hf_to_keye`` returns the very tensor it was given) or None
    (fused, split or reshaped), and every keye name the unit converts to."""
    import torch

    meta = {relative: torch.empty(handle.get_slice(name).get_shape(), device="meta") for relative, name, handle in unit}
    made = cls.hf_to_keye(meta, config)
    renamed = {id(tensor): f"{module}.{name}" for name, tensor in made.items()}
    return {relative: renamed.get(id(tensor)) for relative, tensor in meta.items()}, {f"{module}.{n}" for n in made}


def stream_module(source: HFDirectory, module: str, cls: type, config: Any,
                  wanted: dict[str, tuple[int, int, int] | None] | None = None,
                  stats: ReadStats | None = None) -> Iterator[dict[str, Tensor]]:
    """The module's tensors under keye names (``<module>.<parameter>``, global layer numbers), one load unit at
    a time (one layer, or one tensor outside the layers), each converted by its class's ``hf_to_keye`` on that
    unit alone (`keye.hf.contract`). Drop each part once used, and the checkpoint tensors held at once are one
    unit's.

    ``wanted``: the keye names this rank holds, each with its TP block (`keye.parallel.tp_weights.tp_block`) or
    None. A unit making none of them is not read at all (a pipeline stage reads its own layers, the embedding
    or output head only where it holds them); a tensor the key map only renames into a name with a block is
    read as that block alone (``get_slice``) and comes out as this rank's slice, not the full tensor. Fused
    tensors (q/k/v, gate/up) are read whole. Without ``wanted``: every tensor, full."""
    with _open_files(source) as handles:
        yield from _stream(_units(source, module, cls, config, handles), module, cls, config, wanted, stats)


def _read(handle: Any, name: str, block: tuple[int, int, int] | None) -> Tensor:
    if block is None:
        return handle.get_tensor(name)
    dim, start, stop = block
    return handle.get_slice(name)[(slice(None),) * dim + (slice(start, stop),)]


def _stream(units: list, module: str, cls: type, config: Any, wanted: dict | None,
            stats: ReadStats | None) -> Iterator[dict[str, Tensor]]:
    for unit in units:
        blocks = {}
        if wanted is not None:
            renamed, made = _plan(cls, config, module, unit)
            if not made & wanted.keys():
                if stats is not None:
                    stats.units_skipped += 1
                continue
            blocks = {relative: wanted.get(name) for relative, name in renamed.items() if name is not None}
        hf = {relative: _read(handle, name, blocks.get(relative)) for relative, name, handle in unit}
        if stats is not None:
            size = sum(t.numel() * t.element_size() for t in hf.values())
            stats.tensors, stats.bytes = stats.tensors + len(hf), stats.bytes + size
            stats.peak_bytes = max(stats.peak_bytes, size)
        yield {f"{module}.{name}": tensor for name, tensor in cls.hf_to_keye(hf, config).items()}


def read_module(source: HFDirectory, module: str, cls: type, config: Any) -> dict[str, Tensor]:
    """The module's full tensors under keye names, all of them at once (:func:`stream_module`, gathered)."""
    return {name: tensor for part in stream_module(source, module, cls, config) for name, tensor in part.items()}


def load_module(model: Any, source: HFDirectory, module: str, where: str) -> ReadStats | None:
    """Fill ``module`` of every model chunk on this rank that holds it (its TP slice, its PP layers) from the
    directory, streamed: only the units this rank holds are read, one at a time. What was read, or None when
    no chunk here holds the module (a later pipeline stage has no vision encoder). Not collective."""
    from megatron.core import parallel_state as mpu

    from keye.hf.weights import held_parameters, load_hf_parts
    from keye.parallel.dist_checkpoint import model_chunks
    from keye.parallel.tp_weights import tp_block

    held = [getattr(chunk, module, None) for chunk in model_chunks(model)]
    built = next((part for part in held if part is not None), None)
    if built is None:
        return None
    cls, config = type(built), built.config
    check_module(source, module, cls, config, where)
    tp_rank, tp_size = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
    stats = ReadStats()
    wanted = {name: tp_block(params[0], tp_rank, tp_size) for name, params in held_parameters(model, module).items()}
    load_hf_parts(model, stream_module(source, module, cls, config, wanted, stats), module=module)
    return stats
