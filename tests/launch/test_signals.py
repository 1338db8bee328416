"""Stopping ``keye-launch run --nproc 2`` stops its ranks: real processes, real signals, real pids.

A scheduler (or ``timeout``) that sends SIGTERM to the launcher must not leave ranks training as orphans that
a later ``--resume`` would race; a launcher killed outright (SIGKILL, OOM killer) takes its ranks with it
through the Linux parent-death signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from keye.testing import write_blueprint
from keye.train.output_dir import OutputDirError, lock_output_dir

LAUNCH = [sys.executable, "-m", "keye.launch.cli", "run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc, no psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as dead)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_training(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """A 2-rank run of a tiny model with far more steps than the test waits for; returns once it trains."""
    model = {"language_model": {"name": "qwen3", "size": "tiny"}, "vision_encoder": {"name": "siglip_navit", "size": "tiny"},
             "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64}}
    data = {"max_tokens": 128, "pack_buffer": 8, "sources": {"t": {"name": "synthetic", "tasks": ["ocr"]}}}
    stage = {"name": "long", "kind": "lm", "train": ["language_model"], "steps": 100000, "data": data}
    path = write_blueprint(tmp_path / "bp.yaml", {"run": {"name": "sig", "output_dir": str(tmp_path / "run")},
                                                  "model": model, "stages": [stage]})
    launcher = subprocess.Popen([*LAUNCH, str(path), "--nproc", "2"], env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):  # both ranks are past their first steps
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the run did not start training in 180 s"
        time.sleep(0.2)
    ranks = children_of(launcher.pid)
    assert len(ranks) == 2 and all(alive(pid) for pid in ranks)
    return launcher, ranks


def wait_dead(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if alive(pid)]


def test_sigterm_to_the_launcher_stops_every_rank(tmp_path):
    """SIGINT and SIGHUP take the same path (`keye.launch.spawn.FORWARDED`), with exit codes 130 and 129."""
    launcher, ranks = start_training(tmp_path)
    launcher.send_signal(signal.SIGTERM)
    try:
        assert launcher.wait(timeout=30) == 143
    finally:
        launcher.kill()
    assert wait_dead(ranks, 5) == []


def test_ranks_die_with_a_killed_launcher(tmp_path):
    launcher, ranks = start_training(tmp_path)
    racing = subprocess.run([*LAUNCH, str(tmp_path / "bp.yaml"), "--resume"], env=ENV, capture_output=True, text=True,
                            timeout=120)  # while it trains, a --resume is kept out
    assert racing.returncode == 2 and f"is in use by a live run (pid {launcher.pid})" in racing.stderr
    launcher.kill()  # SIGKILL: no handler runs, the kernel's parent-death signal must do it
    launcher.wait(timeout=30)
    survivors = wait_dead(ranks, 5)
    for pid in survivors:  # do not leave them training on the test machine
        os.kill(pid, signal.SIGKILL)
    assert survivors == []
    # The lock goes with the last process holding it: the ranks' data-loader workers (forked, so they share
    # the lock's open file) notice their parent's death within a few seconds. Then --resume may start.
    deadline = time.monotonic() + 20
    while True:
        try:
            lock_output_dir(tmp_path / "run").release()
            break
        except OutputDirError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
