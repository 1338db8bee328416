"""``mllm_judge``: a keye model, prompted with a rubric, scores a reply's outcome and its reasoning.

Why: rule rewards see only what a regular expression can check. Keye-VL (spec §3.4) also rewards with a
multimodal LLM judge: (a) is the outcome right given the reference, and (b) does the reasoning support the
answer it reaches (a right answer after a thought that argues for another one is not rewarded as if it
were reasoned). Any keye model can judge: a finished stage of this run (``stage``, loaded into the run's
tensor/pipeline layout as the ``eval`` stage loads one) or a released-format folder (``path``).

The judge reads the rubric (`RUBRIC`, or ``rubric`` from the blueprint with the fields ``{question}``,
``{reference}`` and ``{response}``) as one user turn and answers greedily, for the whole batch at once
through the generator (batched ``batch_size`` prompts at a time). It must end with two lines::

    outcome: <0..scale>
    consistency: <0..scale>

`parse_judgement` reads them robustly: case and spacing do not matter, ``=`` works like ``:``, quotes around
the names (JSON) are fine, a fraction ``7/10`` is read as 0.7, ``N`` alone as N/scale; a ``<think>`` block is
skipped (only what follows the last ``</think>`` counts; an unclosed one means the judge was cut off); when a
name appears several times the last one is the verdict. A value outside [0, scale] (or an unparsable one) is
not a judgement.

Scores, per sample: ``outcome_weight · outcome + consistency_weight · consistency`` (each in [0, 1]).
Handled by rule, counted, never raised:

- a part the judge did not give (``unparsable_outcome``, ``unparsable_consistency``; ``unparsable`` when
  neither is readable) scores ``unparsable_score`` (default 0: a judge that answers nonsense gives no reward);
- no reference (``missing_reference``): the outcome cannot be judged; the score is the consistency alone
  (its weight taken as the whole);
- an empty reply (``empty_response``) scores 0 without asking the judge;
- a judge prompt longer than the judge's window (``too_long``) gets no judgement: unparsable, as above.

Components: ``outcome`` and ``consistency`` as read (NaN where not readable or not asked) and ``parsed``
(1 when both needed parts were read). The raw judgements of the last batch are kept in ``judgements``.

The judge sees text only: a `RewardSample` carries the prompt as text, so images and videos are not shown
to it (their placeholder tokens are removed from the question); it judges the answer against the reference
and the reasoning's coherence, which is what the rubric asks.

Where it runs: in the training processes, as the rollout generator does. Generation is collective over the
model-parallel group, so every rank of that group must call ``score`` with the same samples (the RL and
rejection-sampling stages do; data-parallel ranks judge their own samples). A judge in its own process
group (a second model placed on other devices, fed by messages) is not built: on a 2-core CPU machine two
process groups would compete for the same cores, and on a cluster the judge-as-a-server pattern is what an
external engine gives (the ``generator`` contract's external engines); the in-process judge keeps the run
to one layout and one launcher.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from keye import hookimpl
from keye.config import doc
from keye.errors import KeyeUserError
from keye.rewards.contract import RewardOutput, RewardSample, count

RUBRIC = (
    "You are a strict grader. Read the question, the reference answer and a reply.\n"
    "Question: {question}\n"
    "Reference answer: {reference}\n"
    "Reply: {response}\n"
    "Grade two things from 0 to 10: outcome (is the reply's final answer the reference answer?) and "
    "consistency (does the reply's reasoning support its final answer?). End with exactly two lines:\n"
    "outcome: <0-10>\n"
    "consistency: <0-10>"
)
PARTS = ("outcome", "consistency")
_VALUE = r"[\"']?\s*[:=]\s*[\"']?\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?))?"
_PATTERNS = {part: re.compile(rf"[\"']?\b{part}\b{_VALUE}", re.IGNORECASE) for part in PARTS}
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")
_VISION = re.compile(r"<\|vision_start\|>.*?<\|vision_end\|>", re.DOTALL)


def parse_judgement(text: str, scale: float = 10.0) -> dict[str, float | None]:
    """``{"outcome": x, "consistency": y}``, each in [0, 1] or None when not given (module docstring)."""
    text = _SPECIAL.sub(" ", text.replace("<|im_end|>", "").replace("<|endoftext|>", ""))
    if "<think>" in text:
        end = text.rfind("</think>")
        if end == -1 or end < text.rfind("<think>"):
            return {part: None for part in PARTS}  # cut off while thinking: no verdict
        text = text[end + len("</think>"):]
    result: dict[str, float | None] = {}
    for part, pattern in _PATTERNS.items():
        found = pattern.findall(text)
        if not found:
            result[part] = None
            continue
        value, denominator = found[-1]
        top = float(denominator) if denominator else scale
        number = float(value)
        result[part] = number / top if top > 0 and 0 <= number <= top else None
    return result


def question_text(prompt: str) -> str:
    """The prompt as the judge reads it: vision blocks and special tokens removed, whitespace squeezed."""
    text = _SPECIAL.sub(" ", _VISION.sub(" ", prompt))
    return " ".join(text.split())


class MLLMJudge:
    """The ``mllm_judge`` reward model (see the module docstring).

    ``ctx``: the stage's context (``blueprint``, ``stage``, ``registry``, ``parallel``), needed to load a stage
    of the run; may be None with ``path``. The judge model is loaded on the first ``score`` call.
    """

    @dataclass
    class Config:
        stage: str = doc("A finished earlier stage of this run that judges (its weights, the run's layout).", "")
        path: str = doc("A released-format folder that judges, instead of a stage.", "")
        rubric: str = doc("The judge's prompt, with {question}, {reference} and {response}; empty: the built-in one.", "")
        scale: float = doc("The top of the judge's grading scale (a bare number N means N/scale).", 10.0)
        outcome_weight: float = doc("Weight of the outcome part of the score.", 0.5)
        consistency_weight: float = doc("Weight of the reasoning-supports-the-answer part.", 0.5)
        unparsable_score: float = doc("What a part the judge did not give scores (documented rule; 0: no reward).", 0.0)
        max_new_tokens: int = doc("Tokens of a judgement at most.", 32)
        batch_size: int = doc("Judge prompts generated together.", 16)
        mode: str = doc("Thinking mode of the judge prompt: no_think, think, auto or agentic.", "no_think")

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        from keye.eval.model import MODES

        if bool(config.stage) == bool(config.path):
            check.fail("stage", "name the judge: a stage of this run or a released-format folder (path), one of them")
        if config.stage and check.blueprint is not None and check.stage_index is not None:
            earlier = [stage.name for stage in check.blueprint.stages][: check.stage_index]
            if config.stage not in earlier:
                check.fail("stage", f"no earlier stage named '{config.stage}'; earlier stages: {', '.join(earlier) or '(none)'}")
        check.number(config, "scale", above=0.0)
        for name in ("outcome_weight", "consistency_weight", "unparsable_score"):
            check.number(config, name)
        if config.outcome_weight == 0 and config.consistency_weight == 0:
            check.fail("outcome_weight", "outcome_weight and consistency_weight are both 0: the judge would score nothing")
        check.count(config, "max_new_tokens", "batch_size")
        check.one_of(config, "mode", MODES)
        if config.rubric:
            try:
                config.rubric.format(question="", reference="", response="")
            except (KeyError, IndexError, ValueError) as exc:
                check.fail("rubric", f"only {{question}}, {{reference}} and {{response}} may be filled in ({exc!s})")

    def __init__(self, config: Config, ctx: Any = None, model: Any = None) -> None:
        self.config = config
        self.ctx = ctx
        self.model = model  # a keye.eval.model.EvalModel; None: loaded on first use
        self.judgements: list[str] = []

    def load(self) -> Any:
        """The judge as a `keye.eval.model.EvalModel` (greedy, ``max_new_tokens``)."""
        if self.model is not None:
            return self.model
        from keye.eval.model import EvalModel, from_released, make_generator, stage_model

        config, ctx = self.config, self.ctx
        if config.path:
            if not Path(config.path).is_dir():
                raise KeyeUserError(f"mllm_judge.path: {config.path}: no such released-format folder")
            self.model = from_released(config.path, max_new_tokens=config.max_new_tokens)
            return self.model
        if ctx is None or getattr(ctx, "blueprint", None) is None:
            raise KeyeUserError(f"mllm_judge.stage: '{config.stage}' needs a run to load it from (use path outside a run)")
        from keye.data.pipeline import build_processor

        model = stage_model(ctx.blueprint, Path(ctx.blueprint.run.output_dir) / config.stage, ctx.registry, ctx.parallel)
        processor = build_processor(ctx)
        self.model = EvalModel(make_generator(model, processor.tokenizer, ctx.parallel), processor,
                               max_new_tokens=config.max_new_tokens)
        return self.model

    def prompt(self, sample: RewardSample) -> str:
        reference = sample.reference
        if isinstance(reference, (list, tuple)):
            reference = " or ".join(str(r) for r in reference)
        return (self.config.rubric or RUBRIC).format(
            question=question_text(sample.prompt), reference="(none)" if reference in (None, "") else reference,
            response=" ".join(_SPECIAL.sub(" ", sample.response).split()))  # a template token cannot be quoted

    def judge(self, prompts: Sequence[str], counts: dict[str, int] | None = None) -> list[str]:
        """The judge's raw reply to each prompt (greedy), ``batch_size`` at a time. A prompt the judge cannot
        take (longer than its window with ``max_new_tokens``) gets the empty judgement, counted ``too_long``."""
        from keye.data.sample import Message, TextPart

        model = self.load()
        replies: list[str] = [""] * len(prompts)
        size = self.config.batch_size
        for start in range(0, len(prompts), size):
            requests, where = [], []
            for i in range(start, min(start + size, len(prompts))):
                try:
                    requests.append(model.request([Message("user", [TextPart(prompts[i])])], self.config.mode, {},
                                                  f"judge/{i}"))
                    where.append(i)
                except KeyeUserError:
                    count(counts if counts is not None else {}, "too_long")
            for i, (text, _) in zip(where, model.generate(requests) if requests else []):
                replies[i] = text
        return replies

    def score(self, samples: Sequence[RewardSample]) -> RewardOutput:
        config = self.config
        counts: dict[str, int] = {}
        asked = [i for i, s in enumerate(samples) if s.response.replace("<|im_end|>", "").strip()]
        raw = self.judge([self.prompt(samples[i]) for i in asked], counts) if asked else []
        by_index = dict(zip(asked, raw))
        self.judgements = [by_index.get(i, "") for i in range(len(samples))]
        scores, outcome, consistency, parsed = [], [], [], []
        for i, sample in enumerate(samples):
            if i not in by_index:
                count(counts, "empty_response")
                scores.append(0.0)
                outcome.append(math.nan)
                consistency.append(math.nan)
                parsed.append(0.0)
                continue
            verdict = parse_judgement(by_index[i], config.scale)
            has_reference = sample.reference not in (None, "", [])
            if not has_reference:
                count(counts, "missing_reference")
            if verdict["outcome"] is None and verdict["consistency"] is None:
                count(counts, "unparsable")
            for part in PARTS:
                if verdict[part] is None and (part == "consistency" or has_reference):
                    count(counts, f"unparsable_{part}")
            rule = config.unparsable_score
            got_c = verdict["consistency"] if verdict["consistency"] is not None else rule
            if has_reference:
                got_o = verdict["outcome"] if verdict["outcome"] is not None else rule
                scores.append(config.outcome_weight * got_o + config.consistency_weight * got_c)
                ok = verdict["outcome"] is not None and verdict["consistency"] is not None
            else:  # no reference: the consistency carries the whole weight
                scores.append((config.outcome_weight + config.consistency_weight) * got_c)
                ok = verdict["consistency"] is not None
            outcome.append(math.nan if verdict["outcome"] is None or not has_reference else verdict["outcome"])
            consistency.append(math.nan if verdict["consistency"] is None else verdict["consistency"])
            parsed.append(float(ok))
        return RewardOutput(scores, {"outcome": outcome, "consistency": consistency, "parsed": parsed}, counts)


@hookimpl
def keye_register_reward_models(register):
    register("mllm_judge", MLLMJudge)
