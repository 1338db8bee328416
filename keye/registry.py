"""The component registry: kind → name → component class, with provenance.

Core code finds components only here (no `if name == ...` switches). Every entry records which
distribution registered it, so an unknown name can list what exists and a duplicate can name both
providers. A component class must carry a nested `Config` dataclass (its blueprint schema) and meet its
kind's contract (`keye.contracts`: the methods it must have, the constructor the host calls); both are
checked here, at registration, so a bad plugin fails when it loads, in one line, not minutes into a run.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Iterator

from keye.contracts import check_contract
from keye.errors import DuplicateComponentError, UnknownComponentError

#: Every component kind, in the order `keye-launch plugins` shows them. One hook per kind.
KINDS: tuple[str, ...] = (
    "vision_encoder",
    "projector",
    "language_model",
    "text_encoder",
    "position_encoding",
    "data_source",
    "data_mixer",
    "loss",
    "reward_model",
    "merger",
    "generator",
    "video_decoder",
    "stage",
)

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Provenance:
    """Who registered a component: the distribution and the plugin (entry point) inside it."""

    distribution: str
    version: str
    plugin: str

    def __str__(self) -> str:
        return f"{self.distribution} {self.version} (plugin {self.plugin})"


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    cls: type
    provenance: Provenance


class Registry:
    """Components by kind and name. One per plugin host; tests make a fresh one each."""

    def __init__(self) -> None:
        self._components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}

    def register(self, kind: str, name: str, cls: type, provenance: Provenance, *, replace: bool = False) -> Component:
        """Add one component; the host calls this on behalf of a plugin's register callback.

        A name already taken is an error naming both providers, unless ``replace``: the host passes it only
        for an override the user asked for (``KEYE_OVERRIDE``, see `keye.plugins`).
        """
        check_component(kind, name, cls)
        check_contract(kind, name, cls, str(provenance))
        existing = self._components[kind].get(name)
        if existing is not None and not replace:
            raise DuplicateComponentError(
                f"{kind} '{name}' is registered twice: by {existing.provenance} and by {provenance}"
            )
        component = Component(kind, name, cls, provenance)
        self._components[kind][name] = component
        return component

    def unregister(self, kind: str, name: str) -> None:
        """Remove one entry (used to roll back a plugin whose registration hook failed half-way)."""
        self._components[kind].pop(name, None)

    def find(self, kind: str, name: str) -> Component | None:
        """The component registered as ``name``, or None (also for a name that is not even a string)."""
        return self._components[kind].get(name) if isinstance(name, str) else None

    def get(self, kind: str, name: str) -> Component:
        if kind not in self._components:
            raise UnknownComponentError(f"unknown component kind '{kind}'; known: {', '.join(KINDS)}")
        try:
            return self._components[kind][name]
        except KeyError:
            known = ", ".join(sorted(self._components[kind])) or "(none registered)"
            raise UnknownComponentError(f"unknown {kind} '{name}'; known: {known}") from None

    def cls(self, kind: str, name: str) -> type:
        return self.get(kind, name).cls

    def names(self, kind: str) -> list[str]:
        return sorted(self._components[kind])

    def __iter__(self) -> Iterator[Component]:
        for kind in KINDS:
            yield from (self._components[kind][name] for name in sorted(self._components[kind]))

    def __contains__(self, kind_and_name: tuple[str, str]) -> bool:
        kind, name = kind_and_name
        return name in self._components.get(kind, {})


def check_component(kind: str, name: str, cls: type) -> None:
    """The host validates what plugins hand it, so a bad plugin fails at load time, not mid-run."""
    if kind not in KINDS:
        raise ValueError(f"unknown component kind '{kind}'; known: {', '.join(KINDS)}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{kind} name {name!r} must be lower_snake_case (letters, digits, _)")
    if not isinstance(cls, type):
        raise TypeError(f"{kind} '{name}' must be registered as a class, got {type(cls).__name__}")
    config = getattr(cls, "Config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise TypeError(f"{kind} '{name}' ({cls.__qualname__}) needs a nested `Config` dataclass")
