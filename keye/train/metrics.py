"""Run outputs: ``metrics.jsonl`` (one JSON object per step) and ``summary.json`` (per stage).

Only rank 0 writes; other ranks get a writer that does nothing, so stage code never branches on rank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so a bad step is visible rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return _clean(value.item())
    return value


METRICS_NAME = "metrics.jsonl"


def _keep_lines(path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite ``path`` with only the records ``keep`` accepts (nothing to do when there is no file)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
    path.write_text("".join(line + "\n" for line in kept))


def drop_stage_lines(path: Path, stage: str) -> None:
    """Forget every line of ``stage`` in the metrics file ``path`` (``--stage NAME --overwrite`` runs it anew)."""
    _keep_lines(Path(path), lambda record: record.get("stage") != stage)


class MetricsWriter:
    """Appends one line per logged step to ``<output_dir>/metrics.jsonl``.

    Appending is safe because ``keye-launch run`` never lets two runs share the file: a live run holds the
    folder's lock and a fresh run refuses an old run's file (`keye.train.output_dir`).
    """

    def __init__(self, output_dir: Path, enabled: bool = True) -> None:
        self.path = Path(output_dir) / METRICS_NAME
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def drop_after(self, stage: str, step: int) -> None:
        """Forget ``stage``'s lines after ``step`` (a resumed run logs those steps again)."""
        if self.enabled:
            _keep_lines(self.path, lambda record: not (record.get("stage") == stage and record.get("step", 0) > step))

    def log(self, **record: Any) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({key: _clean(value) for key, value in record.items()}) + "\n")


def write_summary(output_dir: Path, summary: dict[str, Any]) -> Path:
    path = Path(output_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=_clean) + "\n")
    return path
