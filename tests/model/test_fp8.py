"""FP8: the torch backend's scaled-FP8 linear, its delayed scaling, qwen3 built with it, and the TE error.

The FP8 matmul is checked against quantisation written out by hand here (scale = fp8_max / amax,
saturate, cast, dequantise, fp32 matmul). Models are built only in spawned processes (Megatron's
parallel state is per process).

Tolerances, and why:
* hand quantisation vs ``_scaled_mm``: relative 1e-6 (same fp8 values; on CPU ``_scaled_mm`` is the
  fp32 matmul of the dequantised inputs, so only fp32 rounding of the scaling can differ);
* FP8 qwen3 vs the same fp32 weights: relative L2 error of the logits <= 6% and cosine similarity
  >= 0.998 (measured: 3.2% and 0.9995). e4m3 keeps 3 mantissa bits: rounding each operand costs ~2%
  RMS per element, ~3% per matmul output, and with random-sign data that does not average down over
  the K terms; the output layer is not FP8, so the logits carry roughly one matmul's error. A lower
  bound (> 1e-4) proves FP8 really ran;
* training 6 AdamW steps on a fixed batch: the loss falls by > 0.5 nat, and stays within 1% of the
  initial loss of the fp32 run's curve (measured: 0.3%);
* activation recompute on vs off: identical gradients (scales are fixed within a step);
* TP=2 vs TP=1, both FP8: amaxes are all-reduced over TP, so both layouts quantise identically and the
  logits agree to fp32 rounding: 1e-5 absolute (measured 1.8e-7; without the reduction, 3e-2). Step
  amaxes reduced over a group (data parallel) give every rank the same scale.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from keye.config.schema import FP8Config, PrecisionConfig
from keye.errors import KeyeUserError
from keye.parallel.fp8 import transformer_engine_available
from keye.testing.distributed import run_distributed

E4M3_MAX, E5M2_MAX = 448.0, 57344.0
SEED = 7
BATCH, SEQ = 2, 16
TORCH_FP8 = PrecisionConfig(fp8=FP8Config(enabled=True, backend="torch", amax_history=4))


# --- the scaled-FP8 matmul against hand quantisation ------------------------------------------------


def _hand(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """What an FP8 tensor holds, back in fp32: saturate(t * scale) rounded to ``dtype``, divided by scale."""
    fmax = torch.finfo(dtype).max
    return (t * scale).clamp(-fmax, fmax).to(dtype).to(torch.float32) / scale


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-6) -> bool:
    return (actual - expected).abs().max().item() <= rel * expected.abs().max().item()


def _operands() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 48, generator=gen) * torch.logspace(-2, 1, 48)  # (S, B, K): mixed magnitudes
    weight = torch.randn(40, 48, generator=gen) * 0.05  # (N, K)
    grad = torch.randn(3, 8, 40, generator=gen) * 1e-3  # (S, B, N)
    return x, weight, grad


def test_fp8_linear_forward_and_backward_equal_hand_quantisation():
    from keye.model.fp8_linear import Fp8Meta, fp8_linear

    x, weight, grad = _operands()
    x.requires_grad_(True)
    weight.requires_grad_(True)
    out = fp8_linear(x, weight, Fp8Meta())  # no fp8_autocast: every scale from the tensor's own amax
    out.backward(grad)

    sx, sw = E4M3_MAX / x.abs().max().item(), E4M3_MAX / weight.abs().max().item()
    sg = E5M2_MAX / grad.abs().max().item()
    xq, wq = _hand(x.detach(), sx, torch.float8_e4m3fn), _hand(weight.detach(), sw, torch.float8_e4m3fn)
    gq = _hand(grad, sg, torch.float8_e5m2)
    expected = xq @ wq.t()  # (S, B, N)
    assert out.shape == (3, 8, 40) and out.dtype == torch.float32
    assert _close(out, expected)
    assert _close(x.grad, gq @ wq)  # dgrad: g (e5m2) @ W (e4m3)
    assert _close(weight.grad, gq.reshape(-1, 40).t() @ xq.reshape(-1, 48))  # wgrad: g^T (e5m2) @ x (e4m3)
    full = x.detach() @ weight.detach().t()
    error = ((out - full).norm() / full.norm()).item()
    assert 1e-4 < error < 0.05, error  # FP8 really ran, and stayed close to fp32


def test_bf16_master_weights_keep_their_dtype():
    from keye.model.fp8_linear import Fp8Meta, fp8_linear

    x, weight, _ = _operands()
    x, weight = x.bfloat16().requires_grad_(True), weight.bfloat16().requires_grad_(True)
    out = fp8_linear(x, weight, Fp8Meta())
    out.float().sum().backward()
    assert out.dtype == x.grad.dtype == weight.grad.dtype == torch.bfloat16


def test_scaled_mm_padding_to_16_leaves_the_product_unchanged():
    from keye.model.fp8_linear import scaled_mm

    gen = torch.Generator().manual_seed(1)
    a = (torch.randn(5, 7, generator=gen) * 50).to(torch.float8_e4m3fn)  # (M, K): no dim a multiple of 16
    b = (torch.randn(7, 3, generator=gen) * 50).to(torch.float8_e5m2)  # (K, N)
    inv_a, inv_b = torch.tensor(0.25), torch.tensor(0.5)
    padded = scaled_mm(a, b, inv_a, inv_b, torch.float32, pad=True)
    assert padded.shape == (5, 3)
    assert torch.equal(padded, scaled_mm(a, b, inv_a, inv_b, torch.float32, pad=False))
    assert _close(padded, (a.float() * 0.25) @ (b.float() * 0.5))


def test_delayed_scaling_uses_the_max_of_the_last_n_steps_and_saturates():
    from keye.model.fp8_linear import GRAD, INPUT, DelayedScaling, Fp8Meta, fp8_autocast, fp8_linear

    meta, weight = Fp8Meta(), torch.eye(4)  # (N, K); amax 1
    x = torch.tensor([[0.5, -0.25, 0.125, 1.0]])  # (T, K); amax 1: step k feeds amaxes[k] * x
    amaxes, expected_scales = [2.0, 4.0, 1.0, 0.5], [448 / 2, 448 / 4, 448 / 4, 448 / 1]  # history of 2
    for step, (amax, scale) in enumerate(zip(amaxes, expected_scales)):
        with fp8_autocast(DelayedScaling(amax_history_len=2)):
            xs = (amax * x).requires_grad_(True)
            out = fp8_linear(xs, weight, meta)
            out.sum().backward()
        if step == 1:  # scale 448/2 from step 0, amax 4 now: 4 * 224 = 896 saturates at 448 → 2.0
            # Within an ulp, not bit for bit: the kernel multiplies by the inverse scale (fp32 1/224 is not
            # exact) and, by CPU, may fuse that into the accumulation.
            assert _close(out.detach(), _hand(xs.detach(), 448 / 2, torch.float8_e4m3fn))
            assert out[0, 3].item() == pytest.approx(2.0, rel=1e-6)  # unsaturated it would be 4.0
        assert meta.scale[INPUT].item() == pytest.approx(scale), step
    assert bool(meta.ready[GRAD]) and meta.scale[GRAD].item() == pytest.approx(E5M2_MAX)  # d(sum)/d(out) = 1

    history, scale = meta.history.clone(), meta.scale.clone()
    with torch.no_grad():  # outside fp8_autocast: the delayed scales, nothing recorded
        out = fp8_linear(8 * x, weight, meta)
    assert torch.equal(meta.history, history)
    assert _close(out, _hand(8 * x, 448.0, torch.float8_e4m3fn))
    with pytest.raises(RuntimeError, match="step failed"):  # a failed step leaves no trace
        with fp8_autocast(DelayedScaling(amax_history_len=2)):
            fp8_linear(100 * x, weight, meta)
            raise RuntimeError("step failed")
    assert torch.equal(meta.history, history) and torch.equal(meta.scale, scale)


def test_fp8_layer_spec_swaps_the_four_linears():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from keye.model.fp8_linear import Fp8ColumnParallelLinear, Fp8RowParallelLinear, fp8_layer_spec

    local = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    spec = fp8_layer_spec(local)
    attention, mlp = spec.submodules.self_attention.submodules, spec.submodules.mlp.submodules
    assert attention.linear_qkv is mlp.linear_fc1 is Fp8ColumnParallelLinear
    assert attention.linear_proj is mlp.linear_fc2 is Fp8RowParallelLinear
    assert local.submodules.mlp.submodules.linear_fc1 is not Fp8ColumnParallelLinear  # the input is untouched


# --- configuration errors ---------------------------------------------------------------------------


def _precision(backend: str) -> PrecisionConfig:
    return PrecisionConfig(fp8=FP8Config(enabled=True, backend=backend))


@pytest.mark.skipif(transformer_engine_available(), reason="Transformer Engine runs on this machine")
def test_te_backend_without_transformer_engine_is_one_clear_line():
    from keye.model.protocols import BuildContext
    from keye.parallel.fp8 import check_fp8_available, fp8_context
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel

    precision, tiny = _precision("te"), Qwen3LanguageModel.SIZES["tiny"]
    for attempt in (
        lambda: check_fp8_available(precision),
        lambda: fp8_context(precision),
        lambda: Qwen3LanguageModel(Qwen3LanguageModel.Config(**tiny), BuildContext(fp8=precision.fp8)),
    ):
        with pytest.raises(KeyeUserError) as caught:
            attempt()
        message = str(caught.value)
        assert "\n" not in message
        assert "Transformer Engine with CUDA" in message and "backend=torch" in message, message
    with pytest.raises(KeyeUserError, match="unknown"):
        check_fp8_available(_precision("fp8x"))
    check_fp8_available(PrecisionConfig())  # FP8 off: nothing to check
    check_fp8_available(_precision("torch"))


# --- qwen3 with FP8 linears, one and two tensor-parallel ranks ----------------------------------------


def _batch(vocab: int, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)  # (B, L)
    labels = torch.roll(ids, -1, dims=1)  # (B, L)
    positions = torch.arange(SEQ).expand(3, BATCH, SEQ)  # (3, B, L): text positions on all M-RoPE axes
    return ids, labels, positions


def _qwen3(ctx, fp8: bool, recompute: bool = False):
    from keye.model.protocols import BuildContext
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel

    config = Qwen3LanguageModel.Config(**Qwen3LanguageModel.SIZES["tiny"], recompute=recompute)
    return Qwen3LanguageModel(config, BuildContext(ctx, seed=SEED, fp8=TORCH_FP8.fp8 if fp8 else None))


def _full_logits(model, ids, positions, ctx) -> torch.Tensor:
    """Logits ``(B, L, V)``, gathered over the TP ranks' vocabulary shards."""
    logits = model(ids, positions, attention_mask=None)  # (B, L, V / TP)
    if ctx.tp_size == 1:
        return logits.detach()
    from megatron.core import parallel_state as mpu

    shards = [torch.empty_like(logits) for _ in range(ctx.tp_size)]
    torch.distributed.all_gather(shards, logits.detach().contiguous(), group=mpu.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


def _sharded_grad_norms(model, ctx) -> dict[str, float]:
    """Squared gradient norm of every TP-sharded weight, summed over the TP ranks (layout-free)."""
    from megatron.core import parallel_state as mpu

    names = [n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)]
    squares = torch.stack([model.get_parameter(n).grad.double().square().sum() for n in names])
    if ctx.tp_size > 1:
        torch.distributed.all_reduce(squares, group=mpu.get_tensor_model_parallel_group())
    return dict(zip(names, squares.tolist()))


