"""One written contract per component kind, checked when a plugin registers a class.

For every kind: how the host constructs it (``built``), the methods it must provide (checked), what it
must provide besides (attributes set in ``__init__``, return shapes: ``provides``), what it may ignore
(``may_ignore``), and the Protocol that types it (``protocol``, a dotted name: resolved only when asked,
so listing plugins imports nothing heavy). `check_contract` runs when a plugin's ``register(name, cls)``
reaches the registry: a class without a required method, or whose constructor cannot take the arguments
the host passes, fails that plugin with one line naming the plugin, the class and the missing member.
Attributes set in ``__init__`` (a vision encoder's ``out_dim``) are not visible on the class; the
Protocols list them, and `check_built` checks them on a built object.

Why here and not in each Protocol: the registry must check every kind, including kinds whose Protocol
lives beside the code that uses it (`keye.generate.contract.Generator`, `keye.rewards.contract.RewardModel`,
`keye.data.video.VideoDecoder`, the model parts in `keye.model.protocols`). Kinds without such a home
(data sources, mixers, losses, mergers, stages) have their Protocol at the end of this module.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

from keye.errors import ContractError


@dataclass(frozen=True)
class Contract:
    kind: str
    built: str  #: how the host constructs it
    arguments: int  #: positional arguments the host passes after ``config``
    methods: tuple[tuple[str, ...], ...]  #: one group must be complete (most kinds have exactly one)
    provides: str
    may_ignore: str
    protocol: str  #: dotted name of the Protocol(s) ("a | b" where a kind has roles)

    def protocols(self) -> list[type]:
        """The Protocol classes (imported now)."""
        found = []
        for dotted in self.protocol.split(" | "):
            module, _, name = dotted.rpartition(".")
            found.append(getattr(importlib.import_module(module), name))
        return found


_MODEL_IGNORES = ("tensor parallelism (a plain PyTorch module is replicated over TP ranks), ``ctx.fp8``, "
                  "``ctx.vp_stage``")

CONTRACTS: dict[str, Contract] = {c.kind: c for c in (
    Contract("vision_encoder", "Cls(config, ctx: keye.model.protocols.BuildContext)", 1, (("forward",),),
             "``out_dim``; ``forward(patches [N, 3, P, P], grid_thw [K, 3]) -> [N, out_dim]``",
             _MODEL_IGNORES + "; it is built on the first pipeline stage only",
             "keye.model.protocols.VisionEncoder"),
    Contract("projector", "Cls(config, ctx: BuildContext)", 1, (("forward",),),
             "``forward(features [N, in_dim], grid_thw [K, 3]) -> [N / merge², out_dim]``",
             _MODEL_IGNORES + "; it is built on the first pipeline stage only",
             "keye.model.protocols.Projector"),
    Contract("language_model", "Cls(config, ctx: BuildContext) on every pipeline stage", 1,
             (("forward", "embed", "set_input_tensor"),),
             "``vocab_size``, ``position_encoding``, ``transformer_config``, ``gpt`` (or None); ``embed``, "
             "``set_input_tensor``, ``forward`` (per-token loss with labels, else logits)",
             "``loss_mask`` (may compute every position), ``inference_context``/``logits_at`` (generators then "
             "use the no-cache path)",
             "keye.model.protocols.LanguageModel"),
    Contract("text_encoder", "Cls(config, ctx: BuildContext)", 1, (("forward",),),
             "``out_dim``; ``forward(input_ids [B, L]) -> [B, out_dim]``",
             _MODEL_IGNORES + "; pipeline parallelism (stage 0 runs without it)",
             "keye.model.protocols.TextEncoder"),
    Contract("position_encoding", "Cls(config, ctx: BuildContext) by the model part whose node selects it "
             "(and by the data pipeline)", 1,
             (("position_ids", "decode_position_ids", "rotary_pos_emb"), ("patch_rotary_pos_emb",)),
             "for a language model (`TokenPositions`): ``spatial_merge_size``, ``position_ids``, "
             "``decode_position_ids``, ``rotary_pos_emb``; for a vision encoder (`PatchPositions`): "
             "``patch_rotary_pos_emb``; a scheme may serve both",
             "the vision arguments of ``position_ids`` (a text-only scheme); ``ctx.parallel`` (no weights)",
             "keye.model.protocols.TokenPositions | keye.model.protocols.PatchPositions"),
    Contract("data_source", "Cls(config, parallel: keye.parallel.ParallelContext | None)", 1, (("__iter__",),),
             "iteration yields `keye.data.sources.LoadedSample` items of this data-parallel rank's share (all "
             "of them with ``parallel=None``), a new pass each time; ``bad_inputs`` (a BadInputCounter)",
             "shuffling, data-loader workers, ``set_epoch`` (the built-ins inherit them from "
             "`keye.data.sources.DataSource`)",
             "keye.contracts.DataSource"),
    Contract("data_mixer", "Cls(config, sources: dict[label, data source])", 1,
             (("__iter__", "__next__", "state_dict", "load_state_dict"),),
             "an endless iterator of samples drawn from ``sources``; ``state_dict``/``load_state_dict`` so a "
             "resumed run continues the same sequence",
             "``realised_ratios()`` (shown in metrics when present); ``config.weights`` may arrive empty "
             "(then every source weighs 1)",
             "keye.contracts.DataMixer"),
    Contract("loss", "Cls(config, ctx: BuildContext)", 1, (("__call__",),),
             "a callable (usually an ``nn.Module``) whose arguments and results are those of the stage kind "
             "that uses it (next_token: ``(per_token_loss, loss_mask) -> (sum, tokens, metrics)``; see each stage)",
             "``ctx.parallel`` unless it reduces across ranks itself",
             "keye.contracts.Loss"),
    Contract("reward_model", "Cls(config, ctx)", 1, (("score",),),
             "``score(samples: list[RewardSample]) -> RewardOutput``: one float per sample, named components, "
             "counts; bad input scores 0 and is counted, never raised",
             "``ctx`` (rule rewards need none), the think mode and finish reason of a sample",
             "keye.rewards.contract.RewardModel"),
    Contract("merger", "Cls(config, ctx)", 1, (("__call__",),),
             "``__call__(states: list[state dict], weights: list[float]) -> state dict`` of full tensors",
             "``ctx`` (the merge stage passes None)",
             "keye.contracts.Merger"),
    Contract("generator", "Cls(config, ctx: keye.generate.contract.GeneratorContext)", 1,
             (("generate", "sync_weights"),),
             "``generate(requests, settings, on_token=None) -> list[GenerationOutput]`` (ids, log-probs under "
             "the distribution sampled from, finish reasons); ``sync_weights(weights)``",
             "``on_token`` (streaming); ``sync_weights`` may be a no-op in process",
             "keye.generate.contract.Generator"),
    Contract("video_decoder", "Cls(config)", 0, (("read", "probe"),),
             "``read(path, fps, **limits) -> DecodedVideo`` and ``probe(path) -> VideoInfo``; an unreadable "
             "file raises ``ValueError('cannot read video ...')`` (the sample is skipped and counted)",
             "limits it cannot honour exactly (frames are resampled to the token budget afterwards)",
             "keye.data.video.VideoDecoder"),
    Contract("stage", "Cls(config, ctx: keye.train.runner.StageContext)", 1, (("run",),),
             "``run() -> dict | None``: the stage's summary (steps, losses, evaluations), written to summary.json",
             "checkpointing and resume (then ``--resume`` restarts the stage), evaluation",
             "keye.contracts.Stage"),
)}


def missing_members(kind: str, cls: type) -> list[str]:
    """What ``cls`` lacks of its kind's contract: methods (``name()``) or a constructor that cannot take
    ``(config, *arguments)`` (``__init__(config, ...)``). Empty when it meets the contract."""
    contract = CONTRACTS[kind]
    gaps = [[f"{name}()" for name in group if not _defines(cls, name)] for group in contract.methods]
    missing = min(gaps, key=len)  # the role it comes closest to
    if not _constructible(cls, 1 + contract.arguments):
        missing.append(f"an __init__ taking {1 + contract.arguments} argument(s), built as {contract.built}")
    return missing


def check_contract(kind: str, name: str, cls: type, who: str) -> None:
    """Raise `ContractError` (one line naming ``who``, the plugin) when ``cls`` does not meet its contract."""
    missing = missing_members(kind, cls)
    if missing:
        contract = CONTRACTS[kind]
        raise ContractError(
            f"{kind} '{name}' ({cls.__qualname__}) from {who} does not meet the {kind} contract: missing "
            f"{', '.join(missing)} (see {contract.protocol} and keye.contracts)"
        )


def check_built(kind: str, name: str, component: Any) -> None:
    """After building: the attributes the kind's Protocol names (``out_dim``, ``vocab_size``, ...) are set."""
    protocols = CONTRACTS[kind].protocols()
    if not any(isinstance(component, protocol) for protocol in protocols):
        wanted = sorted(set().union(*(_attributes(p) for p in protocols)))
        lacking = [attr for attr in wanted if not hasattr(component, attr)]
        raise ContractError(f"{kind} '{name}' ({type(component).__qualname__}): the built object lacks "
                            f"{', '.join(lacking) or 'a member'} (see {CONTRACTS[kind].protocol})")


