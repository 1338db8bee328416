"""Contrastive-score filtering (`keye.data.filters`, ``tools/filter_pairs.py``) with real towers.

The towers are the registered ``siglip_navit`` and ``siglip_text`` (tiny, freshly initialised) on real
Megatron-Core, in one spawned rank. The pairs are the synthetic world's, half of them given another pair's
caption. Checked: the scorer is deterministic and batch-independent; its scores equal cosines computed here
from the towers' outputs by hand (mean over patches, head, dot over norms); stage-0 weights written by the
stages' own saver from the contrastive stage's model load and score the same; and the keep rule keeps exactly the pairs
whose independently computed score is above the threshold.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from keye.data.filters import ScoreReport, keep_mask
from keye.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
NUM_PAIRS = 12
TINY_TOWERS = {
    "vision_encoder": {"name": "siglip_navit", "size": "tiny"},
    "text_encoder": {"name": "siglip_text", "size": "tiny", "vocab_size": 1024},
}


def test_keep_mask_is_strictly_above():
    assert keep_mask([0.1, 0.5, 0.9, -1.0], 0.5).tolist() == [False, False, True, False]
    assert keep_mask(torch.tensor([0.95]), 0.9).tolist() == [True]


def test_report_histogram_and_fraction():
    report = ScoreReport(threshold=0.0, bins=4)  # bins [-1, -.5), [-.5, 0), [0, .5), [.5, 1]
    for score in (-0.9, -0.2, 0.0, 0.1, 0.7, 1.0):
        report.add(score)
    counts, edges = report.histogram()
    assert counts.tolist() == [1, 1, 2, 2] and edges.tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert report.kept == 3 and report.kept_fraction == 0.5  # 0.0 itself is not above 0.0
    text = report.render()
    assert "6 pairs" in text and "kept 3 with score > 0 (50.0%)" in text


def _pairs():
    """The synthetic world's pairs, every odd one with the caption of the pair five places on."""
    from keye.data.synthetic import generate_many

    samples = list(generate_many(NUM_PAIRS, tasks=["pair"], seed=2))
    captions = [s.sample.caption for s in samples]
    for i, loaded in enumerate(samples):
        if i % 2:
            loaded.sample.caption = captions[(i + 5) % NUM_PAIRS]
    return samples


def _by_hand(scorer, item) -> float:
    """One pair's cosine, from the towers' raw outputs, in float64."""
    features = scorer.vision_encoder(item.images.patches, item.images.grid_thw).double()  # (N, D)
    head = scorer.vision_head
    image = features.mean(0) @ head.weight.double().t() + head.bias.double()  # (E,)
    text = scorer.text_encoder(item.caption_ids[None])[0].double()  # (E,)
    return float(image @ text / (image.norm() * text.norm()))


@torch.no_grad()
def _rank(tmp: str) -> dict:
    from megatron.core import parallel_state as mpu

    from keye.config.validate import validate_component
    from keye.data.filters import ContrastiveScorer, score_pairs
    from keye.data.pipeline import load_tokenizer
    from keye.data.processor import Processor, ProcessorSettings
    from keye.model.composition import build_component
    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel
    from keye.plugins import get_host
    from keye.train.stage_weights import save_stage_weights
    from keye_plugins.stage.contrastive import ContrastiveModel

    parallel = init_parallel(tensor=1, pipeline=1, seed=7)
    registry = get_host().registry
    build = BuildContext(parallel, torch.float32, seed=7)
    towers = {  # validate_component expands size: tiny, as blueprint loading does
        kind: build_component(kind, validate_component(kind, node, kind, registry, str), registry, build)
        for kind, node in TINY_TOWERS.items()
    }
    scorer = ContrastiveScorer(towers["vision_encoder"], towers["text_encoder"], seed=3)
    processor = Processor(load_tokenizer("synthetic", 1024), ProcessorSettings(image_max_tokens=16, caption_length=16))
    pairs = _pairs()

    def scores(model, batch_size):
        return [p.score for p in score_pairs(model, processor, pairs, 0.0, batch_size=batch_size)]

    first, again, whole = scores(scorer, 5), scores(scorer, 5), scores(scorer, NUM_PAIRS)
    by_hand = [_by_hand(scorer, processor.pair(p.sample, p.media)) for p in pairs]

    # stage-0 weights, written from the contrastive stage's own model by the stages' saver, score the same
    loss = build_component("loss", {"name": "siglip_sigmoid"}, registry, build)
    stage_model = ContrastiveModel(towers["vision_encoder"], towers["text_encoder"], loss)
    stage_model.vision_head.load_state_dict(scorer.vision_head.state_dict())
    save_stage_weights(stage_model, SimpleNamespace(output_dir=Path(tmp) / "stage0", parallel=parallel))
    torch.manual_seed(99)
    other = {  # other towers and head...
        kind: build_component(kind, validate_component(kind, node, kind, registry, str), registry,
                              BuildContext(parallel, torch.float32, seed=99))
        for kind, node in TINY_TOWERS.items()
    }  # fmt: skip
    loaded = ContrastiveScorer(other["vision_encoder"], other["text_encoder"], seed=99)
    other_head = scores(loaded, 5)
    loaded.load_weights(Path(tmp) / "stage0")  # ...until the saved ones are loaded
    from_file = scores(loaded, 5)

    # the threshold halfway between two neighbouring hand-computed scores: no float tie at the boundary
    ordered = sorted(by_hand)
    threshold = (ordered[5] + ordered[6]) / 2
    decided = {p.key: p.kept for p in score_pairs(scorer, processor, pairs, threshold, batch_size=5)}
    as_tool = scores(ContrastiveScorer(towers["vision_encoder"], towers["text_encoder"], seed=7), 5)  # run.seed 7
    mpu.destroy_model_parallel()

    # the tool, on the same pairs written as JSONL, with the same towers (fresh, run.seed 7)
    tool = _tool_main(tmp, pairs)
    return {
        "keys": [p.sample.key for p in pairs], "first": first, "again": again, "whole": whole, "by_hand": by_hand,
        "other_head": other_head, "from_file": from_file, "threshold": threshold, "decided": decided, "tool": tool,
        "as_tool": as_tool,
    }  # fmt: skip


