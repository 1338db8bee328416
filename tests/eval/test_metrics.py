"""Answer extraction and metrics against hand-computed cases; ANLS and IoU also against independent formulas
(a memoised recursive edit distance; IoU by counting the unit cells two integer boxes cover)."""

from __future__ import annotations

import functools
import random

import pytest

from keye.eval.extract import extract, thought
from keye.eval.metrics import anls, box_iou, choice, exact, iou, relaxed


@pytest.mark.parametrize("response,metric,expected", [
    ("<think>count them</think><answer>3</answer><|im_end|>", "exact", "3"),
    ("<analysis>easy</analysis>two", "exact", "two"),
    ("so \\boxed{\\frac{1}{2}} it is", "exact", "\\frac{1}{2}"),
    ("<think>never finished", "exact", ""),
    ("<answer>B</answer>", "choice", "B"),
    ("(C) a red square", "choice", "C"),
    ("The answer is D.", "choice", "D"),
    ("I think it is B, not A", "choice", "A"),  # the last standalone letter
    ("red square", "choice", "B"),  # repeats the text of option B
    ("nothing here", "choice", None),
    ("about 1,234.5 units", "relaxed", "1,234.5"),
    ("<answer>12%</answer>", "relaxed", "12%"),
    ("<|box_start|>[[10,20,300,400]]<|box_end|>", "iou", [10.0, 20.0, 300.0, 400.0]),
    ("first [1, 2, 3, 4] then [5, 6, 7, 8]", "iou", [5.0, 6.0, 7.0, 8.0]),
    ("no box", "iou", None),
])
def test_extract(response, metric, expected):
    assert extract(response, metric, {"A": "blue circle", "B": "red square", "C": "x", "D": "y"}) == expected


def test_thought():
    assert thought("<think>a</think><answer>b</answer>")
    assert thought("<analysis>hard</analysis><think>steps")  # cut off mid-thought: it did choose to think
    assert not thought("<think>\n\n</think>b") and not thought("<analysis>easy</analysis>b")


def test_exact_relaxed_choice():
    assert exact("Two.", "two") == 1 and exact("two", ["2", "TWO "]) == 1 and exact("three", "two") == 0
    assert relaxed("104", "100") == 1 and relaxed("106", "100") == 0 and relaxed("0", "0") == 1
    assert relaxed("0.01", "0") == 0 and relaxed("1,000", "1000") == 1 and relaxed("Paris", "paris") == 1
    assert choice("b", "B") == 1 and choice(None, "B") == 0 and choice("A", "B") == 0


@functools.lru_cache(maxsize=None)
def _distance(a: str, b: str) -> int:
    if not a or not b:
        return len(a) + len(b)
    return min(_distance(a[1:], b) + 1, _distance(a, b[1:]) + 1, _distance(a[1:], b[1:]) + (a[0] != b[0]))


def _anls_reference(prediction: str, answers: list[str]) -> float:
    scores = []
    for answer in answers:
        p, a = " ".join(prediction.lower().split()), " ".join(answer.lower().split())
        nl = _distance(p, a) / max(len(p), len(a), 1)
        scores.append(1 - nl if nl < 0.5 else 0.0)
    return max(scores)


def test_anls_by_hand_and_against_a_reference():
    assert anls("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert anls("abcd", "abxy") == 0.0  # distance 0.5: cut to 0
    assert anls("Hello", ["nope", "hello"]) == 1.0
    rng = random.Random(0)
    for _ in range(300):
        word = lambda: "".join(rng.choice("abc .") for _ in range(rng.randint(1, 8))).strip() or "a"
        prediction, answers = word(), [word() for _ in range(rng.randint(1, 3))]
        assert anls(prediction, answers) == pytest.approx(_anls_reference(prediction, answers))


def _iou_reference(a: list[int], b: list[int]) -> float:
    cells = lambda box: {(x, y) for x in range(box[0], box[2]) for y in range(box[1], box[3])}
    ca, cb = cells(a), cells(b)
    return len(ca & cb) / len(ca | cb) if ca | cb else 0.0


def test_iou_by_hand_and_against_cell_counting():
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([10, 10, 0, 0], [0, 0, 10, 10]) == 1.0  # corners in either order
    assert box_iou(None, [0, 0, 1, 1]) == 0.0 and box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert iou([0, 0, 10, 10], [0, 0, 10, 20]) == 1.0 and iou([0, 0, 10, 10], [0, 0, 10, 21]) == 0.0
    rng = random.Random(1)
    for _ in range(300):
        def box():
            x1, y1 = rng.randint(0, 12), rng.randint(0, 12)
            return [x1, y1, x1 + rng.randint(1, 8), y1 + rng.randint(1, 8)]
        a, b = box(), box()
        assert box_iou(a, b) == pytest.approx(_iou_reference(a, b))
