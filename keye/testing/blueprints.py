"""Small blueprints for tests: a dict in, a YAML file out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def write_blueprint(path: str | Path, content: dict[str, Any]) -> Path:
    """Write ``content`` as a YAML blueprint at ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def tiny_blueprint(**model: dict[str, Any]) -> dict[str, Any]:
    """A minimal blueprint dict with the given model slots (e.g. ``projector={"name": "x"}``) and no stages."""
    return {"run": {"name": "test", "output_dir": "runs/test", "seed": 0}, "model": dict(model), "stages": []}
