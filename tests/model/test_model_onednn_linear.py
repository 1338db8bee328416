"""oneDNN linears (keye.model.onednn_linear) against the matmuls they replace.

* ``onednn_linear`` against ``F.linear`` (fp64 reference): output and the x, W, b gradients, 3D and
  non-contiguous inputs, with and without bias; ``linear`` falls back to ``F.linear`` where oneDNN does not
  apply (fp64 here: bit-identical);
* the layer specs: the local ViT and qwen3 specs hold the oneDNN linears, a built layer has the same state
  dict keys as one with Megatron's linears, and the LLM's output layer is switched too;
* Megatron's own column/row-parallel linears against the oneDNN ones, same weights, under TP=1 and TP=2
  (the column-parallel input gradient is all-reduced over TP, the row-parallel output summed): outputs and
  gradients agree within fp32 rounding, 1e-5 relative.
Megatron's parallel state is per process, so the spec and TP cases run in spawned ranks.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from keye.model.onednn_linear import linear, onednn_available, onednn_linear
from keye.testing.distributed import run_distributed

pytestmark = pytest.mark.skipif(not onednn_available(), reason="PyTorch built without oneDNN")
RELATIVE = 1e-5


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
def test_onednn_linear_matches_f_linear(bias: bool, contiguous: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 2, 96 if contiguous else 160, generator=gen)[..., :96]  # (S, B, K); else strided rows
    weight, b = torch.randn(80, 96, generator=gen) * 0.1, torch.randn(80, generator=gen) if bias else None
    upstream = torch.randn(37, 2, 80, generator=gen)
    grads = []
    for fn, dtype in ((onednn_linear, torch.float32), (F.linear, torch.float64)):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (x, weight, b) if t is not None]
        out = fn(*inputs) if bias else fn(*inputs, None)
        (out * upstream.to(dtype)).sum().backward()
        grads.append([out.detach(), *(t.grad for t in inputs)])
    assert grads[0][0].shape == (37, 2, 80)
    for ours, reference in zip(*grads):
        assert _relative(ours, reference) < RELATIVE


def test_linear_falls_back_where_onednn_does_not_apply() -> None:
    x, weight = torch.randn(5, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(linear(x, weight), F.linear(x, weight))
    assert torch.equal(linear(x[:0].float(), weight.float()), F.linear(x[:0].float(), weight.float()))  # empty


# --- specs and parallel layouts (spawned ranks) -------------------------------------------------------


def _specs() -> dict[str, Any]:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerLayer
    from megatron.core.transformer.spec_utils import build_module

    from keye.model import siglip_tower
    from keye.model.spec_swap import swap_spec_modules
    from keye.model.onednn_linear import OneDnnColumnParallelLinear, OneDnnRowParallelLinear
    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel
    from keye_plugins.vision_encoder.siglip_navit import SiglipNaViT

    ctx = init_parallel(tensor=1, seed=3)
    onednn_spec = siglip_tower.encoder_layer_spec("local")
    megatron_spec, swapped = swap_spec_modules(
        onednn_spec, {OneDnnColumnParallelLinear: ColumnParallelLinear, OneDnnRowParallelLinear: RowParallelLinear}
    )
    config = SiglipNaViT(SiglipNaViT.Config(**SiglipNaViT.SIZES["tiny"]), BuildContext(ctx)).transformer_config
    layers = [build_module(spec, config=config, layer_number=1) for spec in (onednn_spec, megatron_spec)]
    assert all(isinstance(layer, TransformerLayer) for layer in layers)
    llm = Qwen3LanguageModel(Qwen3LanguageModel.Config(**Qwen3LanguageModel.SIZES["tiny"]), BuildContext(ctx, seed=3))
    block = llm.gpt.decoder.layers[0]
    return {
        "swapped": sorted(cls.__name__ for cls in swapped),
        "same_keys": list(layers[0].state_dict()) == list(layers[1].state_dict()),
        "vit": [type(layers[0].self_attention.linear_qkv).__name__, type(layers[0].mlp.linear_fc2).__name__],
        "qwen3": [type(block.self_attention.linear_qkv).__name__, type(block.mlp.linear_fc2).__name__,
                  type(llm.gpt.output_layer).__name__],
        "output_layer_keys": sorted(llm.gpt.output_layer.state_dict()),
    }


def test_local_specs_use_the_onednn_linears() -> None:
    [result] = run_distributed(_specs, 1)
    assert result["swapped"] == ["OneDnnColumnParallelLinear"] * 2 + ["OneDnnRowParallelLinear"] * 2
    assert result["same_keys"]
    assert result["vit"] == ["OneDnnColumnParallelLinear", "OneDnnRowParallelLinear"]
    assert result["qwen3"] == ["OneDnnColumnParallelLinear", "OneDnnRowParallelLinear", "OneDnnColumnParallelLinear"]
    assert result["output_layer_keys"] == ["_extra_state", "weight"]


def _parallel_linears(tensor: int) -> dict[str, float]:
    """Max relative |oneDNN - Megatron| of each linear's output and gradients, same full weights, TP=tensor."""
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from keye.model.onednn_linear import OneDnnColumnParallelLinear, OneDnnRowParallelLinear
    from keye.parallel import init_parallel

    ctx = init_parallel(tensor=tensor, seed=3)
    config = ModelParallelConfig(tensor_model_parallel_size=tensor, use_cpu_initialization=True,
                                 perform_initialization=False, params_dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    full_w, full_b = torch.randn(64, 48, generator=gen) * 0.1, torch.randn(64, generator=gen)
    x = torch.randn(9, 2, 48, generator=gen)  # (S, B, K): the same on every rank
    out: dict[str, float] = {}
    rank = ctx.tp_rank
    for name, classes, kwargs, (weight, bias) in (  # this rank's slice: column splits outputs, row inputs
        ("column", (ColumnParallelLinear, OneDnnColumnParallelLinear), dict(gather_output=True),
         (full_w.chunk(tensor)[rank], full_b.chunk(tensor)[rank])),
        ("row", (RowParallelLinear, OneDnnRowParallelLinear), dict(input_is_parallel=False, skip_bias_add=False),
         (full_w.chunk(tensor, dim=1)[rank], full_b)),
    ):
        results = []
        for cls in classes:
            layer = cls(48, 64, config=config, init_method=lambda w: None, bias=True, **kwargs)
            with torch.no_grad():
                layer.weight.copy_(weight)
                layer.bias.copy_(bias)
            inputs = x.clone().requires_grad_()
            y, _ = layer(inputs)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            results.append([y.detach(), inputs.grad, layer.weight.grad, layer.bias.grad])
        out[name] = max(_relative(a, b) for a, b in zip(results[1], results[0]))
    return out


@pytest.mark.parametrize("tensor", [1, 2])
def test_parallel_linears_match_megatrons(tensor: int) -> None:
    for rank, result in enumerate(run_distributed(_parallel_linears, tensor, tensor)):
        assert max(result.values()) < RELATIVE, (tensor, rank, result)
