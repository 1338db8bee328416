"""Swapping a component is one line: a new ``name`` drops the settings of the component it replaces.

Why: a component node ``{name: siglip_navit, size: tiny, ...}`` holds settings of *that* component. When a
later layer (a blueprint that ``extends:`` this one, or a command-line override) names another component,
the old settings mean nothing to the new one, and keeping them would make the swap fail on keys the new
component does not know (``model.vision_encoder.size: unknown key for vision_encoder 'my_vit'``). As
Hydra's config groups do, the node starts over: it keeps only the keys that the same layer gives beside
the new name (for command-line overrides: all the overrides together, in any order). A layer that gives
the same name, or none, merges key by key as before.

Which mappings are component nodes: the schema's component slots (fields made with
`keye.config.component`: ``model.*``, ``stages.N.loss``, ``stages.N.data.mixer``/``video_decoder``), the
data sources by label, and, given a registry, the nested component fields of the component a node names
(``model.language_model.position_encoding``) and of a stage kind's ``options``. A stage's component key is
``kind``: a new kind drops the stage's ``options``. ``run.name`` and a stage's ``name`` are labels, not
component switches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from keye.config.fields import field_component_kind
from keye.config.schema import DataConfig, ModelConfig, StageConfig
from keye.registry import Registry

_ABSENT = object()


def get(node: Any, path: str) -> Any:
    """The value at dotted ``path`` in plain containers (list indices as digits), or ``_ABSENT``."""
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _ABSENT
    return node


def _slots(config_class: type, prefix: str) -> Iterator[tuple[str, str]]:
    for field in dataclasses.fields(config_class):
        kind = field_component_kind(field)
        if kind:
            yield f"{prefix}{field.name}", kind


def _nested(plain: Any, path: str, kind: str, registry: Registry | None) -> Iterator[tuple[str, str]]:
    """``(path, kind)`` and, recursively, the component fields of the component that node names."""
    yield path, kind
    name = get(plain, f"{path}.name")
    component = registry.find(kind, name) if registry is not None else None
    if component is not None:
        for child, child_kind in _slots(component.cls.Config, f"{path}."):
            yield from _nested(plain, child, child_kind, registry)


def component_paths(plain: dict, registry: Registry | None) -> Iterator[tuple[str, str]]:
    """``(key path, kind)`` of every component node of a blueprint (plain containers), parents first."""
    for path, kind in _slots(ModelConfig, "model."):
        yield from _nested(plain, path, kind, registry)
    stages = get(plain, "stages")
    for index in range(len(stages) if isinstance(stages, list) else 0):
        prefix = f"stages.{index}."
        for path, kind in (*_slots(StageConfig, prefix), *_slots(DataConfig, prefix + "data.")):
            yield from _nested(plain, path, kind, registry)
        for group in ("sources", "heldout"):
            labels = get(plain, f"{prefix}data.{group}")
            for label in labels if isinstance(labels, dict) else ():
                yield from _nested(plain, f"{prefix}data.{group}.{label}", "data_source", registry)
        kind = get(plain, prefix + "kind")
        component = registry.find("stage", kind) if registry is not None else None
        if component is not None:
            for child, child_kind in _slots(component.cls.Config, prefix + "options."):
                yield from _nested(plain, child, child_kind, registry)


def drop_switched(cfg: DictConfig, layer: dict, registry: Registry | None) -> list[str]:
    """Empty every node of ``cfg`` whose component ``layer`` (plain containers) switches; return their paths.

    Call it before merging ``layer`` onto ``cfg``: the merge then fills the emptied nodes with the layer's
    keys only. A stage whose ``kind`` the layer changes loses its ``options`` the same way.
    """
    plain = OmegaConf.to_container(cfg, resolve=False)
    dropped: list[str] = []
    for path, _kind in component_paths(plain, registry):
        if any(path.startswith(done + ".") for done in dropped):
            continue  # inside a node already emptied
        if _switches(plain, layer, path, "name"):
            OmegaConf.update(cfg, path, {}, merge=False)
            dropped.append(path)
    stages = get(plain, "stages")
    for index in range(len(stages) if isinstance(stages, list) else 0):
        if _switches(plain, layer, f"stages.{index}", "kind"):
            OmegaConf.update(cfg, f"stages.{index}.options", {}, merge=False)
            dropped.append(f"stages.{index}.options")
    return dropped


def _switches(plain: dict, layer: dict, path: str, key: str) -> bool:
    old, new = get(plain, f"{path}.{key}"), get(layer, f"{path}.{key}")
    return old is not _ABSENT and old is not None and new is not _ABSENT and new != old


def merge_nodes(base: dict, top: dict) -> dict:
    """``top`` over ``base``, recursively, with the same rule: a nested node that names another component
    replaces the base's node instead of merging into it (used for a component's named ``size`` presets)."""
    merged = dict(base)
    for key, value in top.items():
        below = merged.get(key)
        if isinstance(below, dict) and isinstance(value, dict) and value.get("name", below.get("name")) == below.get("name"):
            merged[key] = merge_nodes(below, value)
        else:
            merged[key] = value
    return merged
