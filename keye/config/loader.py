"""Loading a blueprint: YAML files chained by ``extends:``, command-line overrides, validation.

    cfg = load_blueprint("blueprints/tiny/pretrain.yaml", ["stages.0.steps=3"], registry)

Layers merge in order (bases first, the file itself last, then overrides) onto the structured
schema in `keye.config.schema`, so a typo anywhere is an error naming the key path and the file
that set it. Every problem is one line (`BlueprintError`), never a traceback, and never echoes a
whole file back: quoted values are cut short.

A blueprint is data, never code:

- component names are registry keys (no import paths);
- ``extends:`` names files relative to the extending file's folder: no absolute paths, no ``..``, no
  symlink out of that folder, so a blueprint cannot pull in (and print pieces of) arbitrary files; a
  ``stages`` item ``{include: file}`` (another blueprint's stages, `keye.config.include`) follows the same rule;
- interpolation is plain ``${a.b}`` or ``${oc.env:NAME,default}`` (the shipped cluster blueprints read
  paths from the environment); any other resolver is refused before anything resolves, because
  resolvers are Python functions that any installed package may register (`ALLOWED_RESOLVERS`).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from keye.config.include import include_stages, is_include
from keye.config.repeat import expand_group, is_group
from keye.config.schema import Blueprint, StageConfig
from keye.config.swap import drop_switched
from keye.config.validate import dotted, omegaconf_reason, schema_of, short, validate_blueprint
from keye.errors import BlueprintError
from keye.registry import Registry

_ABSENT = object()

#: What OmegaConf (or the YAML under it) raises for a value that does not fit; all are the user's to fix.
CONFIG_ERRORS = (OmegaConfBaseException, TypeError, ValueError, KeyError, IndexError, AttributeError)

#: The only resolvers a blueprint may call: reading an environment variable runs no code.
ALLOWED_RESOLVERS = ("oc.env",)
_RESOLVER_CALL = re.compile(r"\$\{\s*([^\s:{}]+)\s*:")

#: A blueprint is a page of settings; anything larger is not one (and is not read into memory).
MAX_BLUEPRINT_BYTES = 4 * 1024 * 1024


class _Layer:
    """One source of settings: a file, or one command-line override."""

    def __init__(self, label: str, cfg: DictConfig) -> None:
        self.label = label
        self.cfg = cfg

    def defines(self, key_path: str) -> bool:
        try:
            found = OmegaConf.select(
                self.cfg, key_path, default=_ABSENT, throw_on_missing=False, throw_on_resolution_failure=False
            )
        except CONFIG_ERRORS:
            return False
        return found is not _ABSENT


def _read_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[_Layer]:
    """The file's bases (recursively, depth first) followed by the file itself."""
    try:
        path = path.resolve()
    except OSError as exc:
        raise BlueprintError(f"{short(path)}: cannot read: {exc.strerror or exc}") from None
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise BlueprintError(f"{path}: extends: cycle {cycle}")
    raw = _parse(path, chain)
    label = _display(path)
    extends = OmegaConf.to_container(raw, resolve=False).get("extends", [])  # as written: never resolved
    if "extends" in raw:
        del raw["extends"]
    if isinstance(extends, str):
        extends = [extends]
    if not isinstance(extends, list):
        raise BlueprintError(f"{label}: extends: expected a relative path or a list of them, got {short(extends)}")
    layers: list[_Layer] = []
    for base in extends:
        layers.extend(_read_layers(_base_path(path, base, label), (*chain, path)))
    _expand_stage_items(raw, path, label, chain)
    layer = _Layer(label, raw)
    _check_resolvers(layer)
    _check_stages(layer, items=False)
    layers.append(layer)
    return layers


def _expand_stage_items(raw: DictConfig, path: Path, label: str, chain: tuple[Path, ...]) -> None:
    """Replace ``repeat`` groups in the file's ``stages`` by their rounds (`keye.config.repeat`) and ``include``
    items by the stages of the file they name (`keye.config.include`); errors name ``stages.N`` as written."""
    plain = OmegaConf.to_container(raw, resolve=False).get("stages")  # as written: never resolved
    if not isinstance(plain, list) or not any(is_group(item) or is_include(item) for item in plain):
        return
    expanded: list = []
    for index, item in enumerate(plain):
        if is_group(item):
            expanded.extend(expand_group(item, f"{label}: stages.{index}"))
        elif is_include(item):
            expanded.extend(include_stages(item, label, index, (*chain, path),
                                           lambda name, key: _base_path(path, name, label, key), _included_stages))
        else:
            expanded.append(item)
    raw.stages = expanded


