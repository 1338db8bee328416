"""keye: train Keye-VL-style multimodal LLMs end to end on Megatron-Core.

Plugins import ``hookimpl`` from here::

    from keye import hookimpl

    @hookimpl
    def keye_register_projectors(register):
        register("my_projector", MyProjector)
"""

from keye import megatron_jit
from keye.hookspecs import hookimpl

megatron_jit.install()  # before any Megatron import: see keye/megatron_jit.py

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
