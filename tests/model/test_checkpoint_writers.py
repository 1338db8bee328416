"""Both ``torch_dist`` writers of ``keye.parallel.dist_checkpoint.save`` write the same checkpoint.

With psutil installed (a declared dependency now) Megatron-Core's own writer runs (``save_strategy()`` is
None: Megatron's default, its forked writer processes); without it, keye's serial writer. Two real gloo
ranks (TP=2) save the same tiny qwen3 both ways (psutil hidden from the import system for the second, as on
a machine without it); every tensor read back whole must be identical, and Megatron loads each folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from keye.testing.distributed import run_distributed


def _save_both(workdir: str) -> dict:
    from keye.model.protocols import BuildContext
    from keye.parallel import dist_checkpoint, init_parallel
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel

    ctx = init_parallel(tensor=2, seed=5)
    model = Qwen3LanguageModel(Qwen3LanguageModel.Config(**Qwen3LanguageModel.SIZES["tiny"]), BuildContext(ctx))
    strategies = [dist_checkpoint.save_strategy()]
    dist_checkpoint.save(dist_checkpoint.sharded_state_dict(model), Path(workdir) / "megatron")
    sys.modules["psutil"] = None  # import psutil fails, find_spec finds nothing: a machine without it
    try:
        strategies.append(type(dist_checkpoint.save_strategy()).__name__)
        dist_checkpoint.save(dist_checkpoint.sharded_state_dict(model), Path(workdir) / "serial")
    finally:
        del sys.modules["psutil"]
    loaded = {}
    for name in ("megatron", "serial"):
        state = dist_checkpoint.load(dist_checkpoint.sharded_state_dict(model), Path(workdir) / name)
        loaded[name] = all(torch.equal(state[key], value) for key, value in model.state_dict().items()
                           if key in state and isinstance(state[key], torch.Tensor))
    return {"strategies": strategies, "loaded": loaded}


def test_megatron_writer_with_psutil_and_the_serial_fallback_write_the_same(tmp_path):
    from keye.parallel.dist_checkpoint import read_full_tensors

    rank0, _ = run_distributed(_save_both, 2, str(tmp_path))
    assert rank0["strategies"][0] is None  # psutil present: Megatron's own torch_dist writer
    assert rank0["strategies"][1] == "SerialTorchDistSave", rank0  # without it: keye's serial writer
    assert rank0["loaded"] == {"megatron": True, "serial": True}
    megatron, serial = read_full_tensors(tmp_path / "megatron"), read_full_tensors(tmp_path / "serial")
    assert megatron.keys() == serial.keys() and len(megatron) > 5
    for key, tensor in megatron.items():
        assert torch.equal(tensor, serial[key]), key
