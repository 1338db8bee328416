"""``keye.model.swiglu``: the one-function SwiGLU against ``silu(a) * b`` under autograd, and ``SwiGLUMLP``
against Megatron's ``MLP`` in the qwen3 model (real Megatron, same weights)."""

import torch
import torch.nn.functional as F

from keye.model.swiglu import swiglu
from keye.testing.distributed import run_distributed


def test_swiglu_is_autograd_of_silu_times_gate_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        y = (torch.randn(7, 2, 24, generator=generator) * 3).to(dtype)
        grad = torch.randn(7, 2, 12, generator=generator).to(dtype)
        ours_y, ref_y = y.clone().requires_grad_(), y.clone().requires_grad_()
        ours = swiglu(ours_y)
        a, b = ref_y.chunk(2, dim=-1)
        ref = F.silu(a) * b
        ours.backward(grad)
        ref.backward(grad)
        assert torch.equal(ours, ref) and torch.equal(ours_y.grad, ref_y.grad), dtype
    exact = y.double().requires_grad_()  # and both are SwiGLU: against fp64
    a, b = exact.chunk(2, dim=-1)
    (a * torch.sigmoid(a) * b).backward(grad.double())
    torch.testing.assert_close(ours_y.grad.double(), exact.grad, atol=0.05, rtol=0.02)  # bf16 rounding


def _mlp_against_megatron() -> dict:
    from megatron.core.transformer.mlp import MLP

    from keye.model.protocols import BuildContext
    from keye.model.swiglu import SwiGLUMLP
    from keye.parallel import init_parallel
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel

    ctx = init_parallel(seed=7)
    config = Qwen3LanguageModel.Config(**{**Qwen3LanguageModel.SIZES["tiny"], "position_encoding": {"name": "rope1d"}})
    model = Qwen3LanguageModel(config, BuildContext(ctx))
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    built = sorted({type(m).__name__ for m in mlps})
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=generator)
    labels = torch.randint(0, config.vocab_size, (2, 12), generator=generator)
    runs = {}
    for cls in (SwiGLUMLP, MLP):
        for mlp in mlps:
            mlp.__class__ = cls
        model.zero_grad(set_to_none=True)
        loss = model(ids, torch.arange(12).expand(2, 12), None, labels=labels)
        loss.sum().backward()
        runs[cls.__name__] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (ours, ours_grads), (theirs, their_grads) = runs["SwiGLUMLP"], runs["MLP"]
    return {
        "mlps": len(mlps),
        "built": built,
        "loss_equal": torch.equal(ours, theirs),
        "grads_equal": all(torch.equal(ours_grads[n], their_grads[n]) for n in ours_grads),
        "fc1_grad_norm": float(their_grads["gpt.decoder.layers.0.mlp.linear_fc1.weight"].norm()),
    }


def test_swiglu_mlp_matches_megatrons_mlp_exactly() -> None:
    [result] = run_distributed(_mlp_against_megatron, 1)
    assert result["mlps"] == 2 and result["built"] == ["SwiGLUMLP"] and result["fc1_grad_norm"] > 0
    assert result["loss_equal"] and result["grads_equal"], result
