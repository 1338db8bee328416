"""The Keye ViT (``siglip_navit``) against transformers' SigLIP and against the spec read literally (§1.1).

Megatron-Core modules need Megatron's parallel state and, on CPU, keye's CUDA bridge, which patches the
process it runs in; so everything that builds the model runs in spawned ranks (``run_distributed``):
one rank computes every single-process check once (a module fixture), two ranks run TP=2 and PP=2.
The reference formulations (bilinear resize, 2D RoPE, block-diagonal attention, the whole tower) are
written here in float64 from the spec's words, not from the module's code.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from keye.model.hf_keys import fuse_qkv, split_qkv
from keye.testing.distributed import run_distributed
from keye_plugins.vision_encoder import siglip_navit
from keye_plugins.vision_encoder.siglip_navit import SiglipNaViT, hf_to_keye_state_dict, keye_to_hf_state_dict

SEED = 1234
TINY = SiglipNaViT.SIZES["tiny"]  # hidden 32, 2 layers, 2 heads (head_dim 16), 56 px / 14 → 4x4 table
HEADS, PATCH, SIDE = TINY["num_heads"], 14, TINY["image_size"] // 14
PACK = [(1, 4, 4), (1, 3, 5), (1, 2, 6), (2, 2, 3)]  # three images of different sizes and a 2-frame video
TOLERANCE = 1e-5


# --- references, from the spec --------------------------------------------------------------------


def bilinear_reference(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``[S, S, D]`` → ``[h * w, D]``: bilinear, align_corners=False, by hand.

    Output pixel y samples source ``(y + 0.5) * S / h - 0.5`` (clamped at 0) between its floor and the
    next row (clamped at S - 1); the same along x.
    """

    def taps(out: int, size: int) -> list[tuple[int, int, float]]:
        result = []
        for dst in range(out):
            src = max((dst + 0.5) * size / out - 0.5, 0.0)
            low = int(math.floor(src))
            result.append((low, min(low + 1, size - 1), src - low))
        return result

    rows = []
    for y0, y1, ly in taps(h, table.shape[0]):
        for x0, x1, lx in taps(w, table.shape[1]):
            top = table[y0, x0] * (1 - lx) + table[y0, x1] * lx
            bottom = table[y1, x0] * (1 - lx) + table[y1, x1] * lx
            rows.append(top * (1 - ly) + bottom * ly)
    return torch.stack(rows)


def rope_reference(x: torch.Tensor, grids: list[tuple[int, int, int]], theta: float = 1e4) -> torch.Tensor:
    """Spec §1.1: patch i of grid (t, h, w) has row ``(i % (h*w)) // w`` and col ``i % w``; with
    ``inv_freq[k] = theta ** (-2k / (D/2))`` for k < D/4, the D/2 angles are ``[row * inv_freq, col * inv_freq]``
    and dims i, i + D/2 rotate together by angle i (flash-attn non-interleaved). ``x``: ``[N, heads, D]``."""
    ids = [((i % (h * w)) // w, i % w) for t, h, w in grids for i in range(t * h * w)]
    rows, cols = torch.tensor(ids, dtype=x.dtype).unbind(-1)  # (N,), (N,)
    half, quarter = x.shape[-1] // 2, x.shape[-1] // 4
    inv_freq = theta ** (-2.0 * torch.arange(quarter, dtype=x.dtype) / half)  # (D/4,)
    angle = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)[:, None, :]  # (N, 1, D/2)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], dim=-1)


def navit_reference(w: dict[str, torch.Tensor], patches: torch.Tensor, grids: list, use_rope: bool) -> torch.Tensor:
    """The whole tower in float64 from HF-named weights: Conv2d patches, bilinear pos-emb per frame,
    pre-LN layers with per-image/per-video attention (each block run on its own), post-LN."""
    w = {name: t.double() for name, t in w.items()}
    eps, heads = 1e-6, HEADS

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    x = F.conv2d(patches.double(), w["embeddings.patch_embedding.weight"], w["embeddings.patch_embedding.bias"])
    x = x.flatten(1)  # (N, D)
    table = w["embeddings.position_embedding.weight"].view(SIDE, SIDE, -1)
    x = x + torch.cat([bilinear_reference(table, h, ww).repeat(t, 1) for t, h, ww in grids])
    n, dim = x.shape
    bounds = torch.tensor([0] + [t * h * ww for t, h, ww in grids]).cumsum(0).tolist()
    layer = 0
    while f"encoder.layers.{layer}.layer_norm1.weight" in w:
        p = f"encoder.layers.{layer}"
        h = ln(x, f"{p}.layer_norm1")
        q, k, v = (lin(h, f"{p}.self_attn.{s}_proj").view(n, heads, -1) for s in "qkv")  # (N, heads, hd)
        if use_rope:
            q, k = rope_reference(q, grids), rope_reference(k, grids)
        out = torch.empty_like(q)
        for start, end in zip(bounds[:-1], bounds[1:]):  # one image / one whole video at a time
            scores = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end]) / math.sqrt(dim // heads)
            out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[start:end])
        x = x + lin(out.reshape(n, dim), f"{p}.self_attn.out_proj")
        h = F.gelu(lin(ln(x, f"{p}.layer_norm2"), f"{p}.mlp.fc1"), approximate="tanh")
        x = x + lin(h, f"{p}.mlp.fc2")
        layer += 1
    return ln(x, "post_layernorm")


