"""Released Keye-VL checkpoints: load, save, and the forward pass against independent references.

The tiny checkpoint is written here from scratch in the released naming (spec §1.7): the list of names and
shapes below is typed out from the spec, not taken from keye.hf. The references are written here too:

- a float64 forward of the whole model from the spec, with plain torch ops: SigLIP ViT with interpolated
  absolute position embeddings (bilinear, half-pixel, written as interpolation matrices) and 2D RoPE
  (§1.1), block-diagonal attention per image/video, the pre-merge-LayerNorm projector (§1.2), the
  embedding scatter, M-RoPE ids and channel split (§1.4), Qwen3 layers with q/k norms (§1.3);
- transformers' ``Qwen3ForCausalLM`` for text-only input (M-RoPE with equal ids is plain RoPE).

Megatron state is per process, so the model runs in a spawned process (``run_distributed``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from keye.errors import KeyeUserError
from keye.hf import hf_configs
from keye.testing.distributed import run_distributed

IMAGE, VIDEO, V_START, V_END, PAD = 250, 251, 248, 249, 0

TINY_CONFIG = {
    "architectures": ["KeyeForConditionalGeneration"], "model_type": "Keye", "torch_dtype": "float32",
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
    "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "attention_bias": False,
    "attention_dropout": 0.0, "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": None,
    "bos_token_id": 0, "eos_token_id": 1, "vision_start_token_id": V_START, "vision_end_token_id": V_END,
    "vision_token_id": 252, "image_token_id": IMAGE, "video_token_id": VIDEO,
    "vision_config": {
        "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_channels": 3, "image_size": 56, "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "attention_dropout": 0.0,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "tokens_per_second": 2,
    },
}


def released_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a released checkpoint (spec §1.7), unused ones included."""
    vc = cfg["vision_config"]
    d, inner, p = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"]
    v = "visual.vision_model."
    shapes = {
        v + "embeddings.patch_embedding.weight": (d, 3, p, p), v + "embeddings.patch_embedding.bias": (d,),
        v + "embeddings.position_embedding.weight": ((vc["image_size"] // p) ** 2, d),
        v + "embeddings.packing_position_embedding.weight": (64, d),  # unused (32768 rows when released)
        v + "post_layernorm.weight": (d,), v + "post_layernorm.bias": (d,),
        v + "head.probe": (1, 1, d), v + "head.attention.in_proj_weight": (3 * d, d),  # unused pooling head
        v + "head.attention.in_proj_bias": (3 * d,), v + "head.attention.out_proj.weight": (d, d),
        v + "head.attention.out_proj.bias": (d,), v + "head.layernorm.weight": (d,), v + "head.layernorm.bias": (d,),
        v + "head.mlp.fc1.weight": (inner, d), v + "head.mlp.fc1.bias": (inner,),
        v + "head.mlp.fc2.weight": (d, inner), v + "head.mlp.fc2.bias": (d,),
    }
    for i in range(vc["num_hidden_layers"]):
        layer = f"{v}encoder.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
            shapes[layer + name + ".weight"], shapes[layer + name + ".bias"] = (d, d), (d,)
        for name in ("layer_norm1", "layer_norm2"):
            shapes[layer + name + ".weight"], shapes[layer + name + ".bias"] = (d,), (d,)
        shapes[layer + "mlp.fc1.weight"], shapes[layer + "mlp.fc1.bias"] = (inner, d), (inner,)
        shapes[layer + "mlp.fc2.weight"], shapes[layer + "mlp.fc2.bias"] = (d, inner), (d,)
    merged, h = 4 * d, cfg["hidden_size"]
    shapes.update({"mlp_AR.pre_norm.weight": (d,), "mlp_AR.pre_norm.bias": (d,),
                   "mlp_AR.linear_1.weight": (merged, merged), "mlp_AR.linear_1.bias": (merged,),
                   "mlp_AR.linear_2.weight": (h, merged), "mlp_AR.linear_2.bias": (h,)})
    hd, ffn, vocab = cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes.update({"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)})
    for i in range(cfg["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        shapes.update({
            layer + "self_attn.q_proj.weight": (q, h), layer + "self_attn.k_proj.weight": (kv, h),
            layer + "self_attn.v_proj.weight": (kv, h), layer + "self_attn.o_proj.weight": (h, q),
            layer + "self_attn.q_norm.weight": (hd,), layer + "self_attn.k_norm.weight": (hd,),
            layer + "mlp.gate_proj.weight": (ffn, h), layer + "mlp.up_proj.weight": (ffn, h),
            layer + "mlp.down_proj.weight": (h, ffn), layer + "input_layernorm.weight": (h,),
            layer + "post_attention_layernorm.weight": (h,),
        })
    return shapes


def random_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of O(1) activations: norms near 1, matrices ~ 1/sqrt(fan_in), small biases."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in released_shapes(cfg).items():
        x = torch.randn(shape, generator=gen)
        if "norm" in name and name.endswith("weight"):
            x = 1.0 + 0.2 * x
        elif name.endswith("bias"):
            x = 0.1 * x
        elif len(shape) >= 2 and "embed" not in name:
            x = x / math.sqrt(math.prod(shape[1:]))
        else:
            x = 0.5 * x
        out[name] = x.contiguous()
    return out


def write_tiny_checkpoint(path: Path, cfg: dict | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A released-format directory: config.json, model.safetensors, generation_config.json."""
    from safetensors.torch import save_file

    cfg = cfg or TINY_CONFIG
    path.mkdir(parents=True, exist_ok=True)
    weights = random_weights(cfg, seed)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_k": 20}))
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return weights


# --- the batch: two rows, two images and a video, left padding -------------------------------------------


def tiny_batch(seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    image_grids = torch.tensor([[1, 4, 4], [1, 6, 8]])  # 4 and 12 merged tokens
    video_grids = torch.tensor([[3, 4, 4]])  # 3 frames x 4 tokens
    row0 = [5, 6, 7, V_START] + [IMAGE] * 4 + [V_END, 8, 9, V_START] + [VIDEO] * 12 + [V_END, 10, 11]
    row1 = [12, 13, 14, V_START] + [IMAGE] * 12 + [V_END, 15, 16]
    length = len(row0)
    input_ids = torch.tensor([row0, [PAD] * (length - len(row1)) + row1])
    attention_mask = (torch.arange(length) >= length - len(row1)).long().expand(2, -1).clone()
    attention_mask[0] = 1
    return dict(
        input_ids=input_ids, attention_mask=attention_mask,
        pixel_values=torch.randn(16 + 48, 3, 14, 14, generator=gen), image_grid_thw=image_grids,
        pixel_values_videos=torch.randn(48, 3 * 14 * 14, generator=gen),  # the flattened form
        video_grid_thw=video_grids, second_per_grid_ts=torch.tensor([0.75]),  # T = floor(t * 0.75 * 2)
    )


# --- the float64 reference ------------------------------------------------------------------------------


def interpolation_matrix(out: int, size: int) -> torch.Tensor:
    """``[out, size]`` bilinear weights, align_corners=False: source = (o + 0.5) * size / out - 0.5, clamped at 0."""
    a = torch.zeros(out, size, dtype=torch.float64)
    for o in range(out):
        src = max((o + 0.5) * size / out - 0.5, 0.0)
        i0 = int(src)
        i1 = min(i0 + 1, size - 1)
        a[o, i0] += 1 - (src - i0)
        a[o, i1] += src - i0
    return a


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def reference_vision(W: dict, pixels: torch.Tensor, grids: torch.Tensor, cfg: dict) -> torch.Tensor:
    """SigLIP ViT + 2D RoPE + projector (spec §1.1-1.2): ``[N, 3, 14, 14]`` → ``[N / 4, hidden]``."""
    vc = cfg["vision_config"]
    d, heads, eps = vc["hidden_size"], vc["num_attention_heads"], vc["layer_norm_eps"]
    hd, side = d // heads, vc["image_size"] // vc["patch_size"]
    v = "visual.vision_model."
    x = F.conv2d(pixels.double(), W[v + "embeddings.patch_embedding.weight"], W[v + "embeddings.patch_embedding.bias"],
                 stride=vc["patch_size"]).flatten(1)  # (N, D)
    table = W[v + "embeddings.position_embedding.weight"].view(side, side, d)
    pos, rows, cols, block = [], [], [], []
    for k, (t, h, w) in enumerate(grids.tolist()):
        grid = torch.einsum("ys,xr,srd->yxd", interpolation_matrix(h, side), interpolation_matrix(w, side), table)
        pos.append(grid.reshape(h * w, d).repeat(t, 1))
        i = torch.arange(t * h * w)
        rows.append((i % (h * w)) // w)
        cols.append(i % w)
        block.append(torch.full((t * h * w,), k))
    x = x + torch.cat(pos)
    inv = 10000.0 ** (-torch.arange(0, hd // 2, 2, dtype=torch.float64) / (hd // 2))  # (hd/4,)
    angles = torch.cat([torch.cat(rows)[:, None] * inv, torch.cat(cols)[:, None] * inv], dim=-1)  # (N, hd/2)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]  # (N, 1, hd)
    block = torch.cat(block)
    allowed = block[:, None] == block[None, :]  # (N, N)
    n = x.shape[0]
    for i in range(vc["num_hidden_layers"]):
        L = f"{v}encoder.layers.{i}."
        y = layer_norm(x, W[L + "layer_norm1.weight"], W[L + "layer_norm1.bias"], eps)
        q, k, val = (
            (y @ W[f"{L}self_attn.{p}_proj.weight"].T + W[f"{L}self_attn.{p}_proj.bias"]).view(n, heads, hd)
            for p in "qkv"
        )
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        att = torch.einsum("hqk,khd->qhd", probs, val).reshape(n, d)
        x = x + att @ W[L + "self_attn.out_proj.weight"].T + W[L + "self_attn.out_proj.bias"]
        y = layer_norm(x, W[L + "layer_norm2.weight"], W[L + "layer_norm2.bias"], eps)
        y = F.gelu(y @ W[L + "mlp.fc1.weight"].T + W[L + "mlp.fc1.bias"], approximate="tanh")
        x = x + y @ W[L + "mlp.fc2.weight"].T + W[L + "mlp.fc2.bias"]
    x = layer_norm(x, W[v + "post_layernorm.weight"], W[v + "post_layernorm.bias"], eps)
    # projector (Preview): LayerNorm per patch, then each 2x2 square concatenated (p1, p2, d), then the MLP
    x = layer_norm(x, W["mlp_AR.pre_norm.weight"], W["mlp_AR.pre_norm.bias"], 1e-5)
    merged, start = [], 0
    for t, h, w in grids.tolist():
        part = x[start:start + t * h * w].view(t, h // 2, 2, w // 2, 2, d).permute(0, 1, 3, 2, 4, 5)
        merged.append(part.reshape(-1, 4 * d))
        start += t * h * w
    x = F.gelu(torch.cat(merged) @ W["mlp_AR.linear_1.weight"].T + W["mlp_AR.linear_1.bias"])
    return x @ W["mlp_AR.linear_2.weight"].T + W["mlp_AR.linear_2.bias"]


def reference_positions(ids: torch.Tensor, keep: torch.Tensor, grids: dict, seconds: list, cfg: dict) -> torch.Tensor:
    """M-RoPE ids ``[3, L]`` of one row (spec §1.4); grids/seconds are consumed in order across rows."""
    tps = cfg["vision_config"]["tokens_per_second"]
    kept = ids[keep.bool()].tolist()
    out, nxt, i = [], 0, 0
    while i < len(kept):
        if kept[i] in (IMAGE, VIDEO):
            t, h, w = grids[kept[i]].pop(0)
            sec = seconds.pop(0) if kept[i] == VIDEO else 0.0
            block = [(nxt + int(tt * sec * tps), nxt + a, nxt + b)
                     for tt in range(t) for a in range(h // 2) for b in range(w // 2)]
            out += block
            nxt = max(max(p) for p in block) + 1
            i += len(block)
        else:
            out.append((nxt, nxt, nxt))
            nxt, i = nxt + 1, i + 1
    full = torch.ones(3, len(ids), dtype=torch.float64)  # padding: id 1, never attended
    full[:, keep.bool()] = torch.tensor(out, dtype=torch.float64).T
    return full


def reference_logits(W: dict, batch: dict, cfg: dict) -> torch.Tensor:
    """The whole released forward in float64: logits ``[B, L, V]``."""
    W = {k: v.double() for k, v in W.items()}
    ids, keep = batch["input_ids"], batch["attention_mask"].bool()
    x = W["model.embed_tokens.weight"][ids]  # (B, L, H)
    images = reference_vision(W, batch["pixel_values"], batch["image_grid_thw"], cfg)
    videos = reference_vision(W, batch["pixel_values_videos"].view(-1, 3, 14, 14), batch["video_grid_thw"], cfg)
    x[ids == IMAGE] = images  # boolean indexing is (B, L) reading order, like masked_scatter
    x[ids == VIDEO] = videos
    grids = {IMAGE: batch["image_grid_thw"].tolist(), VIDEO: batch["video_grid_thw"].tolist()}
    seconds = batch["second_per_grid_ts"].tolist()
    pos = torch.stack([reference_positions(ids[b], keep[b], grids, seconds, cfg) for b in range(len(ids))], 1)
    heads, groups, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    inv = cfg["rope_theta"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,)
    axis = [a for a, n in enumerate(cfg["rope_scaling"]["mrope_section"]) for _ in range(n)]  # frequency → t/h/w axis
    angles = torch.stack([pos[axis[f]] * inv[f] for f in range(hd // 2)], dim=-1)  # (B, L, hd/2)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, :, None], torch.cat([angles.sin()] * 2, -1)[:, :, None]
    b, n = ids.shape
    allowed = torch.ones(n, n, dtype=torch.bool).tril() & keep[:, None, None, :]  # (B, 1, L, L)
    allowed = allowed | torch.eye(n, dtype=torch.bool)  # padded rows see themselves (their logits are not compared)
    eps = cfg["rms_norm_eps"]
    for i in range(cfg["num_hidden_layers"]):
        L = f"model.layers.{i}."
        y = rms_norm(x, W[L + "input_layernorm.weight"], eps)
        q = (y @ W[L + "self_attn.q_proj.weight"].T).view(b, n, heads, hd)
        k = (y @ W[L + "self_attn.k_proj.weight"].T).view(b, n, groups, hd)
        q, k = rms_norm(q, W[L + "self_attn.q_norm.weight"], eps), rms_norm(k, W[L + "self_attn.k_norm.weight"], eps)
        v = (y @ W[L + "self_attn.v_proj.weight"].T).view(b, n, groups, hd)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(heads // groups, dim=2), v.repeat_interleave(heads // groups, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        x = x + torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, heads * hd) @ W[L + "self_attn.o_proj.weight"].T
        y = rms_norm(x, W[L + "post_attention_layernorm.weight"], eps)
        gate, up = y @ W[L + "mlp.gate_proj.weight"].T, y @ W[L + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ W[L + "mlp.down_proj.weight"].T
    return rms_norm(x, W["model.norm.weight"], eps) @ W["lm_head.weight"].T


# --- what runs in the spawned process -------------------------------------------------------------------


def _files(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _params_equal(a, b) -> bool:
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    return set(pa) == set(pb) and all(torch.equal(pa[k], pb[k]) for k in pa)


def _load_save_forward(root: str) -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from keye.hf import hf_configs, load_keye_vl, save_keye_vl

    root = Path(root)
    weights = write_tiny_checkpoint(root / "hf")
    out = {}
    model = load_keye_vl(root / "hf")
    out["skipped"] = model.skipped
    save_keye_vl(model, root / "saved")
    out["saved_equals_source"] = _same(_files(root / "saved"), weights)
    again = load_keye_vl(root / "saved")
    out["reloaded_params_equal"] = _params_equal(model, again)
    save_keye_vl(again, root / "sharded", max_shard_bytes=40_000)
    sharded = load_keye_vl(root / "sharded")
    out["shards"] = len(list((root / "sharded").glob("*.safetensors")))
    out["sharded_equals_source"] = _same(_files(root / "sharded"), weights)
    out["sharded_params_equal"] = _params_equal(model, sharded)
    out["config_round_trip"] = json.loads((root / "saved" / "config.json").read_text())
    # a bare KeyeVLModel (as a blueprint builds it): the model's tensors, token ids it lacks given by the caller
    save_keye_vl(model.model, root / "bare", extra_config={"vision_start_token_id": V_START})
    bare = _files(root / "bare")
    # the unused head and packing table it lacks are written initialised (test_export_remote_code): same names
    out["bare_equals_used"] = set(bare) == set(weights) and _same(
        {k: v for k, v in bare.items() if k not in model.skipped}, {k: v for k, v in weights.items() if k not in model.skipped})
    out["bare_config"] = hf_configs(json.loads((root / "bare" / "config.json").read_text()))

    batch = tiny_batch()
    logits = model.hf_forward(**batch)  # (B, L, V)
    out["shape"] = tuple(logits.shape)
    out["finite"] = bool(torch.isfinite(logits).all())
    keep = batch["attention_mask"].bool()
    expected = reference_logits(weights, batch, TINY_CONFIG)
    out["reference_diff"] = (logits.double() - expected)[keep].abs().max().item()
    out["reference_scale"] = expected[keep].abs().max().item()
    # the padded row alone, unpadded: same logits at its real tokens
    row = keep[1]
    alone = dict(batch, input_ids=batch["input_ids"][1:, row], attention_mask=None,
                 pixel_values=batch["pixel_values"][16:], image_grid_thw=batch["image_grid_thw"][1:],
                 pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None)
    out["padding_diff"] = (model.hf_forward(**alone)[0] - logits[1, row]).abs().max().item()

    # text only: transformers' Qwen3 with the same tensors
    c = TINY_CONFIG
    hf_config = Qwen3Config(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], head_dim=c["head_dim"], rms_norm_eps=c["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]}, tie_word_embeddings=False,
        max_position_embeddings=c["max_position_embeddings"], attention_bias=False,
    )
    qwen3 = Qwen3ForCausalLM(hf_config).eval()
    missing, unexpected = qwen3.load_state_dict(
        {k: v for k, v in weights.items() if k.startswith("model.") or k == "lm_head.weight"}, strict=False
    )
    out["qwen3_load"] = (missing, unexpected)
    text = torch.randint(0, 240, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out["text_diff"] = (model.hf_forward(text) - qwen3(input_ids=text).logits).abs().max().item()
    return out


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict:
    [result] = run_distributed(_load_save_forward, 1, str(tmp_path_factory.mktemp("keye_vl")))
    return result


def test_round_trip_is_bit_exact(loaded):
    assert loaded["skipped"] == sorted(n for n in released_shapes(TINY_CONFIG) if ".head." in n or "packing" in n)
    assert loaded["saved_equals_source"]  # every tensor, the unused ones included, same dtype and bits
    assert loaded["reloaded_params_equal"]
    assert loaded["shards"] > 1 and loaded["sharded_equals_source"] and loaded["sharded_params_equal"]
    saved = loaded["config_round_trip"]
    assert {k: v for k, v in saved.items() if k not in ("vision_config", "auto_map")} == {
        k: v for k, v in TINY_CONFIG.items() if k != "vision_config"
    }
    assert {**TINY_CONFIG["vision_config"], **saved["vision_config"]} == saved["vision_config"]
    # the source had no auto_map: the released one is added (test_export_remote_code checks its form)
    assert saved["auto_map"]["AutoModel"].endswith("modeling_keye.KeyeForConditionalGeneration")
    assert loaded["bare_equals_used"]
    assert loaded["bare_config"] == hf_configs(TINY_CONFIG)  # the same model, described from its components


def test_forward_matches_float64_reference(loaded):
    assert loaded["shape"] == (2, 27, 256) and loaded["finite"]
    assert loaded["reference_scale"] > 1.0  # the comparison is not between two near-zero tensors
    assert loaded["reference_diff"] < 1e-4, loaded
    assert loaded["padding_diff"] < 1e-5, loaded


def test_text_only_matches_transformers_qwen3(loaded):
    missing, unexpected = loaded["qwen3_load"]
    assert not unexpected and all("rotary" in name for name in missing), loaded["qwen3_load"]
    assert loaded["text_diff"] < 1e-5, loaded


# --- user errors: raised before any model is built, so they run in this process --------------------------


def _broken(tmp_path: Path, drop=(), add=None, reshape=None, config=None) -> Path:
    from safetensors.torch import save_file

    path = tmp_path / "broken"
    path.mkdir()
    weights = {k: v for k, v in random_weights(TINY_CONFIG).items() if k not in drop}
    weights.update(add or {})
    for name, shape in (reshape or {}).items():
        weights[name] = torch.zeros(shape)
    (path / "config.json").write_text(json.dumps(config or TINY_CONFIG))
    save_file(weights, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("kind, expect", [
    ("missing", "missing weight model.layers.1.mlp.up_proj.weight"),
    ("unexpected", "unexpected weight model.layers.7.mlp.up_proj.weight"),
    ("shape", "wrong shape weight mlp_AR.linear_2.weight (64, 100) (config says (64, 128))"),
    ("config", "missing key 'vision_config.patch_size'"),
])
def test_bad_checkpoints_name_the_problem(tmp_path, kind, expect):
    from keye.hf import load_keye_vl

    config = json.loads(json.dumps(TINY_CONFIG))
    del config["vision_config"]["patch_size"]
    path = _broken(
        tmp_path,
        drop=("model.layers.1.mlp.up_proj.weight",) if kind == "missing" else (),
        add={"model.layers.7.mlp.up_proj.weight": torch.zeros(1)} if kind == "unexpected" else None,
        reshape={"mlp_AR.linear_2.weight": (64, 100)} if kind == "shape" else None,
        config=config if kind == "config" else None,
    )
    with pytest.raises(KeyeUserError, match="^.*" + expect.replace("(", r"\(").replace(")", r"\)")):
        load_keye_vl(path)


def test_missing_directory_is_a_user_error(tmp_path):
    from keye.hf import load_keye_vl

    with pytest.raises(KeyeUserError, match="not a directory"):
        load_keye_vl(tmp_path / "nowhere")