def _included_stages(path: Path, chain: tuple[Path, ...]) -> Any:
    """The stage list a blueprint runs: that of the last file of its ``extends`` chain that sets one."""
    for layer in reversed(_read_layers(path, chain)):
        stages = OmegaConf.to_container(layer.cfg, resolve=False).get("stages", _ABSENT)
        if stages is not _ABSENT:
            return stages
    return None


def _parse(path: Path, chain: tuple[Path, ...]) -> DictConfig:
    """One YAML file as a mapping; every way it can fail is one line naming the file."""
    try:
        text = _read_text(path, chain)
    except OSError as exc:  # unreadable, a name too long, ...
        raise BlueprintError(f"{short(path)}: cannot read: {exc.strerror or exc}") from None
    try:
        raw = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise BlueprintError(f"{path}: invalid YAML{where}: {short(reason)}") from None
    except (OmegaConfBaseException, OSError):  # OmegaConf says OSError for a top-level scalar
        raw = None
    except CONFIG_ERRORS as exc:
        raise BlueprintError(f"{path}: invalid YAML: {short(omegaconf_reason(exc))}") from None
    if not isinstance(raw, DictConfig):
        raise BlueprintError(f"{path}: a blueprint must be a mapping at the top level")
    if not raw:
        raise BlueprintError(f"{path}: the file is empty (no settings)")
    return raw


def _read_text(path: Path, chain: tuple[Path, ...]) -> str:
    """The file's text, if it is a regular, not too large, UTF-8 file."""
    if not path.exists():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise BlueprintError(f"blueprint not found: {path}{where}")
    if not path.is_file():  # a folder, a FIFO (would block), a device (/dev/zero would never end)
        raise BlueprintError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size > MAX_BLUEPRINT_BYTES:
        raise BlueprintError(f"{path}: {size} bytes is too large for a blueprint (at most {MAX_BLUEPRINT_BYTES})")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BlueprintError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); blueprints are UTF-8 YAML"
        ) from None


def _base_path(path: Path, base: Any, label: str, key: str = "extends") -> Path:
    """Where ``extends: base`` (or an ``include`` at ``key``) points: a file in the folder of ``path`` or below
    it, nowhere else."""
    if not isinstance(base, str) or not base.strip() or "${" in base or base == "???":
        raise BlueprintError(f"{label}: {key}: entries must be relative paths, got {short(base)}")
    relative = Path(base)
    if relative.is_absolute() or ".." in relative.parts:
        raise BlueprintError(
            f"{label}: {key}: '{short(base)}' must be relative to this file's folder, without '..' "
            "(keep bases beside the blueprint or below it)"
        )
    try:
        target = (path.parent / relative).resolve()
    except OSError as exc:
        raise BlueprintError(f"{label}: {key}: '{short(base)}': {exc.strerror or exc}") from None
    if not target.is_relative_to(path.parent):
        raise BlueprintError(f"{label}: {key}: '{short(base)}' leaves this file's folder (a symlink?)")
    return target


