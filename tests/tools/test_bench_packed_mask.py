"""``tools/bench/packed_mask.py --quick`` runs end to end and prints both variants and the ratio line. What must
hold is checked, not the numbers: the micro-batch without the dense mask holds at least the T² bytes less
(T = 4096: 16 MiB), and its collate does not raise the process's peak memory by the dense mask's size."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_prints_before_now_and_the_ratio():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "packed_mask.py"), "--quick"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for variant in ("before", "now"):
        row = re.search(rf"^\s+4096\s+{variant}\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)$", result.stdout, re.MULTILINE)
        assert row, f"no '{variant}' row in:\n{result.stdout}"
        rows[variant] = [float(value) for value in row.groups()]
    assert re.search(r"^\s+4096\s+ratio\s+\d+x\s+\d+x\s+\d+x\s+\(before / now\)$", result.stdout, re.MULTILINE), result.stdout
    (peak_before, held_before, _), (peak_now, held_now, _) = rows["before"], rows["now"]
    assert held_before - held_now >= 16.0 and held_now < 1.0  # the (1, 1, 4096, 4096) bool mask is 16 MiB
    assert peak_now < 8.0 < peak_before
