"""Rejection sampling: N replies per prompt from the current model, scored, kept as preference pairs or SFT targets.

Why: Keye-VL's iterative alignment (spec §3.4) samples the model it is improving, scores the samples with the
rewards it trusts (rule rewards plus an MLLM judge), and trains on the contrast: the best reply against the
worst as an MPO pair, and the best as an SFT target when it is good enough. Each round's data come from that
round's model, so the next round corrects what the last one still gets wrong.

For each prompt (an RL prompt with its reference answer, or a conversation whose last assistant turn is
dropped and whose ``meta["answer"]`` is the reference; `prompt_of`) `sample_and_score` draws one think mode
by the configured weights (seeded by the prompt's key, so a rerun asks the same), samples ``n`` replies in
that mode (one mode per prompt: the chosen and rejected replies of a pair must answer the same rendered
prompt), and scores them all with the stage's `keye.rewards.contract.WeightedRewards`. `pick_pair` keeps
the best against the worst when their scores differ by at least ``margin`` (ties: the earliest sampled), and
`pick_sft` the best when it scores at least ``min_score``.

A prompt without a reference is kept: the rewards that need one score it 0 and count ``missing_reference``
(the judge can still score the reasoning), so it shows in the stage's counts rather than vanishing. A prompt
whose media will not load is skipped and counted by kind. Every written sample carries its provenance in
``meta["rejection_sampling"]``: the model, its training step, the seed, n, the mode, the temperature and the
scores of all n replies (the chosen and rejected indices among them).
"""

from __future__ import annotations

import logging
import math
import random
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator, Mapping, Sequence

from keye.data.chat import _STRUCTURAL_TOKENS
from keye.data.cot import Question
from keye.data.processor import SampleError
from keye.data.sample import ConversationSample, Message, PreferenceSample, TextPart, asked
from keye.data.sources import LoadedSample
from keye.rewards.contract import RewardSample

logger = logging.getLogger("keye.data")


@dataclass
class Group:
    """One prompt's ``n`` replies and their scores."""

    question: Question
    mode: str
    replies: list[str]
    finish: list[str]
    scores: list[float]
    components: dict[str, list[float]]


@dataclass
class RejectionStats:
    """What a pass did: prompts, replies and rewards per mode, counts of what was handled by rule."""

    prompts: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> inputs that were not sampled
    counts: Counter = field(default_factory=Counter)  # reward events (missing_reference, unparsable, ...)
    no_pair: Counter = field(default_factory=Counter)  # why a prompt gave no pair
    pairs: int = 0
    sft: int = 0
    prompts_by_mode: Counter = field(default_factory=Counter)
    by_mode: dict[str, list[float]] = field(default_factory=dict)  # mode -> every reply's score
    best: list[float] = field(default_factory=list)  # each prompt's best score
    components: dict[str, list[float]] = field(default_factory=dict)  # name -> per reply (NaN: not applicable)

    def add(self, group: Group) -> None:
        done = self.samples
        self.prompts += 1
        self.samples += len(group.scores)
        self.prompts_by_mode[group.mode] += 1
        self.by_mode.setdefault(group.mode, []).extend(group.scores)
        self.best.append(max(group.scores))
        for name in set(self.components) | set(group.components):  # a reward's parts may come and go by batch
            column = self.components.setdefault(name, [math.nan] * done)
            column.extend(group.components.get(name, [math.nan] * len(group.scores)))

    def summary(self) -> dict[str, Any]:
        every = [s for scores in self.by_mode.values() for s in scores]
        return {
            "prompts": self.prompts, "samples": self.samples, "pairs": self.pairs, "sft": self.sft,
            "mean_reward": _mean(every), "mean_best_reward": _mean(self.best),
            "reward_by_mode": {mode: _mean(scores) for mode, scores in sorted(self.by_mode.items())},
            "prompts_by_mode": dict(sorted(self.prompts_by_mode.items())),
            "components": {name: _mean([v for v in values if not math.isnan(v)])
                           for name, values in sorted(self.components.items())},
            "counts": dict(self.counts), "no_pair": dict(self.no_pair), "skipped": dict(self.skipped),
        }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def prompt_of(loaded: LoadedSample) -> Question | str:
    """The prompt a sample asks and its reference (None when it has none), or why it is no prompt."""
    sample = loaded.sample
    meta = getattr(sample, "meta", None) or {}
    found = asked(sample)
    if isinstance(found, str):
        return found
    messages, answer = found
    return Question(sample.key, messages, dict(loaded.media), None if answer == "" else answer,
                    meta.get("metric"), meta.get("analysis_choice"), loaded.origin)  # None: each reward's default


def mode_for(key: str, modes: Mapping[str, float], seed: int) -> str:
    """The think mode a prompt is sampled in: drawn by ``modes``' weights, the same for the same key and seed."""
    rng = random.Random(zlib.crc32(f"{seed}/{key}".encode()))
    names = sorted(modes)
    return rng.choices(names, weights=[modes[m] for m in names])[0]


def writable(reply: str) -> bool:
    """Whether a reply can be written as a training turn: the processor refuses an empty reply, and the chat
    template text holding its own structural tokens (a degenerate sample may emit ``<|image_pad|>``), so such a
    reply is never picked."""
    return bool(reply.strip()) and not any(token in reply for token in _STRUCTURAL_TOKENS)


