"""The answer in a generated reply, in the form its metric compares (`extract`), and whether it thought.

First the Keye post-processing (`keye.data.chat.parse_answer`): past ``</analysis>`` and ``</think>``, inside
the last ``<answer>…</answer>``, inside the last ``\\boxed{…}``. Then per metric:

- ``choice``: a letter: the text alone (``B``, ``(B)``, ``B.``, ``B) text``), "answer is B", the last
  standalone capital among the choices, or the letter of a choice whose text the answer repeats;
- ``relaxed``: the last number in the text, if the text is not one already;
- ``iou``: the last box ``[x1, y1, x2, y2]`` (the ``<|box_start|>[[…]]<|box_end|>`` form too), as 4 floats;
- ``exact``, ``anls``: the text itself.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from keye.data.chat import parse_answer
from keye.eval.metrics import to_number

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?%?|-?\.\d+")
_BOX = re.compile(r"\[\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\]")
_LEAD_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[.:)\s]|$)")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\(?([A-Z])\b\)?", re.IGNORECASE)
_SPECIAL = ("<|im_end|>", "<|endoftext|>")


def clean(response: str) -> str:
    """The reply without the stop tokens the generator keeps."""
    for token in _SPECIAL:
        response = response.replace(token, "")
    return response


def thought(response: str) -> bool:
    """Whether the reply thinks: a non-empty ``<think>…</think>`` (or one cut off unclosed)."""
    start = response.rfind("<think>")
    if start == -1:
        return False
    end = response.find("</think>", start)
    body = response[start + len("<think>"): end if end != -1 else None]
    return bool(body.strip())


def extract(response: str, metric: str, choices: Mapping[str, str] | None = None) -> Any:
    text = parse_answer(clean(response))
    if metric == "choice":
        return _letter(text, choices or {})
    if metric == "relaxed":
        if to_number(text) is not None:
            return text
        numbers = _NUMBER.findall(text)
        return numbers[-1] if numbers else text
    if metric == "iou":
        boxes = _BOX.findall(text)
        return [float(v) for v in boxes[-1]] if boxes else None
    return text


def _letter(text: str, choices: Mapping[str, str]) -> str | None:
    letters = set(choices) or set("ABCDEFGHIJ")
    stripped = text.strip()
    for pattern in (_LEAD_LETTER, _ANSWER_IS):
        found = pattern.search(stripped)
        if found and found.group(1).upper() in letters:
            return found.group(1).upper()
    for letter, option in choices.items():
        if option and stripped.lower().rstrip(".") == str(option).strip().lower().rstrip("."):
            return letter
    standalone = [c for c in re.findall(r"\b([A-Z])\b", stripped) if c in letters]
    return standalone[-1] if standalone else None
