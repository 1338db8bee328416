#!/usr/bin/env python
"""The GPU check: keye's CUDA and Transformer Engine path on one H100/H200, in well under 8 minutes.

    python tools/gpu_check.py            # on a GPU machine (keye and megatron-core installed; TE optional)
    python tools/gpu_check.py --dry      # anywhere: imports what the checks need, every row skipped with why
    OUT=/some/dir python tools/gpu_check.py   # also writes gpu_check.md and gpu_check.json there (or --out DIR)

Why a script and not only ``tests/gpu/``: a lent GPU machine is offline, short-lived and has no
megatron-core or Transformer Engine preinstalled (README: "GPU check"); one command that prints one table,
row by row, and keeps going when a row fails is what fits such a slot. ``tests/gpu/test_gpu_check.py`` runs
the same rows under pytest where CUDA is present.

Rows (each says ok / FAIL / skipped, its numbers, and for a skip the reason):

* ``te_vs_local_bf16``: tiny qwen3 in bf16, Transformer Engine layers vs Megatron's local layers with the
  same weights (moved through a keye ``torch_dist`` checkpoint, which maps the layer-norm names): logits.
* ``packed_neighbour_local`` / ``packed_neighbour_te``: a packed row of three samples (one causal block
  each, as ``collate_pack`` builds it) gives each sample the logits it gets alone (thd cu_seqlens reach TE),
  to within a tenth of what seeing its neighbours would change (the same row with no mask): bf16 noise
  passes, a leak does not.
* ``fp8_te_training`` / ``fp8_torch_training``: 30 AdamW steps on a fixed packed batch (small qwen3): the
  loss falls, and each step stays within 5% of bf16's curve (relative to the first loss).
* ``mfu_bf16_keye_vl_8b``: fwd+bwd of a keye_vl_8b LLM slice (4 of 36 layers, full width and vocabulary,
  16,384 tokens): model TFLOP/s and the share of the card's dense bf16 peak.
* ``nccl_tp2``: with two GPUs, TP=2 logits equal one GPU's; skipped with one GPU (PP=2 equivalence is
  tested on CPU with gloo: tests/model/test_composition_layouts.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
SEED = 7
LENGTHS = [40, 56, 24]  # packed samples; the row is padded to ROW
ROW = 128
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "B200": 2250e12}  # dense bf16 FLOP/s (SXM)


class Skip(Exception):
    """A row that cannot run here; the message is the reason."""


# --- helpers ---------------------------------------------------------------------------------------------------


def _impl(name: str) -> None:
    """Which layers the next models build from (keye.model.backend reads it per build)."""
    os.environ["KEYE_TRANSFORMER_IMPL"] = name


def _needs_te() -> None:
    from keye.model.backend import transformer_engine_usable

    if not transformer_engine_usable():
        raise Skip("no Transformer Engine with CUDA here (pip install the '.[gpu]' extra on a CUDA machine)")


def _qwen3(ctx: Any, size: str, dtype: torch.dtype, fp8: Any = None, **overrides: Any) -> Any:
    from keye.model.protocols import BuildContext
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel

    config = Qwen3LanguageModel.Config(**{**Qwen3LanguageModel.SIZES[size], **overrides})
    return Qwen3LanguageModel(config, BuildContext(ctx, dtype, seed=SEED, fp8=fp8)).to(ctx.device)


def _packed_row(vocab: int, device: torch.device) -> dict[str, Any]:
    """One row of LENGTHS samples padded to ROW: ids, M-RoPE ids (restarting per sample), labels, mask."""
    from keye.data.packing import block_attention_mask

    gen = torch.Generator().manual_seed(SEED)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    positions = torch.cat([torch.arange(n) for n in LENGTHS] + [torch.arange(ROW - sum(LENGTHS))])
    return {
        "ids": torch.randint(0, vocab, (1, ROW), generator=gen).to(device),
        "positions": positions.expand(3, 1, ROW).contiguous().to(device),  # (3, B, L)
        "labels": torch.randint(0, vocab, (1, ROW), generator=gen).to(device),
        "mask": (~block_attention_mask(cu, ROW)).view(1, 1, ROW, ROW).to(device),  # True = masked
        "bounds": cu.tolist(),
    }


def _copy_weights(src: Any, dst: Any, folder: Path) -> None:
    """``src``'s weights into ``dst`` through a keye torch_dist checkpoint (local ↔ TE names are mapped)."""
    from keye.parallel import dist_checkpoint as dc

    dc.save(dc.tensors_only(dc.sharded_state_dict(src)), folder)
    state = dc.load(dc.tensors_only(dc.sharded_state_dict(dst)), folder)
    dc.load_model_state(dst, state, strict=False)


