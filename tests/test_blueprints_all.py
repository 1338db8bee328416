"""Every blueprint shipped under blueprints/ loads and validates against the installed components."""

from pathlib import Path

import pytest

from keye.config import load_blueprint, render_blueprint

ROOT = Path(__file__).resolve().parents[1]
BLUEPRINTS = sorted((ROOT / "blueprints").rglob("*.yaml"))


def test_there_are_blueprints():
    assert ROOT / "blueprints" / "tiny" / "pretrain.yaml" in BLUEPRINTS


@pytest.mark.parametrize("path", BLUEPRINTS, ids=lambda p: str(p.relative_to(ROOT / "blueprints")))
def test_blueprint_validates(path, keye_registry):
    cfg = load_blueprint(path, [], keye_registry)
    assert render_blueprint(cfg, keye_registry).strip()


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("```")
    assert len(blocks) > 1
    first = [line.split("#")[0].strip() for line in blocks[1].splitlines()[1:] if line.strip() and not line.startswith("#")]
    assert first[:2] == ["tools/dev main", "tools/dev test"], first
    assert "exec tools/dev test" in (ROOT / ".ci" / "run").read_text()
