"""The plugin host: a pluggy PluginManager for the ``keye`` entry-point group, loaded safely.

Built-in components are listed in keye's own ``[project.entry-points.keye]`` and load exactly like
third-party plugins. Each entry point is imported on its own: an error in one is recorded
(status ``failed``), warned about once, and never affects the others or the CLI.

Environment switches:
  KEYE_STRICT_PLUGINS=1      re-raise the first plugin error (the test suite uses this)
  KEYE_BLOCK_PLUGINS=a,b     skip these entry points or distributions (status ``blocked``)
  KEYE_BUILTINS_ONLY=1       load only keye's own entry points: the escape hatch when a plugin breaks things
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import pluggy

from keye import hookspecs
from keye.errors import DuplicateComponentError
from keye.registry import KINDS, Provenance, Registry

GROUP = "keye"
BUILTIN_DISTRIBUTION = "keye"
ENV_STRICT = "KEYE_STRICT_PLUGINS"
ENV_BLOCK = "KEYE_BLOCK_PLUGINS"
ENV_BUILTINS_ONLY = "KEYE_BUILTINS_ONLY"


class PluginLoadWarning(UserWarning):
    """A plugin failed to load; keye carries on without it."""


@dataclass
class PluginRecord:
    """What happened to one plugin: shown by ``keye-launch plugins``."""

    name: str
    distribution: str
    version: str
    module: str
    status: str = "loaded"  # loaded | failed | blocked
    error: str | None = None
    components: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "status": self.status,
            "error": self.error,
            "components": self.components,
        }


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _env_list(name: str) -> set[str]:
    return {item.strip() for item in os.environ.get(name, "").split(",") if item.strip()}


class PluginHost:
    """A plugin manager, the registry its plugins fill, and a record per plugin.

    Make one per process (``get_host()``) or one per test (the ``keye_host`` fixture).
    """

    def __init__(self, *, strict: bool | None = None) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.records: dict[str, PluginRecord] = {}
        self.strict = _env_flag(ENV_STRICT) if strict is None else strict
        self._warned: set[str] = set()

    # --- loading ---------------------------------------------------------------------------

    def load_entry_points(self) -> None:
        """Import every entry point in group ``keye``, each in its own try."""
        blocked = _env_list(ENV_BLOCK)
        builtins_only = _env_flag(ENV_BUILTINS_ONLY)
        for ep in sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: e.name):
            dist = ep.dist.metadata["Name"] if ep.dist is not None else "(unknown)"
            version = ep.dist.version if ep.dist is not None else "?"
            if ep.name in self.records:
                continue  # the same distribution seen twice on sys.path (e.g. editable + site)
            if builtins_only and dist != BUILTIN_DISTRIBUTION:
                continue
            record = PluginRecord(ep.name, dist, version, ep.value)
            self.records[ep.name] = record
            if ep.name in blocked or dist in blocked:
                record.status = "blocked"
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # an ImportError or anything a broken plugin raises
                self._fail(record, exc)
                continue
            self._register(record, plugin)

    def add_plugin(self, plugin: Any, name: str, *, distribution: str = "(local)", version: str = "0") -> PluginRecord:
        """Register a plugin object or module directly (tests, notebooks, inline hooks)."""
        if isinstance(plugin, types.ModuleType):
            module = plugin.__name__
        else:
            module = type(plugin).__qualname__
        record = PluginRecord(name, distribution, version, module)
        self.records[name] = record
        self._register(record, plugin)
        return record

    def _register(self, record: PluginRecord, plugin: Any) -> None:
        """Add the plugin to pluggy, then collect its components; roll back on any error."""
        try:
            self.pm.register(plugin, name=record.name)  # pluggy checks signatures against the specs
            self._check_hook_names(plugin)
        except Exception as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._fail(record, exc)
            return
        provenance = Provenance(record.distribution, record.version, record.name)
        added: list[tuple[str, str]] = []
        try:
            for kind in KINDS:
                hook_name = hookspecs.registration_hook(kind)
                for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                    if impl.plugin is not plugin:
                        continue

                    def register(name: str, cls: type, _kind: str = kind) -> None:
                        self.registry.register(_kind, name, cls, provenance)
                        added.append((_kind, name))

                    impl.function(register=register)
        except Exception as exc:
            for kind, name in added:
                self.registry.unregister(kind, name)
            self.pm.unregister(plugin)
            self._fail(record, exc)
            return
        for kind, name in added:
            record.components.setdefault(kind, []).append(name)

    def _check_hook_names(self, plugin: Any) -> None:
        """A hook implementation without a spec is a typo that would otherwise be silently ignored."""
        for caller in self.pm.get_hookcallers(plugin) or []:
            if caller.spec is None:
                close = difflib.get_close_matches(caller.name, self._spec_names(), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise AttributeError(f"unknown hook '{caller.name}'{hint}")

    @staticmethod
    def _spec_names() -> list[str]:
        return [name for name in dir(hookspecs) if name.startswith("keye_")]

    def _fail(self, record: PluginRecord, exc: BaseException) -> None:
        record.status = "failed"
        record.error = f"{type(exc).__name__}: {exc}"
        if self.strict:
            if isinstance(exc, DuplicateComponentError):
                raise exc
            raise RuntimeError(f"plugin '{record.name}' ({record.distribution} {record.version}) failed to load") from exc
        if record.name not in self._warned:
            self._warned.add(record.name)
            warnings.warn(
                f"keye plugin '{record.name}' from {record.distribution} {record.version} failed to load "
                f"and is skipped: {record.error}",
                PluginLoadWarning,
                stacklevel=3,
            )

    # --- hooks ------------------------------------------------------------------------------

    @property
    def hook(self) -> Any:
        """Lifecycle hooks: ``host.hook.keye_before_stage(stage=..., blueprint=...)``."""
        return self.pm.hook


_HOST: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide host, built (and every entry point loaded) on first use."""
    global _HOST
    if _HOST is None:
        host = PluginHost()
        host.load_entry_points()
        _HOST = host
    return _HOST


def get_registry() -> Registry:
    return get_host().registry
