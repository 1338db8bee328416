"""A small, learnable multimodal world, so every training stage can run and be evaluated on a CPU.

Why: end-to-end tests of contrastive pre-training, SFT, MPO, cold start and RL need data a ~1M-parameter
model can actually learn in minutes, with answers that can be checked exactly. Real data is neither small nor
checkable; this world is both. It is made of coloured shapes, three-letter words and short clips
(`keye.data.synthetic_images`, `keye.data.synthetic_video`), described in a vocabulary of a few dozen words
with one template per question type.

Tasks (``TASKS``), each producing one sample kind of `keye.data.sample`:

- ``pair`` (pair sample): a scene and its caption, for the contrastive stage 0;
- ``caption``, ``count``, ``color``, ``shape``, ``position``, ``grounding``, ``ocr`` (conversation): a question
  on an image and its short answer, for pre-training and SFT;
- ``video_direction``, ``video_order``, ``video_when`` (conversation): a question on a clip; "when" answers in
  seconds;
- ``reasoning`` (conversation, thinking mode ``think``): ``<think>`` steps ``</think><answer>…</answer>``,
  for the CoT cold start;
- ``preference`` (preference): the right answer against a subtly wrong one (off by one, the other side, a
  shifted box), for MPO;
- ``rl`` (rl_prompt): a question with its verifiable reference answer and the rewards that score it.

Thinking modes: with a ``mode_mix`` (e.g. ``{think: 0.4, no_think: 0.3, auto: 0.2, agentic: 0.1}``) every
conversation is rewritten in a mode drawn by those weights (`in_mode`), for SFT and the CoT cold start, and
every preference pair too (`pair_in_mode`: both replies in that mode), for MPO after the cold start.

Grounding answers use the spec §1.6 format: ``<|box_start|>[[x1,y1,x2,y2]]<|box_end|>``, integers in [0, 1000).
Every sample's ``meta`` has ``task``, ``family``, ``split`` and ``answer`` (the short correct answer), for
per-family evaluation of generated replies.

Determinism and splits: sample ``i`` depends only on ``(seed, split, i)`` and the task list (task ``i`` is
``tasks[i % len(tasks)]``, so every task gets its share at any prefix), and any range of indices can be made
alone, which is how data-loader workers share the work. The ``heldout`` split uses its own seeds *and*
content the train split never draws (`keye.data.synthetic_images.in_split`), for evaluation.

Media travel as bytes named ``<key>.png`` / ``<key>.mp4``: the sample's `ImageRef`/`VideoRef` ``key`` names
that member, as in a webdataset shard (``tools/make_synthetic_data.py`` writes them so).
"""

from __future__ import annotations

import random
from typing import Callable, Iterator, Sequence

from keye.data.sample import (
    ConversationSample,
    ImagePart,
    ImageRef,
    Message,
    PairSample,
    PreferenceSample,
    RLPromptSample,
    Sample,
    TextPart,
    VideoPart,
    VideoRef,
)
from keye.data.sources import LoadedSample
from keye.data.synthetic_images import IMAGE_FAMILIES, QA, SPLITS
from keye.data.synthetic_video import VIDEO_FAMILIES

SOURCE = "synthetic"
FAMILIES: dict[str, Callable[[random.Random, str], QA]] = {**IMAGE_FAMILIES, **VIDEO_FAMILIES}
#: families whose QA carries a step-by-step explanation
REASONING_FAMILIES = ("count", "video_direction", "video_order", "video_when")
#: families asked in preference pairs (all of them: each has a subtly wrong answer)
PREFERENCE_FAMILIES = tuple(FAMILIES)
#: families with an answer that a string match can verify (a box needs IoU, a caption is free text)
RL_FAMILIES = tuple(f for f in FAMILIES if f not in ("caption", "grounding"))
#: reward_model names that score the RL prompts: the reference answer, and the reply's format for its mode
RL_REWARDS = ("answer_match", "format")


def _prompt(qa: QA, key: str) -> Message:
    member = f"{key}.{qa.extension}"
    media = ImagePart(ImageRef(key=member)) if qa.media_type == "image" else VideoPart(VideoRef(key=member))
    return Message("user", [media, TextPart(qa.question)])


