"""The plugin host: a pluggy PluginManager for the ``keye`` entry-point group, loaded safely.

Built-in components are listed in keye's own ``[project.entry-points.keye]`` and load exactly like
third-party plugins. Each entry point is imported on its own: an error in one is recorded
(status ``failed``), warned about once, and never affects the others or the CLI.

Precedence. Entry points are found by ``importlib.metadata`` in an order that depends on sys.path and
names, so order must not decide who owns a name:
  - keye's own entry points (distribution ``keye``) load first, then every other distribution's, sorted
    by distribution and entry-point name;
  - plugins are keyed by (distribution, entry-point name): a third party's entry point called ``lm``
    is a plugin of its own and hides nothing;
  - registering a component name (per kind) that another distribution already registered is an error
    naming both; it fails the *later* plugin as a whole, so a built-in is never displaced by accident.
This guards against accidents and careless plugins, not malice: a plugin is code run at import, and can
patch anything (or call ``os._exit``); install only plugins you trust.

Overriding a component on purpose is the user's decision, not the plugin's: list it in KEYE_OVERRIDE,
comma-separated ``KIND:NAME=DISTRIBUTION`` items, e.g.
    KEYE_OVERRIDE=vision_encoder:siglip_navit=keye-eva-vit keye-launch run bp.yaml
Then that distribution's registration of that name replaces the one made before it (``keye-launch
plugins --json`` shows the replaced one under ``overridden``; ``print-config`` names who registered each
component); an item that names a distribution which registered no such component is warned about.

Anything a plugin raises while it is imported or registers components, ``SystemExit`` and
``KeyboardInterrupt`` included, is contained like any other error: a plugin cannot end the CLI. A real
Ctrl-C while plugins load still stops the program: the host notes SIGINT while loading (chaining to the
handler it found) and re-raises a KeyboardInterrupt that a signal caused; one the plugin raised itself
is the plugin's failure.

Environment switches:
  KEYE_STRICT_PLUGINS=1      re-raise the first plugin error (the test suite uses this)
  KEYE_BLOCK_PLUGINS=a,b     skip these entry points or distributions (status ``blocked``)
  KEYE_BUILTINS_ONLY=1       load only keye's own entry points: the escape hatch when a plugin breaks things
  KEYE_OVERRIDE=k:n=dist,... let these distributions replace these components on purpose (above)
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import os
import re
import signal
import threading
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import pluggy

from keye import hookspecs
from keye.errors import DuplicateComponentError, PluginOverrideError
from keye.registry import KINDS, Component, Provenance, Registry

GROUP = "keye"
BUILTIN_DISTRIBUTION = "keye"
ENV_STRICT = "KEYE_STRICT_PLUGINS"
ENV_BLOCK = "KEYE_BLOCK_PLUGINS"
ENV_BUILTINS_ONLY = "KEYE_BUILTINS_ONLY"
ENV_OVERRIDE = "KEYE_OVERRIDE"


class PluginLoadWarning(UserWarning):
    """A plugin failed to load; keye carries on without it."""


class PluginOverrideWarning(UserWarning):
    """A KEYE_OVERRIDE item had no effect: the distribution it names registered no such component."""


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
    #: every hook the plugin implements (registration and lifecycle), so a lifecycle-only plugin shows too
    hooks: list[str] = field(default_factory=list)
    #: kind -> name -> who replaced it, for components of this plugin that KEYE_OVERRIDE let another replace
    overridden: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        """(distribution, entry-point name): unique, where the entry-point name alone is not."""
        return (self.distribution, self.name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "status": self.status,
            "error": self.error,
            "components": self.components,
            "hooks": self.hooks,
            "overridden": self.overridden,
        }


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _env_list(name: str) -> set[str]:
    return {item.strip() for item in os.environ.get(name, "").split(",") if item.strip()}


def _canonical(distribution: str) -> str:
    """Distribution names compare as pip compares them (PEP 503): case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def parse_overrides(text: str) -> dict[tuple[str, str], str]:
    """``KIND:NAME=DISTRIBUTION[,...]`` -> {(kind, name): canonical distribution}; a bad item is a user error."""
    overrides: dict[tuple[str, str], str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        target, _, distribution = item.partition("=")
        kind, _, name = (part.strip() for part in target.partition(":"))
        if not (kind and name and distribution.strip()):
            raise PluginOverrideError(
                f"{ENV_OVERRIDE}: {item!r} is not KIND:NAME=DISTRIBUTION (e.g. vision_encoder:siglip_navit=keye-eva-vit)"
            )
        if kind not in KINDS:
            raise PluginOverrideError(f"{ENV_OVERRIDE}: unknown component kind '{kind}' in {item!r}; known: {', '.join(KINDS)}")
        overrides[(kind, name)] = _canonical(distribution.strip())
    return overrides


def _entry_points() -> list[tuple[importlib.metadata.EntryPoint, str, str]]:
    """(entry point, distribution, version) for group ``keye``: keye's own first, then by distribution and name.

    The sort is stable, so one distribution found twice on sys.path (editable + site) keeps sys.path order.
    """
    found = []
    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = ep.dist.metadata["Name"] if ep.dist is not None else "(unknown)"
        version = ep.dist.version if ep.dist is not None else "?"
        found.append((ep, dist, version))
    return sorted(found, key=lambda item: (item[1] != BUILTIN_DISTRIBUTION, _canonical(item[1]), item[0].name))


class PluginHost:
    """A plugin manager, the registry its plugins fill, and a record per plugin.

    Make one per process (``get_host()``) or one per test (the ``keye_host`` fixture).
    """

    def __init__(self, *, strict: bool | None = None, overrides: dict[tuple[str, str], str] | None = None) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.records: dict[tuple[str, str], PluginRecord] = {}  # by PluginRecord.key
        self.strict = _env_flag(ENV_STRICT) if strict is None else strict
        self.overrides = parse_overrides(os.environ.get(ENV_OVERRIDE, "")) if overrides is None else overrides
        self._warned: set[tuple[str, str]] = set()
        self._ctrl_c = False  # a real SIGINT arrived while plugins loaded

    # --- loading ---------------------------------------------------------------------------

    def load_entry_points(self) -> None:
        """Import every entry point in group ``keye``, each in its own try, keye's own first."""
        blocked = _env_list(ENV_BLOCK)
        builtins_only = _env_flag(ENV_BUILTINS_ONLY)
        with self._noting_ctrl_c():
            for ep, dist, version in _entry_points():
                record = PluginRecord(ep.name, dist, version, ep.value)
                if record.key in self.records:
                    continue  # the same distribution seen twice on sys.path (e.g. editable + site)
                if builtins_only and dist != BUILTIN_DISTRIBUTION:
                    continue
                self.records[record.key] = record
                if ep.name in blocked or dist in blocked:
                    record.status = "blocked"
                    continue
                try:
                    plugin = ep.load()
                except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt too (module docstring)
                    self._fail(record, exc)
                    continue
                self._register(record, plugin)
        self._warn_unused_overrides()

    def add_plugin(self, plugin: Any, name: str, *, distribution: str = "(local)", version: str = "0") -> PluginRecord:
        """Register a plugin object or module directly (tests, notebooks, inline hooks)."""
        if isinstance(plugin, types.ModuleType):
            module = plugin.__name__
        else:
            module = type(plugin).__qualname__
        record = PluginRecord(name, distribution, version, module)
        self.records[record.key] = record
        with self._noting_ctrl_c():
            self._register(record, plugin)
        return record

    def _register(self, record: PluginRecord, plugin: Any) -> None:
        """Add the plugin to pluggy, then collect its components; roll back on any error."""
        pm_name = f"{record.distribution}:{record.name}"
        try:
            self.pm.register(plugin, name=pm_name)  # pluggy checks signatures against the specs
            self._check_hook_names(plugin)
        except BaseException as exc:  # noqa: BLE001
            if self.pm.get_plugin(pm_name) is plugin:  # not another name's plugin: the same module may be both
                self.pm.unregister(name=pm_name)
            self._fail(record, exc)
            return
        provenance = Provenance(record.distribution, record.version, record.name)
        added: list[tuple[str, str, Component | None]] = []  # (kind, name, the component it replaced)
        try:
            for kind in KINDS:
                hook_name = hookspecs.registration_hook(kind)
                for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                    if impl.plugin is plugin:
                        impl.function(register=self._register_callback(kind, provenance, added))
        except BaseException as exc:  # noqa: BLE001
            for kind, name, replaced in reversed(added):
                self.registry.unregister(kind, name)
                if replaced is not None:
                    self.registry.register(kind, name, replaced.cls, replaced.provenance)
            self.pm.unregister(name=pm_name)
            self._fail(record, exc)
            return
        record.hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])
        for kind, name, replaced in added:
            record.components.setdefault(kind, []).append(name)
            if replaced is not None:
                owner = self.records.get((replaced.provenance.distribution, replaced.provenance.plugin))
                if owner is not None:
                    owner.overridden.setdefault(kind, {})[name] = str(provenance)

    def _register_callback(self, kind: str, provenance: Provenance, added: list) -> Any:
        """The ``register(name, cls)`` a plugin's registration hook receives: precedence is decided here."""

        def register(name: str, cls: type) -> None:
            existing = self.registry.find(kind, name)
            replace = (
                existing is not None
                and existing.provenance.distribution != provenance.distribution
                and self.overrides.get((kind, name)) == _canonical(provenance.distribution)
            )
            try:
                self.registry.register(kind, name, cls, provenance, replace=replace)
            except DuplicateComponentError as exc:
                raise DuplicateComponentError(
                    f"{exc}; to use {provenance.distribution}'s on purpose, set "
                    f"{ENV_OVERRIDE}={kind}:{name}={provenance.distribution}"
                ) from None
            added.append((kind, name, existing if replace else None))

        return register

    def _warn_unused_overrides(self) -> None:
        """A KEYE_OVERRIDE item whose distribution registered no such component is most likely a typo."""
        for (kind, name), distribution in self.overrides.items():
            component = self.registry.find(kind, name)
            if component is not None and _canonical(component.provenance.distribution) == distribution:
                continue
            using = f"using {component.provenance}" if component is not None else "no such component is registered"
            warnings.warn(
                f"{ENV_OVERRIDE}: {distribution} registered no {kind} '{name}'; {using}",
                PluginOverrideWarning,
                stacklevel=3,
            )

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

    @contextlib.contextmanager
    def _noting_ctrl_c(self) -> Iterator[None]:
        """Note a real SIGINT (then do what the handler found here does), so `_fail` can tell a user's Ctrl-C
        from a plugin's own ``raise KeyboardInterrupt``: both arrive as the same exception. Signals reach only
        the main thread, so elsewhere, or when SIGINT is ignored or fatal, every KeyboardInterrupt is a plugin's."""
        previous = signal.getsignal(signal.SIGINT)
        if not callable(previous) or threading.current_thread() is not threading.main_thread():
            yield
            return

        def note(signum: int, frame: Any) -> None:
            self._ctrl_c = True
            previous(signum, frame)

        signal.signal(signal.SIGINT, note)
        try:
            yield
        finally:
            if signal.getsignal(signal.SIGINT) is note:  # a plugin that set its own handler keeps it
                signal.signal(signal.SIGINT, previous)

    def _fail(self, record: PluginRecord, exc: BaseException) -> None:
        if isinstance(exc, KeyboardInterrupt) and self._ctrl_c:
            raise exc  # the user pressed Ctrl-C: stop, whatever was loading
        record.status = "failed"
        record.error = f"{type(exc).__name__}: {exc}"
        if self.strict:
            if isinstance(exc, DuplicateComponentError):
                raise exc
            raise RuntimeError(f"plugin '{record.name}' ({record.distribution} {record.version}) failed to load") from exc
        if record.key not in self._warned:
            self._warned.add(record.key)
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
