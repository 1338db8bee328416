"""Checkpoints you can trust (issue 10, items 3 and 10): nothing in a checkpoint folder runs code when it
is loaded, a truncated checkpoint or a ``latest`` that names nothing falls back to the newest good one
with a line naming both, a full disk is one line naming the folder, and the previous checkpoint stays.

One real training run (a tiny lm stage, checkpoints at steps 2 and 4, weights at step 6) is made once;
each test copies it, breaks it as a user's disk or an attacker would, and runs ``keye-launch`` on it.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keye.parallel import checkpoint_folder
from keye.parallel.checkpoint_folder import CheckpointError, verify
from keye.parallel.dist_checkpoint import read_full_tensors, saved_tensors
from keye.testing import write_blueprint

LAUNCH = [sys.executable, "-m", "keye.launch.cli", "run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = 6


def blueprint(path: Path, output_dir: Path, **stage: object) -> Path:
    return write_blueprint(path, {
        "run": {"name": "trust", "output_dir": str(output_dir), "seed": 3, "checkpoint_every": 2},
        "model": {
            "vision_encoder": {"name": "siglip_navit", "size": "tiny"},
            "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
            "language_model": {"name": "qwen3", "size": "tiny"},
        },
        "stages": [{
            "name": "lm", "kind": "lm", "train": ["projector", "language_model"], "steps": STEPS,
            "optimizer": {"lr": 3e-3, "lr_scale": {"projector": 0.5}}, "schedule": {"kind": "cosine", "warmup_steps": 1},
            "data": {"max_tokens": 128, "pack_buffer": 4, "image_max_tokens": 16,
                     "sources": {"a": {"name": "synthetic", "tasks": ["color"], "num_samples": 100}}},
            **stage,
        }],
    })


def launch(*args: str, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *args], env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=preexec)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run: checkpoints at steps 2 and 4 (the newest two are kept), weights of step 6."""
    root = tmp_path_factory.mktemp("trust")
    done = launch(str(blueprint(root / "bp.yaml", root / "run")))
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "run"


