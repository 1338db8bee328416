"""RL prompts: what a rollout is asked, how it is scored, and the think mode it is rendered in.

A prompt comes from the stage's data sources as an ``rl_prompt`` sample (messages, reference answer, the
reward models that score it), or as a conversation with ``meta["answer"]`` (its last assistant turn dropped),
so SFT data can be reused. The metric that compares the final answer with the reference is ``meta["metric"]``
when the data says, else the synthetic world's metric for the question's family
(`keye.data.synthetic.BENCHMARK_METRICS`: RL prompts there carry a family, not a metric), else the reward
model's default. A ``relaxed`` reference written with words around its number ("at 2.0 seconds") is reduced to
that number, as the benchmark rows do, because the relaxed metric compares numbers.

A prompt without a reference is *not* dropped here: the rule rewards score it 0 and count it
(``answer_match/missing_reference``), and a group that scores all-equal carries no gradient (dynamic
sampling drops it), so the count is visible in the metrics and nothing stops.

Think modes (spec §3.4, "mix-mode" RL): with ``mode_mix`` (mode → weight) every prompt is rendered in a mode
drawn by those weights from a generator seeded by (run seed, step, prompt key), so every rank of a
tensor/pipeline group draws the same mode and a resumed run draws it again; an empty mix keeps the sample's
own ``thinking_mode`` (None: no suffix, the model's auto-think default).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from omegaconf import OmegaConf

from keye.data.sample import Message, RLPromptSample, TextPart, asked
from keye.data.sources import LoadedSample


@dataclass
class RLPrompt:
    key: str
    messages: list[Message]  # up to and including the last user turn
    media: dict[str, bytes]
    reference: Any = None
    metric: str | None = None
    reward_names: list[str] | None = None  # None: every configured reward model applies
    mode: str | None = None
    task: str | None = None
    text: str = ""  # the prompt's text parts, for reward models that read the question (a judge)


def _number_reference(reference: Any) -> Any:
    if isinstance(reference, str):
        numbers = re.findall(r"-?\d+(?:\.\d+)?", reference)
        return numbers[-1] if numbers else reference
    return reference


def prompt_of(loaded: LoadedSample) -> RLPrompt | str:
    """The prompt a sample asks, or why it is not one (a short reason, counted by the caller)."""
    from keye.data.synthetic import BENCHMARK_METRICS

    sample = loaded.sample
    meta = getattr(sample, "meta", None) or {}
    found = asked(sample)
    if isinstance(found, str):
        return found
    messages, reference = found
    names = list(sample.reward_names) if isinstance(sample, RLPromptSample) else None
    metric = meta.get("metric") or BENCHMARK_METRICS.get(meta.get("family"))
    if metric == "relaxed":
        reference = _number_reference(reference)
    text = "\n".join(part.text for message in messages for part in message.content if isinstance(part, TextPart))
    return RLPrompt(sample.key, messages, dict(loaded.media), reference, metric, names, sample.thinking_mode,
                    meta.get("task") or meta.get("family"), text)


def choose_mode(prompt: RLPrompt, mode_mix: dict[str, float], seed: int, step: int) -> str | None:
    """The think mode ``prompt`` is rendered in at ``step`` (module docstring)."""
    from keye.data.synthetic import pick_mode

    if not mode_mix:
        return prompt.mode
    return pick_mode(mode_mix, random.Random(f"keye-rl-mode:{seed}:{step}:{prompt.key}"))


@dataclass
class PromptStream:
    """Prompts of a stage's sources: mixed by its mixer and endless (training), or in order, once (held-out).

    Each data-parallel rank reads its own share (the sources split by index); tensor/pipeline peers read the
    same share, so they generate the same rollouts. Samples that are not prompts are skipped and counted in
    ``skipped`` by reason. ``state_dict`` is the mixer's position, for resumable checkpoints.
    """

    ctx: Any
    split: str = "train"
    skipped: dict[str, int] = field(default_factory=dict)
    step: int = 0  # RL steps taken on this stream (their seeds depend on it; saved with the position)

    def __post_init__(self) -> None:
        from keye.config import build_component_config
        from keye.data.pipeline import build_sources

        group = "sources" if self.split == "train" else "heldout"
        self.sources = build_sources(self.ctx, group)
        self.mixer = None
        if self.split == "train":
            node = OmegaConf.to_container(self.ctx.stage.data.mixer)
            cls, config = build_component_config("data_mixer", node, self.ctx.registry)
            if not config.weights:
                config.weights = {label: 1.0 for label in self.sources}
            self.mixer = cls(config, self.sources)
            self._samples: Iterator[LoadedSample] = iter(self.mixer)
        else:
            self._samples = (loaded for source in self.sources.values() for loaded in source)

    def take(self, count: int, skipped: dict[str, int] | None = None) -> list[RLPrompt]:
        """Up to ``count`` prompts (fewer only at the end of a finite split); samples that are not prompts are
        counted in ``self.skipped`` and in ``skipped`` (the step's own counts) when given."""
        out: list[RLPrompt] = []
        for loaded in self._samples:
            prompt = prompt_of(loaded)
            if isinstance(prompt, str):
                for counts in (self.skipped, skipped if skipped is not None else {}):
                    counts[prompt] = counts.get(prompt, 0) + 1
                continue
            out.append(prompt)
            if len(out) == count:
                break
        return out

    def bad_inputs(self) -> dict[str, int]:
        """What the sources themselves skipped (unreadable records), by kind."""
        merged: dict[str, int] = {}
        for source in self.sources.values():
            for kind, n in source.bad_inputs.counts.items():
                merged[kind] = merged.get(kind, 0) + n
        return merged

    def state_dict(self) -> dict[str, Any]:
        return {"mixer": self.mixer.state_dict() if self.mixer is not None else None, "skipped": dict(self.skipped),
                "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.mixer is not None and state.get("mixer") is not None:
            self.mixer.load_state_dict(state["mixer"])
            self._samples = iter(self.mixer)
        self.skipped = dict(state.get("skipped", {}))
        self.step = int(state.get("step", 0))
