"""The CoT data builder: sample K reasoning paths per question, keep a verified one, write an SFT data set.

Why: the cold start (spec §3.4, II.1) trains on long chains of thought that were *checked*: the paper samples
many CoTs from large models, verifies the result, and keeps the path the samples agree on most. Our teacher
is any keye model (a finished stage, or a released-format folder; `keye.eval.model`), so the same recipe
runs on the tiny synthetic world and on a cluster.

For each question (a conversation whose last assistant turn is dropped, or an RL prompt; the reference is
``meta["answer"]`` or the RL ``reference_answer``) `build_cot` asks the teacher for K replies per mode:

- ``think``: a reply counts when it thinks (a non-empty ``<think>``) and its final answer, extracted as the
  eval harness extracts it (`keye.eval.extract`), scores at least ``min_score`` against the reference with
  the question's metric (`keye.eval.metrics`; ``exact`` unless ``meta["metric"]`` says otherwise). Of the
  replies that count, the most frequent text is kept (ties: the earliest sampled): the path the samples
  agree on, not a lucky one-off.
- ``auto``: a correct reply counts only when its ``<analysis>`` chose well: the mode it picked is the
  question's ``meta["analysis_choice"]`` when the data says which mode suits it, else the cheaper
  ``/no_think`` whenever some correct reply managed without thinking (and ``/think`` otherwise).

Each kept path becomes a conversation sample (the question, the reply, its thinking mode) whose ``meta``
carries the provenance: ``cot: {teacher, mode, k, votes, correct, temperature}`` and the reference answer.
Questions with no kept path are counted (``no_correct_path``), not written; a question whose media will
not load is skipped and counted by kind (``stats.skipped``), named in the log. `write_jsonl` writes the samples
as the ``jsonl`` source reads them, media as files beside the JSONL.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from keye.data.processor import SampleError
from keye.data.sample import ConversationSample, Message, TextPart, asked
from keye.data.sources import LoadedSample, media_name, media_refs

logger = logging.getLogger("keye.data")

#: modes the builder can sample paths in
COT_MODES = ("think", "auto")


@dataclass
class Question:
    key: str
    messages: list[Message]  # up to and including the last user turn
    media: dict[str, bytes]
    answer: Any
    metric: str = "exact"
    analysis_choice: str | None = None  # "think" / "no_think" when the data knows which mode suits it
    origin: str | None = None


@dataclass
class CotStats:
    """What a build did: questions asked, paths kept per mode, questions without a verified path."""

    questions: int = 0
    kept: Counter = field(default_factory=Counter)  # mode -> paths written
    no_correct_path: Counter = field(default_factory=Counter)  # mode -> questions with none
    skipped: Counter = field(default_factory=Counter)  # reason -> inputs that are not questions
    replies: int = 0
    correct_replies: int = 0

    def summary(self) -> dict[str, Any]:
        return {"questions": self.questions, "kept": dict(self.kept), "no_correct_path": dict(self.no_correct_path),
                "skipped": dict(self.skipped), "replies": self.replies,
                "reply_accuracy": self.correct_replies / self.replies if self.replies else None}


def question_of(loaded: LoadedSample) -> Question | str:
    """The question a sample asks and its reference answer, or why it is not one (a short reason)."""
    sample = loaded.sample
    meta = getattr(sample, "meta", None) or {}
    found = asked(sample)
    if isinstance(found, str):
        return "not_a_question" if found == "not_a_prompt" else found
    messages, answer = found
    if answer is None or answer == "":
        return "no_reference_answer"
    return Question(sample.key, messages, dict(loaded.media), answer, meta.get("metric", "exact"),
                    meta.get("analysis_choice"), loaded.origin)


def analysis_choice(reply: str) -> str | None:
    """The mode an auto-think ``<analysis>`` picked: ``think``, ``no_think`` or None (no analysis)."""
    end = reply.find("</analysis>")
    if not reply.startswith("<analysis>") or end == -1:
        return None
    analysis = reply[:end]
    if "/no_think" in analysis:
        return "no_think"
    return "think" if "/think" in analysis else None


def _judge(question: Question, reply: str, mode: str, min_score: float, require_thought: bool = True) -> bool:
    from keye.eval.extract import extract, thought
    from keye.eval.metrics import METRICS

    if mode == "think" and require_thought and not thought(reply):
        return False
    if mode == "auto" and analysis_choice(reply) is None:
        return False
    return METRICS[question.metric](extract(reply, question.metric), question.answer) >= min_score


def pick_path(question: Question, replies: Sequence[str], mode: str, min_score: float = 1.0,
              require_thought: bool = True) -> tuple[str, int, int] | None:
    """``(reply, votes, correct)``: the most frequent reply among those that count (module docstring), how
    many of the K replies were that text, and how many were correct; None when none counts.
    ``require_thought`` off accepts think-mode replies without a ``<think>`` (a teacher that never learnt
    the tags: tests, a base model)."""
    correct = [r for r in replies if _judge(question, r, mode, min_score, require_thought)]
    counted = correct
    if mode == "auto":
        want = question.analysis_choice
        if want is None:
            want = "no_think" if any(analysis_choice(r) == "no_think" for r in correct) else "think"
        counted = [r for r in correct if analysis_choice(r) == want]
    if not counted:
        return None
    votes = Counter(r.strip() for r in counted)
    best = max(votes.values())
    reply = next(r.strip() for r in counted if votes[r.strip()] == best)  # ties: the earliest sampled
    return reply, best, len(correct)


def build_cot(model: Any, questions: Iterable[Question], *, k: int = 8, modes: Sequence[str] = ("think",),
              temperature: float = 0.8, min_score: float = 1.0, batch_size: int = 8, teacher: str = "",
              require_thought: bool = True, stats: CotStats | None = None) -> Iterator[LoadedSample]:
    """Verified reasoning paths of ``model`` (a `keye.eval.model.EvalModel`) as conversation samples, with
    the question's media; ``stats`` (if given) is filled in as the build goes."""
    from dataclasses import replace

    from keye.generate.contract import SamplingSettings

    stats = stats if stats is not None else CotStats()
    settings = replace(model.settings(), temperature=temperature)
    if not isinstance(settings, SamplingSettings):  # pragma: no cover - the contract's type, always
        raise TypeError("model.settings() must give SamplingSettings")
    batch: list[Question] = []

    def flush() -> Iterator[LoadedSample]:
        for mode in modes:
            requests, asked = [], []
            for question in batch:
                try:
                    request = model.request(question.messages, mode, question.media, question.key)
                except SampleError as exc:  # bad media: skipped, counted, named in the log
                    logger.warning("cot: skipped %r (%s): %s", exc.key, exc.kind, exc.reason)
                    stats.skipped[exc.kind] += 1
                    continue
                request.n = k
                requests.append(request)
                asked.append(question)
            outputs = model.generator.generate(requests, settings) if requests else []
            for question, output in zip(asked, outputs):
                replies = [model.decode(sample.token_ids) for sample in output.samples]
                picked = pick_path(question, replies, mode, min_score, require_thought)
                stats.replies += len(replies)
                stats.correct_replies += sum(_judge(question, r, mode, min_score, require_thought) for r in replies)
                if picked is None:
                    stats.no_correct_path[mode] += 1
                    continue
                reply, votes, correct = picked
                stats.kept[mode] += 1
                yield _record(question, reply, mode, {"teacher": teacher, "mode": mode, "k": k, "votes": votes,
                                                      "correct": correct, "temperature": temperature})
        batch.clear()

    for question in questions:
        stats.questions += 1
        batch.append(question)
        if len(batch) == batch_size:
            yield from flush()
    if batch:
        yield from flush()