def _fp8_step_then_delayed_logits(model, ctx) -> dict:
    """Current-scaling logits, one forward/backward under fp8_context, then delayed-scaling logits.

    The delayed logits are of another batch, so its scales (from the first batch's amaxes) are not the
    ones current scaling would pick.
    """
    from keye.parallel.fp8 import fp8_context

    ids, labels, positions = _batch(model.vocab_size)
    with torch.no_grad():
        first = _full_logits(model, ids, positions, ctx)
    with fp8_context(TORCH_FP8):
        loss = model(ids, positions, attention_mask=None, labels=labels).mean()  # labels → (B, L) losses
        loss.backward()
    other_ids, _, _ = _batch(model.vocab_size, seed=SEED + 1)
    with torch.no_grad():
        delayed = _full_logits(model, other_ids, positions, ctx)
    ready = all(bool(m.fp8_meta.ready.all()) for m in model.modules() if hasattr(m, "fp8_meta"))
    return {"current": first, "grads": _sharded_grad_norms(model, ctx), "loss": loss.item(), "delayed": delayed,
            "ready": ready}


def _recompute_changes_nothing(ctx) -> float:
    """Largest gradient difference, activation recompute on vs off, over 3 FP8 steps (delayed from step 2).

    Scales are fixed within a step, so the recomputed forward quantises exactly like the first one.
    """
    from keye.parallel.fp8 import fp8_context

    ids, labels, positions = _batch(1024)
    grads = []
    for recompute in (False, True):
        model = _qwen3(ctx, fp8=True, recompute=recompute)
        for _ in range(3):
            model.zero_grad()
            with fp8_context(TORCH_FP8):
                model(ids, positions, attention_mask=None, labels=labels).mean().backward()
            with torch.no_grad():
                for param in model.parameters():
                    param -= 1e-2 * param.grad.sign()
        grads.append([param.grad for param in model.parameters()])
    return max((a - b).abs().max().item() for a, b in zip(*grads))