# --- what the spawned ranks run --------------------------------------------------------------------


def _hf_model(use_head: bool = False) -> Any:
    """A tiny transformers ``SiglipVisionModel`` whose every weight (biases, norms too) is non-trivial."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=TINY["hidden_size"], intermediate_size=TINY["intermediate_size"],
        num_hidden_layers=TINY["num_layers"], num_attention_heads=HEADS, image_size=TINY["image_size"],
        patch_size=PATCH, layer_norm_eps=1e-6, vision_use_head=use_head, attn_implementation="eager",
    )
    torch.manual_seed(SEED)
    model = SiglipVisionModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model


def _patches(grids: list[tuple[int, int, int]], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), 3, PATCH, PATCH, generator=generator)


def _patchify(pixels: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` → ``[H/14 * W/14, 3, 14, 14]`` in raster order (what Keye's processor emits)."""
    c, height, width = pixels.shape
    grid = pixels.reshape(c, height // PATCH, PATCH, width // PATCH, PATCH)  # (3, h, P, w, P)
    return grid.permute(1, 3, 0, 2, 4).reshape(-1, c, PATCH, PATCH)


def _build(ctx: Any, **overrides: Any) -> SiglipNaViT:
    from keye.model.protocols import BuildContext

    if "use_rope" in overrides:  # the 2D RoPE on or off: the position_encoding node
        overrides["position_encoding"] = {"name": "rope2d_vision" if overrides.pop("use_rope") else "none"}
    return SiglipNaViT(SiglipNaViT.Config(**{**TINY, **overrides}), BuildContext(parallel=ctx)).eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@torch.no_grad()
def _single_rank(workdir: str) -> dict[str, Any]:
    """Every TP=1 check, once: differences out, and the weights/inputs/output the TP=2 run must match."""
    from keye.parallel import init_parallel

    ctx = init_parallel(tensor=1, pipeline=1, seed=SEED)
    hf = _hf_model(use_head=True)  # the released checkpoint carries the (unused) pooling head too
    hf_weights = {name: t.detach().clone() for name, t in hf.state_dict().items()}
    result: dict[str, Any] = {}

    # (a) no RoPE, one image whose grid is the table: transformers' SigLIP exactly.
    model = _build(ctx, use_rope=False)
    model.load_hf_state_dict(hf_weights, prefix="")
    pixels = torch.randn(1, 3, SIDE * PATCH, SIDE * PATCH, generator=torch.Generator().manual_seed(1))
    expected = hf(pixels).last_hidden_state[0]  # (16, D)
    result["hf_table_size"] = _max_diff(model(_patchify(pixels[0]), torch.tensor([[1, SIDE, SIDE]])), expected)
    result["mapping_round_trip"] = {
        name: torch.equal(t, hf_weights[name]) for name, t in model.hf_state_dict(prefix="").items()
    }
    result["hf_keys"] = sorted(hf_weights)

    # (a) interpolated grid 3x5: transformers' embeddings and encoder, with the bilinear table by hand.
    pixels = torch.randn(1, 3, 3 * PATCH, 5 * PATCH, generator=torch.Generator().manual_seed(2))
    embeds = hf.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (1, 15, D)
    table = hf.embeddings.position_embedding.weight.view(SIDE, SIDE, -1)
    embeds = embeds + bilinear_reference(table, 3, 5)[None]
    expected = hf.post_layernorm(hf.encoder(inputs_embeds=embeds).last_hidden_state)[0]
    result["hf_interpolated"] = _max_diff(model(_patchify(pixels[0]), torch.tensor([[1, 3, 5]])), expected)

    # (b) packing, RoPE on: the pack gives each image/video what it gets alone.
    model = _build(ctx, use_rope=True)
    model.load_hf_state_dict(hf_weights, prefix="")
    patches = _patches(PACK)
    packed = model(patches, torch.tensor(PACK))
    alone = torch.cat([model(part, torch.tensor([grid])) for part, grid in zip(
        patches.split([t * h * w for t, h, w in PACK]), PACK)])
    result["packed_vs_alone"] = _max_diff(packed, alone)
    result["packed_vs_unmasked"] = _max_diff(packed, model.decoder(
        model.embed_patches(patches)[:, None] + model.position_embeddings(torch.tensor(PACK))[:, None],
        attention_mask=None, rotary_pos_emb=model.rotary_pos_emb(torch.tensor(PACK)))[:, 0])

    # (c) RoPE on, packed with a video: the spec's tower in float64, layer by layer.
    result["reference_rope"] = _max_diff(packed, navit_reference(hf_weights, patches, PACK, use_rope=True))
    result["reference_no_rope"] = _max_diff(
        _build_loaded(ctx, hf_weights, use_rope=False)(patches, torch.tensor(PACK)),
        navit_reference(hf_weights, patches, PACK, use_rope=False),
    )

    # Activation recompute changes memory, not results (forward and weight gradients).
    result["recompute_grad"] = _recompute_difference(ctx, hf_weights, patches)

    torch.save({"hf_weights": hf_weights, "patches": patches, "packed": packed}, Path(workdir) / "tp1.pt")
    return result


def _build_loaded(ctx: Any, hf_weights: dict[str, torch.Tensor], **overrides: Any) -> SiglipNaViT:
    model = _build(ctx, **overrides)
    model.load_hf_state_dict(hf_weights, prefix="")
    return model


def _recompute_difference(ctx: Any, hf_weights: dict[str, torch.Tensor], patches: torch.Tensor) -> float:
    grads = []
    for recompute in (False, True):
        model = _build_loaded(ctx, hf_weights, recompute=recompute).train()
        with torch.enable_grad():
            model(patches, torch.tensor(PACK)).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return _max_diff(*grads)


@torch.no_grad()
def _two_ranks(workdir: str) -> dict[str, Any]:
    """The packed RoPE forward with the TP=1 weights loaded by global name: as TP=2 (each rank takes its
    slice), then, in the same processes, as PP=2 (the tower must stay whole on a pipeline stage)."""
    from megatron.core import parallel_state as mpu

    from keye.parallel import init_parallel

    saved = torch.load(Path(workdir) / "tp1.pt")
    ctx = init_parallel(tensor=2, pipeline=1, seed=SEED + 1)  # another seed: weights must come from the file
    model = _build_loaded(ctx, saved["hf_weights"], use_rope=True)
    gathered = model.hf_state_dict(prefix="")  # all ranks take part in the gather
    result = {
        "tp2_heads_here": model.decoder.layers[0].self_attention.num_attention_heads_per_partition,
        "tp2_output": model(saved["patches"], torch.tensor(PACK)),
        "tp2_gathered_equal": all(torch.equal(t, saved["hf_weights"][name]) for name, t in gathered.items()),
    }
    mpu.destroy_model_parallel()

    ctx = init_parallel(tensor=1, pipeline=2, seed=SEED + 2)
    model = _build_loaded(ctx, saved["hf_weights"], use_rope=True)
    result["pp2_layer_numbers"] = [layer.layer_number for layer in model.decoder.layers]
    result["pp2_output"] = model(saved["patches"], torch.tensor(PACK))
    return result


# --- the tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    workdir = str(tmp_path_factory.mktemp("siglip_navit"))
    [result] = run_distributed(_single_rank, 1, workdir)
    return workdir, result


def test_bilinear_reference_by_hand() -> None:
    table = torch.tensor([[0.0, 1.0], [2.0, 3.0]])[..., None]  # (2, 2, 1)
    assert bilinear_reference(table, 1, 1).flatten().tolist() == [1.5]  # the centre
    # 2 → 1 rows: the mean row [1, 2]; 2 → 4 along x samples sources -0.25 (clamped to 0), 0.25, 0.75,
    # 1.25 (upper tap clamped to 1)
    assert bilinear_reference(table, 1, 4).flatten().tolist() == [1.0, 1.25, 1.75, 2.0]
    assert bilinear_reference(table, 2, 2).flatten().tolist() == [0.0, 1.0, 2.0, 3.0]  # same size: unchanged
    big = torch.randn(5, 5, 3, dtype=torch.float64)
    torch_resize = F.interpolate(big.permute(2, 0, 1)[None], size=(3, 7), mode="bilinear", align_corners=False)
    torch.testing.assert_close(bilinear_reference(big, 3, 7), torch_resize[0].permute(1, 2, 0).reshape(21, 3))


def test_fused_qkv_layout_by_hand() -> None:
    """Two heads of width 1: Megatron's linear_qkv rows are [q_0, k_0, v_0, q_1, k_1, v_1]."""
    q, k, v = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [4.0]]), torch.tensor([[5.0], [6.0]])
    assert fuse_qkv(q, k, v, num_heads=2).flatten().tolist() == [1, 3, 5, 2, 4, 6]
    assert fuse_qkv(q[:, 0], k[:, 0], v[:, 0], num_heads=2).tolist() == [1, 3, 5, 2, 4, 6]  # biases
    wide = [torch.randn(2 * 3, 5) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fuse_qkv(*wide, 2), 2), wide))


