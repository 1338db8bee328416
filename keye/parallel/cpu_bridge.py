"""Run Megatron-Core on a CPU-only machine: the one place that bridges its CUDA assumptions.

Megatron-Core 0.16 works with the gloo backend on CPU (TP, PP, DP, DDP, finalize_model_grads, the
optimizer) except for a handful of spots that assume a GPU. This module bridges exactly those, each
with a comment naming what Megatron assumed. Nothing else in keye patches torch or Megatron.

``install_cpu_bridge()`` is idempotent and does nothing when CUDA is available. It patches the process
it runs in (it is meant for worker processes: ``init_parallel`` calls it), so never call it in a
process that must keep stock torch behaviour.

Why targeted patches and not a ``TorchFunctionMode`` that rewrites every cuda call: a catch-all mode
was about 1.5x slower and is not active inside autograd backward (activation recompute still crashed).

The bridges, with every name they replace (this is the whole list of keye's process-wide patches):

* RNG: ``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()`` (every attention
  forward, recompute) keep CUDA generator states. Here the tracker keeps CPU generator states and
  forks the CPU default generator, so dropout inside ``fork()`` draws from the tracked stream as on GPU
  (``megatron.core.tensor_parallel.random``: ``CudaRNGStatesTracker``, ``_get_cuda_rng_state``,
  ``_set_cuda_rng_state``).
* ``torch.cuda.current_device()`` answers the CPU device (buffers for gathers, p2p, DDP, rotary).
* ``device="cuda"`` hard-coded in a few modules (causal mask helpers, ``total_num_tokens`` in the
  pipeline schedules, the grad-norm helper, grad scaler, optimizer scalars): inside those modules
  only (``_CUDA_FACTORY_MODULES``: their ``torch`` name), tensor factories map a cuda device to the CPU.
* ``tensor.type()`` compared with ``'torch.cuda.FloatTensor'`` (clip-grad assert, optimizer wrappers):
  while those functions run (``clip_grad_by_total_norm_fp32`` in ``clip_grads`` and ``optimizer``; the
  constructors of ``Float16OptimizerWithFloat16Params`` and ``DistributedOptimizer``, and the latter's
  ``_build_model_and_main_param_groups``), ``torch.Tensor.type`` reports the CUDA type name of a CPU dtype.
* ``torch.Tensor.cuda()`` (tied embeddings under PP, CLIP ViT) returns the tensor itself.
* ``torch.cuda.synchronize()`` (p2p, DDP) is a no-op.

One more, at import time rather than in ``install_cpu_bridge``: without CUDA, Megatron's ``torch.compile``
fuser is switched off with its own ``megatron.core.jit.disable_jit_fuser()`` as ``megatron.core.jit`` is first
imported (`keye.megatron_jit`, installed by ``import keye``): it saves ~2 s of TorchDynamo set-up per process.

Elsewhere keye changes nothing process-wide in torch or Megatron (``tests/model/test_backend.py`` scans for
it): ``keye.quiet`` only adds warning filters for exact texts, and keye's CPU fast paths
(`keye.model.gpt_layers`) switch the class of individual built modules, never a library class.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from typing import Any, Callable, Iterator

import torch

_installed = False

# Modules that create tensors with a hard-coded device="cuda" on paths keye runs.
_CUDA_FACTORY_MODULES = (
    "megatron.core.transformer.utils",  # get_default_causal_mask / sliding-window mask (fused_softmax)
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens
    "megatron.core.utils",  # local_multi_tensor_l2_norm: the grad-norm helper without apex
    "megatron.core.optimizer.clip_grads",  # grad norm, clip and count-zeros buffers
    "megatron.core.optimizer.optimizer",  # found_inf, loss-scale scalars
    "megatron.core.optimizer.grad_scaler",  # loss scale tensors (fp16)
    "megatron.core.tensor_parallel.data",  # broadcast_data sizes
)
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange")

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def install_cpu_bridge() -> bool:
    """Bridge Megatron-Core's CUDA assumptions in this process; True if the bridge is (now) active."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    _bridge_torch_cuda()
    _bridge_rng()
    _bridge_cuda_factories()
    _bridge_cuda_type_checks()
    _installed = True
    return True


