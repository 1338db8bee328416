"""Hugging Face interop: the released Keye-VL checkpoint format ↔ keye's Megatron-based modules.

``load_keye_vl(path)`` builds a ``KeyeVLModel`` from a released checkpoint directory and returns a
:class:`KeyeVL` wrapper (``.model``, ``.config``, ``.hf_forward(...)``); ``save_keye_vl(model, path)`` writes
one back. The format is composed from registered components, each owning its key map (`keye.hf.contract`);
nothing here imports a plugin. Megatron is imported only when a model is built.

Modules: ``config`` (config.json ↔ component Configs, the format's parts), ``contract`` (what a component
provides), ``weights`` (names and shapes, full tensors in and out of a parallel model), ``files`` (the
directory), ``forward`` (``KeyeVL`` and the released forward), ``generate`` (``hf_generate``), ``keye_vl``
(load and save).
"""

from keye.hf.config import KeyeVLConfigs, hf_config_dict, hf_configs
from keye.hf.forward import KeyeVL
from keye.hf.keye_vl import load_keye_vl, save_keye_vl
from keye.hf.weights import expected_hf_shapes, hf_to_keye_state, keye_to_hf_state

__all__ = [
    "KeyeVL",
    "KeyeVLConfigs",
    "expected_hf_shapes",
    "hf_config_dict",
    "hf_configs",
    "hf_to_keye_state",
    "keye_to_hf_state",
    "load_keye_vl",
    "save_keye_vl",
]
