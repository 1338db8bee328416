"""The composed Keye-VL model gives the same results for any parallel layout: TP=2, PP=2 and TP=2 x PP=2
against one process.

The model is the shipped tiny one (``blueprints/tiny/base.yaml``: siglip_navit tiny → patch_merge_mlp →
qwen3 tiny), built through the plugin registry exactly as a stage builds it. Two packed micro-batches, each
holding two images of different sizes, a multi-frame video and plain text (three samples, causal blocks,
time-aligned M-RoPE ids), go through Megatron's own ``get_forward_backward_func()`` (so PP runs the real
1F1B schedule, with the ViT and projector on the first stage), Megatron's DDP, per-token loss
(``calculate_per_token_loss``, as ``TrainEngine`` sets it) and ``finalize_model_grads``, in real gloo
processes. Every layout must give the one-process logits (TP shards gathered), loss, and gradient of every
parameter by global name (TP shards gathered, PP stages' layers renumbered), within 1e-5.

Initial weights are *not* loaded from a file: the test checks that every layout starts from the
one-process weights by itself. The qwen3 LLM draws each weight from a generator keyed by its global name;
the ViT and projector are built only on the first stage, before the LLM, from the same seeded CPU RNG
state in every layout, with Megatron's CPU initialisation splitting the full draws under TP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from keye.data.batch import IGNORE, MicroBatch, TokenSample, collate_pack
from keye.model.composition import VisionInputs
from keye.testing.distributed import run_distributed
from keye.testing.tensor_parallel import tp_gather

ROOT = Path(__file__).resolve().parents[2]
BLUEPRINT = ROOT / "blueprints" / "tiny" / "base.yaml"
SEED = 1234
IMAGE_PAD, VIDEO_PAD, VISION_START = 1000, 1001, 1002  # inside the tiny vocabulary (1024)
SEQ = 64  # positions per packed micro-batch
TOLERANCE = 1e-5

# Per micro-batch: samples, each a list of parts; ("image" | "video", (t, h, w) in ViT patches) or ("text", n).
MICRO_BATCHES = [
    [
        [("text", 5), ("image", (1, 4, 4)), ("text", 4)],  # 4 image tokens
        [("text", 3), ("video", (2, 2, 4)), ("text", 3), ("image", (1, 2, 6)), ("text", 2)],  # 4 + 3 tokens
        [("text", 9)],
    ],
    [
        [("image", (1, 6, 4)), ("text", 6)],  # 6 tokens
        [("text", 4), ("image", (1, 2, 2)), ("text", 2), ("video", (3, 2, 2)), ("text", 5)],  # 1 + 3 tokens
        [("text", 7)],
    ],
]


# --- inputs: the same on every rank and in every layout ------------------------------------------------


def _sample(key: str, parts: list[tuple[str, Any]], generator: torch.Generator) -> TokenSample:
    """One sample: random text ids, a vision-start token and one pad token per merged token per image/video,
    random patches, next-token labels (no loss on predicting a pad), M-RoPE ids of the sample on its own."""
    from keye_plugins.position_encoding.mrope_time_aligned import MRopeTimeAligned, packed_position_ids

    ids: list[torch.Tensor] = []
    images: list[tuple[int, int, int]] = []
    videos: list[tuple[int, int, int]] = []
    for kind, what in parts:
        if kind == "text":
            ids.append(torch.randint(0, 990, (what,), generator=generator))
            continue
        t, h, w = what
        pad = IMAGE_PAD if kind == "image" else VIDEO_PAD
        ids.append(torch.tensor([VISION_START] + [pad] * (t * h * w // 4)))
        (images if kind == "image" else videos).append(what)
    input_ids = torch.cat(ids)  # (L,)
    targets = torch.cat([input_ids[1:], torch.tensor([IGNORE])])
    labels = torch.where((targets == IMAGE_PAD) | (targets == VIDEO_PAD), IGNORE, targets)

    def vision(grids: list[tuple[int, int, int]]) -> VisionInputs | None:
        if not grids:
            return None
        n = sum(t * h * w for t, h, w in grids)
        return VisionInputs(torch.randn(n, 3, 14, 14, generator=generator), torch.tensor(grids))  # (N, 3, P, P)

    mrope = MRopeTimeAligned.Config(mrope_section=[2, 3, 3], head_dim=16, image_token_id=IMAGE_PAD,
                                    video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START)
    positions = packed_position_ids(
        input_ids, [0, len(input_ids)], torch.tensor(images) if images else None,
        torch.tensor(videos) if videos else None, [0.5] * len(videos) or None, config=mrope,
    )  # (3, L)
    return TokenSample(key, input_ids, labels, positions, images=vision(images), videos=vision(videos))


def _micro_batches() -> list[MicroBatch]:
    generator = torch.Generator().manual_seed(0)
    return [
        collate_pack([_sample(f"mb{m}s{s}", parts, generator) for s, parts in enumerate(samples)], SEQ)
        for m, samples in enumerate(MICRO_BATCHES)
    ]


# --- what every rank runs --------------------------------------------------------------------------


def _build(ctx: Any) -> torch.nn.Module:
    """This rank's part of the tiny Keye-VL model, from the registry, as the lm stage builds it."""
    from keye.config import load_blueprint
    from keye.model.composition import KeyeVLModel
    from keye.model.protocols import BuildContext
    from keye.plugins import PluginHost

    host = PluginHost(strict=True)
    host.load_entry_points()
    blueprint = load_blueprint(BLUEPRINT, [], host.registry)
    torch.manual_seed(SEED)  # the ViT and projector draw from here, in the same order in every layout
    build = BuildContext(ctx, pre_process=ctx.is_first_stage, post_process=ctx.is_last_stage, seed=SEED)
    return KeyeVLModel(blueprint.model, host.registry, build, image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD)


