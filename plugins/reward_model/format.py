"""``format``: 1 when the reply has the structure its think mode requires and ended with a stop token.

The structures are the Keye-VL output formats (spec §1.6, paper App. C; `keye.data.chat.format_thinking`,
`format_auto_think`), the whole reply (stop tokens removed, surrounding whitespace ignored):

- ``think``: ``<think>T</think><answer>A</answer>``, T and A non-empty, nothing before or after;
- ``no_think``: a direct answer: non-empty text with no ``<think>``/``<analysis>`` tag;
- ``auto`` (and None, the model's auto-think default): ``<analysis>D</analysis>`` then either the
  ``think`` structure or a ``no_think`` answer;
- ``agentic``: the ``think`` structure with at least one fenced code block (```` ```python … ``` ````) inside
  the thought; ``<sandbox_output>…</sandbox_output>`` blocks, if any, are balanced.

Whitespace between the blocks is allowed (generation often puts a newline there). A reply cut by the
length limit (finish reason ``length``) is not well formed whatever it holds. Components: ``structure``
and ``stop`` (1/0 each); the score is their product. An unknown mode scores 0 and is counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from keye import hookimpl
from keye.eval.extract import clean
from keye.rewards.contract import RewardOutput, RewardSample, count

_TAGS = ("think", "answer", "analysis")
_THINK = re.compile(r"<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>", re.DOTALL)
_ANALYSIS = re.compile(r"<analysis>(?P<analysis>.*?)</analysis>\s*(?P<rest>.*)", re.DOTALL)
_CODE = re.compile(r"```[a-zA-Z0-9_+-]*\n.*?```", re.DOTALL)


def _tag_count(text: str, tag: str) -> int:
    return text.count(f"<{tag}>") + text.count(f"</{tag}>")


def think_ok(text: str) -> bool:
    """Exactly ``<think>T</think><answer>A</answer>`` with non-empty T and A and no other tag."""
    found = _THINK.fullmatch(text)
    if not found or not found["think"].strip() or not found["answer"].strip():
        return False
    return _tag_count(text, "think") == 2 and _tag_count(text, "answer") == 2 and _tag_count(text, "analysis") == 0


def direct_ok(text: str) -> bool:
    """A direct answer: non-empty, no think or analysis tag."""
    return bool(text) and _tag_count(text, "think") == 0 and _tag_count(text, "analysis") == 0


def auto_ok(text: str) -> bool:
    """``<analysis>D</analysis>`` (D non-empty, once) then a thinking reply or a direct answer."""
    found = _ANALYSIS.fullmatch(text)
    if not found or not found["analysis"].strip() or _tag_count(text, "analysis") != 2:
        return False
    rest = found["rest"].strip()
    return think_ok(rest) or direct_ok(rest)


def agentic_ok(text: str) -> bool:
    """The thinking structure with a fenced code block in the thought; sandbox outputs balanced."""
    if not think_ok(text):
        return False
    thought = _THINK.fullmatch(text)["think"]
    if text.count("<sandbox_output>") != text.count("</sandbox_output>"):
        return False
    return bool(_CODE.search(thought))


CHECKS = {"think": think_ok, "no_think": direct_ok, "auto": auto_ok, None: auto_ok, "agentic": agentic_ok}


class FormatReward:
    """The ``format`` reward model (see the module docstring)."""

    @dataclass
    class Config:
        pass

    def __init__(self, config: Config, ctx: Any = None) -> None:
        self.config = config

    def score(self, samples: Sequence[RewardSample]) -> RewardOutput:
        counts: dict[str, int] = {}
        structure, stop = [], []
        for sample in samples:
            check = CHECKS.get(sample.mode)
            if check is None:
                count(counts, "unknown_mode")
            structure.append(float(check is not None and check(clean(sample.response).strip())))
            stopped = sample.finish_reason == "stop"
            if not stopped:
                count(counts, "truncated")
            stop.append(float(stopped))
        scores = [s * t for s, t in zip(structure, stop)]
        return RewardOutput(scores, {"structure": structure, "stop": stop}, counts)


@hookimpl
def keye_register_reward_models(register):
    register("format", FormatReward)
