"""Run outputs: ``metrics.jsonl`` (one JSON object per step) and ``summary.json`` (per stage).

Only rank 0 writes; other ranks get a writer that does nothing, so stage code never branches on rank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so a bad step is visible rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return _clean(value.item())
    return value


class MetricsWriter:
    """Appends one line per logged step to ``<output_dir>/metrics.jsonl``."""

    def __init__(self, output_dir: Path, enabled: bool = True) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def drop_after(self, stage: str, step: int) -> None:
        """Forget ``stage``'s lines after ``step`` (a resumed run logs those steps again)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if not (json.loads(line).get("stage") == stage and json.loads(line).get("step", 0) > step)]
        self.path.write_text("".join(line + "\n" for line in kept))

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