def _one_rank() -> dict:
    from keye.parallel import init_parallel
    from keye.parallel.fp8 import fp8_context

    ctx = init_parallel(seed=SEED)
    reference, model = _qwen3(ctx, fp8=False), _qwen3(ctx, fp8=True)
    model.load_state_dict(reference.state_dict())  # the same fp32 master weights
    ids, labels, positions = _batch(model.vocab_size)
    with torch.no_grad():
        expected = reference(ids, positions, attention_mask=None).flatten()
        actual = model(ids, positions, attention_mask=None).flatten()
    results = {
        "cosine": torch.nn.functional.cosine_similarity(actual, expected, dim=0).item(),
        "relative": ((actual - expected).norm() / expected.norm()).item(),
        "fp8_linears": sum("Fp8" in type(m).__name__ for m in model.modules()),
        "tp1": _fp8_step_then_delayed_logits(model, ctx),
        "recompute_difference": _recompute_changes_nothing(ctx),
    }

    model.load_state_dict(reference.state_dict())  # train from the start: FP8 vs fp32, same steps
    runs = (("fp8", model, lambda: fp8_context(TORCH_FP8)), ("fp32", reference, contextlib.nullcontext))
    for name, net, context in runs:
        optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
        losses = []
        for _ in range(6):
            optimizer.zero_grad()
            with context():
                loss = net(ids, positions, attention_mask=None, labels=labels).mean()
                loss.backward()
            optimizer.step()
            losses.append(loss.item())
        results[f"losses_{name}"] = losses
    return results


