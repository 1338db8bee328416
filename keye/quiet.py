"""Known, harmless warnings kept out of keye's output: exact texts from exact places, all in this module.

A run's stderr should hold only news: a warning the user can act on, or one nobody has looked at yet.
Megatron-Core and torch print a few that keye has looked at and that need nothing from the user; they
repeat on every run (some once per layer), and bury the lines that matter. ``install()`` filters exactly
those: each filter names the message *and* the module or logger it comes from, with a comment saying why
it is safe, so the same text from anywhere else, and every other warning, still shows.

``keye-launch`` calls ``install()`` at process start (every rank runs the CLI's ``main``). Python started
with ``-W`` options or ``PYTHONWARNINGS`` (``sys.warnoptions``) filters nothing here: whoever asks for
warnings their own way (``PYTHONWARNINGS=default keye-launch run ...``) sees them all.

Warnings that keye's own code caused are fixed where they arise, not filtered here.
"""

from __future__ import annotations

import re
import sys
import warnings

_installed = False


def install() -> None:
    """Filter the known warnings in this process (idempotent); nothing when the user gave warning options."""
    global _installed
    if _installed or sys.warnoptions:
        return
    _installed = True
    # Megatron-Core 0.16.1 loads distributed checkpoints through torch's ``load_state_dict``, a deprecated alias
    # of ``torch.distributed.checkpoint.load`` (same function, same result). The call is Megatron's, not
    # keye's nor the user's: nothing to act on until a Megatron release changes it.
    warnings.filterwarnings(
        "ignore",
        message=re.escape("`load_state_dict` is deprecated and will be removed in future versions. Please use `load` instead.") + "$",
        category=FutureWarning,
        module=r"megatron\.core\.dist_checkpointing\.strategies\.torch$",
    )
    # Megatron-Core's checkpoint format holds its shards as ``ShardedTensor``, which torch plans to replace by
    # DTensor; torch's checkpoint planner warns each time it reads one. Reading them is fully supported by the
    # pinned torch; the deprecation is addressed to Megatron's format, not to a keye user.
    warnings.filterwarnings(
        "ignore",
        message=re.escape("Please use DTensor instead and we are deprecating ShardedTensor.") + "$",
        category=FutureWarning,
        module=r"torch\.distributed\.checkpoint\.(planner_helpers|default_planner)$",
    )
    # With data parallelism, Megatron-Core's gradient buffers call torch's collectives by their old names, which
    # torch 2.13 keeps as aliases of the new ones (same collective). torch's logging wrapper re-raises the
    # warning from its own frame, so the module is c10d_logger whoever called; keye itself calls neither name.
    for old, new in (("reduce_scatter_tensor", "reduce_scatter_single"), ("all_gather_into_tensor", "all_gather_single")):
        warnings.filterwarnings(
            "ignore",
            message=re.escape(f"`torch.distributed.{old}` is deprecated. Please use `torch.distributed.{new}` instead.") + "$",
            category=FutureWarning,
            module=r"torch\.distributed\.c10d_logger$",
        )
    # Megatron-Core's distributed optimizer keeps each fp32 parameter's shard as a view of the parameter (by
    # design: ``model_param.view(-1)[start:end]``, a non-leaf tensor) and sets its ``.grad`` itself; its
    # ``zero_grad`` helper reads that ``.grad``, and torch warns about reading .grad of a non-leaf. Nothing is
    # lost: Megatron never relies on autograd to fill it. (The rest of torch's text names its build folder.)
    warnings.filterwarnings(
        "ignore",
        message=re.escape("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed."),
        category=UserWarning,
        module=r"megatron\.core\.optimizer\.optimizer$",
    )
