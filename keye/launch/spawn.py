"""Start N local processes for ``keye-launch run --nproc N``, torchrun style.

Each child is the same ``keye-launch`` command line with the torch.distributed environment set
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). A child sees RANK and does not spawn again,
which is also how a run started under ``torchrun`` (or a cluster launcher) uses the environment it is given.
If one child fails, the others are stopped and its exit code is returned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Sequence

from keye.parallel.state import free_port

DIST_ENV = ("RANK", "WORLD_SIZE")


def under_launcher() -> bool:
    """True when torchrun, a cluster launcher or our own spawner already set up this process."""
    return all(name in os.environ for name in DIST_ENV)


def spawn_local(nproc: int, argv: Sequence[str]) -> int:
    """Run ``keye-launch <argv>`` in ``nproc`` processes on this machine; return the first failure's code."""
    port = free_port()
    children: list[subprocess.Popen] = []
    for rank in range(nproc):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        env.setdefault("OMP_NUM_THREADS", "1")
        children.append(subprocess.Popen([sys.executable, "-m", "keye.launch.cli", *argv], env=env))
    try:
        return _wait(children)
    except KeyboardInterrupt:
        _stop(children)
        return 130


def _wait(children: list[subprocess.Popen]) -> int:
    while True:
        codes = [child.poll() for child in children]
        failed = [code for code in codes if code not in (None, 0)]
        if failed:
            _stop(children)
            return failed[0]
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.05)


def _stop(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
