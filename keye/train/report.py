"""``report.md``: a readable summary of a run: each stage's headline numbers, loss curves as PNG plots.

Written by rank 0 at the end of every stage from ``metrics.jsonl`` and ``summary.json``, so a run
stopped half-way still leaves a report of what it did.

Each stage kind says which of its summary keys show that it did its job (``headline_keys``, a class attribute
of the stage component; the runner records it in the stage's summary, and a stage may set its own in its
summary instead). A central list of keys would forget the kinds it does not know (a third-party stage, a new
metric): the kind knows what its numbers mean. A pattern is one of:

- a key of the stage's held-out evaluation (``eval_after``): shown ``before → after`` (``eval_before``);
- otherwise a key path into the summary itself, nested mappings joined by ``.``: shown as its value;
- with ``*`` standing for one key part (no ``.`` or ``/`` in it): ``heldout_reward/*`` is each reward
  component, ``tasks.*`` each task, ``counts.*/unparsable`` any reward model's count. A trailing ``*`` (a
  breakdown) that matches a single key is left out: a breakdown into one part (the only think mode) says
  nothing its total does not.

Keys a stage did not report are skipped. A stage may also list images in its folder under ``plots`` (the
``rl`` stage's reward curve): they are shown under the stage's loss curve.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any


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
        whole = not math.isfinite(value) or value == int(value) or abs(value) >= 1000
        return f"{value:.4g}" if whole else f"{value:.3f}"
    return "" if value is None else str(value)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping of ``a.b`` keys to their leaves (lists are leaves)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _matches(pattern: str, keys: list[str]) -> list[str]:
    if "*" not in pattern:
        return [pattern] if pattern in keys else []
    regex = re.compile("".join("[^./]+" if part == "*" else re.escape(part) for part in re.split(r"(\*)", pattern)))
    found = [key for key in keys if regex.fullmatch(key)]
    return [] if pattern.endswith("*") and len(found) == 1 else found  # a breakdown into one part adds nothing


def headline(stage: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, before, after)`` for each of the stage's headline keys it reported; ``before`` is None for a
    value that is not a before/after evaluation."""
    before, after = flatten(stage.get("eval_before") or {}), flatten(stage.get("eval_after") or {})
    rest = flatten({k: v for k, v in stage.items() if k not in ("eval_before", "eval_after", "headline_keys")})
    rows: list[tuple[str, Any, Any]] = []
    for pattern in stage.get("headline_keys") or ():
        evaluated = _matches(pattern, list(after))
        if evaluated:
            rows += [(key, before.get(key), after[key]) for key in evaluated]
        else:
            rows += [(key, None, rest[key]) for key in _matches(pattern, list(rest))]
    return [row for row in rows if isinstance(row[2], (int, float, str)) and row[2] != ""]


def _cell(rows: list[tuple[str, Any, Any]]) -> str:
    parts = [f"{key} {_fmt(old)} → {_fmt(new)}" if old is not None else f"{key} {_fmt(new)}" for key, old, new in rows]
    return "<br>".join(parts)


def write_report(output_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``<output_dir>/report.md`` and one ``plots/loss_<stage>.png`` per trained stage."""
    output_dir = Path(output_dir)
    plots = output_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    metrics = _read_metrics(output_dir / "metrics.jsonl")
    stages = summary.get("stages", {})
    lines = [f"# Run `{summary.get('run')}`", "", f"World size: {summary.get('world_size')}.", "",
             "Each stage's headline numbers: held-out evaluations before → after the stage, other values as the "
             "stage reported them.", "",
             "| stage | kind | steps | final loss | headline | wall time (s) |",
             "|---|---|---|---|---|---|"]
    for name, stage in stages.items():
        lines.append(f"| {name} | {stage.get('kind')} | {_fmt(stage.get('steps'))} | {_fmt(stage.get('final_loss'))} "
                     f"| {_cell(headline(stage))} | {_fmt(stage.get('wall_time_s'))} |")
    lines.append("")
    for name in dict.fromkeys([*metrics, *stages]):
        images = []
        if metrics.get(name):
            images.append((f"{name} loss", _plot(name, metrics[name], plots)))
        for image in (stages.get(name) or {}).get("plots") or ():
            path = output_dir / name / image
            if path.is_file():
                images.append((f"{name} {Path(image).stem.replace('_', ' ')}", path))
        if images:
            lines += [f"## {name}", ""]
            lines += [f"![{alt}]({path.relative_to(output_dir)})" for alt, path in images] + [""]
    report = output_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