def _reply(text: str) -> Message:
    return Message("assistant", [TextPart(text)])


def _meta(task: str, split: str, qa: QA) -> dict:
    return {"task": task, "family": qa.family, "split": split, "answer": qa.answer, **qa.meta}


def _family_task(family: str) -> Callable[[random.Random, str, str], tuple[Sample, QA]]:
    def make(rng: random.Random, split: str, key: str) -> tuple[Sample, QA]:
        qa = FAMILIES[family](rng, split)
        messages = [_prompt(qa, key), _reply(qa.answer)]
        sample = ConversationSample(key, messages, source=SOURCE, meta=_meta(family, split, qa))
        return sample, qa

    make.__doc__ = FAMILIES[family].__doc__
    return make


def pair_task(rng: random.Random, split: str, key: str) -> tuple[Sample, QA]:
    """A scene and its caption, for the contrastive stage."""
    qa = FAMILIES["caption"](rng, split)
    return PairSample(key, ImageRef(key=f"{key}.png"), qa.answer, source=SOURCE, meta=_meta("pair", split, qa)), qa


def reasoning_task(rng: random.Random, split: str, key: str) -> tuple[Sample, QA]:
    """A question answered with a thinking trace: ``<think>steps</think><answer>answer</answer>``."""
    qa = FAMILIES[rng.choice(REASONING_FAMILIES)](rng, split)
    reply = _reply(f"<think>{qa.reasoning}</think><answer>{qa.answer}</answer>")
    sample = ConversationSample(
        key, [_prompt(qa, key), reply], thinking_mode="think", source=SOURCE, meta=_meta("reasoning", split, qa)
    )
    return sample, qa


def preference_task(rng: random.Random, split: str, key: str) -> tuple[Sample, QA]:
    """The same question answered right (chosen) and subtly wrong (rejected)."""
    qa = FAMILIES[rng.choice(PREFERENCE_FAMILIES)](rng, split)
    meta = {**_meta("preference", split, qa), "rejected_answer": qa.wrong}
    sample = PreferenceSample(key, [_prompt(qa, key)], _reply(qa.answer), _reply(qa.wrong), source=SOURCE, meta=meta)
    return sample, qa


def rl_task(rng: random.Random, split: str, key: str) -> tuple[Sample, QA]:
    """A prompt with its reference answer; the mode is left to the RL stage (auto-think by default)."""
    qa = FAMILIES[rng.choice(RL_FAMILIES)](rng, split)
    sample = RLPromptSample(
        key, [_prompt(qa, key)], list(RL_REWARDS), reference_answer=qa.answer, source=SOURCE,
        meta=_meta("rl", split, qa),
    )  # fmt: skip
    return sample, qa


# --- thinking modes (spec §1.6, paper App. C) ------------------------------------------------------------

#: the modes a synthetic conversation can be written in (`generate`'s ``mode_mix``)
MODES = ("think", "no_think", "auto", "agentic")


def mode_reply(qa: QA, mode: str, answer: str | None = None) -> tuple[str, str | None]:
    """The reply to ``qa`` in thinking ``mode`` giving ``answer`` (default: the right one), as Keye writes it,
    and the auto mode's right pick (``None`` in the other modes).

    ``think``: ``<think>steps</think><answer>…</answer>``; ``no_think``: the bare answer; ``auto``: an
    ``<analysis>`` that picks /think for the families that need steps (`REASONING_FAMILIES`) and /no_think
    for the rest, then that mode's reply; ``agentic``: a thinking reply that calls a tool inside ``<think>``
    and reads the ``<sandbox_output>`` the runtime injects (masked from the loss by `keye.data.chat`). The
    steps and the tool's output are always the true ones, so a wrong ``answer`` (a preference pair's
    rejected reply) is one that does not follow from its own thought.
    """
    from keye.data.chat import format_auto_think, format_thinking

    answer = qa.answer if answer is None else answer
    steps = qa.reasoning or f"The question is about the {qa.family} in the {qa.media_type}."
    if mode == "think":
        return format_thinking(steps, answer), None
    if mode == "no_think":
        return answer, None
    if mode == "auto":
        if qa.family in REASONING_FAMILIES:
            analysis = f"This needs {qa.family} steps. Therefore, /think mode is more appropriate."
            return format_auto_think(analysis, answer, steps), "think"
        analysis = "This is a direct question. Therefore, /no_think mode is more appropriate."
        return format_auto_think(analysis, answer), "no_think"
    if mode == "agentic":
        tool = f"<code>inspect({qa.media_type})</code><sandbox_output>{qa.family}: {qa.answer}</sandbox_output>"
        return format_thinking(f"I inspect the {qa.media_type} with code. {tool} {steps}", answer), None
    raise ValueError(f"unknown thinking mode {mode!r}; known: {', '.join(MODES)}")


