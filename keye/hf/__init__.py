"""Hugging Face interop: the released Keye-VL checkpoint format ↔ keye's Megatron-based modules.

``load_keye_vl(path)`` builds a ``KeyeVLModel`` from a released checkpoint directory and returns a
:class:`KeyeVL` wrapper (``.model``, ``.config``, ``.hf_forward(...)``); ``save_keye_vl(model, path)`` writes
one back. Megatron is imported only when a model is built.
"""

from keye.hf.keye_vl import (
    KeyeVL,
    KeyeVLConfigs,
    expected_hf_shapes,
    hf_config_dict,
    hf_configs,
    hf_to_keye_state,
    keye_to_hf_state,
    load_keye_vl,
    save_keye_vl,
)

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
