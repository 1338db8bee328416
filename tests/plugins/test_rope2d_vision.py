"""The ViT 2D RoPE against an independent complex-number formulation (spec §1.1)."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from keye_plugins.position_encoding.rope2d_vision import Rope2DVision, apply_rotary, vision_position_ids


def reference_rotate(x: torch.Tensor, ids: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Spec §1.1 read literally, in float64 complex numbers.

    Pair (i, i + D/2) is one complex number ``x[i] + 1j * x[i + D/2]``; it turns by
    ``row * theta ** (-2i / (D/2))`` for i < D/4 and by ``col * theta ** (-2(i - D/4) / (D/2))`` otherwise.
    """
    n, heads, d = x.shape
    half, quarter = d // 2, d // 4
    out = torch.empty(n, heads, d, dtype=torch.float64)
    xd = x.double()
    for i in range(half):
        k = i if i < quarter else i - quarter
        freq = theta ** (-2.0 * k / half)
        pos = ids[:, 0] if i < quarter else ids[:, 1]
        angle = pos.double() * freq  # (N,)
        z = torch.complex(xd[..., i], xd[..., i + half]) * torch.polar(torch.ones_like(angle), angle)[:, None]
        out[..., i] = z.real
        out[..., i + half] = z.imag
    return out


def test_position_ids_by_hand():
    ids = vision_position_ids(torch.tensor([[1, 2, 3], [2, 2, 2]]))
    assert ids.tolist() == [
        [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2],  # image 2x3
        [0, 0], [0, 1], [1, 0], [1, 1],  # video frame 0
        [0, 0], [0, 1], [1, 0], [1, 1],  # video frame 1: ids restart
    ]


def test_cos_sin_by_hand():
    rope = Rope2DVision()
    cos, sin = rope(torch.tensor([[1, 2, 3]]))
    assert cos.shape == sin.shape == (6, 72)
    assert rope.inv_freq.shape == (18,)
    assert rope.inv_freq[1].item() == pytest.approx(10000 ** (-2 / 36))
    patch = 5  # row 1, col 2
    assert sin[patch, 0].item() == pytest.approx(math.sin(1.0))  # dim 0: row * inv_freq[0] = 1
    assert sin[patch, 18].item() == pytest.approx(math.sin(2.0))  # dim 18: col * inv_freq[0] = 2
    assert cos[patch, 19].item() == pytest.approx(math.cos(2 * 10000 ** (-2 / 36)))  # col * inv_freq[1]
    assert torch.equal(cos[:, :36], cos[:, 36:]) and torch.equal(sin[:, :36], sin[:, 36:])
    assert torch.equal(cos[0], torch.ones(72))  # patch (0, 0) is not rotated


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_complex_reference(dtype):
    torch.manual_seed(0)
    grid = torch.tensor([[1, 4, 6], [3, 2, 4], [1, 5, 3]])
    n = int(grid.prod(-1).sum())
    x = torch.randn(n, 3, 72).to(dtype)
    cos, sin = Rope2DVision()(grid)
    got = apply_rotary(x, cos, sin)
    want = reference_rotate(x, vision_position_ids(grid))
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_small_head_dim_and_theta():
    torch.manual_seed(0)
    rope = Rope2DVision(Rope2DVision.Config(head_dim=8, theta=100.0))
    grid = torch.tensor([[2, 3, 2]])
    x = torch.randn(12, 2, 8)
    got = apply_rotary(x, *rope(grid))
    torch.testing.assert_close(got.double(), reference_rotate(x, vision_position_ids(grid), theta=100.0))


def test_scores_depend_only_on_2d_offset():
    """RoPE's point: q·k depends on (Δrow, Δcol) only, so shifting both patches changes nothing."""
    torch.manual_seed(0)
    rope = Rope2DVision()
    cos, sin = rope(torch.tensor([[1, 6, 6]]))
    q, k = torch.randn(1, 1, 72).double(), torch.randn(1, 1, 72).double()

    def score(qi: int, ki: int) -> float:
        qr = apply_rotary(q, cos[qi : qi + 1].double(), sin[qi : qi + 1].double())
        kr = apply_rotary(k, cos[ki : ki + 1].double(), sin[ki : ki + 1].double())
        return float((qr * kr).sum())

    # patch index = row * 6 + col. (1,2)->(3,1) and (2,4)->(4,3) both have offset (+2, -1).
    assert score(1 * 6 + 2, 3 * 6 + 1) == pytest.approx(score(2 * 6 + 4, 4 * 6 + 3), rel=1e-6)  # float32 math
    assert score(1 * 6 + 2, 3 * 6 + 1) != pytest.approx(score(1 * 6 + 2, 1 * 6 + 3), rel=1e-3)


def test_config_is_a_blueprint_schema():
    node = OmegaConf.merge(OmegaConf.structured(Rope2DVision.Config), {"theta": 500.0})
    assert OmegaConf.to_object(node) == Rope2DVision.Config(head_dim=72, theta=500.0)
    with pytest.raises(ValueError, match="divisible by 4"):
        Rope2DVision(Rope2DVision.Config(head_dim=70))


def test_registers_through_its_hook(keye_empty_host):
    import keye_plugins.position_encoding.rope2d_vision as plugin

    keye_empty_host.add_plugin(plugin, "rope2d_vision")
    assert keye_empty_host.registry.cls("position_encoding", "rope2d_vision") is Rope2DVision