def in_mode(sample: ConversationSample, qa: QA, mode: str) -> ConversationSample:
    """The question of ``sample`` answered in thinking ``mode`` (`mode_reply`); ``meta["analysis_choice"]``
    records the auto mode's right pick, for the CoT builder."""
    reply, choice = mode_reply(qa, mode)
    meta = dict(sample.meta)
    if choice is not None:
        meta["analysis_choice"] = choice
    messages = [*sample.messages[:-1], _reply(reply)]
    return ConversationSample(sample.key, messages, thinking_mode=mode, source=sample.source, meta=meta)


def pair_in_mode(sample: PreferenceSample, qa: QA, mode: str) -> PreferenceSample:
    """A preference pair asked in thinking ``mode``: the chosen and the rejected reply both written in it
    (`mode_reply`), differing only in the final answer.

    Why: once the CoT cold start has taught the modes, a prompt without a suffix means auto-think (spec
    §1.6), whose replies open with ``<analysis>``. Bare-answer pairs on such prompts would score (and, through
    MPO's SFT term, train) a format the model no longer uses for them; pairs in a mode ask in it.
    """
    chosen, choice = mode_reply(qa, mode)
    rejected, _ = mode_reply(qa, mode, sample.meta["rejected_answer"])
    meta = dict(sample.meta)
    if choice is not None:
        meta["analysis_choice"] = choice
    return PreferenceSample(sample.key, sample.prompt, _reply(chosen), _reply(rejected), thinking_mode=mode,
                            source=sample.source, meta=meta)


def pick_mode(mode_mix: dict[str, float], rng: random.Random) -> str:
    """A mode drawn with probability proportional to its weight in ``mode_mix``."""
    modes = [m for m in MODES if mode_mix.get(m, 0) > 0]
    return rng.choices(modes, weights=[mode_mix[m] for m in modes])[0]


def check_mode_mix(mode_mix: dict[str, float] | None) -> None:
    """Raise ValueError naming the first bad entry: an unknown mode, a negative or non-numeric weight, all zero."""
    if not mode_mix:
        return
    for mode, weight in mode_mix.items():
        if mode not in MODES:
            raise ValueError(f"unknown thinking mode {mode!r}; known: {', '.join(MODES)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"the weight of mode {mode!r} must be a number >= 0, got {weight!r}")
    if not any(mode_mix.values()):
        raise ValueError("every mode has weight 0")


TASKS: dict[str, Callable[[random.Random, str, str], tuple[Sample, QA]]] = {
    "pair": pair_task,
    **{family: _family_task(family) for family in FAMILIES},
    "reasoning": reasoning_task,
    "preference": preference_task,
    "rl": rl_task,
}
#: names that stand for several tasks in a task list
TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "image_qa": tuple(IMAGE_FAMILIES),
    "video_qa": tuple(VIDEO_FAMILIES),
    "all": tuple(TASKS),
}


def expand_tasks(names: Sequence[str] | None) -> list[str]:
    """Task names with groups expanded, in order, without repeats; ``None`` or empty means all tasks."""
    out: list[str] = []
    for name in names or ["all"]:
        if name not in TASKS and name not in TASK_GROUPS:
            known = ", ".join([*TASKS, *TASK_GROUPS])
            raise ValueError(f"unknown synthetic task {name!r}; known: {known}")
        for task in TASK_GROUPS.get(name, (name,)):
            if task not in out:
                out.append(task)
    return out