def test_weight_names_map_both_ways() -> None:
    hf = {"visual.vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 14, 14),
          "visual.vision_model.embeddings.packing_position_embedding.weight": torch.zeros(8, 4),
          "visual.vision_model.head.probe": torch.zeros(1, 1, 4),
          "mlp_AR.linear_1.weight": torch.zeros(1)}
    for part in ("q", "k", "v", "out"):
        hf[f"visual.vision_model.encoder.layers.0.self_attn.{part}_proj.weight"] = torch.randn(4, 4)
    ours = hf_to_keye_state_dict(hf, num_heads=2)
    assert sorted(ours) == ["decoder.layers.0.self_attention.linear_proj.weight",
                            "decoder.layers.0.self_attention.linear_qkv.weight", "patch_embedding.weight"]
    back = keye_to_hf_state_dict(ours, num_heads=2)
    assert all(torch.equal(back[name], hf[name]) for name in back) and len(back) == 5
    with pytest.raises(KeyError, match="unknown weight visual.vision_model.embeddings.oops"):
        hf_to_keye_state_dict({"visual.vision_model.embeddings.oops": torch.zeros(1)}, num_heads=2)


def test_registers_itself() -> None:
    registered = {}
    siglip_navit.keye_register_vision_encoders(lambda name, cls: registered.update({name: cls}))
    assert registered == {"siglip_navit": SiglipNaViT}
    assert SiglipNaViT.SIZES["keye_vl_8b"] == dict(
        hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, image_size=384)