def killed_copy(finished: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run as if killed after its step-4 checkpoint; its blueprint writes to the copy."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "lm" / "done.json").unlink()
    shutil.rmtree(run / "lm" / "weights")
    return run, blueprint(tmp_path / "bp.yaml", run)


def checkpoints(run: Path) -> Path:
    return run / "lm" / "checkpoints"


def one_error_line(stderr: str) -> str:
    """keye-launch's error: exactly one line, and no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def error_line(done: subprocess.CompletedProcess) -> str:
    """keye-launch's one-line error, with its exit status 2."""
    assert done.returncode == 2, done.stderr[-3000:]
    return one_error_line(done.stderr)


def same_weights(a: Path, b: Path) -> None:
    expected, got = read_full_tensors(a / "lm" / "weights"), read_full_tensors(b / "lm" / "weights")
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []


# --- nothing executes -------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do with os.system instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def craft(folder: Path, name: str, marker: Path) -> None:
    """Replace ``folder/name`` with a live payload, and re-sign the manifest as an attacker could."""
    if name == "common.pt":
        torch.save({"step": _Payload(marker)}, folder / name)
    else:
        (folder / name).write_bytes(pickle.dumps(_Payload(marker)))
    manifest = json.loads((folder / checkpoint_folder.MANIFEST).read_text())
    manifest["files"][name] = {"size": (folder / name).stat().st_size, "sha256": checkpoint_folder._sha256(folder / name)}
    (folder / checkpoint_folder.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", [".metadata", "common.pt"])
def test_crafted_file_is_refused_before_it_is_unpickled(finished, tmp_path, name):
    folder = tmp_path / "weights"
    shutil.copytree(finished / "lm" / "weights", folder)
    marker = tmp_path / "marker"
    craft(folder, name, marker)
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists(), "the payload is live: plain unpickling runs it"

    for read in (verify, saved_tensors, read_full_tensors):
        with pytest.raises(CheckpointError) as caught:
            read(folder)
        message = str(caught.value)
        assert str(folder / name) in message and "refused" in message and "\n" not in message
    assert not marker.exists()


def test_init_from_a_crafted_folder_runs_nothing(finished, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(finished / "lm" / "weights", source / "weights")
    marker = tmp_path / "marker"
    craft(source / "weights", ".metadata", marker)
    bp = blueprint(tmp_path / "bp.yaml", tmp_path / "run", init_from=str(source))
    line = error_line(launch(str(bp)))
    assert str(source / "weights" / ".metadata") in line and "refused" in line
    assert not marker.exists()


def test_resume_passes_over_a_crafted_checkpoint(finished, tmp_path):
    run, bp = killed_copy(finished, tmp_path)
    marker = tmp_path / "marker"
    craft(checkpoints(run) / "step_00000004", "common.pt", marker)
    done = launch(str(bp), "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{checkpoints(run) / 'step_00000004' / 'common.pt'}: refused to load" in done.stdout
    assert not marker.exists()


# --- nothing is lost --------------------------------------------------------------------------------------


def test_truncated_checkpoint_and_dangling_latest_fall_back_to_the_newest_good_one(finished, tmp_path):
    run, bp = killed_copy(finished, tmp_path)
    shard = checkpoints(run) / "step_00000004" / "__0_0.distcp"
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    (checkpoints(run) / "latest").write_text("step_00000099\n")

    done = launch(str(bp), "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("keye: ")]
    assert len(lines) == 2, done.stdout
    assert "latest names 'step_00000099'" in lines[0] and "step_00000002 instead" in lines[0]
    assert str(shard) in lines[1] and "truncated" in lines[1] and "step_00000002 instead" in lines[1]
    assert json.loads((run / "summary.json").read_text())["stages"]["lm"]["resumed_from_step"] == 2
    same_weights(finished, run)


def test_resume_with_no_usable_checkpoint_is_an_error_not_a_restart(finished, tmp_path):
    run, bp = killed_copy(finished, tmp_path)
    for step in (2, 4):
        (checkpoints(run) / f"step_{step:08d}" / "common.pt").write_bytes(b"")
    line = error_line(launch(str(bp), "--resume"))
    assert f"--resume: no usable checkpoint in {checkpoints(run)}" in line
    assert "step_00000004/common.pt" in line and "step_00000002/common.pt" in line
    assert not (run / "lm" / "weights").exists()


def test_truncated_stage_weights_are_one_line_naming_the_file(finished, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(finished / "lm" / "weights", source / "weights")
    shard = source / "weights" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    bp = blueprint(tmp_path / "bp.yaml", tmp_path / "run", init_from=str(source))
    line = error_line(launch(str(bp)))
    assert str(shard) in line and "truncated" in line


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


def _limit_file_size(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


CHECK_AFTER = """
import json, sys
from pathlib import Path
from keye.parallel.checkpoint_folder import verify
root = Path(sys.argv[1])
verify(root / "step_00000002", require_manifest=True)
print(json.dumps({"left": sorted(p.name for p in root.iterdir()), "latest": (root / "latest").read_text().strip()}))
"""


@pytest.mark.parametrize("limit", ["tmpfs", "file_size"])
def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(finished, tmp_path, limit):
    """A resumed run (from step 2) whose step-4 checkpoint does not fit: on a real small tmpfs (a private
    mount namespace) or, where mounting is not allowed, under RLIMIT_FSIZE (writes fail with EFBIG)."""
    run, bp = killed_copy(finished, tmp_path)
    shutil.rmtree(checkpoints(run) / "step_00000004")
    (checkpoints(run) / "latest").write_text("step_00000002\n")
    if limit == "tmpfs":
        if not _can_mount_tmpfs():
            pytest.skip("cannot mount a tmpfs here (the file_size case covers the same path)")
        disk = tmp_path / "disk"
        disk.mkdir()
        bp = blueprint(tmp_path / "bp_disk.yaml", disk)
        used = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
        one = sum(p.stat().st_size for p in (checkpoints(run) / "step_00000002").iterdir())
        script = (f'mount -t tmpfs -o size={used + one // 2} tmpfs "$1" && cp -a "$2/." "$1/" && '
                  f'"$3" -m keye.launch.cli run "$4" --resume; echo "exit=$?" >&2; "$3" -c "$5" "$1/lm/checkpoints"')
        done = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(disk), str(run), sys.executable, str(bp),
                               CHECK_AFTER], env=ENV, capture_output=True, text=True, timeout=300)
        assert "exit=2" in done.stderr, done.stderr[-3000:]
        line, folder = one_error_line(done.stderr), disk / "lm" / "checkpoints" / "step_00000004"
        after = json.loads(done.stdout.strip().splitlines()[-1])
    else:
        done = launch(str(bp), "--resume", preexec=_limit_file_size(1 << 20))
        line, folder = error_line(done), checkpoints(run) / "step_00000004"
        after = json.loads(subprocess.run([sys.executable, "-c", CHECK_AFTER, str(checkpoints(run))], env=ENV,
                                          capture_output=True, text=True, check=True).stdout)
    assert f"{folder}: no space left on device" in line
    assert after == {"left": ["latest", "step_00000002"], "latest": "step_00000002"}
