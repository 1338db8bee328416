"""The evaluation loop: benchmark items → prompts → generated replies → extracted answers → scores.

Written for runs that die: each scored sample is one line of ``results.jsonl``, flushed as it is written,
and ``summary.json`` / ``report.md`` are written at the end *and* when the loop is interrupted (whatever
was scored so far). Bad samples (a bad line, media that cannot be read or decoded, a prompt past the
model's window) are skipped with one line each on stderr naming the sample, and counted by kind.

Under tensor/pipeline parallelism every rank runs the loop (generation is collective) and only the
``writer`` rank writes files.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from keye.errors import KeyeUserError
from keye.eval.benchmark import BadItem, EvalItem, item_media, item_messages, read_benchmark
from keye.eval.extract import extract, thought
from keye.eval.metrics import METRICS, box_iou
from keye.eval.model import EvalModel, check_mode
from keye.eval.report import summarize, write_report


def read_benchmarks(paths: Sequence[str | Path], max_samples: int | None = None) -> tuple[list[EvalItem], list[BadItem]]:
    """Every file's items (the first ``max_samples`` of each) and bad lines; any unusable file fails first."""
    if max_samples is not None and max_samples < 1:
        raise KeyeUserError(f"--max-samples must be at least 1, got {max_samples}")
    if not paths:
        raise KeyeUserError("no benchmark files given")
    items, bad = [], []
    for path in paths:
        found, wrong = read_benchmark(path)
        items += found[:max_samples] if max_samples is not None else found
        bad += wrong
    return items, bad


def evaluate(benchmarks: Sequence[str | Path], model: EvalModel, out_dir: str | Path, mode: str = "auto",
             max_samples: int | None = None, batch_size: int = 8, writer: bool = True, source: str = "",
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on the benchmark files; returns the summary (also written to ``out_dir``)."""
    check_mode(mode)
    log = log or (lambda line: print(line, file=sys.stderr))
    items, bad = read_benchmarks(benchmarks, max_samples)
    for item in bad:
        log(f"keye eval: skipped {item.line()}")
    out = Path(out_dir)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    results = None
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        results = (out / "results.jsonl").open("w", encoding="utf-8")
    try:
        for first in range(0, len(items), batch_size):
            for row in _batch(items[first:first + batch_size], model, mode, bad, log):
                rows.append(row)
                if results is not None:
                    results.write(json.dumps(row) + "\n")
                    results.flush()
    finally:
        if results is not None:
            results.close()
        summary = summarize(rows, bad, mode=mode, source=source, benchmarks=[str(p) for p in benchmarks],
                            seconds=time.perf_counter() - start)
        if writer:
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            write_report(out, summary)
    return summary


def _batch(items: list[EvalItem], model: EvalModel, mode: str, bad: list[BadItem],
           log: Callable[[str], None]) -> list[dict[str, Any]]:
    from keye.data.processor import SampleError
    from keye.data.sources import MediaRefused

    kept, requests = [], []
    for item in items:
        try:
            request = model.request(item_messages(item), mode, item_media(item), item.key)
        except MediaRefused as exc:
            bad.append(BadItem(item.key, exc.kind, str(exc)))
        except SampleError as exc:
            bad.append(BadItem(item.key, exc.kind, getattr(exc, "reason", str(exc))))
        except KeyeUserError as exc:  # past the model's window
            bad.append(BadItem(item.key, "too_long", str(exc)))
        else:
            kept.append(item)
            requests.append(request)
            continue
        log(f"keye eval: skipped {bad[-1].line()}")
    if not requests:
        return []
    replies = model.generate(requests)
    rows = []
    for item, request, (response, tokens) in zip(kept, requests, replies):
        extracted = extract(response, item.metric, item.choices)
        row = {"key": item.key, "task": item.task, "metric": item.metric, "mode": mode,
               "prompt": model.tokenizer.decode(request.prompt_ids.tolist(), skip_special_tokens=False),
               "response": response, "extracted": extracted, "answer": item.answer,
               "score": METRICS[item.metric](extracted, item.answer), "thought": thought(response),
               "response_tokens": tokens}
        if item.metric == "iou":
            row["iou"] = box_iou(extracted, item.answer)
        rows.append(row)
    return rows
