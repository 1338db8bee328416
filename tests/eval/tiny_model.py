"""A tiny released-format Keye-VL folder (config.json, safetensors, tokenizer) for command-line tests.

The model and tokenizer are tests/generate/test_megatron_generator.py's (O(1) random weights, clear greedy
choices); that module is loaded from its file, as tests/generate import it beside them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from keye.testing.distributed import run_distributed

GENERATE_TESTS = Path(__file__).resolve().parents[1] / "generate" / "test_megatron_generator.py"


def generator_helpers():
    spec = importlib.util.spec_from_file_location("keye_tiny_generator_helpers", GENERATE_TESTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: str) -> None:
    helpers = generator_helpers()
    tokenizer = helpers.tiny_tokenizer()
    helpers.write_checkpoint(Path(path), tokenizer)
    tokenizer.save_pretrained(path)


def make_released(path: Path) -> Path:
    """Write the tiny checkpoint with its tokenizer to ``path`` (in a spawned Megatron process)."""
    run_distributed(_write, 1, str(path))
    return path


def png(width: int, height: int, seed: int) -> bytes:
    return generator_helpers().png(width, height, seed)