def _amax_reduction_over(group) -> float:
    """The input scale after one step in which rank r saw amax r + 1, its amaxes reduced over ``group``."""
    from keye.model.fp8_linear import INPUT, DelayedScaling, Fp8Meta, fp8_autocast, fp8_linear

    meta, rank = Fp8Meta(), torch.distributed.get_rank()
    with fp8_autocast(DelayedScaling(amax_history_len=2), amax_reduction_group=group):
        fp8_linear(torch.full((2, 4), rank + 1.0), torch.eye(4), meta)
    return meta.scale[INPUT].item()


def _two_ranks() -> dict:
    from keye.parallel import init_parallel

    ctx = init_parallel(tensor=2, seed=SEED)
    result = _fp8_step_then_delayed_logits(_qwen3(ctx, fp8=True), ctx)
    result["reduced_scale"] = _amax_reduction_over(torch.distributed.group.WORLD)  # as over data parallel
    return result


@pytest.fixture(scope="module")
def one_rank() -> dict:
    [result] = run_distributed(_one_rank, 1)
    return result


def test_fp8_qwen3_logits_are_close_to_fp32(one_rank):
    assert one_rank["fp8_linears"] == 2 * 4  # qkv, proj, fc1, fc2 in each of the 2 layers
    assert one_rank["cosine"] >= 0.998, one_rank["cosine"]
    assert 1e-4 < one_rank["relative"] <= 0.06, one_rank["relative"]


def test_fp8_qwen3_training_reduces_the_loss_like_fp32(one_rank):
    fp8, fp32 = one_rank["losses_fp8"], one_rank["losses_fp32"]
    assert all(math.isfinite(loss) for loss in fp8)
    assert fp8[-1] < fp8[0] - 0.5, fp8  # a fixed batch is memorised
    assert max(abs(a - b) for a, b in zip(fp8, fp32)) < 0.01 * fp32[0], (fp8, fp32)
    assert one_rank["recompute_difference"] == 0.0


def test_fp8_tensor_parallel_2_equals_1(one_rank):
    [tp2, tp2_rank1] = run_distributed(_two_ranks, 2)
    assert tp2["reduced_scale"] == tp2_rank1["reduced_scale"] == 448 / 2  # replicas share the max amax
    tp1 = one_rank["tp1"]
    assert tp1["ready"] and tp2["ready"]  # every FP8 linear has delayed scales after the step
    for key in ("current", "delayed"):
        assert (tp2[key] - tp1[key]).abs().max().item() < 1e-5, key
    assert tp2["loss"] == pytest.approx(tp1["loss"], rel=1e-6)
    for name, square in tp1["grads"].items():
        assert tp2["grads"][name] == pytest.approx(square, rel=1e-4), name
