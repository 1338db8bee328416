"""What a Transformer Engine run is handed, checked where TE cannot run (this CPU); TE itself runs in
``tests/gpu/`` and ``tools/gpu_check.py``.

* ``packing_masks.causal_thd_params``: a packed row's block-causal mask → ``thd`` PackedSeqParams whose
  cu_seqlens are the samples' boundaries and the padding block (written out by hand here); any other mask
  (tree-shaped, bidirectional, several rows) has no thd form.
* qwen3 hands Megatron that thd form instead of the dense mask (what TE needs: under ``causal`` it ignores a
  mask). With keye's SDPA attention, and with Megatron's own ``SelfAttention`` (the module TE's spec uses:
  its thd squeeze and its per-token thd RoPE), each sample's logits equal the sample run alone, and the
  row's logits equal Megatron's dense-mask ``DotProductAttention`` (an independent attention). Position ids
  are random per M-RoPE axis, so RoPE that restarted per sequence (Megatron's other thd mapping) would fail.
* FP8 GEMM rows: ``loss_rows.aligned_rows`` by hand; an FP8 (torch backend) qwen3's last MLP sees 16 rows
  for 5 loss positions, the added rows' loss is dropped, the rest match the full FP8 computation.
* The ViT's FP8 is its own choice (``precision.fp8.vision``): off, no FP8 linears; on, FP8 linears fed a
  pack padded to a multiple of 16 rows, features close to fp32; the padding block changes nothing (fp32).
* ``parallel.sequence_parallel`` on local layers: qwen3 refuses it in one line (Megatron's local norms would
  assert); the vision towers never split their sequence (their config says so whatever the layout says).

Tolerances: fp32 paths 1e-5 absolute on logits of size ~1 (measured ~1e-6). FP8 vs FP8 with other rows in
the tensor: per-tensor scales change with the rows, so 5% relative (e4m3, see tests/model/test_fp8.py).
"""

from __future__ import annotations

import pytest
import torch

from keye.config.schema import FP8Config
from keye.data.packing import block_attention_mask
from keye.testing.distributed import run_distributed

SEED = 11
LENGTHS = [5, 7, 4]  # three packed samples; the row is padded to T
T = 24
WANTED = [2, 6, 9, 13, 15]  # positions whose loss counts (5: not a multiple of 16)
TORCH_FP8 = FP8Config(enabled=True, backend="torch")


def _row_mask() -> torch.Tensor:
    """``(1, 1, T, T)`` bool, True = masked: what ``collate_pack`` builds for LENGTHS padded to T."""
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    return (~block_attention_mask(cu, T, causal=True)).view(1, 1, T, T)


# --- pure functions ---------------------------------------------------------------------------------------


def test_block_causal_mask_becomes_thd_cu_seqlens_with_the_padding_block():
    from keye.model.packing_masks import causal_block_lengths, causal_thd_params

    params = causal_thd_params(_row_mask())
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == [0, 5, 12, 16, 24]
    assert params.cu_seqlens_q.dtype == torch.int32  # what TE's kernels take
    assert params.max_seqlen_q == params.max_seqlen_kv == 8  # the padding block is the longest
    assert causal_block_lengths(~torch.eye(3, dtype=torch.bool)) == [1, 1, 1]  # each token sees itself only

    tree = _row_mask().clone()
    tree[0, 0, 8, 6] = True  # a token of sample 2 no longer sees an earlier one: not causal
    bidirectional = ~block_attention_mask(torch.tensor([0, 5, 12, 16]), T, causal=False)
    leaking = _row_mask().clone()
    leaking[0, 0, 7, 2] = False  # sample 2 sees sample 1
    for mask in (tree, bidirectional, leaking, _row_mask().expand(2, 1, T, T)):
        assert causal_block_lengths(mask) is None and causal_thd_params(mask) is None


def test_aligned_rows_adds_the_earliest_unkept_positions_to_a_multiple():
    from keye.model.loss_rows import aligned_rows

    keep = torch.zeros(2, 12, dtype=torch.bool)
    keep[0, [3, 7]] = True
    keep[1, [0, 5, 11]] = True  # 5 kept
    out = aligned_rows(keep, 8)
    assert int(out.sum()) == 8 and bool((out | ~keep).all())  # a superset, 8 rows
    assert (out & ~keep).nonzero().tolist() == [[0, 0], [0, 1], [0, 2]]  # earliest, batch-major
    assert torch.equal(aligned_rows(keep, 1), keep)
    assert int(aligned_rows(keep, 16).sum()) == 16
    assert bool(aligned_rows(keep[1:], 16).all())  # 3 kept of 12 positions: 16 cannot be reached, all rows
    assert torch.equal(aligned_rows(out, 8), out)  # already aligned: unchanged


