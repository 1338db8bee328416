"""Semantic checks of a blueprint: whatever a run would refuse after building, refused before anything is built.

The schema (`keye.config.schema`) and each component's ``Config`` say which keys exist and their types; this
module says which *values* can run: ranges (no negative steps, no ``lr: .nan``), references between stages
(``init_from``, ``lr_scale`` and ``train`` naming modules), and the parallel layout against the number of
processes. ``keye-launch validate`` and ``keye-launch run`` both go through it, so a blueprint that validates
does not fail on these points minutes into a run; each problem is one `BlueprintError` line naming the full
key path and the file that set it.

What only a component knows (heads that must divide the tensor-parallel size, a mixer's weights against
the stage's source labels, a merge's inputs) the component checks itself: a component class may define

    @classmethod
    def check_config(cls, config, check: ConfigCheck) -> None: ...

which gets its completed ``Config`` instance and a `ConfigCheck` (the blueprint, where the node sits, and
``check.fail(key, message)``); see ``keye.hookspecs``. It runs after the checks below, on every component
node, nested ones included, and must neither build nor read anything (validate stays fast and harmless).

Limits: counts must fit in a signed 32-bit integer (`MAX_COUNT`): Megatron and torch keep steps, sizes and
indices in int32 in places, and anything larger is a typo. Paths (``init_from`` folders, data files) are not
looked at here, because a blueprint is usually validated away from the cluster it runs on; `check_runnable`
looks at them just before a run starts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from typing import Any, Callable, Iterable, NoReturn

from omegaconf import DictConfig, OmegaConf

from keye.config.fields import field_component_kind
from keye.config.schema import MODULES
from keye.config.validate import short
from keye.errors import BlueprintError, KeyeUserError
from keye.model.backend import check_impl_name, effective_impl_name

Origin = Callable[[str], str]

#: Largest step count, size or batch a blueprint may ask for (see the module docstring).
MAX_COUNT = 2**31 - 1
#: Learning-rate schedules (keye.train.optim.SCHEDULES; a test keeps the two equal).
SCHEDULE_KINDS = ("constant", "cosine", "wsd", "linear")
#: torch.distributed backends (keye.parallel.state).
BACKENDS = ("auto", "gloo", "nccl")
#: FP8 implementations (keye.parallel.fp8.BACKENDS; a test keeps the two equal).
FP8_BACKENDS = ("te", "torch")
#: How packed sequences are shared among data-parallel ranks (keye.data.pipeline).
BALANCE_MODES = ("shard", "flops")
#: What a sample longer than ``data.max_tokens`` does (keye.data.pipeline).
OVER_BUDGET_POLICIES = ("skip", "error")
#: Text a sample needs beside its one largest image or video (template, question, a short answer), for the
#: budget warning: at most this, and at most a quarter of ``max_tokens`` (tiny test blueprints).
TEXT_ROOM = 512
OVER_BUDGET_EFFECT = {"skip": "such samples are skipped as over_budget (apart from bad input)",
                      "error": "such a sample stops the run (over_budget: error)"}


class ConfigCheck:
    """Where a component node sits in a blueprint, and how to report what is wrong with it.

    ``path`` is the node's key path (``model.language_model``, ``stages.2.data.mixer``); ``stage`` the
    stage it belongs to (None for model nodes); ``blueprint`` the whole validated blueprint, completed
    with defaults (read-only by convention). ``fail("weights.foo", "...")`` raises one line naming
    ``<path>.weights.foo`` and the file that set it.
    """

    def __init__(self, blueprint: DictConfig, path: str, origin: Origin, stage_index: int | None = None) -> None:
        self.blueprint = blueprint
        self.path = path
        self.stage_index = stage_index
        self._origin = origin

    @property
    def stage(self) -> DictConfig | None:
        return None if self.stage_index is None else self.blueprint.stages[self.stage_index]

    @property
    def tensor(self) -> int:
        return int(self.blueprint.parallel.tensor)

    @property
    def pipeline(self) -> int:
        return int(self.blueprint.parallel.pipeline)

    def key(self, key: str = "") -> str:
        return f"{self.path}.{key}" if key else self.path

    def fail(self, key: str, message: str) -> NoReturn:
        fail(self._origin, self.key(key), message)

    # Stage kinds that sample or measure a model (eval, cot_build, rejection_sampling) share these two.

    def trains_nothing(self, kind: str) -> None:
        """The stage's ``steps`` and ``train`` stay unset: ``kind`` (e.g. "an eval stage") trains nothing."""
        index = self.stage_index
        if self.stage.steps or self.stage.train:
            self.fail("", f"{kind} trains nothing; leave stages.{index}.steps and stages.{index}.train unset")

    def earlier_stage(self, config: Any, key: str = "stage") -> None:
        """``config.<key>``, when set, names a stage before this one."""
        name, index = getattr(config, key), self.stage_index
        earlier = [stage.name for stage in self.blueprint.stages][:index]
        if name and name not in earlier:
            self.fail(key, f"no earlier stage named '{name}'; earlier stages: {', '.join(earlier) or '(none)'}")

    # Range helpers for the common cases; each names the field.

    def count(self, config: Any, *names: str, minimum: int = 1) -> None:
        """Each field is an integer in [minimum, MAX_COUNT]."""
        for name in names:
            count(self._origin, self.key(name), getattr(config, name), minimum)

    def number(self, config: Any, name: str, *, low: float | None = None, high: float | None = None,
               above: float | None = None) -> None:
        """The field is a finite number, >= low, <= high and > above (each when given)."""
        number(self._origin, self.key(name), getattr(config, name), low=low, high=high, above=above)

    def one_of(self, config: Any, name: str, choices: Iterable[str]) -> None:
        one_of(self._origin, self.key(name), getattr(config, name), choices)

    def divisible(self, config: Any, name: str, by: int, why: str) -> None:
        """The field divides by ``by`` (e.g. the tensor-parallel size)."""
        value = getattr(config, name)
        if by > 0 and value % by:
            self.fail(name, f"{value} is not divisible by {why} ({by})")


