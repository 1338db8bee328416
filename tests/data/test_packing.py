"""Packing, the packed attention layout and the FLOPs estimate (the balancing across ranks that uses it is
``tests/data/test_flops_balance.py``).

Each numeric piece is checked on hand-computed cases and against an independent formulation written
here (per-sample masks put on a block diagonal)."""

import itertools
import random

import pytest
import torch

from keye.data.packing import (
    KEYE_8B_LLM,
    KEYE_VIT,
    Pack,
    PackItem,
    TransformerDims,
    block_attention_mask,
    estimate_flops,
    flops_cost,
    pack_samples,
    packed_position_ids,
    packing_efficiency,
)


def text_items(lengths):
    return [PackItem(f"s{i}", n) for i, n in enumerate(lengths)]


# --- packing --------------------------------------------------------------------------------------


def test_first_fit_decreasing_by_hand():
    # sorted: 6(i0) 5(i1) 4(i2) 3(i3) 2(i4) 1(i5) into 10: [6,4] [5,3,2] [1]
    result = pack_samples(text_items([6, 5, 4, 3, 2, 1]), max_tokens=10)
    assert [p.indices for p in result.packs] == [[0, 2], [1, 3, 4], [5]]
    assert [p.cu_seqlens for p in result.packs] == [[0, 6, 10], [0, 5, 8, 10], [0, 1]]
    assert result.rejected == []
    assert packing_efficiency(result.packs) == pytest.approx(21 / 30)


def test_best_fit_takes_the_tightest_pack():
    # sorted 8(i1) 7(i3) 5(i0) 4(i4) → [8] [7] [5,4]; the 1 goes to the first pack (first fit)
    # or to the pack it fills exactly (best fit).
    items = text_items([5, 8, 1, 7, 4])
    first = pack_samples(items, 10, strategy="first_fit")
    best = pack_samples(items, 10, strategy="best_fit")
    assert [p.indices for p in first.packs] == [[1, 2], [3], [0, 4]]
    assert [p.indices for p in best.packs] == [[1], [3], [0, 2, 4]]
    assert packing_efficiency(best.packs) == pytest.approx(25 / 30)


def test_vision_tokens_count_and_patch_cap_opens_new_packs():
    items = [
        PackItem("a", num_text_tokens=10, num_vision_patches=400, vision_tokens=100),
        PackItem("b", num_text_tokens=20, num_vision_patches=400, vision_tokens=100),
        PackItem("c", num_text_tokens=50),
    ]
    # tokens: a=110, b=120, c=50; all fit in 300 tokens, but two images exceed 500 patches.
    result = pack_samples(items, max_tokens=300, max_vision_patches=500)
    assert [p.indices for p in result.packs] == [[1, 2], [0]]
    assert [p.lengths for p in result.packs] == [[120, 50], [110]]
    assert [p.num_vision_patches for p in result.packs] == [400, 400]
    assert pack_samples(items, max_tokens=300).packs[0].indices == [0, 1, 2]


def test_oversized_samples_are_rejected_with_reasons():
    items = [
        PackItem("ok", 5),
        PackItem("long", 8, vision_tokens=4),
        PackItem("huge_image", 2, num_vision_patches=64, vision_tokens=4),
        PackItem("empty", 0),
    ]
    result = pack_samples(items, max_tokens=10, max_vision_patches=32)
    assert [p.indices for p in result.packs] == [[0]]
    reasons = {r.key: r.reason for r in result.rejected}
    assert [r.index for r in result.rejected] == [1, 2, 3]
    assert reasons["long"] == "12 tokens (text 8 + vision 4) exceed max_tokens 10"
    assert reasons["huge_image"] == "64 vision patches exceed max_vision_patches 32"
    assert "empty" in reasons["empty"]