# --- models in one spawned process (Megatron's parallel state is per process) ---------------------------------


def _qwen3(ctx, attention: str = "sdpa", fp8=None):
    from keye.model.protocols import BuildContext
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel

    config = Qwen3LanguageModel.Config(**Qwen3LanguageModel.SIZES["tiny"], attention=attention)
    return Qwen3LanguageModel(config, BuildContext(ctx, seed=SEED, fp8=fp8)).eval()


def _vit(ctx, fp8=None, attention: str = "sdpa"):
    from keye.model.protocols import BuildContext
    from keye_plugins.vision_encoder.siglip_navit import SiglipNaViT

    torch.manual_seed(SEED)
    config = SiglipNaViT.Config(**SiglipNaViT.SIZES["tiny"], attention=attention)
    return SiglipNaViT(config, BuildContext(parallel=ctx, fp8=fp8)).eval()


def _rows_seen(module: torch.nn.Module) -> list[int]:
    """Rows of every input ``module`` is called with (a forward pre-hook; left installed)."""
    seen: list[int] = []
    module.register_forward_pre_hook(lambda _, args: seen.append(args[0].numel() // args[0].shape[-1]))
    return seen


def _llm_results(ctx) -> dict:
    from megatron.core.transformer.attention import SelfAttention

    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, 1024, (1, T), generator=gen)
    positions = torch.randint(0, 40, (3, 1, T), generator=gen)  # (3, B, L): axes differ, no shift invariance
    labels = torch.randint(0, 1024, (1, T), generator=gen)
    mask = _row_mask()
    model, dense = _qwen3(ctx, "sdpa"), _qwen3(ctx, "megatron")
    dense.load_state_dict(model.state_dict())
    calls: list = []  # what the core attention of layer 1 is called with: (mask, packed_seq_params format)
    model.gpt.decoder.layers[0].self_attention.core_attention.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append((args[3], getattr(kwargs.get("packed_seq_params"), "qkv_format", None))),
        with_kwargs=True)
    out: dict = {"thd": model._attention_inputs(mask, 1)[1].cu_seqlens_q.tolist(), "calls": calls}
    bounds = [0, 5, 12, 16]
    with torch.no_grad():
        packed = model(ids, positions, mask)  # (1, T, V)
        alone = [model(ids[:, s:e], positions[:, :, s:e], None) for s, e in zip(bounds[:-1], bounds[1:])]
        out["vs_alone"] = max((packed[:, s:e] - a).abs().max().item() for s, e, a in zip(bounds, bounds[1:], alone))
        out["vs_dense"] = (packed - dense(ids, positions, mask)).abs().max().item()
        for layer in model.gpt.decoder.layers:  # Megatron's own SelfAttention (no state of its own in keye's)
            layer.self_attention.__class__ = SelfAttention
        megatron_rope = model(ids, positions, mask)
        out["megatron_self_attention_vs_alone"] = max(
            (megatron_rope[:, s:e] - a).abs().max().item() for s, e, a in zip(bounds, bounds[1:], alone))

        fp8 = _qwen3(ctx, "sdpa", TORCH_FP8)
        fp8.load_state_dict(dense.state_dict())
        seen = _rows_seen(fp8.gpt.decoder.layers[-1].mlp.linear_fc1)
        loss_mask = torch.zeros(1, T)
        loss_mask[0, WANTED] = 1.0
        rows_loss = fp8(ids, positions, mask, labels=labels, loss_mask=loss_mask)  # (1, T)
        full_loss = fp8(ids, positions, mask, labels=labels)  # every row
        rows_logits = fp8(ids, positions, mask, logits_at=loss_mask.bool())  # (1, 5, V)
        full_logits = fp8(ids, positions, mask)
    out["fp8_rows"] = seen
    out["dropped"] = rows_loss[loss_mask == 0].abs().max().item()
    wanted = loss_mask.bool()
    out["loss_rel"] = ((rows_loss[wanted] - full_loss[wanted]).norm() / full_loss[wanted].norm()).item()
    out["logits_shape"] = tuple(rows_logits.shape)
    out["logits_rel"] = ((rows_logits[0] - full_logits[wanted]).norm() / full_logits[wanted].norm()).item()
    return out


def _vit_results(ctx) -> dict:
    grids = torch.tensor([[1, 2, 3], [1, 4, 4]])  # 6 + 16 = 22 patches
    patches = torch.randn(22, 3, 14, 14, generator=torch.Generator().manual_seed(SEED))
    plain, off = _vit(ctx), _vit(ctx, FP8Config(enabled=True, backend="torch", vision=False))
    on = _vit(ctx, FP8Config(enabled=True, backend="torch", vision=True))
    on.load_state_dict(plain.state_dict())
    fp8_linears = [sum("Fp8" in type(m).__name__ for m in vit.modules()) for vit in (off, on)]
    seen = _rows_seen(on.decoder.layers[0].mlp.linear_fc1)
    with torch.no_grad():
        expected = plain(patches, grids)
        actual = on(patches, grids)
        plain.fp8_rows = 16  # the same padding block, in fp32: it must change nothing
        padded = plain(patches, grids)
    return {
        "fp8_linears": fp8_linears, "rows": seen, "shape": tuple(actual.shape),
        "cosine": torch.nn.functional.cosine_similarity(actual.flatten(), expected.flatten(), dim=0).item(),
        "relative": ((actual - expected).norm() / expected.norm()).item(),
        "padding_changes": (padded - expected).abs().max().item(),
    }


def _sequence_parallel_results(ctx) -> dict:
    """qwen3 on local layers with sequence parallelism on: the one-line error; the ViT: never split."""
    from dataclasses import replace

    from keye.errors import KeyeUserError

    on = replace(ctx, sequence_parallel=True)
    try:
        _qwen3(on)
        error = None
    except KeyeUserError as exc:
        error = str(exc)
    return {"error": error, "vit": _vit(on).transformer_config.sequence_parallel}


def _one_rank() -> dict:
    from keye.parallel import init_parallel

    ctx = init_parallel(seed=SEED)
    return {"llm": _llm_results(ctx), "vit": _vit_results(ctx), "sp": _sequence_parallel_results(ctx)}


@pytest.fixture(scope="module")
def results() -> dict:
    [result] = run_distributed(_one_rank, 1)
    return result


def test_qwen3_hands_megatron_thd_and_packed_samples_stay_apart(results):
    llm = results["llm"]
    assert llm["thd"] == [0, 5, 12, 16, 24]
    assert llm["calls"][0] == (None, "thd")  # the packed row reached attention as thd, no dense mask
    assert llm["calls"][1] == (None, None)  # a sample alone: no mask at all, the layers' causal type
    assert llm["vs_alone"] < 1e-5, llm  # keye's SDPA under thd
    assert llm["vs_dense"] < 1e-5, llm  # Megatron's dense-mask attention
    assert llm["megatron_self_attention_vs_alone"] < 1e-5, llm  # Megatron's thd squeeze and per-token RoPE


def test_fp8_loss_rows_are_a_multiple_of_16_and_the_extra_rows_dropped(results):
    llm = results["llm"]
    assert llm["fp8_rows"][0] == 16 and llm["fp8_rows"][1] == T and llm["fp8_rows"][2] == 16, llm["fp8_rows"]
    assert llm["dropped"] == 0.0
    assert llm["loss_rel"] < 0.05 and llm["logits_rel"] < 0.05, llm
    assert llm["logits_shape"] == (1, len(WANTED), 1024)


def test_vit_fp8_is_its_own_choice_and_pads_its_pack_to_16_rows(results):
    vit = results["vit"]
    assert vit["fp8_linears"] == [0, 4 * 2]  # vision off: none; on: qkv, proj, fc1, fc2 in 2 layers
    assert vit["rows"] == [32] and vit["shape"] == (22, 32)  # 22 patches + a block of 10
    assert vit["cosine"] > 0.99 and 1e-5 < vit["relative"] < 0.05, vit  # close, and FP8 did run (3e-4)
    assert vit["padding_changes"] < 1e-5, vit


def test_sequence_parallel_on_local_layers_is_one_line_and_the_vit_never_splits(results):
    error = results["sp"]["error"]
    assert error is not None and "\n" not in error, error
    assert error.startswith("parallel.sequence_parallel needs Transformer Engine layers"), error
    assert results["sp"]["vit"] is False


if __name__ == "__main__":  # print the measured numbers
    print(run_distributed(_one_rank, 1))