def pick_pair(scores: Sequence[float], replies: Sequence[str], margin: float) -> tuple[int, int] | str:
    """``(best, worst)`` indices among the writable replies (`writable`), or why there is no pair:
    ``unwritable`` (fewer than two writable replies), ``below_margin`` or ``identical`` replies."""
    kept = [i for i in range(len(scores)) if writable(replies[i])]
    if len(kept) < 2:
        return "unwritable"
    best = max(kept, key=lambda i: (scores[i], -i))  # ties: the earliest sampled
    worst = min(kept, key=lambda i: (scores[i], -i))  # ties: the latest, unlike the best
    if scores[best] - scores[worst] < margin:
        return "below_margin"
    if replies[best].strip() == replies[worst].strip():
        return "identical"
    return best, worst


def pick_sft(scores: Sequence[float], replies: Sequence[str], min_score: float) -> int | None:
    """The best writable reply's index when it scores at least ``min_score``."""
    kept = [i for i in range(len(scores)) if writable(replies[i])]
    best = max(kept, key=lambda i: (scores[i], -i), default=None)
    return best if best is not None and scores[best] >= min_score else None


def question_text(messages: Sequence[Message]) -> str:
    """The text the rewards see as the prompt: the user turns' text (media are not text)."""
    return "\n".join(m.text for m in messages if m.role == "user")


def sample_and_score(model: Any, questions: Iterable[Question], rewards: Any, *, n: int, modes: Mapping[str, float],
                     temperature: float, seed: int, batch_size: int, stats: RejectionStats) -> Iterator[Group]:
    """Each prompt's `Group`: ``n`` replies of ``model`` (a `keye.eval.model.EvalModel`) scored by ``rewards``."""
    settings = replace(model.settings(), temperature=temperature, seed=seed)
    batch: list[Question] = []

    def flush() -> Iterator[Group]:
        requests, asked = [], []
        for question in batch:
            mode = mode_for(question.key, modes, seed)
            try:
                request = model.request(question.messages, mode, question.media, question.key)
            except SampleError as exc:  # bad media: skipped, counted, named in the log
                logger.warning("rejection sampling: skipped %r (%s): %s", exc.key, exc.kind, exc.reason)
                stats.skipped[exc.kind] += 1
                continue
            request.n = n
            requests.append(request)
            asked.append((question, mode))
        outputs = model.generator.generate(requests, settings) if requests else []
        samples, spans = [], []
        for (question, mode), output in zip(asked, outputs):
            start = len(samples)
            for sample in output.samples:
                samples.append(RewardSample(question_text(question.messages), model.decode(sample.token_ids), mode,
                                            question.answer, question.metric,
                                            finish_reason=sample.finish_reason, num_tokens=len(sample.token_ids)))
            spans.append((start, len(samples)))
        scored = rewards.score(samples) if samples else None
        if scored is not None:
            stats.counts.update(scored.counts)
        for (question, mode), (start, end) in zip(asked, spans):
            group = Group(question, mode, [s.response for s in samples[start:end]],
                          [s.finish_reason for s in samples[start:end]], scored.scores[start:end],
                          {name: values[start:end] for name, values in scored.components.items()})
            stats.add(group)
            yield group
        batch.clear()

    for question in questions:
        batch.append(question)
        if len(batch) == batch_size:
            yield from flush()
    if batch:
        yield from flush()


def provenance(group: Group, source: Mapping[str, Any], **picked: int) -> dict[str, Any]:
    """``meta["rejection_sampling"]`` of a written sample: ``source`` (model, step, seed, n, temperature) and
    this prompt's mode, scores and the picked indices."""
    return {**source, "mode": group.mode, "scores": [round(s, 6) for s in group.scores], **picked}


def pair_record(group: Group, best: int, worst: int, source: Mapping[str, Any], prefix: str) -> LoadedSample:
    question = group.question
    copied = [Message.from_dict(m.to_dict()) for m in question.messages]  # write_jsonl rewrites their refs
    meta = {"answer": question.answer, "metric": question.metric, "question_key": question.key,
            "rejection_sampling": provenance(group, source, chosen=best, rejected=worst)}
    sample = PreferenceSample(f"{prefix}/{question.key}", copied, Message("assistant", [TextPart(group.replies[best])]),
                              Message("assistant", [TextPart(group.replies[worst])]), thinking_mode=group.mode,
                              source="rejection_sampling", meta=meta)
    return LoadedSample(sample, dict(question.media), origin=question.origin)


def sft_record(group: Group, best: int, source: Mapping[str, Any], prefix: str) -> LoadedSample:
    question = group.question
    copied = [Message.from_dict(m.to_dict()) for m in question.messages]
    meta = {"answer": question.answer, "metric": question.metric, "question_key": question.key,
            "rejection_sampling": provenance(group, source, chosen=best)}
    messages = [*copied, Message("assistant", [TextPart(group.replies[best])])]
    sample = ConversationSample(f"{prefix}/{question.key}", messages, thinking_mode=group.mode,
                                source="rejection_sampling", meta=meta)
    return LoadedSample(sample, dict(question.media), origin=question.origin)
