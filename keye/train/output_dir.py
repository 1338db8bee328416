"""One run per output directory: a lock keeps a second run out of a live one, and a finished run's outputs
are never reused silently.

Two runs writing one ``run.output_dir`` interleave their ``metrics.jsonl`` lines and overwrite each other's
checkpoints, and a fresh run into an old run's folder would append to its metrics and plots. So
``keye-launch run`` claims the folder before anything starts (`claim_output_dir`):

- **The lock** is ``<output_dir>/.keye-run.lock``, held with ``fcntl.flock`` on an open descriptor for the
  run's lifetime by the process that claims it (the launcher for ``--nproc N``, which passes the descriptor to
  its ranks, so the lock lasts until the last rank has exited; rank 0 under torchrun). The kernel drops a
  flock when its last holder dies, so a run killed by any means leaves no stale lock behind; the file itself
  stays and only records the pid of the holder, which a refused run names.
- **A used folder** is one that already holds what this run would write: for a whole run ``metrics.jsonl``,
  ``summary.json``, ``report.md``, ``plots/`` or a folder of one of its stages; for ``--stage NAME`` that
  stage's folder (running the stages of one run one at a time into one folder is the point of ``--stage``).
  A fresh run refuses a used folder unless told ``--resume`` (continue it) or ``--overwrite`` (remove exactly
  those outputs first; other files in the folder are left alone, so a mistyped ``output_dir: .`` costs
  nothing but the run's own files).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

from keye.errors import KeyeUserError
from keye.train.metrics import METRICS_NAME, drop_stage_lines

logger = logging.getLogger("keye.train")

LOCK_NAME = ".keye-run.lock"
#: what a whole run writes beside its stage folders
RUN_OUTPUTS = (METRICS_NAME, "summary.json", "report.md", "plots")


class OutputDirError(KeyeUserError):
    """``run.output_dir`` is in use by a live run, or holds a finished run's outputs."""


class OutputDirLock:
    """The held lock of one output directory; released when the descriptor is closed or the process ends."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path = fd, path

    def fileno(self) -> int:
        return self.fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def lock_output_dir(output_dir: Path) -> OutputDirLock:
    """Take the folder's lock (creating the folder) or raise `OutputDirError` naming the pid that holds it."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(output_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OutputDirError(f"run.output_dir {output_dir}: cannot create it or its lock file: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OutputDirError(
            f"run.output_dir {output_dir} is in use by a live run (pid {holder}); wait for it to end, "
            "stop it, or set another run.output_dir"
        ) from None
    except OSError as e:  # a file system without locks (ENOLCK): refusing would make it unusable
        logger.warning("run.output_dir %s: cannot lock it (%s); nothing keeps a second run out", output_dir, e)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return OutputDirLock(fd, output_dir / LOCK_NAME)


def previous_outputs(output_dir: Path, stages: Sequence[str], whole_run: bool) -> list[Path]:
    """What an earlier run left in ``output_dir`` that this one would write (see the module docstring)."""
    output_dir = Path(output_dir)
    names = [*(RUN_OUTPUTS if whole_run else ()), *stages]
    return [output_dir / name for name in names if (output_dir / name).exists()]


def clear_outputs(output_dir: Path, stages: Sequence[str], whole_run: bool) -> None:
    """Remove what `previous_outputs` names; for one stage, also its lines in ``metrics.jsonl``."""
    for path in previous_outputs(output_dir, stages, whole_run):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if not whole_run:
        for stage in stages:
            drop_stage_lines(Path(output_dir) / METRICS_NAME, stage)


def claim_output_dir(
    output_dir: Path,
    stages: Sequence[str],
    *,
    whole_run: bool,
    resume: bool = False,
    overwrite: bool = False,
    leader: bool = True,
) -> OutputDirLock | None:
    """Lock ``output_dir`` and check that this run may write it; returns the held lock (None if not ``leader``).

    ``stages`` are the names of the stages this run will run; ``whole_run`` is False for ``--stage NAME``.
    Only the ``leader`` (the launcher, or rank 0 of a foreign launcher) locks and clears; other ranks of a
    foreign launcher only check, so every rank refuses alike.
    """
    if resume and overwrite:
        raise OutputDirError("--resume and --overwrite contradict each other: choose one")
    lock = lock_output_dir(output_dir) if leader else None
    try:
        if overwrite:
            if leader:
                clear_outputs(output_dir, stages, whole_run)
        elif not resume:
            used = previous_outputs(output_dir, stages, whole_run)
            if used:
                listed = ", ".join(path.name + ("/" if path.is_dir() else "") for path in used[:4])
                more = f" and {len(used) - 4} more" if len(used) > 4 else ""
                raise OutputDirError(
                    f"run.output_dir {output_dir} already holds a run ({listed}{more}); "
                    "add --resume to continue it or --overwrite to start it over"
                )
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock
