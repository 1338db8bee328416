"""Megatron-Core initialisation for keye, on one CPU or a GPU cluster.

``init_parallel`` starts torch.distributed and Megatron's tensor/pipeline/data-parallel groups and, on
a machine without CUDA, installs ``cpu_bridge`` (the only place that patches Megatron's CUDA
assumptions). Megatron itself is imported lazily, inside the functions.
"""

from keye.parallel.state import (
    ParallelContext,
    check_layout,
    current_context,
    destroy_parallel,
    init_parallel,
    resolve_backend,
)

__all__ = [
    "ParallelContext",
    "check_layout",
    "current_context",
    "destroy_parallel",
    "init_parallel",
    "resolve_backend",
]
