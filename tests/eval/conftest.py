from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def released(tmp_path_factory) -> Path:
    """A tiny released-format folder with its tokenizer (tests/eval/tiny_model.py)."""
    from tiny_model import make_released  # beside this file (pytest's prepend import mode puts it on sys.path)

    return make_released(tmp_path_factory.mktemp("released") / "ckpt")