def test_random_packings_place_every_sample_once_within_caps():
    rng = random.Random(0)
    for strategy in ("first_fit", "best_fit"):
        for _ in range(30):
            items = [
                PackItem(str(i), rng.randint(0, 300), (p := rng.choice([0, 0, 64, 256, 1024])), p // 4)
                for i in range(rng.randint(1, 40))
            ]
            result = pack_samples(items, 512, 1200, strategy=strategy)
            placed = sorted(i for p in result.packs for i in p.indices)
            rejected = [r.index for r in result.rejected]
            assert sorted(placed + rejected) == list(range(len(items)))
            for pack in result.packs:
                assert pack.num_tokens <= 512 and pack.num_vision_patches <= 1200
                assert pack.cu_seqlens[-1] == pack.num_tokens
                assert pack.lengths == [items[i].num_tokens for i in pack.indices]
            # a decreasing greedy never leaves two packs that could be merged
            sizes = sorted(p.num_tokens for p in result.packs)
            assert len(sizes) < 2 or sizes[0] + sizes[1] > 512 or any(
                a.num_vision_patches + b.num_vision_patches > 1200
                for a, b in itertools.combinations(result.packs, 2)
            )


def test_bad_arguments():
    with pytest.raises(ValueError, match="strategy"):
        pack_samples(text_items([1]), 10, strategy="worst_fit")
    with pytest.raises(ValueError, match="max_tokens"):
        pack_samples(text_items([1]), 0)


def test_efficiency_of_nothing_is_zero():
    assert packing_efficiency([]) == 0.0


# --- attention layout -------------------------------------------------------------------------------


def reference_mask(lengths, seq_len, causal):
    """Independent construction: one block per sample (and one for the padding) on the diagonal."""
    blocks = [torch.ones(n, n, dtype=torch.bool) for n in lengths]
    pad = seq_len - sum(lengths)
    if pad:
        blocks.append(torch.ones(pad, pad, dtype=torch.bool))
    if causal:
        blocks = [b.tril() for b in blocks]
    return torch.block_diag(*blocks)


def test_mask_by_hand():
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(block_attention_mask([0, 2, 5]), expected)
    assert torch.equal(packed_position_ids([0, 2, 5]), torch.tensor([0, 1, 0, 1, 2]))


@pytest.mark.parametrize("causal", [True, False])
def test_mask_matches_per_sample_construction(causal):
    rng = random.Random(1)
    for _ in range(20):
        lengths = [rng.randint(1, 9) for _ in range(rng.randint(1, 6))]
        seq_len = sum(lengths) + rng.choice([0, 0, 3])
        cu = [0, *itertools.accumulate(lengths)]
        mask = block_attention_mask(cu, seq_len, causal=causal)
        assert mask.shape == (seq_len, seq_len)
        assert torch.equal(mask, reference_mask(lengths, seq_len, causal))
        assert bool(mask.any(dim=1).all())  # no fully masked row: softmax stays finite
        positions = torch.cat([torch.arange(n) for n in lengths + [seq_len - sum(lengths)]])
        assert torch.equal(packed_position_ids(cu, seq_len), positions)


def test_packed_attention_equals_attention_per_sample():
    """The mask really isolates samples: packed SDPA output equals running each sample alone."""
    torch.manual_seed(0)
    lengths = [3, 5, 2]
    cu = [0, *itertools.accumulate(lengths)]
    q, k, v = (torch.randn(1, 2, sum(lengths), 4) for _ in range(3))  # (B, H, T, D)
    packed = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=block_attention_mask(cu))
    for start, end in zip(cu[:-1], cu[1:]):
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[..., start:end, :], k[..., start:end, :], v[..., start:end, :], is_causal=True
        )
        torch.testing.assert_close(packed[..., start:end, :], alone)


def test_mask_rejects_bad_boundaries():
    with pytest.raises(ValueError, match="shorter"):
        block_attention_mask([0, 4], seq_len=3)
    with pytest.raises(ValueError, match="start at 0"):
        block_attention_mask([0, 4, 2])


# --- FLOPs ------------------------------------------------------------------------------------------

TINY_LLM = TransformerDims(hidden_size=2, num_layers=1, ffn_hidden_size=3, num_heads=1)
TINY_VIT = TransformerDims(hidden_size=2, num_layers=1, ffn_hidden_size=2, num_heads=1, causal=False)


def test_flops_by_hand():
    # LLM per token: 2·(q,o 2·2·1·2 + k,v 2·2·1·2 + ffn 2·2·3) = 2·28 = 56
    # causal attention, n=3: 6 score entries · 4·1·2 = 48
    assert estimate_flops(3, 0, TINY_LLM) == 3 * 56 + 48
    # ViT per patch: 2·(8 + 8 + 2·2·2) = 48; 8 patches in one block: 64 pairs · 8 = 512.
    # LLM then sees 3 text + 8 // 4 = 2 vision tokens: 5·56 + 15·8 = 400.
    assert estimate_flops(3, 8, TINY_LLM, TINY_VIT) == 400 + 8 * 48 + 512
    # two images of 4 patches are two blocks: 2 · 16 · 8 = 256 instead of 512
    assert estimate_flops(3, [4, 4], TINY_LLM, TINY_VIT) == 400 + 8 * 48 + 256
    explicit = estimate_flops(3, 8, TINY_LLM, TINY_VIT, num_vision_tokens=8)
    assert explicit == 11 * 56 + 66 * 8 + 8 * 48 + 512


def test_flops_linear_term_is_twice_the_parameters_for_keye_8b():
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 12288
    params = 36 * layer + 4096 * 151936  # decoder matrices and lm_head (spec §1.3)
    assert KEYE_8B_LLM.linear_flops_per_token() == 2 * params
    assert 7.5e9 < params < 7.6e9
    # quadratic attention makes one long sample dearer than many short ones of the same total
    assert estimate_flops(8192, 0, KEYE_8B_LLM) > 8 * estimate_flops(1024, 0, KEYE_8B_LLM)
    assert estimate_flops(100, 1024, KEYE_8B_LLM, KEYE_VIT) > estimate_flops(100, 1024, KEYE_8B_LLM)


def test_pack_flops_are_the_sum_of_their_samples():
    items = [PackItem("a", 3, 8, 2), PackItem("b", 4)]
    pack = pack_samples(items, 100, cost=flops_cost(TINY_LLM, TINY_VIT)).packs[0]
    assert pack.flops == estimate_flops(3, 8, TINY_LLM, TINY_VIT) + estimate_flops(4, 0, TINY_LLM, TINY_VIT)

