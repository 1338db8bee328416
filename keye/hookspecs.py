"""Every hook a keye plugin can implement, grouped by lifecycle.

A plugin is a module (or object) with functions marked `@keye.hookimpl`, found through the
entry-point group ``keye``. Built-in components are plugins of exactly the same shape.

Registration hooks (one per component kind) receive a ``register(name, cls)`` callback. ``cls`` must
be a class with a nested ``Config`` dataclass (its blueprint schema); the host validates it, records
the distribution that registered it, and refuses a name that another plugin already took.

A component class may also define an optional classmethod, for ``keye-launch validate`` (and ``run``,
which validates before it builds anything)::

    @classmethod
    def check_config(cls, config, check: keye.config.ConfigCheck) -> None: ...

``config`` is the component's completed ``Config`` instance; ``check`` tells where the node sits
(``check.path``, ``check.stage``, the whole ``check.blueprint`` with ``check.tensor``/``check.pipeline``)
and reports a problem as one line naming the key and the file: ``check.fail("num_heads", "...")``, or the
helpers ``check.count(config, "hidden_size")``, ``check.number(...)``, ``check.one_of(...)``. Put there
every check the class would make when built (divisibility by the tensor-parallel size, names of other
nodes it refers to), so a blueprint that validates does not fail minutes into a run. It runs after the
schema checks, on nested nodes too, and must not build, import heavy libraries or read files.

Lifecycle hooks are called by the stage runner with keyword arguments and return nothing.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("keye")
hookimpl = pluggy.HookimplMarker("keye")

Register = Callable[[str, type], None]


def registration_hook(kind: str) -> str:
    """The hook that registers components of ``kind``: ``keye_register_<kind>s`` (``loss`` → ``losses``)."""
    return "keye_register_losses" if kind == "loss" else f"keye_register_{kind}s"


# --- Component registration -------------------------------------------------------------------


@hookspec
def keye_register_vision_encoders(register: Register) -> None:
    """Register vision encoders: pixels in patches → one feature per patch.

    Contract (`keye.model.protocols.VisionEncoder`): an ``nn.Module`` built as ``Cls(config, ctx)``,
    with ``out_dim``, and ``forward(patches [N, 3, P, P], grid_thw [K, 3]) -> [N, out_dim]``.
    Selected in a blueprint by ``model.vision_encoder.name``.
    """


@hookspec
def keye_register_projectors(register: Register) -> None:
    """Register projectors: patch features → LLM input embeddings (e.g. a 2×2 merge MLP).

    Selected by ``model.projector.name``.
    """


@hookspec
def keye_register_language_models(register: Register) -> None:
    """Register decoder language models (e.g. Qwen3 on Megatron-Core's GPT model).

    Selected by ``model.language_model.name``.
    """


@hookspec
def keye_register_text_encoders(register: Register) -> None:
    """Register text towers for the contrastive stage 0 (e.g. the SigLIP text tower).

    Selected by ``model.text_encoder.name``.
    """


@hookspec
def keye_register_position_encodings(register: Register) -> None:
    """Register rotary/positional schemes (2D vision RoPE, time-aligned M-RoPE, 1D RoPE).

    Usually selected inside a model component's Config (a nested component node).
    """


@hookspec
def keye_register_data_sources(register: Register) -> None:
    """Register data sources: where samples come from (webdataset shards, JSONL, synthetic).

    Selected per entry of ``stages[i].data.sources``.
    """


@hookspec
def keye_register_data_mixers(register: Register) -> None:
    """Register data mixers: how several sources interleave (ratios, resumable state).

    Selected by ``stages[i].data.mixer.name``.
    """


@hookspec
def keye_register_losses(register: Register) -> None:
    """Register training objectives (SigLIP sigmoid, next-token, MPO, GRPO, ...).

    Selected by ``stages[i].loss.name``.
    """


@hookspec
def keye_register_reward_models(register: Register) -> None:
    """Register reward models that score a rollout (rule rewards, MLLM judges).

    Selected inside RL / rejection-sampling stage options.

    Contract (`keye.rewards.contract`): built as ``Cls(config, ctx)``; ``score(samples) -> RewardOutput``
    takes a batch of `RewardSample`s (prompt and reply text, think mode, reference answer and metric,
    finish reason, reply length in tokens) and returns one float per sample, named per-sample components
    (for logging) and counts of the samples handled by rule. Bad input (a missing reference, an
    unparsable reply or judgement) scores 0 and is counted, never raised. `WeightedRewards` adds several
    by the blueprint's weights and keeps every model's score and components.
    Built-in: ``answer_match``, ``format``, ``repetition``, ``length``.
    """


@hookspec
def keye_register_mergers(register: Register) -> None:
    """Register checkpoint mergers (e.g. a weighted linear soup).

    Selected inside merge stage options.
    """


@hookspec
def keye_register_generators(register: Register) -> None:
    """Register generators: sample continuations of prompts from a model (rollouts, CoT building,
    rejection sampling, chat, evaluation).

    Contract (`keye.generate.contract.Generator`): built as ``Cls(config, ctx)``; ``generate(requests,
    settings) -> results`` takes `GenerationRequest`s (prompt ids, vision inputs, M-RoPE ids, n samples)
    and `SamplingSettings`, and returns per sample the generated ids, each token's log-probability under
    the sampling distribution actually used, and the finish reason (``stop`` or ``length``).
    ``sync_weights(...)`` refreshes an engine outside the training process (a no-op in process).
    Built-in: ``megatron`` (KV cache on the composed model in the training layout).
    """


@hookspec
def keye_register_video_decoders(register: Register) -> None:
    """Register video decoders: a file → frames and their timestamps (decord, PyAV).

    Selected by ``stages[i].data.video_decoder.name``.
    """


@hookspec
def keye_register_stages(register: Register) -> None:
    """Register stage kinds: the step loop of a training stage (contrastive, lm, preference, rl, ...).

    Selected by ``stages[i].kind``; ``stages[i].options`` is checked against the stage's Config.
    """


# --- Lifecycle ------------------------------------------------------------------------------------


@hookspec
def keye_configure(blueprint: Any) -> None:
    """Called once per process after a blueprint is loaded and validated, before anything is built.

    ``blueprint`` is the resolved, read-only OmegaConf config. Use it to set up logging or
    integrations; do not change it (overrides belong on the command line).
    """


@hookspec
def keye_before_stage(stage: Any, blueprint: Any) -> None:
    """Called on every rank just before a stage starts. ``stage`` is its config node."""


@hookspec
def keye_after_stage(stage: Any, blueprint: Any, result: dict) -> None:
    """Called on every rank after a stage ends. ``result`` is the stage's summary (steps, losses, metrics)."""
