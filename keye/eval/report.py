"""``summary.json`` and ``report.md`` of an evaluation, from its per-sample rows.

Scores are averaged per task and overall (``overall``: over samples; ``macro``: over tasks). Beside them:
the think ratio (in ``auto`` mode, the share of replies that chose to think: a non-empty ``<think>``; in
another mode the share is reported too, but it measures obedience rather than a choice), the mean response
length in tokens, the mean IoU of grounding tasks, and the bad samples by kind.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    stats = {
        "samples": len(rows),
        "score": _mean([r["score"] for r in rows]),
        "think_ratio": _mean([float(r["thought"]) for r in rows]),
        "mean_response_tokens": _mean([r["response_tokens"] for r in rows]),
    }
    ious = [r["iou"] for r in rows if "iou" in r]
    if ious:
        stats["mean_iou"] = _mean(ious)
    return stats


def summarize(rows: list[dict[str, Any]], bad: list[Any], *, mode: str, source: str = "",
              benchmarks: Sequence[str] = (), seconds: float = 0.0) -> dict[str, Any]:
    tasks: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        tasks.setdefault(row["task"], []).append(row)
    per_task = {name: {"metric": task_rows[0]["metric"], **_stats(task_rows)} for name, task_rows in sorted(tasks.items())}
    return {
        "source": source, "mode": mode, "benchmarks": list(benchmarks),
        "overall": {**_stats(rows), "macro_score": _mean([t["score"] for t in per_task.values()])},
        "tasks": per_task,
        "bad_samples": len(bad), "bad_by_kind": dict(Counter(item.kind for item in bad)),
        "seconds": round(seconds, 3),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["tasks"])
    scores = [summary["tasks"][n]["score"] for n in names]
    fig, axis = plt.subplots(figsize=(max(4.0, 0.7 * len(names) + 1.5), 3.2), dpi=100)
    axis.bar(names, scores, color="tab:blue")
    axis.set_ylim(0, 1)
    axis.set_ylabel("score")
    axis.set_title(f"mode {summary['mode']}")
    axis.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out: Path, summary: dict[str, Any]) -> Path:
    """``out/report.md`` with the per-task table and ``out/scores.png`` (a bar per task, when there are rows)."""
    overall = summary["overall"]
    lines = [f"# Evaluation of `{summary['source']}`", "",
             f"Mode `{summary['mode']}`; {overall['samples']} samples scored, {summary['bad_samples']} skipped"
             + (f" ({', '.join(f'{k}: {v}' for k, v in summary['bad_by_kind'].items())})" if summary["bad_samples"] else "")
             + f"; {summary['seconds']} s.", "",
             "| task | metric | samples | score | think ratio | mean response tokens |", "|---|---|---|---|---|---|"]
    for name, task in summary["tasks"].items():
        extra = f" (mean IoU {_fmt(task['mean_iou'])})" if "mean_iou" in task else ""
        lines.append(f"| {name} | {task['metric']} | {task['samples']} | {_fmt(task['score'])}{extra} "
                     f"| {_fmt(task['think_ratio'])} | {_fmt(task['mean_response_tokens'])} |")
    lines.append(f"| **overall** | | {overall['samples']} | {_fmt(overall['score'])} (macro {_fmt(overall['macro_score'])}) "
                 f"| {_fmt(overall['think_ratio'])} | {_fmt(overall['mean_response_tokens'])} |")
    lines.append("")
    if summary["tasks"]:
        _plot(summary, out / "scores.png")
        lines += ["![scores per task](scores.png)", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
