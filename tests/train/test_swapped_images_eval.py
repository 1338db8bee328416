"""The lm stage's swapped-images evaluation: every held-out question asked about another question's media.

`keye.data.pipeline.swapped_media` is checked on synthetic samples, and the stage's metric against an
independent formulation: a held-out JSONL whose media paths were rotated by hand, evaluated as a plain
held-out set by the next stage on the same weights.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keye.data.pipeline import swapped_media
from keye.data.synthetic import generate_many
from keye.testing import write_blueprint

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["color", "video_direction", "shape", "count"]  # images and videos interleaved


def test_each_sample_takes_the_next_media_of_its_kind():
    samples = list(generate_many(8, tasks=TASKS, split="heldout"))
    out = list(swapped_media(iter(samples)))
    assert [s.sample.key for s in out] == [s.sample.key for s in samples]
    images = [i for i, s in enumerate(samples) if s.sample.key.endswith(("color", "shape", "count"))]
    videos = [i for i in range(8) if i not in images]
    for group in (images, videos):
        for mine, theirs in zip(group, group[1:] + group[:1]):
            (name,) = samples[mine].media
            assert list(out[mine].media) == [name]  # the sample's own reference still resolves
            assert out[mine].media[name] == next(iter(samples[theirs].media.values())) != samples[mine].media[name]


def test_keys_choose_the_samples_and_several_media_stay():
    samples = list(generate_many(6, tasks=["color"], split="heldout"))
    two = samples[5]
    two.media = {**two.media, "extra.png": next(iter(samples[0].media.values()))}
    keys = {samples[1].sample.key, samples[3].sample.key, two.sample.key}
    out = list(swapped_media(iter(samples), keys=keys))
    assert [s.sample.key for s in out] == [samples[1].sample.key, samples[3].sample.key, two.sample.key]
    assert next(iter(out[0].media.values())) == next(iter(samples[3].media.values()))
    assert next(iter(out[1].media.values())) == next(iter(samples[1].media.values()))
    assert out[2].media == two.media


def _jsonl(path: Path, samples: list, media_of: list[int]) -> None:
    """Samples as JSONL; sample i's media file is the one written for sample ``media_of[i]``."""
    lines = []
    for loaded, source in zip(samples, media_of):
        record = json.loads(loaded.sample.to_json())
        (name,) = samples[source].media
        (path.parent / name).write_bytes(samples[source].media[name])
        part = next(p for p in record["messages"][0]["content"] if p["type"] in ("image", "video"))
        part[part["type"]] = {"path": name}
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")


def test_stage_metric_equals_an_evaluation_on_hand_swapped_media(tmp_path):
    samples = list(generate_many(8, tasks=TASKS, split="heldout"))
    images, videos = [0, 2, 3, 4, 6, 7], [1, 5]
    rotated = {mine: theirs for group in (images, videos) for mine, theirs in zip(group, group[1:] + group[:1])}
    _jsonl(tmp_path / "own.jsonl", samples, list(range(8)))
    _jsonl(tmp_path / "swapped.jsonl", samples, [rotated[i] for i in range(8)])
    data = {"max_tokens": 512, "image_max_tokens": 16, "video_frame_tokens": [4, 16], "video_max_tokens": 64,
            "sources": {"qa": {"name": "synthetic", "tasks": ["color"], "num_samples": 8}}}
    stage = {"kind": "lm", "train": [], "steps": 0}
    path = write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "swap", "output_dir": str(tmp_path / "run"), "seed": 3},
        "model": {"vision_encoder": {"name": "siglip_navit", "size": "tiny"},
                  "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
                  "language_model": {"name": "qwen3", "size": "tiny"}},
        "stages": [
            {**stage, "name": "own", "options": {"eval_swapped_images": True},
             "data": {**data, "heldout": {"qa": {"name": "jsonl", "path": str(tmp_path / "own.jsonl")}}}},
            {**stage, "name": "by_hand",
             "data": {**data, "heldout": {"qa": {"name": "jsonl", "path": str(tmp_path / "swapped.jsonl")}}}},
        ],
    })
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "keye.launch.cli", "run", str(path)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]
    own, by_hand = stages["own"]["eval_after"], stages["by_hand"]["eval_after"]
    assert stages["by_hand"]["initialised_from"].endswith("own/weights")
    assert own["answers_by_mode"] == {"none": 8}
    assert own["heldout_loss_swapped_images"] == pytest.approx(by_hand["heldout_loss"], abs=1e-6)
    assert own["answer_accuracy_swapped_images"] == by_hand["answer_accuracy"]
    assert own["image_gain"] == pytest.approx(by_hand["heldout_loss"] - own["heldout_loss"], abs=1e-9)
    assert abs(own["image_gain"]) > 1e-4  # random weights still see their images: the swap changed the input
    assert "image_gain" not in by_hand
