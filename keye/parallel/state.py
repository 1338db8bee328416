"""Start (and stop) torch.distributed and Megatron-Core's model-parallel groups, on CPU or GPU.

``init_parallel(tensor=2, pipeline=2)`` is the one call a keye process makes before building a model:

1. read the torch.distributed environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
   ``MASTER_PORT``, as torchrun and ``keye.testing.distributed`` set it); a lone process with none of
   it becomes world 1 on a free local port;
2. check the layout: the world must divide by tensor x pipeline; data parallel is what remains;
3. pick the backend: nccl with CUDA, gloo without ("auto"); on CPU install the CUDA bridge
   (``keye.parallel.cpu_bridge``);
4. ``torch.distributed.init_process_group`` (unless already done), Megatron's
   ``initialize_model_parallel`` and ``model_parallel_cuda_manual_seed``.

It returns a ``ParallelContext``: sizes, ranks, device, backend, and the Megatron config keywords
that must follow the layout (``model_parallel_kwargs``). One of them is not optional on CPU:
``batch_p2p_comm=True`` (Megatron's default) gives silently wrong pipeline results with gloo.

Plain ints in, not a blueprint section: the blueprint schema lives in ``keye.config`` and passes its
numbers here, so this module can be used (and tested) without any config machinery.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

_BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in the (tensor, pipeline, data) layout, and on which device."""

    rank: int
    world_size: int
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int
    vpp_size: int | None
    device: torch.device
    backend: str
    sequence_parallel: bool = False  # Megatron's sequence parallelism in the LLM (parallel.sequence_parallel)

    @property
    def is_first_stage(self) -> bool:
        """This rank holds the first pipeline stage (embeddings, inputs)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """This rank holds the last pipeline stage (output layer, loss)."""
        return self.pp_rank == self.pp_size - 1

    def p2p_kwargs(self) -> dict[str, Any]:
        """Pipeline send/recv settings: batched p2p is wrong with gloo (results silently differ)."""
        return {"batch_p2p_comm": self.backend != "gloo"}

    def model_parallel_kwargs(self, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """Keywords for Megatron's ``ModelParallelConfig``/``TransformerConfig`` that follow the layout.

        ``dtype`` is what flows between pipeline stages. On CPU the weights are drawn on the CPU and
        split (``use_cpu_initialization``), which also makes them identical for any TP size.
        """
        return {
            "tensor_model_parallel_size": self.tp_size,
            "pipeline_model_parallel_size": self.pp_size,
            "virtual_pipeline_model_parallel_size": self.vpp_size,
            "pipeline_dtype": dtype,
            "use_cpu_initialization": self.device.type == "cpu",
            "sequence_parallel": self.sequence_parallel,
            **self.p2p_kwargs(),
        }


def check_layout(world_size: int, tensor: int, pipeline: int) -> int:
    """The data-parallel size for this layout; ValueError if the world cannot hold it."""
    if tensor < 1 or pipeline < 1:
        raise ValueError(f"tensor ({tensor}) and pipeline ({pipeline}) parallel sizes must be >= 1")
    if world_size % (tensor * pipeline) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor ({tensor}) x pipeline ({pipeline})"
            f" = {tensor * pipeline}"
        )
    return world_size // (tensor * pipeline)


def resolve_backend(backend: str = "auto") -> str:
    """'auto' → nccl with CUDA, gloo without; nccl without CUDA is an error."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(_BACKENDS)}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA, which this machine does not have; use 'gloo'")
    return backend


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _process_env() -> tuple[int, int, int, str]:
    """(rank, world_size, local_rank, init_method) from the environment, or a lone local process."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, 0, f"tcp://127.0.0.1:{free_port()}"
    if "RANK" not in os.environ:
        raise ValueError("WORLD_SIZE is set but RANK is not: set both (torchrun does), or neither")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return rank, int(os.environ["WORLD_SIZE"]), local_rank, "env://"


def _device(backend: str, local_rank: int) -> torch.device:
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _start_process_group(backend: str, rank: int, world_size: int, init_method: str) -> None:
    if dist.is_initialized():
        if dist.get_world_size() != world_size:
            raise ValueError(
                f"torch.distributed already runs with world size {dist.get_world_size()}, not {world_size}"
            )
        return
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timedelta(minutes=10)
    )


def _start_model_parallel(tensor: int, pipeline: int, virtual_pipeline: int | None) -> None:
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        running = (mpu.get_tensor_model_parallel_world_size(), mpu.get_pipeline_model_parallel_world_size())
        if running != (tensor, pipeline):
            raise ValueError(
                f"Megatron model parallel already runs with tensor x pipeline = {running[0]} x {running[1]},"
                f" not {tensor} x {pipeline}; call destroy_parallel() first"
            )
        return
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
    )


def seed_random_streams(seed: int) -> None:
    """Seed torch's CPU generator and Megatron's tracked model-parallel streams, as a fresh process has them.

    ``init_parallel`` calls it once; the stage runner calls it again before every stage, so a stage builds its
    fresh modules from the same streams whether it follows other stages in one process or starts a process
    of its own (``--resume`` after the earlier stages finished, ``--stage NAME``).
    """
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)  # CPU default generator: CPU-initialised weights, and dropout on CPU
    model_parallel_cuda_manual_seed(seed)  # Megatron's tracked states (per-TP-rank streams)


def _quiet_megatron_imports() -> None:
    """Megatron warns at import on every rank that apex / Transformer Engine are absent and that it falls back
    to its local implementations. On CPU that is the expected set-up, not news: keep the log readable."""
    for pattern in (r".*Apex is not installed.*", r".*Transformer Engine and Apex are not installed.*",
                    r".*full scope is deprecated.*", r".*CUDA_DEVICE_MAX_CONNECTIONS.*"):
        warnings.filterwarnings("ignore", message=pattern)


def init_parallel(
    tensor: int = 1,
    pipeline: int = 1,
    backend: str = "auto",
    seed: int = 1234,
    virtual_pipeline: int | None = None,
    sequence_parallel: bool = False,
) -> ParallelContext:
    """Start torch.distributed and Megatron's tensor/pipeline/data-parallel groups in this process.
    ``sequence_parallel`` only travels in the returned context (``model_parallel_kwargs``)."""
    _quiet_megatron_imports()
    rank, world_size, local_rank, init_method = _process_env()
    check_layout(world_size, tensor, pipeline)
    if virtual_pipeline is not None and pipeline < 2:
        raise ValueError(f"virtual pipeline ({virtual_pipeline}) needs pipeline >= 2, got {pipeline}")
    backend = resolve_backend(backend)
    if not torch.cuda.is_available():
        from keye.parallel.cpu_bridge import install_cpu_bridge

        install_cpu_bridge()
    device = _device(backend, local_rank)
    _start_process_group(backend, rank, world_size, init_method)
    _start_model_parallel(tensor, pipeline, virtual_pipeline)
    seed_random_streams(seed)
    context = current_context(backend=backend, device=device, virtual_pipeline=virtual_pipeline)
    return replace(context, sequence_parallel=sequence_parallel)


def current_context(
    backend: str | None = None, device: torch.device | None = None, virtual_pipeline: int | None = None
) -> ParallelContext:
    """The ``ParallelContext`` of this process (after ``init_parallel``)."""
    from megatron.core import parallel_state as mpu

    backend = backend or dist.get_backend()
    if device is None:
        on_gpu = backend == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_size=mpu.get_tensor_model_parallel_world_size(),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_size=mpu.get_pipeline_model_parallel_world_size(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_size=mpu.get_data_parallel_world_size(),
        dp_rank=mpu.get_data_parallel_rank(),
        vpp_size=virtual_pipeline or mpu.get_virtual_pipeline_model_parallel_world_size(),
        device=device,
        backend=backend,
    )


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the torch.distributed process group (safe to call twice)."""
    from megatron.core import parallel_state as mpu

    mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