def test_matches_transformers_siglip(single: tuple[str, dict[str, Any]]) -> None:
    _, result = single
    assert result["hf_table_size"] < TOLERANCE  # grid == table: no interpolation at all
    assert result["hf_interpolated"] < TOLERANCE  # grid 3x5 from the 4x4 table
    assert all(result["mapping_round_trip"].values())
    head = [name for name in result["hf_keys"] if name.startswith("head.")]
    assert head and sorted(result["mapping_round_trip"]) == sorted(set(result["hf_keys"]) - set(head))


def test_packing_is_block_diagonal(single: tuple[str, dict[str, Any]]) -> None:
    _, result = single
    assert result["packed_vs_alone"] < TOLERANCE
    assert result["packed_vs_unmasked"] > 1e-2  # without the mask the images would mix: the check has teeth


def test_rope_and_video_blocks_match_spec_reference(single: tuple[str, dict[str, Any]]) -> None:
    _, result = single
    assert result["reference_rope"] < TOLERANCE
    assert result["reference_no_rope"] < TOLERANCE


def test_recompute_gives_same_gradients(single: tuple[str, dict[str, Any]]) -> None:
    _, result = single
    assert result["recompute_grad"] < TOLERANCE


def test_tp2_and_pp2_equal_one_process(single: tuple[str, dict[str, Any]]) -> None:
    workdir, _ = single
    expected = torch.load(Path(workdir) / "tp1.pt")["packed"]
    ranks = run_distributed(_two_ranks, 2, workdir)
    assert [r["tp2_heads_here"] for r in ranks] == [1, 1]  # each rank really holds half the heads
    # Never split across stages: every stage that builds the tower holds layers 1..n (not n/2 of them,
    # nor layers numbered from a later stage's offset).
    assert [r["pp2_layer_numbers"] for r in ranks] == [list(range(1, TINY["num_layers"] + 1))] * 2
    for r in ranks:
        assert r["tp2_gathered_equal"]
        assert _max_diff(r["tp2_output"], expected) < TOLERANCE
        assert _max_diff(r["pp2_output"], expected) < TOLERANCE
