"""Rollouts: each prompt rendered in its think mode, G samples drawn from it, decoded and made ready to score.

Rendering is the training chat code's (`keye.generate.prompts.conversation_request`), so a prompt plus its
reply tokenises exactly like a training conversation in that mode. The G samples of a prompt are one
request with ``n = G`` (they share its prefill) and stay contiguous: rollouts ``[g·G, (g+1)·G)`` are group g,
the layout `group_advantages` expects.

Handled by rule and counted, never raised: a prompt whose image or video will not load (by the processor's
kind: ``corrupt_image``, ``missing_media``, ...), and a prompt too long to leave room for ``max_new_tokens``
in a training row of ``max_tokens`` (``prompt_too_long``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from keye.data.processor import SampleError
from keye.generate.contract import GenerationRequest, SamplingSettings
from keye.rewards.contract import RewardSample
from keye.rl.prompts import RLPrompt


@dataclass
class Rendered:
    """A prompt as the model is asked it: the prompt, the mode it was rendered in, the request."""

    prompt: RLPrompt
    mode: str | None
    request: GenerationRequest


@dataclass
class Rollout:
    """One sample of a prompt: the generated ids (a stop token included), the sampler's log-probs, why it ended,
    and its text (special tokens removed) for the reward models."""

    group: int  # index of its prompt in the step's rendered prompts
    rendered: Rendered
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


def render(prompts: Sequence[RLPrompt], modes: Sequence[str | None], processor: Any, *, group_size: int,
           max_tokens: int, max_new_tokens: int, skipped: dict[str, int]) -> list[Rendered]:
    """The generation requests of ``prompts`` in ``modes`` (one per prompt), each with ``n = group_size``.
    Prompts that cannot be rendered are left out and counted in ``skipped`` (module docstring)."""
    from keye.generate.prompts import conversation_request

    out = []
    for prompt, mode in zip(prompts, modes):
        try:
            request = conversation_request(prompt.messages, processor, mode, n=group_size, media=prompt.media,
                                           key=prompt.key)
        except SampleError as exc:
            skipped[exc.kind] = skipped.get(exc.kind, 0) + 1
            continue
        if request.prompt_ids.numel() + max_new_tokens > max_tokens:
            skipped["prompt_too_long"] = skipped.get("prompt_too_long", 0) + 1
            continue
        out.append(Rendered(prompt, mode, request))
    return out


def sample_rollouts(generator: Any, rendered: Sequence[Rendered], settings: SamplingSettings,
                    tokenizer: Any) -> list[Rollout]:
    """G rollouts per rendered prompt, groups contiguous (collective over the model-parallel group)."""
    from keye.eval.extract import clean

    if not rendered:
        return []
    outputs = generator.generate([r.request for r in rendered], settings)
    rollouts = []
    for group, (item, output) in enumerate(zip(rendered, outputs)):
        for sample in output.samples:
            text = clean(tokenizer.decode(list(sample.token_ids), skip_special_tokens=False))
            rollouts.append(Rollout(group, item, list(sample.token_ids), list(sample.logprobs), sample.finish_reason,
                                    text))
    return rollouts


def reward_samples(rollouts: Sequence[Rollout]) -> list[RewardSample]:
    """What the reward models see of each rollout."""
    return [
        RewardSample(
            prompt=r.rendered.prompt.text, response=r.text, mode=r.rendered.mode, reference=r.rendered.prompt.reference,
            metric=r.rendered.prompt.metric, task=r.rendered.prompt.task, finish_reason=r.finish_reason,
            num_tokens=len(r.token_ids), reward_names=r.rendered.prompt.reward_names,
        )
        for r in rollouts
    ]
