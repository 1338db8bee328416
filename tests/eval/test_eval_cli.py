"""``keye-launch eval`` on the tiny released checkpoint and small benchmark files, in real processes.

A first run answers the questions (greedy, so a second run answers them the same); the benchmark is then
rewritten with answers built from those replies (one exact hit, one miss, one ANLS near-miss), so the
second run's scores are known by hand and the summary's numbers can be checked exactly. Bad samples (a bad
line, a missing image, an image outside the benchmark's folder) are skipped, counted and named.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_model import png

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def keye_launch(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keye.launch.cli", *args], env=ENV, capture_output=True,
                          text=True, input=stdin, timeout=timeout)


def write_benchmarks(folder: Path, answers: dict[str, object] | None = None) -> list[Path]:
    answers = answers or {}
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "img" / "a.png").write_bytes(png(56, 56, 0))
    (folder / "img" / "b.png").write_bytes(png(84, 56, 1))
    (folder.parent / "outside.png").write_bytes(png(56, 56, 2))
    rows = [
        {"id": "hit", "question": "how many red circle", "media": ["img/a.png"], "task": "count",
         "answer": answers.get("hit", "two")},
        {"id": "miss", "question": "how many green square", "media": ["img/b.png"], "task": "count",
         "answer": "zzz not an answer"},
        {"id": "near", "question": "the answer is", "task": "ocr", "metric": "anls",
         "answer": answers.get("near", "blue")},
        {"id": "gone", "question": "what", "media": ["img/missing.png"], "answer": "x"},
        {"id": "escape", "question": "what", "media": ["../outside.png"], "answer": "x"},
    ]
    jsonl = folder / "bench.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    tsv = folder / "mc.tsv"
    image = base64.b64encode(png(56, 56, 3)).decode()
    tsv.write_text("index\timage\tquestion\tA\tB\tanswer\tcategory\n"
                   f"1\t{image}\twhich colour\tred\tblue\tA\tcolor\n")
    return [jsonl, tsv]


def read_rows(out: Path) -> dict[str, dict]:
    return {row["key"]: row for row in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_eval_writes_results_summary_and_report_with_the_right_numbers(released, tmp_path):
    first = write_benchmarks(tmp_path / "bench")
    out = tmp_path / "out1"
    result = keye_launch("eval", str(released), *map(str, first), "--mode", "no_think", "--max-new-tokens", "6",
                         "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = read_rows(out)
    assert sorted(rows) == ["bench.jsonl:hit", "bench.jsonl:miss", "bench.jsonl:near", "mc.tsv:1"]
    skipped = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 3 and any("bench.jsonl:gone: missing_media" in line for line in skipped)
    assert any("bench.jsonl:escape: refused_media" in line for line in skipped)
    assert any("bench.jsonl:6: bad_line" in line for line in skipped)
    for row in rows.values():
        assert row["prompt"].endswith("/no_think<|im_end|>\n<|im_start|>assistant\n")
        assert 1 <= row["response_tokens"] <= 6 and isinstance(row["response"], str)
    assert "<|image_pad|>" in rows["mc.tsv:1"]["prompt"] and "A. red\nB. blue" in rows["mc.tsv:1"]["prompt"]

    # answers from the replies: "hit" is its own reply, "near" its reply with the last character changed
    hit = rows["bench.jsonl:hit"]["extracted"]
    near = rows["bench.jsonl:near"]["extracted"]
    assert hit.strip() and len(near.strip()) >= 3
    near_answer = near.strip()[:-1] + ("x" if near.strip()[-1] != "x" else "y")
    second = write_benchmarks(tmp_path / "bench2", {"hit": hit, "near": near_answer})
    out2 = tmp_path / "out2"
    result = keye_launch("eval", str(released), *map(str, second), "--mode", "no_think", "--max-new-tokens", "6",
                         "--out", str(out2))
    assert result.returncode == 0, result.stderr
    rows2 = read_rows(out2)
    assert [rows2[k]["response"] for k in sorted(rows2)] == [rows[k]["response"] for k in sorted(rows)]
    summary = json.loads((out2 / "summary.json").read_text())
    length = len(" ".join(near.lower().split()))
    tasks = summary["tasks"]
    assert tasks["count"]["score"] == 0.5 and tasks["count"]["samples"] == 2
    assert tasks["ocr"]["score"] == pytest.approx(1 - 1 / length) and tasks["ocr"]["metric"] == "anls"
    assert tasks["color"]["metric"] == "choice"
    color = rows2["mc.tsv:1"]["score"]
    assert summary["overall"]["score"] == pytest.approx((1 + 0 + (1 - 1 / length) + color) / 4)
    assert summary["overall"]["macro_score"] == pytest.approx((0.5 + (1 - 1 / length) + color) / 3)
    assert summary["bad_samples"] == 3
    assert summary["bad_by_kind"] == {"bad_line": 1, "missing_media": 1, "refused_media": 1}
    tokens = [r["response_tokens"] for r in rows2.values()]
    assert summary["overall"]["mean_response_tokens"] == pytest.approx(sum(tokens) / 4)
    assert summary["overall"]["think_ratio"] == pytest.approx(sum(r["thought"] for r in rows2.values()) / 4)
    report = (out2 / "report.md").read_text()
    assert "| count | exact | 2 | 0.500 |" in report and "3 skipped" in report
    assert (out2 / "scores.png").stat().st_size > 0
    assert "overall score" in result.stdout


@pytest.mark.parametrize("content,message", [("", "empty benchmark (no samples)"),
                                             (None, "no such benchmark file")])
def test_a_bad_benchmark_is_one_line_and_exit_2(released, tmp_path, content, message):
    path = tmp_path / "bench.jsonl"
    if content is not None:
        path.write_text(content)
    result = keye_launch("eval", str(released), str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"keye-launch: error: {path}: {message}"]
    assert not (tmp_path / "out").exists()


def test_an_unknown_mode_is_one_line(released, tmp_path):
    [jsonl, _] = write_benchmarks(tmp_path / "bench")
    result = keye_launch("eval", str(released), str(jsonl), "--mode", "deep")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "keye-launch: error: unknown mode 'deep'; known: think, no_think, auto, agentic"]


def test_an_interrupted_eval_keeps_what_it_scored(released, tmp_path):
    """SIGINT in the middle: results.jsonl keeps every line written (flushed one by one, none torn) and the
    summary and report are written from them."""
    import signal
    import time

    (tmp_path / "a.png").write_bytes(png(56, 56, 0))
    rows = [{"id": str(i), "question": "how many red circle", "media": ["a.png"], "answer": "two"} for i in range(200)]
    (tmp_path / "bench.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "keye.launch.cli", "eval", str(released),
                                str(tmp_path / "bench.jsonl"), "--batch-size", "1", "--max-new-tokens", "16",
                                "--out", str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not results.is_file() or results.read_text().count("\n") < 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    lines = results.read_text().splitlines()
    assert process.returncode != 0, (len(lines), stderr[-3000:])
    assert 3 <= len(lines) < 200
    keys = [json.loads(line)["key"] for line in lines]
    assert keys == [f"bench.jsonl:{i}" for i in range(len(lines))]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["samples"] == len(lines)
    assert f"{len(lines)} samples scored" in (out / "report.md").read_text()
