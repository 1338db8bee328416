"""pytest plugin: fixtures for keye and for plugin authors.

- ``keye_host``: a fresh `PluginHost` per test with every installed entry point loaded, in strict mode
  (a broken plugin fails the test instead of being skipped).
- ``keye_empty_host``: a fresh host with nothing loaded; add inline plugins with ``host.add_plugin(...)``.
- ``keye_registry``: ``keye_host.registry``.
- ``blueprint_file``: a function ``(dict, name="bp.yaml") -> Path`` writing a blueprint under tmp_path.

Strict plugin loading (KEYE_STRICT_PLUGINS=1) is the default for the whole session.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

from keye.plugins import ENV_STRICT, PluginHost
from keye.registry import Registry
from keye.testing.blueprints import write_blueprint


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault(ENV_STRICT, "1")


@pytest.fixture
def keye_host() -> PluginHost:
    host = PluginHost(strict=True)
    host.load_entry_points()
    return host


@pytest.fixture
def keye_empty_host() -> PluginHost:
    return PluginHost(strict=True)


@pytest.fixture
def keye_registry(keye_host: PluginHost) -> Registry:
    return keye_host.registry


@pytest.fixture
def blueprint_file(tmp_path: Path) -> Callable[..., Path]:
    def write(content: dict[str, Any], name: str = "bp.yaml") -> Path:
        return write_blueprint(tmp_path / name, content)

    return write