def _neighbour_gaps(model: Any, row: dict[str, Any]) -> tuple[float, float]:
    """Largest logit difference between each sample and the sample alone: in the packed row, and in the same
    row without the mask (plain causal: every sample sees the ones before it, what a leak would look like)."""
    with torch.no_grad():
        packed = model(row["ids"], row["positions"], row["mask"]).float()  # (1, ROW, V)
        leaky = model(row["ids"], row["positions"], None).float()
        gaps = [0.0, 0.0]
        for start, end in zip(row["bounds"], row["bounds"][1:]):
            alone = model(row["ids"][:, start:end], row["positions"][:, :, start:end], None).float()
            for i, out in enumerate((packed, leaky)):
                gaps[i] = max(gaps[i], (out[:, start:end] - alone).abs().max().item())
    return gaps[0], gaps[1]


def _train(model: Any, row: dict[str, Any], steps: int, context: Callable[[], Any]) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with context():
            loss = model(row["ids"], row["positions"], row["mask"], labels=row["labels"]).float().mean()
            loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# --- rows -----------------------------------------------------------------------------------------------------


def check_te_vs_local(ctx: Any, workdir: Path) -> tuple[bool, str]:
    _needs_te()
    _impl("local")
    local = _qwen3(ctx, "tiny", torch.bfloat16).eval()
    _impl("transformer_engine")
    te = _qwen3(ctx, "tiny", torch.bfloat16).eval()
    _copy_weights(local, te, workdir / "te_vs_local")
    row = _packed_row(local.vocab_size, ctx.device)
    with torch.no_grad():
        a = local(row["ids"], row["positions"], row["mask"]).float()
        b = te(row["ids"], row["positions"], row["mask"]).float()
    diff, scale = (a - b).abs().max().item(), a.abs().max().item()
    return diff <= 0.02 * scale, f"max |logit diff| {diff:.3g} (logits up to {scale:.3g}; bf16, limit 2%)"


def check_neighbour(ctx: Any, impl: str) -> tuple[bool, str]:
    if impl == "transformer_engine":
        _needs_te()
    _impl(impl)
    model = _qwen3(ctx, "tiny", torch.bfloat16, init_std=0.1).eval()  # larger weights: a leak shows clearly
    gap, leak = _neighbour_gaps(model, _packed_row(model.vocab_size, ctx.device))
    return gap <= 0.1 * leak, f"max |packed - alone| {gap:.3g}; seeing the neighbours would give {leak:.3g} (bf16)"


def check_fp8_training(ctx: Any, backend: str) -> tuple[bool, str]:
    import contextlib

    from keye.config.schema import FP8Config, PrecisionConfig
    from keye.parallel.fp8 import fp8_context

    if backend == "te":
        _needs_te()
        _impl("transformer_engine")
    else:
        if torch.cuda.get_device_capability() < (8, 9):
            raise Skip("torch FP8 needs compute capability 8.9+ (Ada, Hopper)")
        _impl("local")
    precision = PrecisionConfig(dtype="bf16", fp8=FP8Config(enabled=True, backend=backend))
    reference = _qwen3(ctx, "small", torch.bfloat16)
    model = _qwen3(ctx, "small", torch.bfloat16, fp8=precision.fp8)
    weights = {k: v for k, v in reference.state_dict().items() if not k.endswith("_extra_state")}  # no FP8 state
    model.load_state_dict(weights, strict=False)  # same layer kind: same names
    row = _packed_row(reference.vocab_size, ctx.device)
    bf16 = _train(reference, row, 30, contextlib.nullcontext)
    fp8 = _train(model, row, 30, lambda: fp8_context(precision))
    track = max(abs(a - b) for a, b in zip(fp8, bf16)) / bf16[0]
    ok = fp8[-1] < fp8[0] - 1.0 and track < 0.05 and all(map(torch.isfinite, torch.tensor(fp8)))
    return ok, f"loss {fp8[0]:.3f} → {fp8[-1]:.3f} (bf16 {bf16[0]:.3f} → {bf16[-1]:.3f}); off bf16 by ≤ {track:.1%}"


def check_mfu(ctx: Any, layers: int = 4, tokens: int = 16384) -> tuple[bool, str]:
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel

    _impl("auto")
    size = Qwen3LanguageModel.SIZES["keye_vl_8b"]
    model = _qwen3(ctx, "keye_vl_8b", torch.bfloat16, num_layers=layers)
    h, v, ffn = size["hidden_size"], size["vocab_size"], size["ffn_hidden_size"]
    q, kv = size["num_attention_heads"] * size["head_dim"], size["num_query_groups"] * size["head_dim"]
    matmul_params = layers * (h * (q + 2 * kv) + q * h + 3 * h * ffn) + h * v
    attention = layers * 2 * 2 * tokens * tokens * q / 2  # QK^T and AV, causal half, per forward
    flops = 3 * (2 * tokens * matmul_params + attention)  # forward + backward (2x)
    ids = torch.randint(0, v, (1, tokens), device=ctx.device)
    positions = torch.arange(tokens, device=ctx.device).expand(3, 1, tokens)
    times = []
    for _ in range(4):  # 1 warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(ids, positions, None, labels=ids).float().mean().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = min(times[1:])
    name = torch.cuda.get_device_name()
    peak = next((value for key, value in PEAK_BF16.items() if key in name), None)
    achieved = flops / seconds
    share = f", {achieved / peak:.1%} of {name}'s {peak / 1e12:.0f} TFLOP/s" if peak else f" ({name}: peak unknown)"
    return True, (f"{model.backend.impl} layers, {layers} layers x {tokens} tokens: {seconds * 1e3:.0f} ms/step, "
                  f"{achieved / 1e12:.0f} TFLOP/s{share}")