def fail(origin: Origin, key: str, message: str) -> NoReturn:
    raise BlueprintError(f"{origin(key)}: {key}: {message}")


def count(origin: Origin, key: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_COUNT:
        fail(origin, key, f"must be an integer from {minimum} to {MAX_COUNT}, got {value!r}")


def number(origin: Origin, key: str, value: Any, *, low: float | None = None, high: float | None = None,
           above: float | None = None) -> None:
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    bounds = [f">= {low}" if low is not None else "", f"<= {high}" if high is not None else "",
              f"> {above}" if above is not None else ""]
    wanted = " and ".join(b for b in bounds if b)
    if not finite or (low is not None and value < low) or (high is not None and value > high) or (
        above is not None and value <= above
    ):
        fail(origin, key, f"must be a finite number{' ' + wanted if wanted else ''}, got {value!r}")


def one_of(origin: Origin, key: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        fail(origin, key, f"'{value}' is not one of {', '.join(choices)}")


# --- the whole blueprint -------------------------------------------------------------------------


def check_blueprint(cfg: DictConfig, registry: Any, origin: Origin, *, nproc: int | None = None) -> None:
    """Every semantic check, in blueprint order; raises the first problem as one line."""
    _check_run(cfg, origin)
    check_layout(cfg, origin, nproc)
    for index, stage in enumerate(cfg.stages):
        _check_stage(cfg, index, stage, origin)
    _check_components(cfg, registry, origin)


def _check_run(cfg: DictConfig, origin: Origin) -> None:
    for key in ("run.name", "run.output_dir"):
        if not str(OmegaConf.select(cfg, key)).strip():
            fail(origin, key, "must not be empty")
    count(origin, "run.checkpoint_every", cfg.run.checkpoint_every, 0)
    count(origin, "eval.every", cfg.eval.every, 0)
    count(origin, "eval.max_samples", cfg.eval.max_samples, 0)
    fp8 = cfg.precision.fp8
    one_of(origin, "precision.fp8.backend", fp8.backend, FP8_BACKENDS)
    count(origin, "precision.fp8.amax_history", fp8.amax_history)


def check_layout(cfg: DictConfig, origin: Origin, nproc: int | None = None) -> None:
    """``parallel``: sizes >= 1, a known backend and, with ``nproc`` processes, a layout that fits them.

    The world is split into tensor x pipeline model-parallel groups and data-parallel replicas of them
    (keye.parallel.state.check_layout), so tensor x pipeline must divide it, and ``parallel.data``, when
    set, must be the quotient.
    """
    par = cfg.parallel
    count(origin, "parallel.tensor", par.tensor)
    count(origin, "parallel.pipeline", par.pipeline)
    one_of(origin, "parallel.backend", par.backend, BACKENDS)
    if par.virtual_pipeline is not None:
        count(origin, "parallel.virtual_pipeline", par.virtual_pipeline)
        if par.pipeline < 2:
            fail(origin, "parallel.virtual_pipeline", f"needs parallel.pipeline >= 2, got {par.pipeline}")
    if par.data is not None:
        count(origin, "parallel.data", par.data)
    impl = cfg.model.transformer_impl
    if impl is not None and check_impl_name(str(impl)):
        fail(origin, "model.transformer_impl", check_impl_name(str(impl)))
    _check_sequence_parallel(cfg, origin)
    if nproc is None:
        return
    group = par.tensor * par.pipeline
    if nproc % group:
        key = "parallel.tensor" if par.tensor > 1 else "parallel.pipeline"
        fail(origin, key, f"tensor {par.tensor} x pipeline {par.pipeline} = {group} does not divide {nproc} processes")
    if par.data is not None and par.data != nproc // group:
        fail(origin, "parallel.data", f"{par.data}, but {nproc} processes / (tensor {par.tensor} x pipeline "
                                      f"{par.pipeline}) = {nproc // group} data-parallel ranks")


def _check_sequence_parallel(cfg: DictConfig, origin: Origin) -> None:
    """``parallel.sequence_parallel`` needs TP > 1 and Transformer Engine layers (Megatron's local norms refuse
    it; the language model checks TE again when it is built, where TE is imported), and keye's torch FP8
    linears refuse it."""
    if not cfg.parallel.sequence_parallel:
        return
    fp8 = cfg.precision.fp8
    if cfg.parallel.tensor < 2:
        fail(origin, "parallel.sequence_parallel", f"needs parallel.tensor > 1, got {cfg.parallel.tensor}")
    if effective_impl_name(cfg) == "local":
        where = "model.transformer_impl" if cfg.model.transformer_impl is not None else "KEYE_TRANSFORMER_IMPL"
        fail(origin, "parallel.sequence_parallel", f"needs Transformer Engine layers, but {where}=local")
    if fp8.enabled and fp8.backend == "torch":
        fail(origin, "parallel.sequence_parallel", "does not run with precision.fp8.backend torch (use te)")


def _check_stage(cfg: DictConfig, index: int, stage: DictConfig, origin: Origin) -> None:
    path = f"stages.{index}"
    count(origin, f"{path}.steps", stage.steps, 0)
    if stage.steps > 0 and not stage.train:
        fail(origin, f"{path}.train", f"{stage.steps} steps but no module trains (list them in train)")
    _check_init_from(cfg, index, stage, origin)
    opt, opt_path = stage.optimizer, f"{path}.optimizer"
    number(origin, f"{opt_path}.lr", opt.lr, low=0)
    for module, scale in opt.lr_scale.items():
        key = f"{opt_path}.lr_scale.{module}"
        if module not in MODULES:
            fail(origin, key, f"unknown module '{module}'; known: {', '.join(MODULES)}")
        if module not in stage.train:
            fail(origin, key, f"'{module}' does not train in this stage (stages.{index}.train), so its scale would do nothing")
        number(origin, key, scale, low=0)
    number(origin, f"{opt_path}.weight_decay", opt.weight_decay, low=0)
    number(origin, f"{opt_path}.beta1", opt.beta1, low=0, high=1)
    number(origin, f"{opt_path}.beta2", opt.beta2, low=0, high=1)
    number(origin, f"{opt_path}.eps", opt.eps, above=0)
    number(origin, f"{opt_path}.clip_grad", opt.clip_grad, low=0)
    sched, sched_path = stage.schedule, f"{path}.schedule"
    one_of(origin, f"{sched_path}.kind", sched.kind, SCHEDULE_KINDS)
    count(origin, f"{sched_path}.warmup_steps", sched.warmup_steps, 0)
    number(origin, f"{sched_path}.min_lr_ratio", sched.min_lr_ratio, low=0, high=1)
    number(origin, f"{sched_path}.decay_fraction", sched.decay_fraction, low=0, high=1)
    _check_data(stage.data, f"{path}.data", origin)


def _check_init_from(cfg: DictConfig, index: int, stage: DictConfig, origin: Origin) -> None:
    """``init_from`` (keye.train.init_plan): a source for the whole model, or a mapping {module: source}; a
    source is an earlier stage's name, a folder (a path with '/'; looked at by `check_runnable`) or 'fresh'."""
    source, key = stage.init_from, f"stages.{index}.init_from"
    if not isinstance(source, DictConfig):
        _check_init_source(cfg, index, stage, origin, key, source, whole=True)
        return
    if not source:
        fail(origin, key, f"an empty mapping; name modules ({', '.join(MODULES)}) or leave init_from null")
    for module, value in source.items():
        if module not in MODULES:
            fail(origin, f"{key}.{module}", f"unknown module '{module}'; known: {', '.join(MODULES)}")
        if cfg.model[module] is None:
            fail(origin, f"{key}.{module}", f"model.{module} is not set")
        _check_init_source(cfg, index, stage, origin, f"{key}.{module}", value, whole=False)


def _check_init_source(cfg: DictConfig, index: int, stage: DictConfig, origin: Origin, key: str, source: Any,
                       whole: bool) -> None:
    if source is None and whole:
        return
    if not isinstance(source, str) or not source:
        mapping = ", or a mapping {module: source}" if whole else ""
        fail(origin, key, f"expected an earlier stage's name, a folder (a path with '/') or 'fresh'{mapping}; "
                          f"got {short(source)}")
    if source == "fresh" or "/" in source:
        return
    names = [s.name for s in cfg.stages]
    if source == stage.name:
        fail(origin, key, "a stage cannot start from its own weights")
    if source in names[index + 1 :]:
        fail(origin, key, f"stage '{source}' comes later; a stage starts from an earlier one")
    if source not in names:
        earlier = ", ".join(names[:index]) or "(none)"
        fail(origin, key, f"'{source}' is neither an earlier stage ({earlier}) nor a folder (a path with '/')")


def _check_data(data: DictConfig, path: str, origin: Origin) -> None:
    count(origin, f"{path}.max_tokens", data.max_tokens)
    count(origin, f"{path}.micro_batch_size", data.micro_batch_size)
    if data.global_batch_size is not None:
        count(origin, f"{path}.global_batch_size", data.global_batch_size)
        if data.global_batch_size % data.micro_batch_size:
            fail(origin, f"{path}.global_batch_size", f"{data.global_batch_size} is not a multiple of "
                                                     f"micro_batch_size ({data.micro_batch_size})")
    number(origin, f"{path}.max_bad_fraction", data.max_bad_fraction, low=0, high=1)
    if data.max_vision_patches is not None:
        count(origin, f"{path}.max_vision_patches", data.max_vision_patches)
    count(origin, f"{path}.pack_buffer", data.pack_buffer)
    one_of(origin, f"{path}.balance", data.balance, BALANCE_MODES)
    one_of(origin, f"{path}.over_budget", data.over_budget, OVER_BUDGET_POLICIES)
    count(origin, f"{path}.image_min_tokens", data.image_min_tokens)
    count(origin, f"{path}.image_max_tokens", data.image_max_tokens, data.image_min_tokens)
    number(origin, f"{path}.video_fps", data.video_fps, above=0)
    frames = list(data.video_frame_tokens)
    if len(frames) != 2:
        fail(origin, f"{path}.video_frame_tokens", f"expected [min, max], got {frames}")
    count(origin, f"{path}.video_frame_tokens.0", frames[0])
    count(origin, f"{path}.video_frame_tokens.1", frames[1], frames[0])
    count(origin, f"{path}.video_max_tokens", data.video_max_tokens)


def budget_warnings(cfg: DictConfig) -> list[str]:
    """One line per stage whose largest allowed image or video, with some text (`TEXT_ROOM`), does not fit
    its ``max_tokens``: such samples are valid input the stage will never train on (skipped as over_budget,
    counted apart from bad input), which is almost never what the recipe meant, but not an error.

    Stages that train the ``text_encoder`` are left out: the contrastive stage 0 feeds captions to a text
    tower of its own length, and ``max_tokens`` does not bound its samples.
    """
    lines = []
    for index, stage in enumerate(cfg.stages):
        data, path = stage.data, f"stages.{index}.data"
        if "text_encoder" in stage.train or not (data.sources or data.heldout):
            continue
        room = min(TEXT_ROOM, data.max_tokens // 4)
        for key in ("image_max_tokens", "video_max_tokens"):
            if data[key] + room > data.max_tokens:
                lines.append(f"{path}.{key} ({data[key]}) + {room} tokens of text exceed {path}.max_tokens "
                             f"({data.max_tokens}): {OVER_BUDGET_EFFECT[data.over_budget]}; raise max_tokens or "
                             "lower the budget")
    return lines


# --- component nodes -----------------------------------------------------------------------------


def _check_components(cfg: DictConfig, registry: Any, origin: Origin) -> None:
    for slot in MODULES:
        if cfg.model[slot] is not None:
            check_node(cfg, registry, origin, slot, cfg.model[slot], f"model.{slot}")
    for index, stage in enumerate(cfg.stages):
        path = f"stages.{index}"
        options = {"name": stage.kind, **OmegaConf.to_container(stage.options)}
        check_node(cfg, registry, origin, "stage", options, f"{path}.options", index)  # its own reason first
        _check_virtual_pipeline(cfg, registry, origin, stage.kind)
        if stage.loss is not None:
            check_node(cfg, registry, origin, "loss", stage.loss, f"{path}.loss", index)
        for group in ("sources", "heldout"):
            for label, node in stage.data[group].items():
                check_node(cfg, registry, origin, "data_source", node, f"{path}.data.{group}.{label}", index)
        check_node(cfg, registry, origin, "data_mixer", stage.data.mixer, f"{path}.data.mixer", index)
        check_node(cfg, registry, origin, "video_decoder", stage.data.video_decoder, f"{path}.data.video_decoder", index)


def _check_virtual_pipeline(cfg: DictConfig, registry: Any, origin: Origin, kind: str) -> None:
    """An interleaved pipeline needs a stage that builds one model chunk per virtual stage. A stage kind says
    it does with ``supports_virtual_pipeline = True`` in its own class body: a subclass that builds its models
    its own way (a frozen reference, a generator) does not inherit the promise."""
    if cfg.parallel.virtual_pipeline is not None and not vars(registry.cls("stage", kind)).get("supports_virtual_pipeline"):
        fail(origin, "parallel.virtual_pipeline", f"the '{kind}' stage kind does not support an interleaved pipeline; "
                                                  "set it to null")


def check_node(cfg: DictConfig, registry: Any, origin: Origin, kind: str, node: Any, path: str,
               stage_index: int | None = None) -> None:
    """Run the component's ``check_config`` (if it has one) on a validated node, then on its nested nodes.

    A `KeyeUserError` other than a `BlueprintError` (a component reusing its run-time check) is reported
    at the node's key path.
    """
    plain = OmegaConf.to_container(node) if isinstance(node, DictConfig) else node
    cls, config = _config_instance(kind, plain, registry)
    if kind == "data_source":
        _check_source(config, ConfigCheck(cfg, path, origin, stage_index))
    checker = getattr(cls, "check_config", None)
    if checker is not None:
        try:
            checker(config, ConfigCheck(cfg, path, origin, stage_index))
        except BlueprintError:
            raise
        except KeyeUserError as exc:
            fail(origin, path, str(exc))
    for field in getattr(cls.Config, "__dataclass_fields__", {}).values():
        nested = field_component_kind(field)
        if nested and plain.get(field.name) is not None:
            check_node(cfg, registry, origin, nested, plain[field.name], f"{path}.{field.name}", stage_index)


def _check_source(config: Any, check: ConfigCheck) -> None:
    """The fields every data source shares (keye.data.sources.SourceConfig), where a source has them."""
    if hasattr(config, "max_bad_fraction"):
        check.number(config, "max_bad_fraction", low=0, high=1)
    if hasattr(config, "max_media_bytes"):
        check.count(config, "max_media_bytes")
    if hasattr(config, "shuffle_buffer"):
        check.count(config, "shuffle_buffer", minimum=0)


def _config_instance(kind: str, node: dict, registry: Any) -> tuple[type, Any]:
    """The component class and its Config instance for a validated (complete) node.

    A node that validated holds every field already, so a Config of plain fields is built directly; that
    is much faster than OmegaConf's merge. A Config with dataclass-typed fields goes through OmegaConf.
    """
    from keye.config.validate import build_component_config

    cls = registry.cls(kind, node["name"])
    if _plain_fields(cls.Config):
        return cls, cls.Config(**{key: value for key, value in node.items() if key != "name"})
    return build_component_config(kind, node, registry)


@functools.lru_cache(maxsize=None)
def _plain_fields(config_class: type) -> bool:
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # an annotation that does not evaluate: let OmegaConf build it
        return False
    return not any(dataclasses.is_dataclass(hint) for hint in hints.values())


# --- just before a run -----------------------------------------------------------------------------


def launch_world_size(nproc: int) -> int:
    """The processes a run will have: ``WORLD_SIZE`` where a launcher set it (torchrun, or a rank that
    ``keye-launch run --nproc`` started), else ``--nproc``."""
    try:
        return int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return nproc


def check_runnable(cfg: DictConfig, only_stage: str | None = None) -> None:
    """What ``run`` needs beyond a valid blueprint: a stage to run, and the ``init_from`` folders it reads
    (there, of a known kind, and Hugging Face directories that fit their modules: `keye.train.init_plan`).

    A blueprint without stages validates (it is a base for others) but runs nothing: an error, not a
    silent exit 0.
    """
    if not cfg.stages:
        raise BlueprintError("stages: the blueprint has no stages, nothing to run (a base for other blueprints?)")
    from keye.plugins import get_registry
    from keye.train.init_plan import check_sources

    for index, stage in enumerate(cfg.stages):
        if only_stage is None or stage.name == only_stage:
            try:
                check_sources(cfg, index, get_registry())
            except BlueprintError:
                raise
            except KeyeUserError as exc:  # a folder or Hugging Face file that does not fit: the blueprint's to fix
                raise BlueprintError(str(exc)) from None
