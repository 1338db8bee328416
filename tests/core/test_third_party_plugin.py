"""A real third-party plugin: a distribution with its own pyproject.toml and an entry point in group
``keye``, installed with pip into a temporary folder, seen by ``keye-launch`` in a fresh process."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from keye.testing import write_blueprint
from keye.testing.third_party import launch


def _write_distribution(root: Path, name: str, version: str, module: str, code: str) -> Path:
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{name}"
        version = "{version}"
        dependencies = ["keye"]

        [project.entry-points.keye]
        {module} = "{module}.plugin"

        [tool.setuptools]
        packages = ["{module}"]
    """))
    (root / module).mkdir()
    (root / module / "__init__.py").write_text("")
    (root / module / "plugin.py").write_text(textwrap.dedent(code))
    return root


TOY_PROJECTOR = '''
    """A toy projector published by a third party."""
    from dataclasses import dataclass

    from keye import hookimpl
    from keye.config import doc


    class ToyLinearProjector:
        @dataclass
        class Config:
            out_dim: int = doc("Output width.", 32)

        def __init__(self, config, ctx=None):
            self.config = config

        def forward(self, features, grid_thw):
            return features


    @hookimpl
    def keye_register_projectors(register):
        register("toy_linear", ToyLinearProjector)
'''

BROKEN = '''
    raise ImportError("this plugin needs a package that is not installed")
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """Both distributions installed with pip (no deps, no network) into one folder put on PYTHONPATH."""
    base = tmp_path_factory.mktemp("third_party")
    good = _write_distribution(base / "src-good", "keye-toy-projector", "0.4.2", "keye_toy_projector", TOY_PROJECTOR)
    bad = _write_distribution(base / "src-bad", "keye-broken", "1.0.0", "keye_broken", BROKEN)
    site = base / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(site), str(good), str(bad)],
        check=True, capture_output=True, text=True,
    )
    return site


def _launch(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return launch(site, *args, timeout=120, **env)


def _by_distribution(stdout: str) -> dict:
    return {record["distribution"]: record for record in json.loads(stdout)}


def test_plugins_json_lists_the_third_party_distribution_and_the_broken_one(plugin_site):
    result = _launch(plugin_site, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    records = _by_distribution(result.stdout)
    toy = records["keye-toy-projector"]
    assert (toy["version"], toy["status"], toy["components"]) == ("0.4.2", "loaded", {"projector": ["toy_linear"]})
    broken = records["keye-broken"]
    assert broken["status"] == "failed"
    assert broken["error"] == "ImportError: this plugin needs a package that is not installed"
    assert result.stderr.count("keye plugin 'keye_broken' from keye-broken 1.0.0 failed to load") == 1
    builtins = [r for r in records.values() if r["distribution"] == "keye"]
    assert all(r["status"] == "loaded" for r in builtins)


def test_a_blueprint_selects_the_third_party_component(plugin_site, tmp_path):
    path = write_blueprint(tmp_path / "bp.yaml", {"model": {"projector": {"name": "toy_linear", "out_dim": 64}}})
    result = _launch(plugin_site, "validate", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ok: {path} (0 stages)"
    shown = _launch(plugin_site, "print-config", str(path))
    assert "# projector registered by keye-toy-projector 0.4.2 (plugin keye_toy_projector)" in shown.stdout
    assert "# Output width.\n    out_dim: 64" in shown.stdout


def test_block_list_builtins_only_and_strict_mode(plugin_site):
    blocked = _by_distribution(_launch(plugin_site, "plugins", "--json", KEYE_BLOCK_PLUGINS="keye-broken").stdout)
    assert blocked["keye-broken"]["status"] == "blocked"
    only = _by_distribution(_launch(plugin_site, "plugins", "--json", KEYE_BUILTINS_ONLY="1").stdout)
    assert "keye-toy-projector" not in only and "keye-broken" not in only
    strict = _launch(plugin_site, "plugins", "--json", KEYE_STRICT_PLUGINS="1")
    assert strict.returncode != 0
    assert "plugin 'keye_broken' (keye-broken 1.0.0) failed to load" in strict.stderr
