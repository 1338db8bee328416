"""Time-aligned M-RoPE (spec §1.4): position ids vs transformers' Qwen2.5-VL and by hand, packed rows vs
samples run alone, the channel split vs transformers and an independent per-channel formula, and the
Megatron-Core mrope path (``MultimodalRotaryEmbedding`` + its rotary application) on our ids."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from keye_plugins.position_encoding.mrope_time_aligned import (
    MRopeTimeAligned,
    apply_mrope,
    get_rope_index,
    megatron_rotary_pos_emb,
    packed_position_ids,
    select_sections,
)

IMG, VID, VS, VE = 151655, 151656, 151652, 151653
PAD = 151643


def text(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def block(token: int, grid: tuple[int, int, int]) -> list[int]:
    t, h, w = grid
    return [VS] + [token] * (t * h * w // 4) + [VE]


def batch(rows: list[list[int]], left: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad rows to one length (left or right) and return input_ids and attention_mask."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, (row, pad_left) in enumerate(zip(rows, left)):
        sl = slice(length - len(row), length) if pad_left else slice(0, len(row))
        ids[b, sl] = torch.tensor(row)
        mask[b, sl] = 1
    return ids, mask


@pytest.fixture(scope="module")
def qwen25vl():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=256, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
            intermediate_size=32, vocab_size=64, bos_token_id=None, eos_token_id=None,
            rope_parameters=dict(rope_type="default", mrope_section=[16, 24, 24], rope_theta=1e6),
        ),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=256,
                           tokens_per_second=2, spatial_merge_size=2),
    )
    return Qwen2_5_VLModel(config).eval()


def hf_rope_index(model, ids, mask, image_grid_thw, video_grid_thw, second_per_grid_ts):
    mm_token_type_ids = (ids == IMG).int() + 2 * (ids == VID).int()
    return model.get_rope_index(
        ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts, attention_mask=mask,
    )


# --- position ids ---------------------------------------------------------------------------------------


def test_by_hand_image():
    # t0 t1 <vs> [image 1x4x6 -> merged 2x3] <ve> t2
    ids = torch.tensor([text(2) + block(IMG, (1, 4, 6)) + text(1)])
    pos, delta = get_rope_index(ids, image_grid_thw=torch.tensor([[1, 4, 6]]))
    assert pos[0, 0].tolist() == [0, 1, 2] + [3] * 6 + [6, 7]  # T: constant for an image
    assert pos[1, 0].tolist() == [0, 1, 2] + [3, 3, 3, 4, 4, 4] + [6, 7]  # H: merged row
    assert pos[2, 0].tolist() == [0, 1, 2] + [3, 4, 5, 3, 4, 5] + [6, 7]  # W: merged col
    assert delta.tolist() == [[8 - 11]]


def test_by_hand_video_time_alignment():
    """4 frames of a 2x2-patch video (one token each) at 1 s per frame: T advances 2 ids per frame."""
    ids = torch.tensor([text(2) + [VID] * 4 + text(2)])
    pos, delta = get_rope_index(ids, video_grid_thw=torch.tensor([[4, 2, 2]]), second_per_grid_ts=torch.tensor([1.0]))
    assert pos[0, 0].tolist() == [0, 1, 2, 4, 6, 8, 9, 10]
    # Text after the block resumes at max(all ids) + 1 = 9 (spec): the temporal ids went furthest.
    # (transformers 5.24 would resume at st + max(h, w) / 2 = 3 here; Qwen2.5-VL's original and Keye: 9.)
    assert pos[1, 0].tolist() == [0, 1, 2, 2, 2, 2, 9, 10]
    assert pos[2, 0].tolist() == [0, 1, 2, 2, 2, 2, 9, 10]
    assert delta.tolist() == [[11 - 8]]


def test_by_hand_fractional_seconds_floor():
    """fps 3 → second_per_grid_t = 1/3 → T offsets floor(t * 2/3) = 0, 0, 1, 2 (float32 like the reference)."""
    ids = torch.tensor([[VID] * 4])
    pos, _ = get_rope_index(ids, video_grid_thw=torch.tensor([[4, 2, 2]]), second_per_grid_ts=[1 / 3])
    assert pos[0, 0].tolist() == [0, 0, 1, 2]


def test_text_only_with_padding():
    ids, mask = batch([text(5), text(3)], left=[False, True])
    pos, delta = get_rope_index(ids, attention_mask=mask)
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 4]
    assert pos[0, 1].tolist() == [1, 1, 0, 1, 2]  # left padding keeps id 1
    assert torch.equal(pos[0], pos[1]) and torch.equal(pos[0], pos[2])
    assert delta.tolist() == [[0], [3 - 5]]


def test_matches_transformers_qwen25vl(qwen25vl):
    images = [(1, 4, 6), (1, 8, 4), (1, 2, 2)]
    videos = [(2, 4, 4), (2, 8, 8), (3, 4, 8), (4, 4, 8)]
    seconds = torch.tensor([0.5, 1.0, 0.5, 1 / 3])
    rows = [
        text(3, 1) + block(IMG, images[0]) + text(4, 2) + block(VID, videos[0]) + text(2, 3),
        text(2, 4) + block(VID, videos[1]) + text(5, 5) + block(IMG, images[1]) + text(1, 6),
        text(7, 7),
        block(VID, videos[2]) + text(3, 8) + block(IMG, images[2]) + block(VID, videos[3]) + text(2, 9),
    ]
    for left in ([True] * 4, [False] * 4, [True, False, True, False]):
        ids, mask = batch(rows, left)
        image_grid_thw, video_grid_thw = torch.tensor(images), torch.tensor(videos)
        pos, delta = get_rope_index(ids, image_grid_thw, video_grid_thw, seconds, mask)
        want_pos, want_delta = hf_rope_index(qwen25vl, ids, mask, image_grid_thw, video_grid_thw, seconds)
        keep = mask.bool()
        assert torch.equal(pos[:, keep], want_pos[:, keep])
        assert (pos[:, ~keep] == 1).all()
        # transformers 5.24 measures the delta against the unpadded length; we use the padded row length
        assert torch.equal(delta, want_delta + mask.sum(-1, keepdim=True) - ids.shape[1])


def test_no_mask_matches_transformers(qwen25vl):
    ids = torch.tensor([text(4) + block(IMG, (1, 6, 4)) + text(3)])
    grid = torch.tensor([[1, 6, 4]])
    pos, delta = get_rope_index(ids, image_grid_thw=grid)
    want_pos, want_delta = hf_rope_index(qwen25vl, ids, None, grid, None, None)
    assert torch.equal(pos, want_pos) and torch.equal(delta, want_delta)


def test_packed_equals_each_sample_alone():
    samples = [
        (text(3, 1) + block(IMG, (1, 4, 4)) + text(2, 2), [(1, 4, 4)], [], []),
        (text(4, 3), [], [], []),
        (text(1, 4) + block(VID, (3, 4, 4)) + text(2, 5) + block(IMG, (1, 2, 4)), [(1, 2, 4)], [(3, 4, 4)], [0.5]),
        (block(VID, (2, 2, 4)) + text(2, 6), [], [(2, 2, 4)], [1.0]),
    ]
    row = [tok for s in samples for tok in s[0]]
    cu = [0]
    for s in samples:
        cu.append(cu[-1] + len(s[0]))
    tail = 3  # padding after the last sample
    ids = torch.tensor(row + [PAD] * tail)
    images = torch.tensor([g for s in samples for g in s[1]])
    videos = torch.tensor([g for s in samples for g in s[2]])
    seconds = torch.tensor([x for s in samples for x in s[3]])
    got = packed_position_ids(ids, torch.tensor(cu), images, videos, seconds)
    assert got.shape == (3, len(row) + tail)
    for (sample, img, vid, sec), lo, hi in zip(samples, cu, cu[1:]):
        alone, _ = get_rope_index(
            torch.tensor([sample]), torch.tensor(img) if img else None, torch.tensor(vid) if vid else None,
            torch.tensor(sec) if sec else None,
        )
        assert torch.equal(got[:, lo:hi], alone[:, 0])
        assert got[:, lo].tolist() == [0, 0, 0]
    assert (got[:, len(row):] == 1).all()
    module = MRopeTimeAligned()
    assert torch.equal(module.packed_position_ids(ids, torch.tensor(cu), images, videos, seconds), got)


def test_grid_token_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"needs 6 <\|image_pad\|> tokens but only 5"):
        get_rope_index(torch.tensor([text(2) + [IMG] * 5 + text(1)]), image_grid_thw=torch.tensor([[1, 4, 6]]))
    with pytest.raises(ValueError, match="more video tokens"):
        get_rope_index(torch.tensor([[VID] * 4]), video_grid_thw=torch.tensor([[1, 2, 2]]))
    with pytest.raises(ValueError, match="image_grid_thw has 2"):
        get_rope_index(torch.tensor([[IMG] * 1]), image_grid_thw=torch.tensor([[1, 2, 2], [1, 2, 2]]))
    with pytest.raises(ValueError, match="not divisible by spatial_merge_size"):
        get_rope_index(torch.tensor([[IMG] * 2]), image_grid_thw=torch.tensor([[1, 3, 2]]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_position_ids(torch.tensor(text(4)), [0, 3, 2])


def test_adjacent_images_without_separators():
    ids = torch.tensor([[IMG] * 2 + [IMG] * 1])
    pos, _ = get_rope_index(ids, image_grid_thw=torch.tensor([[1, 2, 4], [1, 2, 2]]))
    assert pos[:, 0].tolist() == [[0, 0, 2], [0, 0, 2], [0, 1, 2]]


# --- rotary application ---------------------------------------------------------------------------------


def test_channel_split_by_formula():
    """Independent formula: channel c (and c + 64) rotates by pos[axis] * theta^(-2(c % 64)/128), axis by range."""
    module = MRopeTimeAligned()
    position_ids = torch.tensor([[[7, 100]], [[11, 3]], [[13, 5000]]])  # (3, B=1, L=2): distinct T, H, W
    cos, sin = module(position_ids)
    cos, sin = select_sections(cos, [16, 24, 24]), select_sections(sin, [16, 24, 24])  # (1, 2, 128)
    for c in range(128):
        f = c % 64
        axis = 0 if f < 16 else (1 if f < 40 else 2)
        angle = position_ids[axis, 0].double() * 1e6 ** (-2 * f / 128)
        torch.testing.assert_close(cos[0, :, c].double(), angle.cos(), atol=2e-4, rtol=0)
        torch.testing.assert_close(sin[0, :, c].double(), angle.sin(), atol=2e-4, rtol=0)


def test_rotary_matches_transformers(qwen25vl):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding, apply_rotary_pos_emb

    torch.manual_seed(0)
    ids, mask = batch([text(2) + block(IMG, (1, 4, 6)) + text(3), text(1) + block(VID, (2, 4, 4)) + text(1)], [True, False])
    position_ids, _ = get_rope_index(ids, torch.tensor([[1, 4, 6]]), torch.tensor([[2, 4, 4]]), [0.5], mask)
    hf_rope = Qwen2_5_VLRotaryEmbedding(qwen25vl.config.text_config)
    module = MRopeTimeAligned()
    torch.testing.assert_close(module.inv_freq, hf_rope.inv_freq, atol=0, rtol=0)

    q = torch.randn(2, 4, ids.shape[1], 128)  # (B, H, L, D)
    k = torch.randn(2, 2, ids.shape[1], 128)
    cos, sin = module(position_ids)
    assert cos.shape == (3, 2, ids.shape[1], 128)
    hf_cos, hf_sin = hf_rope(q, position_ids)
    torch.testing.assert_close(select_sections(cos, [16, 24, 24]), hf_cos)
    torch.testing.assert_close(select_sections(sin, [16, 24, 24]), hf_sin)
    got_q, got_k = module.apply_rotary(q, k, cos, sin)
    want_q, want_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)
    # [B, L, H, D] layout
    got_q2, _ = apply_mrope(q.transpose(1, 2), k.transpose(1, 2), cos, sin, [16, 24, 24], unsqueeze_dim=2)
    torch.testing.assert_close(got_q2.transpose(1, 2), want_q)


# --- Megatron-Core's mrope path -------------------------------------------------------------------------


class _OneRank:
    """A one-rank context-parallel group (all Megatron's THD rotary reads from it is size and rank)."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


@pytest.fixture
def megatron_rope(monkeypatch):
    if not torch.cuda.is_available():  # Megatron puts inv_freq on torch.cuda.current_device()
        monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding

    return MultimodalRotaryEmbedding(kv_channels=128, rotary_percent=1.0, rotary_base=1_000_000), rope_utils


def test_megatron_mrope_path_equals_ours(megatron_rope):
    mcore_rope, rope_utils = megatron_rope
    torch.manual_seed(0)
    ids, mask = batch([text(2) + block(VID, (2, 4, 4)) + text(3), text(1) + block(IMG, (1, 4, 6)) + text(1)], [False, True])
    position_ids, _ = get_rope_index(ids, torch.tensor([[1, 4, 6]]), torch.tensor([[2, 4, 4]]), [1.0], mask)
    module = MRopeTimeAligned()

    emb = mcore_rope(position_ids, [16, 24, 24]).cpu()  # (L, B, 1, D)
    ours = module.megatron_rotary_pos_emb(position_ids)
    assert emb.shape == ours.shape == (ids.shape[1], 2, 1, 128)
    torch.testing.assert_close(ours, emb, atol=0, rtol=0)

    q = torch.randn(ids.shape[1], 2, 4, 128)  # Megatron's (L, B, H, D)
    got = rope_utils._apply_rotary_pos_emb_bshd(q, emb, rotary_interleaved=False)
    cos, sin = module(position_ids)
    want, _ = apply_mrope(q.permute(1, 2, 0, 3), q.permute(1, 2, 0, 3), cos, sin, [16, 24, 24])  # (B, H, L, D)
    torch.testing.assert_close(got, want.permute(2, 0, 1, 3), atol=1e-5, rtol=1e-5)


def test_megatron_thd_packed_equals_each_sample_alone(megatron_rope):
    """Megatron's packed (THD) rotary takes one id per packed token when freqs cover cu_seqlens[-1]."""
    mcore_rope, rope_utils = megatron_rope
    torch.manual_seed(0)
    samples = [
        (text(2, 1) + block(IMG, (1, 4, 4)) + text(1, 2), [(1, 4, 4)], []),
        (text(1, 3) + block(VID, (2, 4, 4)) + text(2, 4), [], [(2, 4, 4)]),
    ]
    row = torch.tensor([tok for s in samples for tok in s[0]])
    cu = torch.tensor([0, len(samples[0][0]), len(row)], dtype=torch.int32)
    packed = packed_position_ids(row, cu, torch.tensor([[1, 4, 4]]), torch.tensor([[2, 4, 4]]), [0.5])
    freqs = mcore_rope(packed[:, None, :], [16, 24, 24]).cpu()  # (T, 1, 1, D)
    t = torch.randn(len(row), 4, 128)  # (T, H, D)
    got = rope_utils._apply_rotary_pos_emb_thd(t, cu, freqs, rotary_interleaved=False, cp_group=_OneRank())
    for (sample, img, vid), lo, hi in zip(samples, cu.tolist(), cu.tolist()[1:]):
        alone, _ = get_rope_index(torch.tensor([sample]), torch.tensor(img) if img else None,
                                  torch.tensor(vid) if vid else None, [0.5] if vid else None)
        emb = megatron_rotary_pos_emb(alone, MRopeTimeAligned().inv_freq, [16, 24, 24])  # (L, 1, 1, D)
        want = rope_utils._apply_rotary_pos_emb_bshd(t[lo:hi, None], emb, rotary_interleaved=False)[:, 0]
        torch.testing.assert_close(got[lo:hi], want)


def test_config_is_a_blueprint_schema():
    node = OmegaConf.merge(OmegaConf.structured(MRopeTimeAligned.Config), {"mrope_section": [8, 12, 12], "head_dim": 64})
    config = OmegaConf.to_object(node)
    assert config.mrope_section == [8, 12, 12] and config.tokens_per_second == 2.0
    MRopeTimeAligned(config)
    with pytest.raises(ValueError, match="must equal head_dim"):
        MRopeTimeAligned(MRopeTimeAligned.Config(head_dim=64))


def test_registers_through_its_hook(keye_empty_host):
    import keye_plugins.position_encoding.mrope_time_aligned as plugin

    keye_empty_host.add_plugin(plugin, "mrope_time_aligned")
    assert keye_empty_host.registry.cls("position_encoding", "mrope_time_aligned") is MRopeTimeAligned