def _tool_main(tmp: str, pairs) -> dict:
    """Run tools/filter_pairs.py's main in this rank (it starts and stops Megatron itself)."""
    import contextlib
    import io

    from keye.testing.blueprints import tiny_blueprint, write_blueprint

    media = Path(tmp) / "media"
    media.mkdir()
    rows = []
    for p in pairs:
        name = p.sample.image.key
        (media / name).write_bytes(p.media[name])
        rows.append({"kind": "pair", "key": p.sample.key, "image": {"path": f"media/{name}"}, "caption": p.sample.caption})
    rows.append({"kind": "conversation", "key": "not-a-pair", "messages": [{"role": "user", "content": "hi"}]})
    data = Path(tmp) / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    blueprint = tiny_blueprint(**TINY_TOWERS, tokenizer="synthetic")
    blueprint["run"]["seed"] = 7
    blueprint["stages"] = [{"name": "s0", "kind": "contrastive", "data": {"image_max_tokens": 16}}]
    path = write_blueprint(Path(tmp) / "bp.yaml", blueprint)
    spec = importlib.util.spec_from_file_location("keye_tool_filter_pairs", ROOT / "tools" / "filter_pairs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    printed = io.StringIO()
    argv = [str(data), "--blueprint", str(path), "--fresh", "--threshold", "-1", "--out-scores", str(Path(tmp) / "s.jsonl"),
            "--out-keys", str(Path(tmp) / "kept.txt"), "--max-bad-fraction", "0.5"]  # fmt: skip
    with contextlib.redirect_stdout(printed):
        code = module.main(argv)
    scores = [json.loads(line) for line in (Path(tmp) / "s.jsonl").read_text().splitlines()]
    return {"code": code, "out": printed.getvalue(), "scores": scores, "kept": (Path(tmp) / "kept.txt").read_text().split()}


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    return run_distributed(_rank, 1, str(tmp_path_factory.mktemp("filters")), timeout=240)[0]


def test_scores_are_deterministic_and_match_the_definition(ranked):
    assert ranked["first"] == ranked["again"]  # bit for bit
    assert np.allclose(ranked["first"], ranked["whole"], atol=1e-5)  # batching packs images, nothing else changes
    assert np.allclose(ranked["first"], ranked["by_hand"], atol=1e-5)
    assert all(-1 <= s <= 1 for s in ranked["first"])


def test_stage0_weights_file_loads_into_the_scorer(ranked):
    assert not np.allclose(ranked["other_head"], ranked["first"], atol=1e-3)
    assert np.allclose(ranked["from_file"], ranked["first"], atol=1e-6)


def test_threshold_keeps_exactly_the_pairs_above_it(ranked):
    expected = {key: score > ranked["threshold"] for key, score in zip(ranked["keys"], ranked["by_hand"])}
    assert ranked["decided"] == expected
    assert sum(expected.values()) == NUM_PAIRS - 6


def test_filter_pairs_tool(ranked):
    tool = ranked["tool"]
    assert tool["code"] == 0
    assert [s["key"] for s in tool["scores"]] == ranked["keys"]  # the conversation is skipped
    # the same towers (built right after init_parallel with seed 7) and a head drawn from run.seed 7
    assert np.allclose([s["score"] for s in tool["scores"]], ranked["as_tool"], atol=1e-5)
    assert all(s["kept"] for s in tool["scores"]) and tool["kept"] == ranked["keys"]
    assert f"{NUM_PAIRS} pairs" in tool["out"] and "(100.0%)" in tool["out"]
    assert "skipped 1 samples, 1 not_a_pair" in tool["out"]
