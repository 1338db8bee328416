"""The ``generator`` contract: what goes into a generator and what comes out, for any engine.

Every post-training step samples from the model: rollouts for RL, many reasoning paths for CoT data,
N answers per prompt for rejection sampling, one greedy answer per benchmark question. A generator is the
component that does it (kind ``generator``, hook ``keye_register_generators``). The built-in ``megatron``
decodes in process with a KV cache on the composed model in its training layout; an external engine
(vLLM on a GPU cluster) implements the same Protocol and gets fresh weights through ``sync_weights``.

In:

- `GenerationRequest`: one prompt as the model takes it: token ids (chat template applied, image/video pads
  expanded), the packed vision inputs and grids of its images and videos, optionally its 3D M-RoPE ids
  (else the generator computes them from the grids, exactly as training does), the thinking mode it was
  rendered in, and ``n``, the number of samples to draw from it (they share its prefill).
  `keye.generate.prompts.conversation_request` renders one from a conversation with the training chat code.
- `SamplingSettings`: greedy or sampled (temperature, top-k, top-p, min-p, combinable; see
  `keye.generate.sampling` for the order), stop token ids, stop strings, ``max_new_tokens`` and a seed.

Out, per request a `GenerationOutput` with one `SampleOutput` per sample: the generated ids, the
log-probability of each generated token **under the sampling distribution actually used** (after
temperature and the top-k/top-p/min-p filters, renormalised; greedy: under the model's plain softmax, i.e.
temperature 1 and no filter, since the argmax has probability 1 under any "used" distribution and that
number is useless to RL), and why it ended: ``stop`` (a stop token, kept as the last id, or a stop string,
whose last token is kept: ids cannot be cut inside a token) or ``length`` (``max_new_tokens`` reached).

The log-probabilities are what an RL step needs as its "old policy" numbers when the sampler and the
trainer are the same model: the ratio of the policy's probability of a token to the probability it was
drawn with. Under filtering those differ from the trained policy's plain softmax; a trainer that wants the
plain ones recomputes them with a forward pass (which it does anyway for the current policy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Protocol, Sequence, runtime_checkable

import torch

from keye.model.composition import VisionInputs

FinishReason = Literal["stop", "length"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length")


@dataclass
class GenerationRequest:
    """One prompt. ``prompt_ids`` ``(L,)``; ``images``/``videos``: all of the prompt's images (videos), their
    patches packed in reading order with one grid row each (``keye.model.composition.VisionInputs``, as the
    processor makes them); ``video_seconds`` ``[n_videos]``: each video's seconds per temporal grid step
    (``temporal_patch_size / fps``; M-RoPE's time axis), needed only when ``position_ids`` is not given.

    ``position_ids`` ``(3, L)``: the prompt's M-RoPE ids starting at 0 (``packed_position_ids`` of the sample
    alone, as the data pipeline computes them). The k-th generated token (from 0) sits at
    ``max(position_ids) + 1 + k`` on all three axes, which is the released implementation's "slot plus
    ``rope_delta``" whatever the padding. None: computed by the generator from the grids.

    ``thinking_mode`` is the mode the prompt was rendered in (``think``, ``no_think``, ``auto``,
    ``agentic`` or None); the prompt ids already carry it, the generator only reports it back.
    """

    prompt_ids: Sequence[int] | torch.Tensor
    images: VisionInputs | None = None
    videos: VisionInputs | None = None
    video_seconds: Sequence[float] | None = None
    position_ids: torch.Tensor | None = None
    thinking_mode: str | None = None
    n: int = 1

    def __post_init__(self) -> None:
        self.prompt_ids = torch.as_tensor(self.prompt_ids, dtype=torch.long).reshape(-1)
        if self.prompt_ids.numel() == 0:
            raise ValueError("GenerationRequest: empty prompt")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"GenerationRequest: n must be a positive int, got {self.n!r}")
        if self.position_ids is not None and tuple(self.position_ids.shape) != (3, self.prompt_ids.numel()):
            raise ValueError(
                f"GenerationRequest: position_ids must be (3, {self.prompt_ids.numel()}), "
                f"got {tuple(self.position_ids.shape)}"
            )


@dataclass
class SamplingSettings:
    """How to pick each token. ``temperature == 0`` is greedy (the filters are then moot).

    The filters combine and apply in Hugging Face's order (temperature, top-k, top-p, min-p;
    `keye.generate.sampling.filter_logits`). Off values: ``top_k=0``, ``top_p=1``, ``min_p=0``.
    ``seed``: each sample draws from its own generator seeded from (seed, request index, sample index), so
    a sample does not depend on which other requests share its batch; None draws fresh seeds.
    Generation stops at ``max_new_tokens``, at any id of ``stop_token_ids`` (e.g. ``<|im_end|>``,
    ``<|endoftext|>``), or when the decoded continuation contains one of ``stop_strings``.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.stop_strings = tuple(self.stop_strings)
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingSettings: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingSettings: temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingSettings: top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingSettings: top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"SamplingSettings: min_p must be in [0, 1], got {self.min_p}")
        if any(not s for s in self.stop_strings):
            raise ValueError("SamplingSettings: empty stop string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SampleOutput:
    """One sample: ``token_ids`` generated (a stop token included), ``logprobs`` one per id (see the module
    docstring for which distribution), ``finish_reason`` ``stop`` or ``length``, and ``stop_reason``: the
    stop token id or stop string that ended it (None for ``length``)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    stop_reason: int | str | None = None


@dataclass
class GenerationOutput:
    """The ``n`` samples of one request, in order, and the mode its prompt was rendered in."""

    samples: list[SampleOutput]
    thinking_mode: str | None = None


@dataclass
class GeneratorContext:
    """What a generator is built with (``Cls(config, ctx)``): the model it samples from and a tokenizer.

    ``model`` is this process's part of the composed model (`keye.model.composition.KeyeVLModel`: under
    pipeline parallelism only this stage's layers) in the training layout; under an interleaved pipeline
    (``parallel.virtual_pipeline``) the list of this rank's model chunks, in `keye.model.pipeline_split.virtual_stages`
    order. The in-process generator reads its live parameters. ``tokenizer`` (a Hugging Face tokenizer) is needed for stop strings. ``parallel``
    is the `keye.parallel.ParallelContext` (None: one process). ``extras``: engine-specific settings.
    """

    model: Any = None
    tokenizer: Any = None
    parallel: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Generator(Protocol):
    """A generation engine. Built as ``Cls(config, ctx: GeneratorContext)``.

    ``generate`` is collective under TP/PP (call it on every rank of the model-parallel group with the same
    requests and settings; every rank returns the same outputs). ``sync_weights`` is the entry point for an
    engine outside the training process: it receives the model's tensors in Hugging Face names, one at a
    time (``(name, tensor)`` pairs, the per-tensor stream), and loads them. The in-process ``megatron``
    generator samples from the live parameters and does nothing there.

    ``on_token(request index, sample index, token id)``, when given, is called for each kept token as soon
    as it is sampled (streaming: ``keye-launch chat`` prints with it); an engine that cannot stream may call
    it for every token at the end.
    """

    def generate(self, requests: Sequence[GenerationRequest], settings: SamplingSettings,
                 on_token: Callable[[int, int, int], None] | None = None) -> list[GenerationOutput]: ...

    def sync_weights(self, weights: Iterable[tuple[str, torch.Tensor]] | None = None) -> None: ...
