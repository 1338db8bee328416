"""Run a function in N real processes, as torchrun would, and collect what each rank returns.

Tests of tensor and pipeline parallelism must use real processes (the design forbids faking them),
and they must never hang a test session. ``run_distributed(fn, nprocs, *args)``:

* starts ``nprocs`` processes with the ``spawn`` start method (fresh interpreters: no state leaks
  from the test process, and bridges such as ``keye.parallel.cpu_bridge`` stay out of it);
* gives each the torch.distributed environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``) and one thread (``OMP_NUM_THREADS=1``);
* returns ``[fn(*args, **kwargs) on rank 0, on rank 1, ...]`` (values travel as pickle files);
* if a rank raises, dies or the whole run outlives ``timeout`` seconds, kills every rank still
  running and raises ``DistributedError`` with the failing rank's traceback.

``fn`` must be picklable: a top-level function of an importable module (a test module is fine).
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from keye.parallel.state import free_port


class DistributedError(RuntimeError):
    """A rank failed, died or timed out in ``run_distributed``."""


def _rank_env(rank: int, nprocs: int, port: int) -> dict[str, str]:
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(nprocs),
        "LOCAL_WORLD_SIZE": str(nprocs),
        "OMP_NUM_THREADS": "1",
    }


def _write(path: Path, payload: tuple[str, Any]) -> None:
    """Write atomically, so the parent never reads half a file."""
    partial = path.with_suffix(".partial")
    partial.write_bytes(pickle.dumps(payload))
    partial.rename(path)


def _run_rank(
    rank: int, env: dict[str, str], out: Path, fn: Callable[..., Any], args: tuple, kwargs: dict
) -> None:
    """Entry point of one spawned rank: run ``fn`` and leave ('ok', value) or ('error', traceback)."""
    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        value = fn(*args, **kwargs)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        _write(out, ("ok", value))
    except BaseException:  # noqa: BLE001 - everything is reported to the parent
        _write(out, ("error", traceback.format_exc()))
        sys.stderr.flush()
        os._exit(1)  # at once: a normal exit can wait forever on peers stuck in a collective


def _stop(procs: list[Any]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join()


def _tracebacks(outs: list[Path]) -> str:
    """The tracebacks ranks left behind, earliest first (the first one is usually the cause)."""
    reports = []
    for rank, out in enumerate(outs):
        if out.exists():
            status, value = pickle.loads(out.read_bytes())
            if status == "error":
                reports.append((out.stat().st_mtime, f"--- rank {rank} ---\n{value}"))
    return "".join(f"\n{text}" for _, text in sorted(reports))


def run_distributed(
    fn: Callable[..., Any], nprocs: int, *args: Any, timeout: float = 300, **kwargs: Any
) -> list:
    """``fn(*args, **kwargs)`` on ``nprocs`` gloo-ready ranks; the list of their return values."""
    context = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="keye-dist-") as tmp:
        outs = [Path(tmp) / f"rank{rank}.pkl" for rank in range(nprocs)]
        procs = [
            context.Process(
                target=_run_rank,
                args=(rank, _rank_env(rank, nprocs, port), outs[rank], fn, args, kwargs),
                name=f"keye-rank{rank}",
            )
            for rank in range(nprocs)
        ]
        for proc in procs:
            proc.start()
        try:
            problem = _wait_all(procs, outs, timeout)
        finally:
            _stop(procs)
        if problem:
            name = getattr(fn, "__qualname__", fn)
            raise DistributedError(f"{name} on {nprocs} ranks: {problem}{_tracebacks(outs)}")
        return [pickle.loads(out.read_bytes())[1] for out in outs]


def _wait_all(procs: list[Any], outs: list[Path], timeout: float) -> str | None:
    """Wait until every rank exited cleanly (None), or say what went wrong first (then stop waiting)."""
    deadline = time.monotonic() + timeout
    running = dict(enumerate(procs))
    while running:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"ranks {sorted(running)} still running after {timeout:g} s; killed all"
        ready = wait([proc.sentinel for proc in running.values()], timeout=left)
        for rank, proc in list(running.items()):
            if proc.sentinel not in ready:
                continue
            proc.join()
            del running[rank]
            if proc.exitcode != 0 or not outs[rank].exists():
                return f"rank {rank} exited with code {proc.exitcode}; killed all"
    return None
