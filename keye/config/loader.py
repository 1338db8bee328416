"""Loading a blueprint: YAML files chained by ``extends:``, command-line overrides, validation.

    cfg = load_blueprint("blueprints/tiny/pretrain.yaml", ["stages.0.steps=3"], registry)

Layers merge in order (bases first, the file itself last, then overrides) onto the structured
schema in `keye.config.schema`, so a typo anywhere is an error naming the key path and the file
that set it. Nothing in a blueprint is executed: component names are registry keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from keye.config.schema import Blueprint
from keye.config.validate import dotted, omegaconf_reason, validate_blueprint
from keye.errors import BlueprintError
from keye.registry import Registry

_ABSENT = object()


class _Layer:
    """One source of settings: a file, or one command-line override."""

    def __init__(self, label: str, cfg: DictConfig) -> None:
        self.label = label
        self.cfg = cfg

    def defines(self, key_path: str) -> bool:
        return OmegaConf.select(self.cfg, key_path, default=_ABSENT, throw_on_missing=False) is not _ABSENT


def _read_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[_Layer]:
    """The file's bases (recursively, depth first) followed by the file itself."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise BlueprintError(f"{path}: extends: cycle {cycle}")
    if not path.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise BlueprintError(f"blueprint not found: {path}{where}")
    try:
        raw = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise BlueprintError(f"{path}: invalid YAML: {reason}") from None
    if not isinstance(raw, DictConfig):
        raise BlueprintError(f"{path}: a blueprint must be a mapping at the top level")
    extends = raw.pop("extends", [])
    if isinstance(extends, str):
        extends = [extends]
    layers: list[_Layer] = []
    for base in extends:
        if not isinstance(base, str):
            raise BlueprintError(f"{path}: extends: entries must be relative paths, got {base!r}")
        layers.extend(_read_layers(path.parent / base, (*chain, path)))
    layers.append(_Layer(_display(path), raw))
    return layers


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise BlueprintError(f"override '{text}': expected KEY=VALUE (e.g. stages.0.steps=10)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def load_blueprint(
    path: str | Path,
    overrides: Sequence[str] = (),
    registry: Registry | None = None,
    *,
    validate: bool = True,
) -> DictConfig:
    """Load, merge, override, resolve and (with a registry) validate one blueprint; read-only result."""
    path = Path(path)
    layers = _read_layers(path)
    top = layers[-1].label
    cfg = OmegaConf.structured(Blueprint)
    for layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer.cfg)
        except OmegaConfBaseException as exc:
            key = dotted(getattr(exc, "full_key", "") or "(top level)")
            raise BlueprintError(f"{layer.label}: {key}: {omegaconf_reason(exc)}") from None
    for text in overrides:
        key, value = _parse_override(text)
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as exc:
            raise BlueprintError(f"override '{text}': {key}: {omegaconf_reason(exc)}") from None
        layers.append(_Layer(f"override '{text}'", OmegaConf.create(_nested(key, value))))
    cfg.extends = []

    def origin(key_path: str) -> str:
        for layer in reversed(layers):
            if layer.defines(key_path):
                return layer.label
        return top

    missing = sorted(dotted(key) for key in OmegaConf.missing_keys(cfg))
    if missing:
        raise BlueprintError(f"{origin(missing[0])}: {missing[0]}: missing required value")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        key = dotted(getattr(exc, "full_key", "") or "(interpolation)")
        raise BlueprintError(f"{origin(key)}: {key}: {omegaconf_reason(exc)}") from None
    if validate:
        if registry is None:
            raise ValueError("load_blueprint(validate=True) needs a registry")
        validate_blueprint(cfg, registry, origin)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _nested(key: str, value: object) -> dict:
    """``a.b.0.c=v`` as a nested dict (list indices become keys; used only to track origins)."""
    node: dict = {}
    cursor = node
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return node
