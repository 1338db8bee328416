"""`keye.megatron_jit`: importing keye first keeps Megatron's torch.compile fuser off on a CPU machine."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

FUSER = "import keye, megatron.core.jit as j; print(j.jit_fuser is j.noop_decorator)"


def test_the_fuser_is_off_in_this_process_and_on_when_asked():
    assert not torch.cuda.is_available()
    import megatron.core.jit as jit  # pytest loaded keye (its pytest plugin) before any Megatron import

    assert jit.jit_fuser is jit.noop_decorator
    env = {**os.environ, "KEYE_MEGATRON_JIT": "1", "PYTHONWARNINGS": "ignore"}
    kept = subprocess.run([sys.executable, "-c", FUSER], env=env, capture_output=True, text=True, timeout=120)
    assert kept.stdout.strip() == "False", kept.stderr[-2000:]  # Megatron's default: torch.compile
