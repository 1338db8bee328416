"""A plain PyTorch vision encoder (``keye.testing.toys``: no Megatron in it) drops into the composed model
with one blueprint line, and works under tensor parallelism by being replicated on every TP rank.

The shipped tiny blueprint (``blueprints/tiny/base.yaml``) with its ``vision_encoder`` line replaced by
``{name: toy_patch_encoder, out_dim: 32}`` builds a ``KeyeVLModel`` through the registry; one micro-batch of
two images of different sizes, a two-frame video and text goes forward and backward. Under TP=2 the toy
encoder is a full copy on each rank: its input gradient arrives complete on every rank (the projector's
column-parallel ``linear_1`` all-reduces it), so both ranks must hold the TP=1 loss and the TP=1 encoder
gradients, without any extra gradient reduction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from keye.model.composition import VisionInputs
from keye.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "blueprints" / "tiny" / "base.yaml"
SHIPPED_LINE = "  vision_encoder: {name: siglip_navit, size: tiny}"
TOY_LINE = "  vision_encoder: {name: toy_patch_encoder, out_dim: 32}"
SEED = 1234
IMAGE_PAD, VIDEO_PAD = 1000, 1001
IMAGES, VIDEOS = [(1, 4, 4), (1, 2, 6)], [(2, 2, 4)]  # (t, h, w) in 14-px patches; 4 + 3 + 4 merged tokens
TOLERANCE = 1e-5


def _toy_blueprint(folder: Path) -> Path:
    """The shipped tiny base blueprint with one line changed."""
    text = BASE.read_text()
    assert text.count(SHIPPED_LINE + "\n") == 1, "the tiny base blueprint no longer has the expected encoder line"
    path = folder / "toy.yaml"
    path.write_text(text.replace(SHIPPED_LINE + "\n", TOY_LINE + "\n"))
    return path


def _batch() -> dict[str, Any]:
    """One row: text, the two images' pad tokens, more text, the video's pad tokens, text; random patches."""
    generator = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(0, 990, (n,), generator=generator)  # noqa: E731
    pads = lambda grids, pad: torch.full((sum(t * h * w for t, h, w in grids) // 4,), pad)  # noqa: E731
    ids = torch.cat([text(5), pads(IMAGES, IMAGE_PAD), text(6), pads(VIDEOS, VIDEO_PAD), text(8)])[None]  # (1, L)
    length = ids.shape[1]

    def vision(grids: list[tuple[int, int, int]]) -> VisionInputs:
        n = sum(t * h * w for t, h, w in grids)
        return VisionInputs(torch.randn(n, 3, 14, 14, generator=generator), torch.tensor(grids))  # (N, 3, P, P)

    labels = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # (1, L): next token (the last one wraps around)
    loss_mask = ((labels != IMAGE_PAD) & (labels != VIDEO_PAD)).float()  # (1, L)
    return {
        "input_ids": ids,
        "position_ids": torch.arange(length).expand(3, 1, length),  # (3, 1, L): text-style M-RoPE ids
        "labels": labels,
        "loss_mask": loss_mask,
        "images": vision(IMAGES),
        "videos": vision(VIDEOS),
    }


def _run(tensor: int, blueprint: str) -> dict[str, Any]:
    import keye.testing.toys
    from keye.config import load_blueprint
    from keye.model.composition import KeyeVLModel
    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel
    from keye.plugins import PluginHost

    ctx = init_parallel(tensor=tensor, seed=SEED)
    host = PluginHost(strict=True)
    host.load_entry_points()
    host.add_plugin(keye.testing.toys, "toys")  # a third party would register it through an entry point
    cfg = load_blueprint(blueprint, [], host.registry)
    torch.manual_seed(SEED)  # the toy encoder's plain nn.Linear draws, identical on every rank and layout
    model = KeyeVLModel(cfg.model, host.registry, BuildContext(ctx, seed=SEED),
                        image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD)
    batch = _batch()
    per_token = model(batch["input_ids"], batch["position_ids"], None, labels=batch["labels"],
                      images=batch["images"], videos=batch["videos"])  # (1, L), full on every TP rank
    loss = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    loss.backward()
    encoder = model.vision_encoder
    return {
        "encoder": type(encoder).__name__,
        "projector_linear_1": type(model.projector.linear_1).__name__,
        "loss": loss.item(),
        "weights": {name: p.detach().clone() for name, p in encoder.named_parameters()},
        "grads": {name: p.grad.clone() for name, p in encoder.named_parameters()},
    }


def test_one_line_swaps_the_encoder(tmp_path: Path, keye_host: Any) -> None:
    import keye.testing.toys
    from keye.config import load_blueprint

    path = _toy_blueprint(tmp_path)
    changed = [pair for pair in zip(BASE.read_text().splitlines(), path.read_text().splitlines()) if pair[0] != pair[1]]
    assert changed == [(SHIPPED_LINE, TOY_LINE)]
    keye_host.add_plugin(keye.testing.toys, "toys")
    model = load_blueprint(path, [], keye_host.registry).model
    assert dict(model.vision_encoder) == {"name": "toy_patch_encoder", "out_dim": 32, "patch_size": 14}
    assert model.projector.in_dim == 32


def test_toy_encoder_trains_and_tp2_equals_tp1(tmp_path: Path) -> None:
    blueprint = str(_toy_blueprint(tmp_path))
    [tp1] = run_distributed(_run, 1, 1, blueprint)
    assert tp1["encoder"] == "ToyPatchEncoder" and tp1["projector_linear_1"] == "Linear"
    assert tp1["loss"] == pytest.approx(torch.log(torch.tensor(1024.0)).item(), abs=0.5)  # near uniform at init
    assert all(grad.abs().sum() > 0 for grad in tp1["grads"].values())  # the images reach the loss

    ranks = run_distributed(_run, 2, 2, blueprint)
    for r in ranks:
        assert r["encoder"] == "ToyPatchEncoder" and r["projector_linear_1"] == "ColumnParallelLinear"
        assert r["loss"] == pytest.approx(tp1["loss"], abs=TOLERANCE)
        for name, grad in tp1["grads"].items():  # a full replica on each TP rank: same weights, same grads
            torch.testing.assert_close(r["weights"][name], tp1["weights"][name], atol=0, rtol=0)
            torch.testing.assert_close(r["grads"][name], grad, atol=TOLERANCE, rtol=0, msg=lambda m: f"{name}: {m}")
