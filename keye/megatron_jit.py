"""Megatron-Core's ``torch.compile`` fuser stays off on machines without CUDA.

Importing ``megatron.core`` decorates about forty fused kernels (bias-GeLU, bias-SwiGLU, rotary, ...) with
``megatron.core.jit.jit_fuser``, which is ``torch.compile``. Each decoration imports and sets up TorchDynamo:
about 1.5–3 s of CPU time in *every* process that imports Megatron, which on a CPU machine is most of what
a tiny run or a test process costs. keye's CPU path calls none of those kernels (its SwiGLU and norms are
its own, `keye.model.gpt_layers`), and where one would run, eager torch computes the same formula.

So, on a machine without CUDA, right after ``megatron.core.jit`` is first imported, keye calls Megatron's
own ``disable_jit_fuser()`` (its documented switch: the decorator becomes a no-op) before any fused module
is decorated. With CUDA nothing changes. ``KEYE_MEGATRON_JIT=1`` keeps the fuser on everywhere.

This is the one process-wide change keye makes at import time; `keye.parallel.cpu_bridge`'s docstring
lists it with the bridges. It is installed by ``import keye`` (an import hook on ``megatron.core.jit``
only; no torch or Megatron import happens here), so it takes effect in every keye process, rank workers
and pytest included, as long as keye is imported before Megatron.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

MODULE = "megatron.core.jit"


class _DisableFuserOnCpu(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core.jit`` as the normal path finder would and turns its fuser off once executed."""

    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            import torch

            if not torch.cuda.is_available():
                module.disable_jit_fuser()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Idempotent; a no-op when ``megatron.core.jit`` is already imported or ``KEYE_MEGATRON_JIT=1``."""
    if os.environ.get("KEYE_MEGATRON_JIT") == "1" or MODULE in sys.modules:
        return
    if not any(isinstance(finder, _DisableFuserOnCpu) for finder in sys.meta_path):
        sys.meta_path.insert(0, _DisableFuserOnCpu())
