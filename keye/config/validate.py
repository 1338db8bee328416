"""Per-component validation of a blueprint.

The schema types every component slot as an open dict. Here each node ``{name: ..., ...}`` is looked up
in the registry and merged onto that component's ``Config`` dataclass: an unknown key, a wrong type or a
missing required value becomes one line naming the key path (and the file it came from). Nodes come
back completed with the component's defaults, so ``print-config`` shows every setting in force.
Component Configs may hold nested component nodes (fields made with ``keye.config.component``); they are
validated the same way, recursively.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from keye.config.fields import field_component_kind
from keye.config.schema import MODULES, Blueprint
from keye.errors import BlueprintError, UnknownComponentError
from keye.registry import Registry

#: Maps a key path to where it was set ("blueprints/tiny/pretrain.yaml" or "override stages.0.steps=3").
Origin = Callable[[str], str]


#: Longest quoted value in an error line: a value can be a whole file (a bad ``extends:``), never echo it.
MAX_QUOTE = 120


def short(value: Any, limit: int = MAX_QUOTE) -> str:
    """``value`` as text on one line, cut to ``limit`` characters."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def omegaconf_reason(exc: BaseException) -> str:
    """The first line of an OmegaConf error, without its trailing "full_key/object_type" block, cut short."""
    text = str(getattr(exc, "msg", None) or exc).strip()
    return short(text.splitlines()[0] if text else type(exc).__name__, 3 * MAX_QUOTE)


@functools.lru_cache(maxsize=None)
def _cached_schema(config_class: type) -> DictConfig:
    return OmegaConf.structured(config_class)


def schema_of(config_class: type) -> DictConfig:
    """A fresh structured node of ``config_class``. Building one walks the dataclass and is OmegaConf's
    slowest step (a blueprint has dozens of nodes); copying a cached one is about ten times faster."""
    return copy.deepcopy(_cached_schema(config_class))


def dotted(key: str) -> str:
    """OmegaConf writes list items as ``stages[0].name``; overrides and messages use ``stages.0.name``."""
    return re.sub(r"\[(\d+)\]", r".\1", key)


def validate_blueprint(cfg: DictConfig, registry: Registry, origin: Origin, *, nproc: int | None = None) -> None:
    """Check every component node in ``cfg`` (in place: nodes are completed with their defaults), then
    everything a run would check after building (`keye.config.semantics`; the layout against ``nproc``
    processes when given)."""
    dtypes = ("fp32", "bf16")
    if cfg.precision.dtype not in dtypes:
        raise BlueprintError(f"{origin('precision.dtype')}: precision.dtype: '{cfg.precision.dtype}' is not one of {', '.join(dtypes)}")
    model = cfg.model
    for slot in ("vision_encoder", "projector", "language_model", "text_encoder"):
        if model[slot] is not None:
            model[slot] = validate_component(slot, model[slot], f"model.{slot}", registry, origin)

    names: set[str] = set()
    for index, stage in enumerate(cfg.stages):
        path = f"stages.{index}"
        if stage.name in names:
            raise BlueprintError(f"{origin(path + '.name')}: {path}.name: stage name '{stage.name}' is used twice")
        names.add(stage.name)
        for module in stage.train:
            if module not in MODULES:
                raise BlueprintError(
                    f"{origin(path + '.train')}: {path}.train: unknown module '{module}'; known: {', '.join(MODULES)}"
                )
            if cfg.model[module] is None:
                raise BlueprintError(f"{origin(path + '.train')}: {path}.train: '{module}' is not set in model")
        options = validate_component(
            "stage", {"name": stage.kind, **_plain(stage.options)}, f"{path}.options", registry, origin,
            name_path=f"{path}.kind",
        )
        del options["name"]
        stage.options = options
        if stage.loss is not None:
            stage.loss = validate_component("loss", stage.loss, f"{path}.loss", registry, origin)
        data = stage.data
        for group in ("sources", "heldout"):
            for label in list(data[group]):
                data[group][label] = validate_component(
                    "data_source", data[group][label], f"{path}.data.{group}.{label}", registry, origin
                )
        data.mixer = validate_component("data_mixer", data.mixer, f"{path}.data.mixer", registry, origin)
        data.video_decoder = validate_component(
            "video_decoder", data.video_decoder, f"{path}.data.video_decoder", registry, origin
        )
    from keye.config.semantics import check_blueprint

    check_blueprint(cfg, registry, origin, nproc=nproc)


