"""The synthetic world's held-out benchmarks: one file per task, readable, and each training-format answer
(what a perfectly trained model would reply) scores 1 through extraction and its metric."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from keye.data.sample import TextPart
from keye.data.synthetic import TASKS, generate_many
from keye.eval.benchmark import item_media, read_benchmark
from keye.eval.extract import extract
from keye.eval.metrics import METRICS

ROOT = Path(__file__).resolve().parents[2]


def _reply(sample) -> str:
    """The training target of a held-out sample (the chosen reply, the reference answer, the caption)."""
    if getattr(sample, "reference_answer", None):
        return sample.reference_answer
    for attr in ("messages", "chosen"):
        value = getattr(sample, attr, None)
        if value:
            message = value[-1] if isinstance(value, list) else value
            return "".join(part.text for part in message.content if isinstance(part, TextPart))
    return sample.caption


def test_every_task_gets_a_benchmark_its_answers_pass(tmp_path):
    n = 2 * len(TASKS)
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic_data.py"), str(tmp_path), "--num-samples",
                    "1", "--heldout", str(n)], check=True, capture_output=True)
    files = sorted((tmp_path / "benchmarks").glob("*.jsonl"))
    assert [f.stem for f in files] == sorted(TASKS)
    replies = {loaded.sample.key: _reply(loaded.sample) for loaded in generate_many(n, split="heldout")}
    metrics = set()
    for path in files:
        items, bad = read_benchmark(path)
        assert len(items) == 2 and not bad
        for item in items:
            assert len(item_media(item)) == 1
            reply = replies[item.key.split(":", 1)[1]]
            assert METRICS[item.metric](extract(reply, item.metric), item.answer) == 1.0, (item.key, reply)
            metrics.add(item.metric)
    assert metrics == {"exact", "anls", "iou", "relaxed"}
