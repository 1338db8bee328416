"""A user error every rank meets after ``--nproc 2`` has spawned them is printed once, as one line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

from keye.testing import write_blueprint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_an_error_every_rank_hits_is_printed_once(tmp_path):
    missing = tmp_path / "nowhere.jsonl"  # found missing when each rank builds its data source
    model = {"language_model": {"name": "qwen3", "size": "tiny"}}
    data = {"max_tokens": 128, "sources": {"t": {"name": "jsonl", "path": str(missing)}}}
    stage = {"name": "only", "kind": "lm", "train": ["language_model"], "steps": 2, "data": data}
    path = write_blueprint(tmp_path / "bp.yaml", {"run": {"name": "e", "output_dir": str(tmp_path / "run")},
                                                  "model": model, "stages": [stage]})
    result = subprocess.run([sys.executable, "-m", "keye.launch.cli", "run", str(path), "--nproc", "2"], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("keye-launch: error: ")]
    assert errors == [f"keye-launch: error: data source 'jsonl': file not found: {missing}"], result.stderr[-3000:]
