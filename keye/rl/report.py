"""The ``rl`` stage's own ``report.md`` and ``reward_curve.png``, in its stage folder.

Why a report of its own: the run's report (`keye.train.report`) plots each stage's loss, and a policy-gradient
loss says little (it hovers around 0 by construction); what shows RL working is the reward rising. The curve is
the mean training reward per step (and per think mode), smoothed over a few steps, with the held-out greedy
reward before and after training drawn as two markers; the table has the held-out numbers and the step
counts. Written by rank 0 from the run's ``metrics.jsonl`` (so a resumed stage's curve is whole).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def stage_records(metrics_path: Path, stage: str) -> list[dict[str, Any]]:
    records = []
    if Path(metrics_path).is_file():
        for line in Path(metrics_path).read_text().splitlines():
            record = json.loads(line)
            if record.get("stage") == stage:
                records.append(record)
    return records


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` finite values (NaN where none)."""
    out = []
    for i in range(len(values)):
        kept = [v for v in values[max(0, i - window + 1): i + 1] if not math.isnan(v)]
        out.append(sum(kept) / len(kept) if kept else math.nan)
    return out


def plot_reward_curve(records: list[dict[str, Any]], summary: dict[str, Any], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    window = max(1, len(records) // 10)
    fig, axis = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    axis.plot(steps, [_number(r.get("reward")) for r in records], color="tab:blue", alpha=0.3, linewidth=0.8)
    axis.plot(steps, smooth([_number(r.get("reward")) for r in records], window), color="tab:blue", linewidth=1.6,
              label=f"train reward (mean of {window})")
    modes = sorted({key for r in records for key in r if key.startswith("reward_by_mode/")})
    for key in modes:
        axis.plot(steps, smooth([_number(r.get(key)) for r in records], window), linewidth=0.9, linestyle="--",
                  label=key.split("/", 1)[1])
    ends = (steps[0], steps[-1]) if steps else (0, 0)
    for name, marker, x in (("eval_before", "o", ends[0]), ("eval_after", "s", ends[1])):
        value = (summary.get(name) or {}).get("heldout_reward")
        if isinstance(value, (int, float)):
            axis.scatter([x], [value], marker=marker, color="black", zorder=3,
                         label=f"held-out {name.split('_')[1]} {value:.3f}")
    axis.set_xlabel("step")
    axis.set_ylabel("mean reward")
    axis.set_title(title)
    axis.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_stage_report(stage_dir: Path, stage: str, metrics_path: Path, summary: dict[str, Any]) -> Path:
    """``stage_dir/report.md`` with the reward curve and the held-out table (before / after)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    records = stage_records(metrics_path, stage)
    lines = [f"# RL stage `{stage}`", ""]
    if records:
        plot_reward_curve(records, summary, stage_dir / "reward_curve.png", stage)
        lines += ["![reward curve](reward_curve.png)", ""]
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    keys = [k for k in after if k in before and not k.startswith("heldout_count")] or list(before)
    if keys:
        lines += ["| held-out | before | after |", "|---|---|---|"]
        lines += [f"| {key} | {_fmt(before.get(key))} | {_fmt(after.get(key))} |" for key in keys]
        lines.append("")
    trained = sum(1 for r in records if r.get("updates"))
    lines.append(f"Steps: {len(records)} logged, {trained} with an update; reference: {summary.get('reference')}.")
    report = stage_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
