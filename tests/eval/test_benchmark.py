"""Reading benchmark files: JSONL and VLMEvalKit TSV, bad lines counted, unusable files refused in one line,
media read only from the benchmark's folder."""

from __future__ import annotations

import base64
import json

import pytest

from keye.data.sources import MediaRefused
from keye.eval.benchmark import BenchmarkError, item_media, item_messages, read_benchmark


def test_jsonl_items_defaults_and_bad_lines(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"png bytes")
    lines = [
        {"id": "q1", "question": "How many?", "media": ["img/a.png"], "answer": "3", "task": "count"},
        {"question": "Which?", "answer": "B", "metric": "choice", "choices": ["red", "blue"],
         "media": [{"video": "clip.mp4"}]},
        "not json",
        {"question": "no answer"},
        {"question": "q", "answer": "a", "metric": "bleu"},
    ]
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
    items, bad = read_benchmark(path)
    assert [(i.key, i.task, i.metric) for i in items] == [("bench.jsonl:q1", "count", "exact"),
                                                          ("bench.jsonl:2", "bench", "choice")]
    assert items[0].images == ["img/a.png"] and items[1].videos == ["clip.mp4"]
    assert items[1].choices == {"A": "red", "B": "blue"}
    assert items[1].prompt.startswith("Which?\nOptions:\nA. red\nB. blue\n")
    assert [b.line() for b in bad] == [
        "bench.jsonl:3: bad_line: Expecting value: line 1 column 1 (char 0)",
        "bench.jsonl:4: bad_line: missing 'answer'",
        "bench.jsonl:5: bad_line: unknown metric 'bleu' (known: exact, relaxed, choice, anls, iou)",
    ]
    assert item_media(items[0]) == {"img/a.png": b"png bytes"}
    [message] = item_messages(items[0])
    assert [p.type for p in message.content] == ["image", "text"]
    with pytest.raises(MediaRefused) as missing:
        item_media(items[1])
    assert missing.value.kind == "missing_media" and "clip.mp4" in str(missing.value)


def test_media_outside_the_benchmark_folder_is_refused(tmp_path):
    (tmp_path / "secret.png").write_bytes(b"x")
    (tmp_path / "bench").mkdir()
    path = tmp_path / "bench" / "b.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a", "media": ["../secret.png"]}) + "\n"
                    + json.dumps({"question": "q", "answer": "a", "media": ["/etc/hostname"]}) + "\n")
    items, _ = read_benchmark(path)
    for item in items:
        with pytest.raises(MediaRefused) as refused:
            item_media(item)
        assert refused.value.kind == "refused_media"


def test_vlmevalkit_tsv(tmp_path):
    image = base64.b64encode(b"\x89PNG fake").decode()
    rows = ["index\timage\tquestion\tA\tB\tC\tanswer\tcategory",
            f"7\t{image}\tWhat colour?\tred\tblue\t\tA\tcolor",
            "8\t\tCount them\t\t\t\t3\tcount",
            "9\t!!notbase64\tq\ta\tb\t\tA\tcolor"]
    path = tmp_path / "MMB.tsv"
    path.write_text("\n".join(rows) + "\n")
    items, bad = read_benchmark(path)
    first, second = items
    assert (first.key, first.task, first.metric, first.answer) == ("MMB.tsv:7", "color", "choice", "A")
    assert first.choices == {"A": "red", "B": "blue"} and first.images == ["MMB.tsv:7.png"]
    assert item_media(first) == {"MMB.tsv:7.png": b"\x89PNG fake"}
    assert (second.metric, second.images, second.choices) == ("exact", [], None)
    assert [(b.key, b.kind) for b in bad] == [("MMB.tsv:9", "bad_line")]


@pytest.mark.parametrize("name,content,message", [
    ("empty.jsonl", "\n\n", "empty benchmark (no samples)"),
    ("empty.tsv", "index\tquestion\tanswer\n", "empty benchmark (no samples)"),
    ("bench.csv", "a,b\n", "unknown benchmark format '.csv' (known: .jsonl, .tsv)"),
    ("latin.jsonl", b"\xff\xfe", "cannot read"),
])
def test_unusable_files_are_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(BenchmarkError) as error:
        read_benchmark(path)
    assert str(error.value).startswith(f"{path}: {message}") and "\n" not in str(error.value)
    with pytest.raises(BenchmarkError, match="no such benchmark file"):
        read_benchmark(tmp_path / "missing.jsonl")
