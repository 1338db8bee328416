"""``keye-launch chat`` on the tiny released checkpoint, in real processes: one answer, two turns on stdin,
a missing image; and the streaming display, token by token.

The one-shot answer is checked against ``keye-launch eval``'s reply to the same question and image in the
same mode (both greedy on the same rendered prompt), shown through chat's markup rendering.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))  # tests/eval/tiny_model.py (spawn-importable)
from tiny_model import generator_helpers, make_released, png  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    return make_released(tmp_path_factory.mktemp("chat") / "ckpt")


def keye_launch(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keye.launch.cli", *args], env=ENV, capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_one_answer_and_two_turns(released, tmp_path):
    from keye.launch.chat import render

    (tmp_path / "a.png").write_bytes(png(56, 56, 0))
    (tmp_path / "bench.jsonl").write_text(json.dumps(
        {"question": "how many red circle", "media": ["a.png"], "answer": "two"}) + "\n")
    evaluated = keye_launch("eval", str(released), str(tmp_path / "bench.jsonl"), "--mode", "think",
                            "--max-new-tokens", "8", "--out", str(tmp_path / "out"))
    assert evaluated.returncode == 0, evaluated.stderr
    [row] = map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())

    image = ["--image", str(tmp_path / "a.png"), "--mode", "think", "--max-new-tokens", "8"]
    one = keye_launch("chat", str(released), *image, "how many red circle")
    assert one.returncode == 0, one.stderr
    assert one.stdout == render(row["response"]) + "\n"

    two = keye_launch("chat", str(released), *image, stdin="how many red circle\n\nthe answer is\n")
    assert two.returncode == 0, two.stderr
    assert two.stdout.startswith(one.stdout)  # the first turn: the same conversation so far
    second = two.stdout[len(one.stdout):]
    assert second.endswith("\n") and len(second) > 1  # a second answer, then EOF ended the session


def test_a_missing_image_is_one_line(released, tmp_path):
    result = keye_launch("chat", str(released), "--image", str(tmp_path / "nope.png"), "hello")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"keye-launch: error: {tmp_path / 'nope.png'}: cannot read")


def test_the_stream_shows_thinking_apart_and_never_half_a_tag():
    from keye.launch.chat import Stream

    tokenizer = generator_helpers().tiny_tokenizer()
    reply = "<think>two red</think><answer>three</answer><|im_end|>"
    ids = tokenizer.encode(reply, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == reply
    out = io.StringIO()
    stream = Stream(tokenizer, out)
    seen = []
    for token in ids:
        stream(0, 0, token)
        seen.append(out.getvalue())
    stream.finish()
    final = out.getvalue()
    assert final == "[thinking]\ntwo red\n[answer]\nthree\n"
    assert all(final.startswith(s) and "<" not in s for s in seen)  # printed as it came, tags never split
    assert len(set(seen)) > 3  # several partial displays: it streamed
