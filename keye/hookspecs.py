"""Every hook a keye plugin can implement, grouped by lifecycle.

A plugin is a module (or object) with functions marked `@keye.hookimpl`, found through the
entry-point group ``keye``. Built-in components are plugins of exactly the same shape.

Registration hooks (one per component kind) receive a ``register(name, cls)`` callback (`Register`).
``cls`` must be a class with a nested ``Config`` dataclass (its blueprint schema) that meets its kind's
contract (written in each hook's docstring and in `keye.contracts`, which checks it); the host validates
it, records the distribution that registered it, and refuses a name that another plugin already took.

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

from typing import Any, Protocol

import pluggy

hookspec = pluggy.HookspecMarker("keye")
hookimpl = pluggy.HookimplMarker("keye")


class Register(Protocol):
    """The callback a registration hook receives: ``register("name", ComponentClass)``.

    ``name`` is the blueprint key (lower_snake_case, unique per kind across distributions); ``cls`` a class
    with a nested ``Config`` dataclass that meets the kind's contract (`keye.contracts`). A problem with
    either raises, and the plugin fails to load as a whole (its other components are rolled back).
    """

    def __call__(self, name: str, cls: type) -> None: ...


def registration_hook(kind: str) -> str:
    """The hook that registers components of ``kind``: ``keye_register_<kind>s`` (``loss`` → ``losses``)."""
    return "keye_register_losses" if kind == "loss" else f"keye_register_{kind}s"


# --- Component registration -------------------------------------------------------------------
#
# Each docstring is the kind's contract: how the host builds the class, what it must provide, what it may
# ignore, and the Protocol that types it. `keye.contracts` holds the same contract as data and checks the
# methods when ``register`` is called (a class that lacks one fails its plugin, in one line).


@hookspec
def keye_register_vision_encoders(register: Register) -> None:
    """Register vision encoders: pixels in patches → one feature per patch (model part).

    Built as ``Cls(config, ctx: BuildContext)`` on the first pipeline stage. Must provide ``out_dim`` and
    ``forward(patches [N, 3, P, P], grid_thw [K, 3]) -> [N, out_dim]`` (`keye.model.protocols.VisionEncoder`).
    May ignore tensor parallelism (a plain PyTorch encoder is replicated over TP ranks), ``ctx.fp8`` and
    ``ctx.vp_stage``. Rotary positions, if any, through a ``position_encoding`` node built with
    ``ctx.build`` (`PatchPositions`). May carry ``head``, a module ``(features [N, out_dim], grid_thw [K, 3]) ->
    [K, out_dim]`` giving one embedding per image (SigLIP's attention pooling): the contrastive stage then uses
    it, else it mean-pools into a Linear of its own. Selected by ``model.vision_encoder.name``. Built-in:
    ``siglip_navit``.
    """


@hookspec
def keye_register_projectors(register: Register) -> None:
    """Register projectors: patch features → LLM input embeddings (e.g. a 2×2 merge MLP) (model part).

    Built as ``Cls(config, ctx: BuildContext)`` on the first pipeline stage. Must provide
    ``forward(features [N, in_dim], grid_thw [K, 3]) -> [N / merge², out_dim]``, as many rows per image or
    video as the pad tokens the data pipeline wrote (the language model's ``position_encoding``
    ``spatial_merge_size``) (`keye.model.protocols.Projector`). May ignore tensor parallelism, ``ctx.fp8``.
    Selected by ``model.projector.name``. Built-in: ``patch_merge_mlp``.
    """


@hookspec
def keye_register_language_models(register: Register) -> None:
    """Register decoder language models (e.g. Qwen3 on Megatron-Core's GPT model) (model part).

    Built as ``Cls(config, ctx: BuildContext)`` on every pipeline stage (``ctx.pre_process`` /
    ``post_process`` / ``vp_stage`` say which part). Must provide (`keye.model.protocols.LanguageModel`)
    ``vocab_size``, ``position_encoding`` (its built `TokenPositions`: the data pipeline builds the same node
    for position ids, generators ask it for decode positions), ``transformer_config`` and ``gpt`` (Megatron's,
    or None), ``embed(input_ids) -> [L, B, H]``, ``set_input_tensor(tensor)`` and ``forward(input_ids,
    position_ids [3, B, L], attention_mask, decoder_input=None, labels=None, **kwargs)`` returning the
    per-token loss with labels, else logits. May ignore ``loss_mask`` (compute every position),
    ``inference_context``/``logits_at`` (generators then decode without a cache).
    Selected by ``model.language_model.name``. Built-in: ``qwen3``.
    """


@hookspec
def keye_register_text_encoders(register: Register) -> None:
    """Register text towers for the contrastive stage 0 (e.g. the SigLIP text tower) (model part).

    Built as ``Cls(config, ctx: BuildContext)``. Must provide ``out_dim`` and ``forward(input_ids [B, L]) ->
    [B, out_dim]`` (`keye.model.protocols.TextEncoder`). May ignore pipeline parallelism (stage 0 runs
    without it) and ``ctx.fp8``. May provide ``tokenize(texts) -> [B, L] | None`` (captions with the tower's own
    tokenizer; None: the stage uses the blueprint's ``model.tokenizer``) and ``vocab_size`` (the stage refuses
    ids outside it, in one line). Selected by ``model.text_encoder.name``. Built-in: ``siglip_text``.
    """


@hookspec
def keye_register_position_encodings(register: Register) -> None:
    """Register position schemes: rotary angles, and position ids of tokens (model part, nested).

    Selected as a nested component node of the model part that uses it:
    ``model.language_model.position_encoding: {name: ...}`` and ``model.vision_encoder.position_encoding``
    (validated like any node: unknown keys, ``check_config``). Built as ``Cls(config, ctx: BuildContext)``
    by that part (``ctx.build``, which fills a Config ``head_dim`` with the part's own), and, for a language
    model, by the data pipeline too: the one node is the source of truth for the ids of every sample, the
    rotary angles in attention and the positions of generated tokens. Must provide one role or both:

    - for a language model, `keye.model.protocols.TokenPositions`: ``spatial_merge_size``,
      ``position_ids(input_ids [L], **vision) -> [3, L]``, ``decode_position_ids(ids [3, L], count) ->
      [3, count]``, ``rotary_pos_emb(ids [3, B, L]) -> [L, B, 1, head_dim]`` or None;
    - for a vision encoder, `keye.model.protocols.PatchPositions`: ``patch_rotary_pos_emb(grid_thw) ->
      [N, 1, 1, head_dim]`` or None.

    May ignore the vision arguments of ``position_ids`` (a text-only scheme) and ``ctx.parallel`` (a scheme
    holds no weights). Built-in: ``mrope_time_aligned`` (Keye's LLM), ``rope1d``, ``rope2d_vision`` (Keye's
    ViT), ``none`` (no rotation, either role).
    """


@hookspec
def keye_register_data_sources(register: Register) -> None:
    """Register data sources: where samples come from (webdataset shards, JSONL, synthetic) (data part).

    Built as ``Cls(config, parallel)`` (a `keye.parallel.ParallelContext`, or None: read everything). Must
    provide iteration (`keye.contracts.DataSource`): each pass yields `keye.data.sources.LoadedSample` items
    of this data-parallel rank's share; and ``bad_inputs`` (a BadInputCounter): unreadable items are skipped
    and counted, not raised. May ignore shuffling and data-loader workers (`keye.data.sources.DataSource`
    gives both). Selected per entry of ``stages[i].data.sources``.
    """


@hookspec
def keye_register_data_mixers(register: Register) -> None:
    """Register data mixers: how several sources interleave (ratios, resumable state) (data part).

    Built as ``Cls(config, sources)`` (label → data source). Must provide an endless iterator
    (``__iter__``, ``__next__``) and ``state_dict``/``load_state_dict`` so a resumed run continues the same
    sequence (`keye.contracts.DataMixer`). May ignore ``realised_ratios()`` (shown when present); an empty
    ``config.weights`` means every source weighs 1. Selected by ``stages[i].data.mixer.name``.
    """


@hookspec
def keye_register_losses(register: Register) -> None:
    """Register training objectives (SigLIP sigmoid, next-token, MPO, GRPO, ...) (training part).

    Built as ``Cls(config, ctx: BuildContext)``. Must provide ``__call__`` (usually an ``nn.Module``;
    `keye.contracts.Loss`) with the arguments and results of the stage kind that uses it (``lm``:
    ``(per_token_loss, loss_mask) -> (loss_sum, tokens, metrics)``). May ignore ``ctx.parallel`` unless it
    reduces across ranks itself. Selected by ``stages[i].loss.name``.
    """


@hookspec
def keye_register_reward_models(register: Register) -> None:
    """Register reward models that score a rollout (rule rewards, MLLM judges) (training part).

    Built as ``Cls(config, ctx)``. Must provide (`keye.rewards.contract.RewardModel`)
    ``score(samples) -> RewardOutput``: it takes a batch of `RewardSample`s (prompt and reply text, think
    mode, reference answer and metric, finish reason, reply length in tokens) and returns one float per
    sample, named per-sample components (for logging) and counts of the samples handled by rule. Bad input
    (a missing reference, an unparsable reply or judgement) scores 0 and is counted, never raised.
    May ignore ``ctx`` (rule rewards need none) and the fields of a sample it does not score.
    `WeightedRewards` adds several by the blueprint's weights and keeps every model's score and components.
    Selected inside RL / rejection-sampling stage options. Built-in: ``answer_match``, ``format``,
    ``repetition``, ``length``, ``mllm_judge``.
    """


@hookspec
def keye_register_mergers(register: Register) -> None:
    """Register checkpoint mergers (e.g. a weighted linear soup) (training part).

    Built as ``Cls(config, ctx)``. Must provide ``__call__(states, weights) -> state`` over full state dicts
    (`keye.contracts.Merger`). May ignore ``ctx`` (the merge stage passes None).
    Selected inside merge stage options. Built-in: ``linear_soup``.
    """


@hookspec
def keye_register_generators(register: Register) -> None:
    """Register generators: sample continuations of prompts from a model (rollouts, CoT building,
    rejection sampling, chat, evaluation) (training part).

    Built as ``Cls(config, ctx: GeneratorContext)`` (the model, tokenizer, parallel layout). Must provide
    (`keye.generate.contract.Generator`) ``generate(requests, settings, on_token=None) -> results``: it takes
    `GenerationRequest`s (prompt ids, vision inputs, position ids, n samples) and `SamplingSettings`, and
    returns per sample the generated ids, each token's log-probability under the sampling distribution
    actually used, and the finish reason (``stop`` or ``length``); decode positions come from the language
    model's ``position_encoding``. ``sync_weights(...)`` refreshes an engine outside the training process.
    May ignore ``on_token`` (streaming) and make ``sync_weights`` a no-op in process.
    Built-in: ``megatron`` (KV cache on the composed model in the training layout).
    """


@hookspec
def keye_register_video_decoders(register: Register) -> None:
    """Register video decoders: a file → frames and their timestamps (decord, PyAV) (data part).

    Built as ``Cls(config)``. Must provide ``read(path, fps, **limits) -> DecodedVideo`` and ``probe(path)
    -> VideoInfo`` (`keye.data.video.VideoDecoder`); an unreadable file raises ``ValueError("cannot read
    video ...")`` so the sample is skipped and counted. May ignore limits it cannot honour exactly (frames
    are resampled to the token budget afterwards). Selected by ``stages[i].data.video_decoder.name``.
    """


@hookspec
def keye_register_stages(register: Register) -> None:
    """Register stage kinds: the step loop of a training stage (contrastive, lm, preference, rl, ...) (training part).

    Built as ``Cls(config, ctx: StageContext)`` (``keye.train.runner``: blueprint, stage, parallel layout,
    registry, output folder, the previous stage). Must provide ``run() -> dict | None``, the stage's summary
    (`keye.contracts.Stage`). May ignore checkpointing (``--resume`` then restarts the stage) and
    evaluation. Selected by ``stages[i].kind``; ``stages[i].options`` is checked against the stage's Config.
    May ignore ``parallel.virtual_pipeline``: a stage that builds one model chunk per virtual pipeline stage
    (as ``lm``'s ``build_chunks``) says so with ``supports_virtual_pipeline = True`` in its own class body;
    without it a blueprint with a virtual pipeline is refused at validation, naming the stage kind.
    May say which summary keys show that it did its job with ``headline_keys`` (a class attribute: keys of its
    ``eval_after``, shown before → after, or of its summary, ``*`` for one key part) and list images in its
    folder under the summary's ``plots``: the run's report.md shows them (`keye.train.report`).
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