def _record(question: Question, reply: str, mode: str, provenance: dict) -> LoadedSample:
    copied = [Message.from_dict(m.to_dict()) for m in question.messages]  # write_jsonl rewrites their refs
    messages = [*copied, Message("assistant", [TextPart(reply)])]
    meta = {"answer": question.answer, "metric": question.metric, "question_key": question.key, "cot": provenance}
    sample = ConversationSample(f"cot/{mode}/{question.key}", messages, thinking_mode=mode, source="cot", meta=meta)
    return LoadedSample(sample, dict(question.media), origin=question.origin)


def write_jsonl(items: Iterable[LoadedSample], path: str | Path, media_dir: str = "media") -> int:
    """Write samples as the ``jsonl`` source reads them: one sample per line, media as files under
    ``media_dir`` beside the JSONL (each name written once, numbered so two sources' ``img.png`` stay
    apart), references rewritten to those relative paths."""
    path = Path(path)
    (path.parent / media_dir).mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for item in items:
            for ref in media_refs(item.sample):
                name = media_name(ref)
                if name not in written:
                    written[name] = f"{media_dir}/{len(written):06d}-{Path(name).name}"
                    (path.parent / written[name]).write_bytes(item.media[name])
                ref.path, ref.key = written[name], None
            out.write(json.dumps(item.sample.to_dict(), ensure_ascii=False) + "\n")
            out.flush()
            count += 1
    return count
