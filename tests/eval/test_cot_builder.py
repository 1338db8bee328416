"""``tools/build_cot.py`` on the tiny released checkpoint, in real processes.

A first build with ``--min-score 0`` keeps every question's (near-greedy) path, which says what the model
answers; the questions are then rewritten so half of the references are those answers and half can never be
hit, and a second build must keep exactly the first half, with provenance, as a data set the ``jsonl``
source reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_model import png

from keye.data.chat import parse_answer

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
QUESTIONS = ["how many red circle", "what color is the square", "where is the blue shape", "how many green"]


def build(released: Path, questions: Path, out: Path, *extra: str) -> dict:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "build_cot.py"), str(released), str(questions), "--out", str(out),
         "-k", "3", "--temperature", "0.001", "--max-new-tokens", "8", "--no-require-thought", *extra],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_questions(folder: Path, answers: list[str]) -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (question, answer) in enumerate(zip(QUESTIONS, answers)):
        (folder / "img" / f"{i}.png").write_bytes(png(56, 56, i))
        lines.append(json.dumps({"kind": "conversation", "key": f"q{i}", "meta": {"answer": answer},
                                 "messages": [{"role": "user", "content": [{"type": "image", "image": {"path": f"img/{i}.png"}},
                                                                           {"type": "text", "text": question}]},
                                              {"role": "assistant", "content": "ignored"}]}))
    if len(answers) > len(QUESTIONS):  # one more question, on an image that does not decode
        (folder / "img" / "bad.png").write_bytes(b"\x89PNG not really")
        lines.append(json.dumps({"kind": "conversation", "key": "q-bad", "meta": {"answer": answers[-1]},
                                 "messages": [{"role": "user", "content": [{"type": "image", "image": {"path": "img/bad.png"}},
                                                                           {"type": "text", "text": "what"}]}]}))
    path = folder / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_only_correct_paths_are_kept_with_provenance(released, tmp_path):
    from keye_plugins.data_source.jsonl import JsonlSource

    probe = build(released, write_questions(tmp_path / "q1", ["x"] * 4), tmp_path / "probe" / "cot.jsonl",
                  "--min-score", "0")
    assert probe["written"] == 4 and probe["questions"] == 4
    said = {}
    for line in (tmp_path / "probe" / "cot.jsonl").read_text().splitlines():
        sample = json.loads(line)
        said[sample["meta"]["question_key"]] = parse_answer(sample["messages"][-1]["content"][0]["text"])
    answers = [said["q0"], said["q1"], "zzz never said", "zzz never said either", "x"]
    questions = write_questions(tmp_path / "q2", answers)

    summary = build(released, questions, tmp_path / "out" / "cot.jsonl")
    assert summary["written"] == 2 and summary["kept"] == {"think": 2} and summary["no_correct_path"] == {"think": 2}
    assert summary["questions"] == 5 and summary["skipped"] == {"corrupt_image": 1}
    source = JsonlSource(JsonlSource.Config(path=str(tmp_path / "out" / "cot.jsonl"), max_bad_fraction=0.0))
    samples = list(source)
    assert source.bad_inputs.bad == 0
    assert sorted(s.sample.meta["question_key"] for s in samples) == ["q0", "q1"]
    for loaded in samples:
        sample = loaded.sample
        assert sample.kind == "conversation" and sample.thinking_mode == "think"
        assert [m.role for m in sample.messages] == ["user", "assistant"]
        assert parse_answer(sample.messages[-1].text) == sample.meta["answer"]
        cot = sample.meta["cot"]
        assert cot["teacher"] == str(released) and cot["k"] == 3 and cot["mode"] == "think"
        assert 1 <= cot["votes"] <= cot["correct"] <= 3
        assert len(loaded.media) == 1 and next(iter(loaded.media.values())).startswith(b"\x89PNG")


def test_bad_arguments_are_one_line(released, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "build_cot.py"), str(released), "--out",
                             str(tmp_path / "o.jsonl"), "--modes", "ponder", "--synthetic", "2"],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "ponder" in result.stderr
