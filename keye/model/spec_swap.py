"""Swap module classes inside a Megatron ``ModuleSpec`` tree.

Why: keye's CPU fast paths (``keye.model.onednn_linear``), its scaled-FP8 linears (``keye.model.fp8_linear``)
and its SDPA attention are subclasses of Megatron's local modules with the same parameters; a layer spec
gets them by replacing classes in a copy of Megatron's own spec, so the rest of the spec (and the state
dict it builds) stays Megatron's. This module imports none of those subclasses: they import it.
"""

from __future__ import annotations

from typing import Any


def swap_spec_modules(spec: Any, swaps: dict[type, type]) -> tuple[Any, list[type]]:
    """A deep copy of a ``ModuleSpec`` tree with each module class in ``swaps`` replaced (e.g. Megatron's
    local linears by subclasses with the same parameters), and the classes that were found."""
    import copy
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec

    swapped: list[type] = []

    def swap(node: Any) -> Any:
        if isinstance(node, type) and node in swaps:
            swapped.append(node)
            return swaps[node]
        if isinstance(node, ModuleSpec):
            node.module = swap(node.module)
            node.submodules = swap(node.submodules)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for field in dataclasses.fields(node):
                setattr(node, field.name, swap(getattr(node, field.name)))
        elif isinstance(node, list):
            node[:] = [swap(item) for item in node]
        return node

    return swap(copy.deepcopy(spec)), swapped
