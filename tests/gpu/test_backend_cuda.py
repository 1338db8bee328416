"""The CUDA and Transformer Engine side of ``keye.model.backend``: which layers a GPU run builds.

Runs only on a GPU machine (each test says why it skips elsewhere); the CPU side is
``tests/model/test_backend.py``. On CUDA the CPU fast paths stay off and qwen3 is Megatron's plain modules;
with Transformer Engine installed, ``auto`` picks TE's layers, and FP8 must match the layers it runs on.
"""

from __future__ import annotations

import os

import pytest
import torch

from keye.model.backend import transformer_engine_usable
from keye.testing.distributed import run_distributed

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
needs_te = pytest.mark.skipif(not transformer_engine_usable(),
                              reason="needs Transformer Engine with CUDA (pip install -e '.[gpu]' on a GPU machine)")


def _qwen3_on_cuda(impl: str) -> dict:
    os.environ["KEYE_TRANSFORMER_IMPL"] = impl
    from keye.model.backend import cpu_fast_paths, resolve_transformer_impl
    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel
    from keye.plugins import get_registry

    ctx = init_parallel(seed=3)
    qwen3 = get_registry().cls("language_model", "qwen3")
    lm = qwen3(qwen3.Config(size="tiny", **qwen3.SIZES["tiny"]), BuildContext(ctx)).cuda()
    ids = torch.randint(0, 1024, (2, 16), device="cuda")
    positions = torch.arange(16, device="cuda").expand(3, 2, 16)
    with torch.no_grad():
        logits = lm(ids, positions, None)
    return {
        "impl": resolve_transformer_impl(),
        "fast": cpu_fast_paths(resolve_transformer_impl(), torch.float32),
        "backend": (lm.backend.impl, lm.backend.fast),
        "classes": sorted({type(m).__name__ for m in lm.gpt.modules()}),
        "finite": bool(torch.isfinite(logits).all()),
    }


@needs_cuda
def test_on_cuda_the_plain_megatron_modules_run():
    [result] = run_distributed(_qwen3_on_cuda, 1, "local")
    assert result["impl"] == "local" and result["fast"] is False and result["backend"] == ("local", False)
    assert {"MLP", "ColumnParallelLinear", "TransformerLayer"} <= set(result["classes"])
    keye_fast = {"SwiGLUMLP", "KeyeRMSNorm", "OneDnnColumnParallelLinear", "LossRowsTransformerLayer"}
    assert keye_fast.isdisjoint(result["classes"]) and result["finite"]


@needs_te
def test_auto_picks_transformer_engine_layers_and_fp8_must_match_them():
    from keye.config.schema import FP8Config
    from keye.errors import KeyeUserError
    from keye.model.backend import choose_backend

    [result] = run_distributed(_qwen3_on_cuda, 1, "auto")
    assert result["impl"] == "transformer_engine" and result["backend"] == ("transformer_engine", False)
    assert any(name.startswith("TE") for name in result["classes"]) and result["finite"]
    with pytest.raises(KeyeUserError, match="runs on Transformer Engine layers, but transformer_impl is local"):
        choose_backend(torch.float32, FP8Config(enabled=True, backend="te"), "local")
    with pytest.raises(KeyeUserError, match="replaces Megatron's local linears"):
        choose_backend(torch.float32, FP8Config(enabled=True, backend="torch"), "transformer_engine")
