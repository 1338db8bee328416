"""``keye-launch print-config``: the fully resolved blueprint as YAML, each field with its doc as a comment.

The output is itself a valid blueprint: loading it gives the same configuration.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from keye.config.fields import field_component_kind, field_doc
from keye.config.schema import Blueprint, StageConfig
from keye.registry import Registry


def render_blueprint(cfg: DictConfig, registry: Registry) -> str:
    """YAML text of a loaded (validated) blueprint with doc comments."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("extends", None)
    lines: list[str] = []
    _emit_struct(lines, 0, data, Blueprint, registry)
    return "\n".join(lines) + "\n"


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _comment(lines: list[str], indent: int, text: str) -> None:
    for line in text.splitlines():
        lines.append(" " * indent + f"# {line}".rstrip())


def _emit_value(lines: list[str], indent: int, key: str, value: Any, prefix: str = "") -> None:
    """A key with a plain value (scalar, or a dict/list without schema) in block style."""
    pad = " " * indent + prefix
    if isinstance(value, (dict, list)) and value:
        lines.append(f"{pad}{key}:")
        block = yaml.safe_dump(value, default_flow_style=False, sort_keys=False, width=10_000)
        lines.extend(" " * (indent + len(prefix) + 2) + line for line in block.rstrip().splitlines())
    else:
        lines.append(f"{pad}{key}: {_scalar(value)}")


def _emit_struct(lines: list[str], indent: int, data: dict, schema: type, registry: Registry, first_prefix: str = "") -> None:
    hints = typing.get_type_hints(schema)
    for index, field in enumerate(dataclasses.fields(schema)):
        if field.name not in data:
            continue
        prefix = first_prefix if index == 0 else " " * len(first_prefix)
        value = data[field.name]
        _comment(lines, indent + (len(prefix) if index else 0), field_doc(field))
        kind = field_component_kind(field)
        if kind and isinstance(value, dict):
            _emit_component(lines, indent, field.name, value, kind, registry, prefix)
        elif dataclasses.is_dataclass(hints[field.name]) and isinstance(value, dict):
            lines.append(" " * indent + f"{prefix}{field.name}:")
            _emit_struct(lines, indent + len(prefix) + 2, value, hints[field.name], registry)
        elif field.name == "stages" and value:
            lines.append(" " * indent + f"{prefix}{field.name}:")
            for stage in value:
                _emit_struct(lines, indent + len(prefix) + 2, stage, StageConfig, registry, first_prefix="- ")
        elif schema is StageConfig and field.name == "options" and value and ("stage", data["kind"]) in registry:
            lines.append(" " * indent + f"{prefix}{field.name}:")
            _emit_struct(lines, indent + len(prefix) + 2, value, registry.cls("stage", data["kind"]).Config, registry)
        elif field.name in ("sources", "heldout") and isinstance(value, dict) and value:
            lines.append(" " * indent + f"{prefix}{field.name}:")
            for label, node in value.items():
                _emit_component(lines, indent + len(prefix) + 2, label, node, "data_source", registry)
        else:
            _emit_value(lines, indent, field.name, value, prefix)


def _emit_component(
    lines: list[str], indent: int, key: str, node: dict, kind: str, registry: Registry, prefix: str = ""
) -> None:
    pad = " " * indent
    lines.append(f"{pad}{prefix}{key}:")
    inner = indent + len(prefix) + 2
    if (kind, node.get("name")) not in registry:
        block = yaml.safe_dump(node, default_flow_style=False, sort_keys=False, width=10_000)
        lines.extend(" " * inner + line for line in block.rstrip().splitlines())
        return
    component = registry.get(kind, node["name"])
    _comment(lines, inner, f"{kind} registered by {component.provenance}")
    lines.append(" " * inner + f"name: {_scalar(node['name'])}")
    _emit_struct(lines, inner, {k: v for k, v in node.items() if k != "name"}, component.cls.Config, registry)
