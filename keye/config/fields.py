"""Field helpers for Config dataclasses: a doc string per field (shown by `keye-launch print-config`)
and nested component nodes (a field whose value is `{name: ..., ...}` for another component kind)."""

from __future__ import annotations

import dataclasses
from typing import Any

DOC = "doc"
COMPONENT_KIND = "component_kind"


def doc(text: str, default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a doc string: ``hidden_size: int = doc("Width of the residual stream.", 1152)``.

    Mutable defaults (lists, dicts) go through ``default_factory``.
    """
    return dataclasses.field(default=default, default_factory=default_factory, metadata={DOC: text})


def component(kind: str, text: str, default: dict | None = None) -> Any:
    """A field that holds a nested component node of ``kind`` (validated against that component's Config).

    ``default`` is the node used when the blueprint says nothing, e.g. ``{"name": "rope2d_vision"}``;
    ``None`` makes the slot optional (empty).
    """
    if default is None:
        return dataclasses.field(default=None, metadata={DOC: text, COMPONENT_KIND: kind})
    return dataclasses.field(default_factory=lambda: dict(default), metadata={DOC: text, COMPONENT_KIND: kind})


def field_doc(field: dataclasses.Field) -> str:
    return field.metadata.get(DOC, "")


def field_component_kind(field: dataclasses.Field) -> str | None:
    return field.metadata.get(COMPONENT_KIND)