def _strings(node: Any, prefix: str = ""):
    """(key path, string) for every string value in a plain container."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _strings(value, f"{prefix}{index}.")
    elif isinstance(node, str):
        yield prefix[:-1], node


def _check_resolvers(layer: _Layer) -> None:
    """Refuse any resolver but `ALLOWED_RESOLVERS` before anything resolves (see the module docstring)."""
    _refuse_resolvers(layer.cfg, lambda key: layer.label)


def _refuse_resolvers(cfg: DictConfig, origin: Any) -> None:
    """Escaped calls (``\\${x:}``) count too: OmegaConf turns them into live ones once resolved, and so does
    a value read from the environment that holds one; the resolved blueprint is scanned again for those."""
    for key, text in _strings(OmegaConf.to_container(cfg, resolve=False)):
        for match in _RESOLVER_CALL.finditer(text):
            if match.group(1) not in ALLOWED_RESOLVERS:
                raise BlueprintError(
                    f"{origin(key)}: {key}: resolver '{short(match.group(1))}' is not allowed in a blueprint; "
                    f"use plain ${{a.b}} interpolation or {', '.join(ALLOWED_RESOLVERS)}"
                )


def _check_stages(layer: _Layer, *, items: bool) -> None:
    """``stages`` must be a list of mappings; with ``items``, each is merged onto the stage schema on its
    own, so that an error inside one keeps its ``stages.N.`` prefix (OmegaConf reports keys relative to
    the list item). That costs a schema per stage, so it runs only once the whole layer failed to merge."""
    plain = OmegaConf.to_container(layer.cfg, resolve=False)
    stages = plain.get("stages", _ABSENT)
    if stages is _ABSENT or stages is None or _interpolation(stages):
        return
    if not isinstance(stages, list):
        kind = "a mapping" if isinstance(stages, dict) else short(stages)
        raise BlueprintError(f"{layer.label}: stages: expected a list of stages (- name: ..., kind: ...), got {kind}")
    for index, item in enumerate(stages):
        if _interpolation(item):
            continue
        if not isinstance(item, dict):
            raise BlueprintError(f"{layer.label}: stages.{index}: expected a stage (name: ..., kind: ...), got {short(item)}")
        if not items:
            continue
        try:
            OmegaConf.merge(schema_of(StageConfig), item)
        except CONFIG_ERRORS as exc:
            key = f"stages.{index}.{dotted(getattr(exc, 'full_key', '') or '')}".rstrip(".")
            raise BlueprintError(f"{layer.label}: {key}: {omegaconf_reason(exc)}") from None


def _interpolation(value: Any) -> bool:
    return isinstance(value, str) and value.strip().startswith("${")


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise BlueprintError(f"override '{short(text)}': expected KEY=VALUE (e.g. stages.0.steps=10)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def _merge_layer(cfg: DictConfig, layer: _Layer) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, layer.cfg)
    except CONFIG_ERRORS as exc:
        _check_stages(layer, items=True)  # an error inside a stage: name it with its stages.N. prefix
        key = dotted(getattr(exc, "full_key", "") or "") or _culprit(cfg, layer)
        raise BlueprintError(f"{layer.label}: {short(key)}: {omegaconf_reason(exc)}") from None


def _culprit(cfg: DictConfig, layer: _Layer) -> str:
    """The top-level key whose value does not fit, for errors OmegaConf reports without a key."""
    for key in layer.cfg:
        try:
            OmegaConf.merge(cfg, {key: layer.cfg._get_node(key)})
        except CONFIG_ERRORS:
            return str(key)
    return "(top level)"


def load_blueprint(
    path: str | Path,
    overrides: Sequence[str] = (),
    registry: Registry | None = None,
    *,
    validate: bool = True,
    nproc: int | None = None,
) -> DictConfig:
    """Load, merge, override, resolve and (with a registry) validate one blueprint; read-only result.

    ``nproc``: the number of processes the run will have; when given, the parallel layout is checked
    against it too (`keye.config.semantics.check_layout`).
    """
    path = Path(path)
    layers = _read_layers(path)
    top = layers[-1].label
    cfg = schema_of(Blueprint)
    for layer in layers:  # a layer that names another component drops the old one's keys (keye.config.swap)
        drop_switched(cfg, OmegaConf.to_container(layer.cfg, resolve=False), registry)
        cfg = _merge_layer(cfg, layer)
    parsed = [(text, *_parse_override(text)) for text in overrides]
    for _text, key, value in parsed:  # all overrides' switches first: `a.depth=2 a.name=x` keeps depth
        drop_switched(cfg, _nested(key, value), registry)
    for text, key, value in parsed:
        label = f"override '{short(text)}'"
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except CONFIG_ERRORS as exc:
            raise BlueprintError(f"{label}: {key}: {omegaconf_reason(exc)}") from None
        layer = _Layer(label, OmegaConf.create(_nested(key, value)))
        _check_resolvers(layer)
        layers.append(layer)
    cfg.extends = []

    def origin(key_path: str) -> str:
        """The last layer that set ``key_path``; for a value nobody set (a default, a size preset), the first
        layer that set its closest parent: the file that introduced the node."""
        for layer in reversed(layers):
            if layer.defines(key_path):
                return layer.label
        parts = key_path.split(".")
        for end in range(len(parts) - 1, 0, -1):
            for layer in layers:
                if layer.defines(".".join(parts[:end])):
                    return layer.label
        return top

    try:
        OmegaConf.resolve(cfg)
    except CONFIG_ERRORS as exc:
        key = dotted(getattr(exc, "full_key", "") or "(interpolation)")
        raise BlueprintError(f"{origin(key)}: {key}: {omegaconf_reason(exc)}") from None
    _refuse_resolvers(cfg, origin)
    missing = sorted(dotted(key) for key in OmegaConf.missing_keys(cfg))
    if missing:
        raise BlueprintError(f"{origin(missing[0])}: {missing[0]}: missing required value")
    if validate:
        if registry is None:
            raise ValueError("load_blueprint(validate=True) needs a registry")
        validate_blueprint(cfg, registry, origin, nproc=nproc)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _nested(key: str, value: object) -> dict:
    """``a.b.0.c=v`` as a nested dict (list indices become keys; for origins and `drop_switched`)."""
    node: dict = {}
    cursor = node
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return node