def _attributes(protocol: type) -> set[str]:
    return set(getattr(protocol, "__annotations__", {}))


def _defines(cls: type, name: str) -> bool:
    """``cls`` defines the method (``__call__`` must come from the class, not from ``type``)."""
    return any(name in vars(klass) and callable(vars(klass)[name]) for klass in cls.__mro__ if klass is not object)


def _constructible(cls: type, count: int) -> bool:
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # a builtin or C type: cannot tell, let it through
        return True
    try:
        signature.bind(*range(count))
    except TypeError:
        return False
    return True


# --- Protocols of the kinds that have no other home ---------------------------------------------------


@runtime_checkable
class DataSource(Protocol):
    """Samples of this data-parallel rank's share, one pass per iteration; bad input counted, not raised."""

    bad_inputs: Any

    def __iter__(self) -> Iterator[Any]: ...


@runtime_checkable
class DataMixer(Protocol):
    """An endless, resumable interleaving of labelled sources."""

    def __iter__(self) -> Iterator[Any]: ...

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class Loss(Protocol):
    """A training objective; its call signature is the using stage kind's (see `Contract.provides`)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class Merger(Protocol):
    """Combines the full state dicts of several checkpoints into one."""

    def __call__(self, states: Sequence[Mapping[str, Any]], weights: Sequence[float]) -> dict: ...


@runtime_checkable
class Stage(Protocol):
    """The step loop of one stage of a blueprint."""

    def run(self) -> dict | None: ...
