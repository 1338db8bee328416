"""Running a benchmark of ``tools/bench/`` from a test: its ``--quick`` mode in a fresh process, one thread.

The bench tests check what must hold of a run (rows present, ratios printed, invariants), never the numbers:
those are the benchmark's output, measured on a quiet machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_quick(script: str, timeout: float = 300) -> str:
    """Stdout of ``tools/bench/<script> --quick``; a non-zero exit fails with the end of its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / script), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
