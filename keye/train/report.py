"""``report.md``: a readable summary of a run, with loss curves as PNG plots.

Written by rank 0 at the end of every stage from ``metrics.jsonl`` and ``summary.json``, so a run
stopped half-way still leaves a report of what it did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EVAL_KEYS = ("heldout_loss", "answer_accuracy", "image_to_text_top1", "text_to_image_top1", "chance", "heldout_reward")


def _read_metrics(path: Path) -> dict[str, list[dict[str, Any]]]:
    by_stage: dict[str, list[dict[str, Any]]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            by_stage.setdefault(record["stage"], []).append(record)
    return by_stage


def _plot(stage: str, records: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    losses = [r["loss"] if isinstance(r["loss"], (int, float)) else float("nan") for r in records]
    lrs = [r["lr"] for r in records]
    fig, loss_axis = plt.subplots(figsize=(6, 3.2), dpi=100)
    loss_axis.plot(steps, losses, color="tab:blue", linewidth=1.2)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    lr_axis = loss_axis.twinx()
    lr_axis.plot(steps, lrs, color="tab:gray", linewidth=0.8, linestyle="--")
    lr_axis.set_ylabel("learning rate", color="tab:gray")
    loss_axis.set_title(stage)
    fig.tight_layout()
    path = out / f"loss_{stage}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_report(output_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``<output_dir>/report.md`` and one ``plots/loss_<stage>.png`` per trained stage."""
    output_dir = Path(output_dir)
    plots = output_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    metrics = _read_metrics(output_dir / "metrics.jsonl")
    lines = [f"# Run `{summary.get('run')}`", "", f"World size: {summary.get('world_size')}.", "",
             "| stage | kind | steps | final loss | evaluation before | evaluation after | wall time (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, stage in summary.get("stages", {}).items():
        before = ", ".join(f"{k} {_fmt(v)}" for k, v in (stage.get("eval_before") or {}).items() if k in EVAL_KEYS)
        after = ", ".join(f"{k} {_fmt(v)}" for k, v in (stage.get("eval_after") or {}).items() if k in EVAL_KEYS)
        lines.append(f"| {name} | {stage.get('kind')} | {_fmt(stage.get('steps'))} | {_fmt(stage.get('final_loss'))} "
                     f"| {before} | {after} | {_fmt(stage.get('wall_time_s'))} |")
    lines.append("")
    for name, records in metrics.items():
        if records:
            path = _plot(name, records, plots)
            lines += [f"## {name}", "", f"![{name} loss]({path.relative_to(output_dir)})", ""]
    report = output_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