def validate_component(
    kind: str, node: Any, path: str, registry: Registry, origin: Origin, *, name_path: str | None = None
) -> dict[str, Any]:
    """Validate one ``{name: ..., ...}`` node of ``kind``; return it completed with defaults."""
    name_path = name_path or f"{path}.name"
    node = _plain(node)
    if not isinstance(node, dict) or not isinstance(node.get("name"), str):
        raise BlueprintError(
            f"{origin(path)}: {path}: expected a {kind} node with a 'name' key; known: {_known(registry, kind)}"
        )
    try:
        cls = registry.cls(kind, node["name"])
    except UnknownComponentError as exc:
        raise BlueprintError(f"{origin(name_path)}: {name_path}: {short(exc, 3 * MAX_QUOTE)}") from None
    body = with_size_preset(kind, cls, {key: value for key, value in node.items() if key != "name"}, path, origin)
    schema = _cached_schema(cls.Config)  # merge copies it
    field_names = [field.name for field in dataclasses.fields(cls.Config)]
    for key in body:
        if key not in field_names:
            known = ", ".join(field_names) or "(no settings)"
            raise BlueprintError(
                f"{origin(f'{path}.{key}')}: {path}.{short(key)}: unknown key for {kind} '{node['name']}'; known: {known}"
            )
    try:
        merged = OmegaConf.merge(schema, body)
    except (OmegaConfBaseException, TypeError, ValueError, KeyError, AttributeError) as exc:
        key = f"{path}.{dotted(exc.full_key)}" if getattr(exc, "full_key", None) else path
        raise BlueprintError(f"{origin(key)}: {key}: {omegaconf_reason(exc)} ({kind} '{node['name']}')") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        key = f"{path}.{dotted(missing[0])}"
        raise BlueprintError(f"{origin(path)}: {key}: missing required value for {kind} '{node['name']}'")
    result: dict[str, Any] = {"name": node["name"], **OmegaConf.to_container(merged, resolve=True)}
    for field in dataclasses.fields(cls.Config):
        nested_kind = field_component_kind(field)
        if nested_kind and result.get(field.name) is not None:
            result[field.name] = validate_component(
                nested_kind, result[field.name], f"{path}.{field.name}", registry, origin
            )
    return result


def with_size_preset(kind: str, cls: type, body: dict, path: str, origin: Origin) -> dict:
    """Expand ``size: <name>`` from the component's ``SIZES`` presets; keys set in the node win.

    Named sizes (``tiny``, ``small``, ``keye_vl_8b``) live beside the component that owns the numbers,
    so a blueprint says ``{name: qwen3, size: tiny}`` and print-config shows every resolved value. A preset's
    nested component node (qwen3's ``position_encoding``) takes the node's keys key by key, unless the node
    names another component (then the preset's settings of the old one are dropped: `keye.config.swap`).
    """
    size = body.get("size")
    presets = getattr(cls, "SIZES", None)
    if size is None or presets is None:
        return body
    if not isinstance(size, str) or size not in presets:
        known = ", ".join(presets)
        raise BlueprintError(
            f"{origin(path + '.size')}: {path}.size: unknown size '{short(size)}' for {kind} '{cls.__name__}'; known: {known}"
        )
    from keye.config.swap import merge_nodes

    return merge_nodes(presets[size], body)  # a nested node merges unless it names another component


def build_component_config(kind: str, node: Any, registry: Registry) -> tuple[type, Any]:
    """The component class and its Config instance for a (validated) node."""
    node = _plain(node)
    cls = registry.cls(kind, node["name"])
    body = {key: value for key, value in node.items() if key != "name"}
    config = OmegaConf.to_object(OmegaConf.merge(_cached_schema(cls.Config), body))
    return cls, config



def _plain(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _known(registry: Registry, kind: str) -> str:
    return ", ".join(registry.names(kind)) or "(none registered)"


__all__ = ["Blueprint", "build_component_config", "validate_blueprint", "validate_component"]