def _tp_logits(tensor: int) -> list[float]:
    from megatron.core import parallel_state as mpu

    from keye.parallel import init_parallel

    ctx = init_parallel(tensor=tensor, seed=SEED)
    model = _qwen3(ctx, "tiny", torch.float32).eval()  # weights drawn per global name: the same for any TP
    row = _packed_row(model.vocab_size, ctx.device)
    with torch.no_grad():
        logits = model(row["ids"], row["positions"], row["mask"])  # (1, ROW, V / TP)
    shards = [torch.empty_like(logits) for _ in range(tensor)]
    torch.distributed.all_gather(shards, logits.contiguous(), group=mpu.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1).flatten().cpu().tolist()


def check_nccl_tp2() -> tuple[bool, str]:
    from keye.testing.distributed import run_distributed

    if torch.cuda.device_count() < 2:
        raise Skip(f"{torch.cuda.device_count()} GPU here; TP=2 over NCCL needs two")
    [one] = run_distributed(_tp_logits, 1, 1)
    two, _ = run_distributed(_tp_logits, 2, 2)
    diff = (torch.tensor(one) - torch.tensor(two)).abs().max().item()
    return diff < 1e-4, f"max |TP2 - TP1| logits {diff:.3g} (fp32)"


# --- the table ------------------------------------------------------------------------------------------------


ROWS = ["te_vs_local_bf16", "packed_neighbour_local", "packed_neighbour_te", "fp8_te_training",
        "fp8_torch_training", "mfu_bf16_keye_vl_8b", "nccl_tp2"]


def _checks(ctx: Any, workdir: Path) -> dict[str, Callable[[], tuple[bool, str]]]:
    return {
        "te_vs_local_bf16": lambda: check_te_vs_local(ctx, workdir),
        "packed_neighbour_local": lambda: check_neighbour(ctx, "local"),
        "packed_neighbour_te": lambda: check_neighbour(ctx, "transformer_engine"),
        "fp8_te_training": lambda: check_fp8_training(ctx, "te"),
        "fp8_torch_training": lambda: check_fp8_training(ctx, "torch"),
        "mfu_bf16_keye_vl_8b": lambda: check_mfu(ctx),
        "nccl_tp2": check_nccl_tp2,
    }


def run(dry: bool) -> list[dict[str, Any]]:
    """Every row as ``{name, status, detail, seconds}``; nothing raises out of a row."""
    import megatron.core.models.gpt  # noqa: F401 - what the rows import, so --dry proves it imports
    import keye.data.packing  # noqa: F401
    import keye.model.gpt_layers  # noqa: F401
    import keye.parallel.dist_checkpoint  # noqa: F401
    import keye_plugins.language_model.qwen3  # noqa: F401

    cuda = "CUDA present" if torch.cuda.is_available() else "no CUDA on this machine"
    why = f"--dry: imports checked, nothing run ({cuda})" if dry else (None if torch.cuda.is_available() else cuda)
    if why is not None:
        return [{"name": name, "status": "skipped", "detail": why, "seconds": 0.0} for name in ROWS]
    from keye.parallel import init_parallel

    ctx = init_parallel(seed=SEED)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, check in _checks(ctx, Path(workdir)).items():
            start = time.perf_counter()
            try:
                ok, detail = check()
                status = "ok" if ok else "FAIL"
            except Skip as skip:
                status, detail = "skipped", str(skip)
            except Exception as exc:  # noqa: BLE001 - a broken row is reported, the others still run
                status = "FAIL"
                detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                traceback.print_exc()
            torch.cuda.empty_cache()
            results.append({"name": name, "status": status, "detail": detail,
                            "seconds": round(time.perf_counter() - start, 1)})
            print(f"{name:24s} {status:8s} {detail}", flush=True)
    return results


def table(results: list[dict[str, Any]], device: str) -> str:
    lines = [f"# keye GPU check ({device}, torch {torch.__version__})", "",
             "| check | status | detail | s |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['detail']} | {r['seconds']} |" for r in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="import only; report every row as skipped")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.md/.json ($OUT)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    results = run(args.dry)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry else "no GPU"
    text = table(results, device)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.md").write_text(text)
        (out / "gpu_check.json").write_text(json.dumps({"device": device, "rows": results}, indent=1))
    return 1 if any(r["status"] == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
