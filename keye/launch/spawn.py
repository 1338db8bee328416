"""Start N local processes for ``keye-launch run --nproc N``, torchrun style, and stop them all together.

Each child is the same ``keye-launch`` command line with the torch.distributed environment set
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). A child sees RANK and does not spawn again,
which is also how a run started under ``torchrun`` (or a cluster launcher) uses the environment it is given.
If one child fails, the others are stopped and its exit code is returned.

Process hygiene. Ranks that outlive their launcher keep training and writing checkpoints, and a later
``--resume`` into the same folder races them, so the launcher never leaves one behind:

- SIGTERM, SIGINT and SIGHUP to the launcher (a scheduler, ``timeout``, Ctrl-C, a closed terminal) are
  forwarded to every rank; the launcher waits `GRACE_S` seconds for them, SIGKILLs what is left and exits
  with ``128 + signal`` (143 for SIGTERM), as a shell reports a process killed by that signal.
- Each rank runs in its own process group (its data-loader workers with it), so the forwarded signal
  reaches the whole rank, and a Ctrl-C in a terminal reaches only the launcher, which then stops the
  ranks in order rather than all processes at once.
- A launcher killed outright (SIGKILL, the OOM killer) runs no handler: on Linux each rank asks the kernel
  for SIGKILL when its parent dies (``prctl(PR_SET_DEATHSIG)``, set between fork and exec; the "parent"
  is the launcher's main thread, which is the one that spawns). Elsewhere there is no such guarantee.

User errors once. A `keye.errors.KeyeUserError` found after spawning (a missing data file) is usually hit
by every rank. Rank 0 prints it; ranks > 0 write theirs to a per-run folder (`ERRORS_ENV`) that the
launcher reads when the ranks have ended, printing each line rank 0 did not already print, once.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

DIST_ENV = ("RANK", "WORLD_SIZE")
#: set in the ranks this launcher starts: its pid (the launcher holds the output-directory lock for them)
LAUNCHER_ENV = "KEYE_LAUNCHER_PID"
#: set in the ranks this launcher starts: the folder their user errors go to (see the module docstring)
ERRORS_ENV = "KEYE_ERRORS_DIR"
#: signals forwarded to the ranks
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: seconds the ranks get to stop after a forwarded signal (or a failed peer) before SIGKILL
GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def under_launcher() -> bool:
    """True when torchrun, a cluster launcher or our own spawner already set up this process."""
    return all(name in os.environ for name in DIST_ENV)


def spawned_by_keye() -> bool:
    """True in a rank that `spawn_local` started (as opposed to torchrun or a cluster launcher)."""
    return LAUNCHER_ENV in os.environ


def spawn_local(nproc: int, argv: Sequence[str], pass_fds: Sequence[int] = ()) -> int:
    """Run ``keye-launch <argv>`` in ``nproc`` processes on this machine; return the first failure's code.

    ``pass_fds`` are inherited by every rank (the output-directory lock, so that it is held until the last
    rank has exited). A forwarded signal returns ``128 + signal``.
    """
    from keye.parallel.state import free_port

    port = free_port()
    errors = tempfile.mkdtemp(prefix="keye-errors-")
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in FORWARDED}
    children: list[subprocess.Popen] = []
    preexec = _die_with_parent()
    try:
        for rank in range(nproc):
            env = dict(os.environ)
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                **{LAUNCHER_ENV: str(os.getpid()), ERRORS_ENV: errors},
            )
            env.setdefault("OMP_NUM_THREADS", "1")
            children.append(subprocess.Popen(
                [sys.executable, "-m", "keye.launch.cli", *argv], env=env, process_group=0,
                preexec_fn=preexec, pass_fds=tuple(pass_fds),
            ))  # fmt: skip
        return _wait(children, received)
    finally:
        _stop(children, signal.SIGTERM, received)  # nothing left to stop after a normal end
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        print_rank_errors(Path(errors))
        shutil.rmtree(errors, ignore_errors=True)


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when the launcher dies (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: nothing to load in the child
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before the death signal was armed
            os._exit(128 + signal.SIGKILL)

    return preexec


def _exit_code(code: int) -> int:
    """A child's return code as a shell reports it: killed by signal N → 128 + N."""
    return 128 - code if code < 0 else code


def _wait(children: list[subprocess.Popen], received: list[int]) -> int:
    while True:
        if received:
            _stop(children, received[0], received)
            return 128 + received[0]
        codes = [child.poll() for child in children]
        failed = [code for code in codes if code not in (None, 0)]
        if failed:
            _stop(children, signal.SIGTERM, received)
            return _exit_code(failed[0])
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.05)


def _signal_group(child: subprocess.Popen, signum: int) -> None:
    """Send ``signum`` to the child's process group (the rank and its data-loader workers)."""
    try:
        os.killpg(child.pid, signum)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass


def _stop(children: list[subprocess.Popen], signum: int, received: list[int]) -> None:
    """Send ``signum`` to every live rank, wait up to `GRACE_S` (a second signal cuts it short), then SIGKILL."""
    live = [child for child in children if child.poll() is None]
    if not live:
        return
    for child in live:
        _signal_group(child, signum)
    signals_so_far = len(received)
    deadline = time.monotonic() + GRACE_S
    while any(child.poll() is None for child in live) and time.monotonic() < deadline:
        if len(received) > signals_so_far:  # asked again while waiting: stop waiting
            break
        time.sleep(0.05)
    for child in live:
        _signal_group(child, signal.SIGKILL)  # the rank if it is still there, and any worker it left behind
        child.wait()


def report_user_error(line: str) -> None:
    """Print ``line`` (a user error) to stderr, or, in a rank > 0 that `spawn_local` started, leave it to the
    launcher, which prints it unless rank 0 printed the same line (see the module docstring)."""
    folder, rank = os.environ.get(ERRORS_ENV), os.environ.get("RANK", "0")
    if folder and Path(folder).is_dir():
        try:
            with open(Path(folder) / f"rank{int(rank):05d}.txt", "a") as out:
                out.write(line + "\n")
            if rank != "0":
                return
        except (OSError, ValueError):
            pass
    print(line, file=sys.stderr, flush=True)


def print_rank_errors(folder: Path) -> None:
    """Print the user errors ranks > 0 left in ``folder``, each distinct line once, none rank 0 printed."""
    printed: set[str] = set()
    for path in sorted(folder.glob("rank*.txt")):  # rank00000.txt first: what rank 0 printed itself
        lines = path.read_text().splitlines()
        if path.name != "rank00000.txt":
            for line in lines:
                if line not in printed:
                    print(line, file=sys.stderr, flush=True)
        printed.update(lines)
