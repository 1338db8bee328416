"""Scores of an extracted answer against the reference, one function per metric (``METRICS``).

Each returns a number in [0, 1]. The references follow the usual benchmark conventions:

- ``exact``: normalised string equality (case, surrounding space and a final full stop ignored) with any of
  the reference answers (a list means "any of these");
- ``relaxed``: ChartQA's relaxed accuracy: numbers within 5 % of the reference (exact at 0), else ``exact``;
- ``choice``: the choice letter equals the reference letter;
- ``anls``: Average Normalized Levenshtein Similarity (DocVQA): ``1 - d(p, a) / max(|p|, |a|)`` for the best
  reference, 0 where that distance is 0.5 or more;
- ``iou``: grounding: 1 when the predicted box overlaps the reference with IoU >= 0.5 (the usual
  ``Acc@0.5``); the IoU itself is reported beside it (`box_iou`).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

ANLS_THRESHOLD = 0.5
IOU_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05


def normalize(text: Any) -> str:
    text = re.sub(r"\s+", " ", str(text).strip().lower())
    return text.rstrip(".").strip()


def _answers(answer: Any) -> list:
    return list(answer) if isinstance(answer, (list, tuple)) else [answer]


def to_number(text: Any) -> float | None:
    """A number written plainly (``1,234``, ``12.5``, ``40%``), else None."""
    cleaned = str(text).strip().replace(",", "").rstrip("%").strip()
    try:
        return float(cleaned)
    except ValueError:
        return None


def exact(prediction: Any, answer: Any) -> float:
    return float(any(normalize(prediction) == normalize(a) for a in _answers(answer)))


def relaxed(prediction: Any, answer: Any) -> float:
    value = to_number(prediction)
    for a in _answers(answer):
        target = to_number(a)
        if value is not None and target is not None:
            if (value == target) if target == 0 else abs(value - target) <= RELAXED_TOLERANCE * abs(target):
                return 1.0
        elif normalize(prediction) == normalize(a):
            return 1.0
    return 0.0


def choice(prediction: Any, answer: Any) -> float:
    return float(prediction is not None and str(prediction).strip().upper() == str(answer).strip().upper())


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: Any, answer: Any) -> float:
    """DocVQA's normalisation: case and runs of whitespace only (a full stop counts, as there)."""
    best = 0.0
    p = " ".join(str(prediction).lower().split())
    for a in _answers(answer):
        a = " ".join(str(a).lower().split())
        longest = max(len(p), len(a))
        distance = levenshtein(p, a) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < ANLS_THRESHOLD else 0.0)
    return best


def box_iou(box: Sequence[float] | None, reference: Sequence[float]) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes (corners in either order); 0 for no box."""
    if box is None or len(box) != 4:
        return 0.0
    ax1, ax2 = sorted((box[0], box[2]))
    ay1, ay2 = sorted((box[1], box[3]))
    bx1, bx2 = sorted((reference[0], reference[2]))
    by1, by2 = sorted((reference[1], reference[3]))
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def iou(prediction: Any, answer: Any) -> float:
    return float(box_iou(prediction, answer) >= IOU_THRESHOLD)


METRICS: dict[str, Callable[[Any, Any], float]] = {
    "exact": exact, "relaxed": relaxed, "choice": choice, "anls": anls, "iou": iou,
}