def _global_names(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(global name, parameter): a PP stage numbers its LLM layers from 0, the global name does not."""
    from keye.parallel.weight_init import global_name

    for name, param in model.named_parameters():
        yield global_name(model, name), param


def _logits_step(data: Iterator[MicroBatch], model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    batch = next(data)
    logits = model(batch.input_ids, batch.position_ids, batch.attention_mask, images=batch.images, videos=batch.videos)

    def keep(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        full = gather_from_tensor_model_parallel_region(output)  # (1, T, V): the TP vocab shards joined
        return output.sum() * 0, torch.tensor(1), {"logits": full.detach().clone()}

    return logits, keep


def _loss_step(data: Iterator[MicroBatch], model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    from keye_plugins.loss.next_token import NextTokenLoss

    batch = next(data)
    per_token = model(batch.input_ids, batch.position_ids, batch.attention_mask, labels=batch.labels,
                      images=batch.images, videos=batch.videos, loss_mask=batch.loss_mask)  # last stage: (1, T)
    return per_token, lambda output: NextTokenLoss(NextTokenLoss.Config())(output, batch.loss_mask)


def _run_layout(tensor: int, pipeline: int) -> dict[str, Any]:
    """Initial weights, logits, loss and gradients of this layout (full tensors, by global name)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from keye.parallel import init_parallel

    ctx = init_parallel(tensor=tensor, pipeline=pipeline, seed=SEED)
    model = _build(ctx)
    weights = {name: tp_gather(param, param) for name, param in _global_names(model)}
    config = model.config
    config.calculate_per_token_loss = True  # as TrainEngine: losses are (sum, tokens), grads / global tokens
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    config.finalize_model_grads_func = finalize_model_grads  # also sums the q/k-norm grads over TP ranks
    config.no_sync_func = ddp.no_sync
    batches = _micro_batches()
    run = dict(model=[ddp], num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=1)
    forward_backward = get_forward_backward_func()

    ddp.eval()
    with torch.no_grad():
        logits = forward_backward(forward_step_func=_logits_step, data_iterator=iter(batches), forward_only=True, **run)
    ddp.train()
    reports = forward_backward(forward_step_func=_loss_step, data_iterator=iter(batches), **run)
    grads = {name: tp_gather(param.main_grad, param) for name, param in _global_names(model)}
    last = ctx.is_last_stage
    return {
        "schedule": forward_backward.__name__,
        "loss": sum(float(r["loss_sum"]) for r in reports) / sum(float(r["tokens"]) for r in reports) if last else None,
        "logits": [r["logits"] for r in logits] if last else None,
        "weights": weights if ctx.tp_rank == 0 else {},
        "grads": grads if ctx.tp_rank == 0 else {},
        "vision_here": model.vision_encoder is not None,
    }


def _run_layouts(layouts: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Several layouts of the same world size one after another in the same processes (starting ranks
    and importing Megatron is most of the time): Megatron's groups are rebuilt, the process group kept."""
    from megatron.core import parallel_state as mpu

    results = []
    for tensor, pipeline in layouts:
        results.append(_run_layout(tensor, pipeline))
        mpu.destroy_model_parallel()
    return results


# --- the tests -------------------------------------------------------------------------------------

LAYOUTS = {  # name: (tensor, pipeline, the schedule Megatron must pick)
    "tp2": (2, 1, "forward_backward_no_pipelining"),
    "pp2": (1, 2, "forward_backward_pipelining_without_interleaving"),
    "tp2xpp2": (2, 2, "forward_backward_pipelining_without_interleaving"),
}


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    [result] = run_distributed(_run_layout, 1, 1, 1)
    assert result["schedule"] == "forward_backward_no_pipelining"
    assert result["vision_here"]
    grads = result["grads"]
    for prefix in ("vision_encoder.", "projector.", "language_model."):
        assert any(name.startswith(prefix) for name in grads), prefix
    # Every parameter learns from this batch (a vision parameter without gradient: images not reaching the LLM).
    assert [name for name, grad in grads.items() if not grad.abs().sum() > 0] == []
    return result


@pytest.fixture(scope="module")
def layouts() -> dict[str, list[dict[str, Any]]]:
    """Each layout's per-rank results: layouts of one world size share a run."""
    by_world: dict[int, list[str]] = {}
    for name, (tensor, pipeline, _) in LAYOUTS.items():
        by_world.setdefault(tensor * pipeline, []).append(name)
    results = {}
    for world, names in by_world.items():
        ranks = run_distributed(_run_layouts, world, [LAYOUTS[name][:2] for name in names])
        results.update({name: [r[i] for r in ranks] for i, name in enumerate(names)})
    return results


def test_inputs_are_mixed() -> None:
    """Each micro-batch holds two images of different sizes, a multi-frame video and text-only samples."""
    for batch in _micro_batches():
        grids = batch.images.grid_thw.tolist()
        assert len(grids) == 2 and grids[0] != grids[1]
        assert batch.videos.grid_thw.shape[0] == 1 and batch.videos.grid_thw[0, 0] > 1
        assert len(batch.keys) == 3 and batch.num_tokens < SEQ  # three samples and some padding
        assert int((batch.input_ids == IMAGE_PAD).sum()) == sum(t * h * w // 4 for t, h, w in grids)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_gives_one_process_logits_loss_and_grads(
    reference: dict[str, Any], layouts: dict[str, list[dict[str, Any]]], layout: str
) -> None:
    tensor, pipeline, schedule = LAYOUTS[layout]
    ranks = layouts[layout]
    assert all(r["schedule"] == schedule for r in ranks)
    # Vision lives on the first pipeline stage only (ranks are TP-major: pp rank = rank // tensor).
    assert [r["vision_here"] for r in ranks] == [rank // tensor == 0 for rank in range(tensor * pipeline)]

    weights = {name: w for r in ranks for name, w in r["weights"].items()}  # PP stages hold disjoint params
    assert sorted(weights) == sorted(reference["weights"])
    for name, w in weights.items():  # the same start as one process, with no weights loaded
        torch.testing.assert_close(w, reference["weights"][name], atol=0, rtol=0, msg=lambda m: f"weight {name}: {m}")

    last = [r for r in ranks if r["loss"] is not None]
    assert len(last) == tensor  # every TP rank of the last stage
    for r in last:
        assert r["loss"] == pytest.approx(reference["loss"], abs=TOLERANCE)
        for got, want in zip(r["logits"], reference["logits"], strict=True):
            torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)

    grads = {name: g for r in ranks for name, g in r["grads"].items()}
    assert sorted(grads) == sorted(reference["grads"])
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, reference["grads"][name], atol=TOLERANCE, rtol=0, msg=lambda m: f"grad {name}: {m}"
        )