def generate(index: int, *, tasks: Sequence[str] | None = None, split: str = "train", seed: int = 0,
             mode_mix: dict[str, float] | None = None) -> LoadedSample:
    """Sample ``index`` of the world: task ``tasks[index % len(tasks)]``, content from ``(seed, split, index)``.

    With ``mode_mix`` (mode → weight), every conversation (`in_mode`) and preference pair (`pair_in_mode`) is
    rewritten in a mode drawn by those weights, from a generator of its own so the content is the same whatever the mix.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    names = expand_tasks(tasks)
    task = names[index % len(names)]
    key = f"{split}-{index:06d}-{task}"
    rng = random.Random(f"keye-synthetic:{seed}:{split}:{index}:{task}")
    sample, qa = TASKS[task](rng, split, key)
    if mode_mix and isinstance(sample, (ConversationSample, PreferenceSample)):
        check_mode_mix(mode_mix)
        mode = pick_mode(mode_mix, random.Random(f"keye-synthetic-mode:{seed}:{split}:{index}"))
        sample = in_mode(sample, qa, mode) if isinstance(sample, ConversationSample) else pair_in_mode(sample, qa, mode)
    return LoadedSample(sample, {f"{key}.{qa.extension}": qa.media}, origin=f"synthetic:{split}:{seed}")


def generate_many(
    num_samples: int,
    *,
    tasks: Sequence[str] | None = None,
    split: str = "train",
    seed: int = 0,
    indices: Iterator[int] | None = None,
    mode_mix: dict[str, float] | None = None,
) -> Iterator[LoadedSample]:
    """Samples ``0 .. num_samples-1`` (or just ``indices``) in order."""
    names = expand_tasks(tasks)
    for index in indices if indices is not None else range(num_samples):
        yield generate(index, tasks=names, split=split, seed=seed, mode_mix=mode_mix)


# --- held-out benchmarks -------------------------------------------------------------------------------

#: the metric (`keye.eval.metrics`) that scores a family's answer in a benchmark; every other family: ``exact``
BENCHMARK_METRICS = {"caption": "anls", "ocr": "anls", "grounding": "iou", "video_when": "relaxed"}


def benchmark_rows(num_samples: int, *, tasks: Sequence[str] | None = None, seed: int = 0,
                   split: str = "heldout") -> Iterator[tuple[dict, dict[str, bytes]]]:
    """The first ``num_samples`` samples of ``split`` as benchmark questions (`keye.eval.benchmark`'s JSONL
    rows: question, media file name, short answer, task, metric), each with its media bytes by that name.

    Every task becomes questions: a pair asks for the caption, a preference pair and an RL prompt ask their
    question (answered by the chosen / reference answer), a reasoning sample its question. Grounding answers
    are the box's four numbers (scored by IoU).
    """
    import re

    for loaded in generate_many(num_samples, tasks=tasks, split=split, seed=seed):
        sample, meta = loaded.sample, loaded.sample.meta
        [(name, data)] = loaded.media.items()
        if isinstance(sample, PairSample):
            question = "Describe the image."
        else:
            turn = (getattr(sample, "messages", None) or sample.prompt)[0]
            question = " ".join(part.text for part in turn.content if isinstance(part, TextPart))
        answer: object = meta["answer"]
        metric = BENCHMARK_METRICS.get(meta["family"], "exact")
        if metric == "iou":
            answer = [int(v) for v in re.findall(r"\d+", str(answer))]
        elif metric == "relaxed":  # "at 2.0 seconds": the number is what is compared
            answer = re.findall(r"\d+(?:\.\d+)?", str(answer))[-1]
        kind = "video" if name.endswith(".mp4") else "image"
        row = {"id": sample.key, "question": question, "media": [{kind: name}], "answer": answer,
               "task": meta["task"], "metric": metric}
        yield row, {name: data}
