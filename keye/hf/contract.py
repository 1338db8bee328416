"""What a component provides to take part in a Hugging Face checkpoint format: its key map.

`keye.hf` knows the *format* (Keye-VL-8B-Preview: which component kinds it holds, where each one's weights
live, what config.json says); each component knows its own *weights*. A component class takes part by
carrying three classmethods (the `HFWeights` Protocol), with names relative to where the format puts it
(``visual.vision_model.`` for the vision encoder, ``mlp_AR.`` for the projector, the top level for the
language model):

- ``hf_weight_shapes(config) -> {released name: shape}``: every released weight a model with this config
  has, written out (not derived from the mapping), so a checkpoint is checked before anything converts;
- ``hf_to_keye(hf, config) -> {parameter name: tensor}``: full tensors, released names → the module's;
- ``keye_to_hf(state, config) -> {released name: tensor}``: the inverse, tensor by tensor (any subset of the
  state maps on its own: `keye.generate.weight_stream` sends one tensor at a time).

``hf_to_keye`` must also map any *load unit* on its own, and any union of them: all tensors of one layer
(the names with ``layers.<N>.`` in them; the layer's whole set, so fused q/k/v and gate/up can be built),
or any single tensor outside the layers, and give exactly the parameters those tensors make; it must
work on meta tensors (shape operations only: renames, reshapes, concatenations). `keye.hf.sources.
stream_module` relies on both: a module is read and converted one unit at a time, so a rank never holds
the whole module, and a unit is first converted as meta tensors (nothing read) to learn whether this rank
holds any of what it makes; if not, it is never read. The built-in maps do (``tests/hf/test_streamed_hf_load.py``).

Optional: ``HF_UNUSED``, prefixes of released weights the component does not use (kept and written back,
never loaded). The built-ins ``siglip_navit``, ``patch_merge_mlp`` and ``qwen3`` implement it; a third-party
component that does the same can be loaded from and saved to the format. `keye.model.hf_keys` has the
Megatron ↔ Hugging Face helpers such maps are made of.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from keye.errors import KeyeUserError

METHODS = ("hf_weight_shapes", "hf_to_keye", "keye_to_hf")


@runtime_checkable
class HFWeights(Protocol):
    """A component class with a Hugging Face key map (module docstring)."""

    @classmethod
    def hf_weight_shapes(cls, config: Any) -> dict[str, tuple[int, ...]]: ...

    @classmethod
    def hf_to_keye(cls, hf: dict[str, Tensor], config: Any) -> dict[str, Tensor]: ...

    @classmethod
    def keye_to_hf(cls, state: dict[str, Tensor], config: Any) -> dict[str, Tensor]: ...


def hf_weights(cls: type, kind: str) -> type:
    """``cls`` itself if it carries a key map; else a one-line ``KeyeUserError`` naming the component."""
    missing = [name for name in METHODS if not callable(getattr(cls, name, None))]
    if missing:
        raise KeyeUserError(f"{kind} {cls.__module__}.{cls.__qualname__} has no Hugging Face key map (missing "
                            f"{', '.join(missing)}; see keye.hf.contract)")
    return cls
