"""One run per output directory (`keye.train.output_dir`): real runs, real processes holding real flocks.

A second run into a live folder, or a fresh run into a finished run's folder, would interleave or append to
its ``metrics.jsonl`` and plots; both are refused with one line unless ``--resume``/``--overwrite`` says what
to do, and a lock left by a dead process never blocks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keye.testing import write_blueprint
from keye.train.output_dir import LOCK_NAME, OutputDirError, claim_output_dir, lock_output_dir

LAUNCH = [sys.executable, "-m", "keye.launch.cli", "run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *args], env=ENV, capture_output=True, text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("keye-launch: error: "), lines
    return lines[0]


def tiny_run(tmp_path: Path) -> Path:
    model = {"language_model": {"name": "qwen3", "size": "tiny"}, "vision_encoder": {"name": "siglip_navit", "size": "tiny"},
             "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64}}
    data = {"max_tokens": 128, "pack_buffer": 8, "sources": {"t": {"name": "synthetic", "tasks": ["ocr"], "num_samples": 50}}}
    stage = {"name": "only", "kind": "lm", "train": ["projector"], "steps": 2, "data": data}
    return write_blueprint(tmp_path / "bp.yaml", {"run": {"name": "o", "output_dir": str(tmp_path / "run")},
                                                   "model": model, "stages": [stage]})


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_fresh_run_refuses_a_used_folder_and_overwrite_starts_over(tmp_path):
    bp, run = tiny_run(tmp_path), tmp_path / "run"
    assert launch(str(bp)).returncode == 0
    before = (run / "metrics.jsonl").read_text()
    error = one_line_error(launch(str(bp)))
    assert f"run.output_dir {run} already holds a run (metrics.jsonl, summary.json, report.md, plots/ and 1 more); " \
           "add --resume to continue it or --overwrite to start it over" in error
    assert (run / "metrics.jsonl").read_text() == before  # nothing appended
    (run / "notes.txt").write_text("mine")
    assert launch(str(bp), "--overwrite").returncode == 0
    assert steps(run) == [1, 2]  # the new run's lines only
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own outputs are removed
    assert launch(str(bp), "--resume", "--overwrite").returncode == 2


def test_a_live_run_keeps_others_out_and_a_dead_one_does_not(tmp_path):
    """The lock holder is a real process with a real flock; killed with SIGKILL, it leaves no stale lock."""
    bp, run = tiny_run(tmp_path), tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom keye.train.output_dir import lock_output_dir\n"
                               f"lock_output_dir({str(run)!r}); print('locked', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ((), ("--resume",), ("--overwrite",), ("--nproc", "2")):
            error = one_line_error(launch(str(bp), *extra))
            assert f"run.output_dir {run} is in use by a live run (pid {holder.pid}); " in error
        with pytest.raises(OutputDirError, match=f"pid {holder.pid}"):
            lock_output_dir(run)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / LOCK_NAME).read_text().strip() == str(holder.pid)  # the file stays; the flock died with it
    assert launch(str(bp)).returncode == 0


def test_stage_runs_claim_their_own_folder(tmp_path):
    run = tmp_path / "run"
    (run / "first").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"stage": "first", "step": 1}\n{"stage": "second", "step": 1}\n')
    claim_output_dir(run, ["second"], whole_run=False).release()  # --stage second after --stage first
    with pytest.raises(OutputDirError, match=r"already holds a run \(first/\)"):
        claim_output_dir(run, ["first"], whole_run=False)
    claim_output_dir(run, ["first"], whole_run=False, overwrite=True).release()
    assert not (run / "first").exists()
    assert (run / "metrics.jsonl").read_text() == '{"stage": "second", "step": 1}\n'
    with pytest.raises(OutputDirError, match=r"already holds a run \(metrics.jsonl\)"):
        claim_output_dir(run, ["first", "second"], whole_run=True)
    claim_output_dir(run, ["first", "second"], whole_run=True, resume=True).release()


def test_two_launches_at_once_one_wins(tmp_path):
    """Started together into one folder: exactly one trains, the other exits 2 at once (no interleaved lines)."""
    bp, run = tiny_run(tmp_path), tmp_path / "run"
    procs = [subprocess.Popen([*LAUNCH, str(bp)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    codes = sorted(proc.wait(timeout=300) for proc in procs)
    assert codes == [0, 2]
    assert steps(run) == [1, 2]
