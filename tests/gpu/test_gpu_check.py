"""``tools/gpu_check.py``, the one-command GPU check: its dry mode here, the whole table where CUDA is.

The dry run (any machine, a real process) must import everything the rows use and report every row as
skipped with a reason, printing the table and writing it to ``$OUT``. With CUDA the real run must report no
row as FAIL (rows that need Transformer Engine or two GPUs skip with the reason).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.py"
ROWS = ["te_vs_local_bf16", "packed_neighbour_local", "packed_neighbour_te", "fp8_te_training",
        "fp8_torch_training", "mfu_bf16_keye_vl_8b", "nccl_tp2"]


def _run(tmp_path: Path, *args: str, timeout: int) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    report = json.loads((tmp_path / "gpu_check.json").read_text()) if (tmp_path / "gpu_check.json").exists() else {}
    return done, report


def test_dry_run_imports_and_skips_every_row_with_the_reason(tmp_path):
    done, report = _run(tmp_path, "--dry", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [row["name"] for row in report["rows"]] == ROWS
    assert all(row["status"] == "skipped" and row["detail"].startswith("--dry: imports checked") for row in report["rows"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert table in done.stdout and all(f"| {name} | skipped |" in table for name in ROWS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_on_a_gpu_no_row_fails(tmp_path):
    done, report = _run(tmp_path, timeout=600)
    failed = [row for row in report.get("rows", []) if row["status"] == "FAIL"]
    assert done.returncode == 0 and not failed, (failed, done.stdout[-3000:], done.stderr[-3000:])
    ran = {row["name"] for row in report["rows"] if row["status"] == "ok"}
    assert {"packed_neighbour_local", "fp8_torch_training", "mfu_bf16_keye_vl_8b"} <= ran, report
