"""``init_parallel`` in real processes: layout errors, ranks and sizes, the CPU backend and bridge.

Also the harness the parallel tests stand on: ``run_distributed`` must surface a failing rank's
traceback instead of hanging the session.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pytest
import torch

from keye.parallel import check_layout, init_parallel, resolve_backend
from keye.testing.distributed import DistributedError, run_distributed

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")


def test_layout_error_names_the_numbers() -> None:
    message = r"world size 6 is not divisible by tensor \(4\) x pipeline \(1\) = 4"
    with pytest.raises(ValueError, match=message):
        check_layout(6, tensor=4, pipeline=1)
    assert check_layout(8, tensor=2, pipeline=2) == 2  # data parallel is what remains


def test_init_parallel_rejects_a_layout_bigger_than_the_world(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lone process is world 1: it cannot hold tensor x pipeline = 2 (raised before anything starts)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by tensor \(1\) x pipeline \(2\)"):
        init_parallel(pipeline=2)


@no_cuda
def test_backend_on_cpu_is_gloo() -> None:
    assert resolve_backend("auto") == "gloo"
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend("nccl")
    with pytest.raises(ValueError, match="unknown backend 'mpi'"):
        resolve_backend("mpi")


def _contexts_in_three_layouts() -> dict[str, Any]:
    """On each of 2 ranks: the context for TP=2, then PP=2, then DP=2 (one process group throughout)."""
    from megatron.core import parallel_state as mpu

    from keye.parallel.cpu_bridge import is_installed

    contexts = {}
    for name, layout in {"tp": {"tensor": 2}, "pp": {"pipeline": 2}, "dp": {}}.items():
        ctx = init_parallel(**layout)
        contexts[name] = {**asdict(ctx), "device": str(ctx.device), "kwargs": ctx.model_parallel_kwargs()}
        if name == "tp":
            try:
                init_parallel(pipeline=2)
            except ValueError as error:
                contexts["relayout_error"] = str(error)
        mpu.destroy_model_parallel()
    contexts["bridge_installed"] = is_installed()
    return contexts


@no_cuda
def test_two_processes_get_their_ranks_and_sizes() -> None:
    ranks = run_distributed(_contexts_in_three_layouts, 2, timeout=120)

    for rank, contexts in enumerate(ranks):
        tp, pp, dp = contexts["tp"], contexts["pp"], contexts["dp"]
        for ctx in (tp, pp, dp):
            assert (ctx["rank"], ctx["world_size"], ctx["backend"], ctx["device"]) == (rank, 2, "gloo", "cpu")
            assert ctx["kwargs"]["batch_p2p_comm"] is False  # batched p2p is silently wrong on gloo
            assert ctx["kwargs"]["use_cpu_initialization"] is True
        assert (tp["tp_size"], tp["tp_rank"], tp["pp_size"], tp["dp_size"]) == (2, rank, 1, 1)
        assert (pp["pp_size"], pp["pp_rank"], pp["tp_size"], pp["dp_size"]) == (2, rank, 1, 1)
        assert (dp["dp_size"], dp["dp_rank"], dp["tp_size"], dp["pp_size"]) == (2, rank, 1, 1)
        assert "already runs with tensor x pipeline = 2 x 1, not 1 x 2" in contexts["relayout_error"]
        assert contexts["bridge_installed"]


def _init_too_big_layout() -> None:
    init_parallel(tensor=4)


def test_bad_layout_in_real_processes_reports_the_rank_traceback() -> None:
    with pytest.raises(DistributedError, match=r"(?s)rank \d.*world size 2 is not divisible by tensor \(4\)"):
        run_distributed(_init_too_big_layout, 2, timeout=60)


def _rank_one_fails_while_rank_zero_waits() -> None:
    torch.distributed.init_process_group("gloo")
    if torch.distributed.get_rank() == 1:
        raise RuntimeError("rank one gives up")
    torch.distributed.barrier()  # never completes: rank 1 is gone


def test_a_failing_rank_stops_the_run_instead_of_hanging() -> None:
    with pytest.raises(DistributedError, match=r"(?s)--- rank 1 ---.*rank one gives up"):
        run_distributed(_rank_one_fails_while_rank_zero_waits, 2, timeout=60)