def is_installed() -> bool:
    """Whether ``install_cpu_bridge`` has patched this process."""
    return _installed


# --- torch.cuda entry points -------------------------------------------------------------------


def _bridge_torch_cuda() -> None:
    # Megatron assumed torch.cuda.current_device() names the device to allocate buffers on.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # Megatron assumed torch.cuda.synchronize() exists (p2p communication, DDP buffers).
    torch.cuda.synchronize = lambda device=None: None
    # Megatron assumed .cuda() moves a tensor to the GPU (tied embeddings under PP, CLIP ViT).
    torch.Tensor.cuda = lambda self, device=None, non_blocking=False, **kwargs: self


# --- RNG -----------------------------------------------------------------------------------------


def _bridge_rng() -> None:
    from megatron.core.tensor_parallel import random

    class CpuRNGStatesTracker(random.CudaRNGStatesTracker):
        """Megatron's RNG-states tracker keeping CPU generator states (CPU stands in for the GPU)."""

        def add(self, name: str, seed: int) -> None:
            # Megatron assumed torch.cuda.manual_seed/get_rng_state to create a named state.
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            """Megatron's fork on the CPU default generator, without its 'CPU RNG changed' warning
            (here the forked generator *is* the CPU one, so draws inside the fork change it)."""
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state, outer_name = torch.get_rng_state(), self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    # Megatron assumed the tracker it instantiates can hold CUDA generator states.
    random.CudaRNGStatesTracker = CpuRNGStatesTracker
    # Megatron assumed a CUDA default generator (recompute saves/restores it with these helpers).
    random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    random.initialize_rng_tracker(force_reset=True)  # drop a tracker made before the bridge


# --- device="cuda" in tensor factories -----------------------------------------------------------


def _on_cpu(device: Any) -> Any:
    """The CPU device in place of a cuda one (a str, torch.device or CUDA index); others unchanged."""
    if isinstance(device, int) or (device is not None and torch.device(device).type == "cuda"):
        return torch.device("cpu")
    return device


def _cpu_factory(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def make(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        return factory(*args, **kwargs)

    return make


class _TorchWithCpuFactories(types.ModuleType):
    """Stands in for ``torch`` inside one Megatron module: everything is torch's, except that tensor
    factories given a cuda device make the tensor on the CPU. Only calls that would fail change."""

    def __init__(self) -> None:
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _bridge_cuda_factories() -> None:
    cpu_torch = _TorchWithCpuFactories()
    for module_name in _CUDA_FACTORY_MODULES:
        # Megatron assumed device="cuda" exists in these modules' tensor factories.
        importlib.import_module(module_name).torch = cpu_torch


# --- tensor.type() == 'torch.cuda.FloatTensor' ---------------------------------------------------


@contextlib.contextmanager
def cuda_type_names() -> Iterator[None]:
    """Within the block, ``t.type()`` on a CPU float tensor answers ``'torch.cuda.<Dtype>Tensor'``."""
    stock_type = torch.Tensor.type

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return stock_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = stock_type


def _with_cuda_type_names(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with cuda_type_names():
            return fn(*args, **kwargs)

    return wrapped


def _wrap_method(cls: type, name: str) -> None:
    method = cls.__dict__[name]
    if isinstance(method, classmethod):
        setattr(cls, name, classmethod(_with_cuda_type_names(method.__func__)))
    else:
        setattr(cls, name, _with_cuda_type_names(method))


def _bridge_cuda_type_checks() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    # Megatron assumed grads are 'torch.cuda.FloatTensor' (an assert in clip_grad_by_total_norm_fp32).
    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clip
    optimizer.clip_grad_by_total_norm_fp32 = clip
    # Megatron assumed params are torch.cuda.{Float,Half,BFloat16}Tensor when wrapping them for the
    # mixed-precision and distributed optimizers (anything else is a TypeError).
    _wrap_method(optimizer.Float16OptimizerWithFloat16Params, "__init__")
    _wrap_method(distrib_optimizer.DistributedOptimizer, "__init__")
    _wrap_method(distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups")
