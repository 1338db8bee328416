"""What a stage's ``init_from`` means: for each module of its model, where its weights start.

Why: one stage's starting point is often pieced together. Stage 1 of the recipe takes the ViT of stage 0,
the LLM of the public Qwen3-8B and a fresh projector; a stage in the middle of a run may swap in another
LLM and keep the rest. ``stages[i].init_from`` says so in plain data:

- null: every module from the previous stage (the modules the two stages share; none before the first);
- a string, for the whole model (every module the source holds):
  - an earlier stage's name (``stage2_multitask``): that stage's ``weights/`` in this run;
  - a folder (a path with '/'): a stage's folder or a ``keye-launch convert hf-to-megatron`` output (both hold
    ``weights/``, a Megatron-Core distributed checkpoint), or a Hugging Face directory (its config.json
    ``model_type`` says which of its weights fill which module: `keye.hf.sources.HF_FORMATS`);
  - ``fresh``: nothing is loaded (the model's seeded initialisation);
- a mapping ``{module: <one of those strings>}``, e.g.
  ``{vision_encoder: stage0_vit, language_model: /ckpt/Qwen3-8B, projector: fresh}``: each named module from
  its source, and **every module not named from the previous stage**, as without ``init_from``. The mapping
  only says what differs from the usual chain; a module to start over is named ``fresh``.

A named module must come from its source: a weights folder or Hugging Face directory without it is an error
(the whole-model forms load what the source and the model share). `plan` turns the blueprint value into
`Source` s (pure: no file is read), `check_sources` looks at the folders before any process starts
(`keye.config.semantics.check_runnable`), `keye.train.stage_weights` loads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keye.errors import KeyeUserError

#: The source that loads nothing.
FRESH = "fresh"


@dataclass(frozen=True)
class Source:
    """Some modules' starting point: a folder (``weights/`` inside, or a Hugging Face directory), or fresh."""

    key: str  #: blueprint key, for messages: ``stages.1.init_from.language_model``
    path: Path | None  #: None: fresh
    modules: tuple[str, ...] | None  #: the modules named for it; None: every module the source and the model share
    exclude: tuple[str, ...] = ()  #: with ``modules`` None: modules that come from elsewhere
    explicit: bool = True  #: False for the implicit previous stage (missing weights then mean "start fresh")
    earlier_stage: bool = False  #: named by stage: a folder of this run, perhaps not written yet


def _value(key: str, value: str, output_dir: Path, modules: tuple[str, ...] | None) -> Source:
    if value == FRESH:
        return Source(key, None, modules)
    if "/" in value:
        return Source(key, Path(value), modules)
    return Source(key, output_dir / value, modules, earlier_stage=True)


def plan(init_from: Any, stage_index: int, output_dir: str | Path, previous_output: Path | None) -> list[Source]:
    """The sources of a stage's modules, in load order (a validated ``init_from``: str, mapping or None)."""
    key, output_dir = f"stages.{stage_index}.init_from", Path(output_dir)
    if init_from is None:
        return [Source(key, previous_output, None, explicit=False)] if previous_output is not None else []
    if isinstance(init_from, str):
        return [_value(key, init_from, output_dir, None)]
    named = {str(module): str(value) for module, value in init_from.items()}
    rest = [Source(key, previous_output, None, tuple(named), explicit=False)] if previous_output is not None else []
    return rest + [_value(f"{key}.{module}", value, output_dir, (module,)) for module, value in named.items()]


# --- what a folder is ------------------------------------------------------------------------------------

KEYE = "keye"  #: ``weights/``: a stage's folder or a converted checkpoint
HF = "hf"  #: a Hugging Face directory


def folder_kind(path: Path, key: str) -> str:
    """`KEYE` or `HF`; anything else is one line saying what was looked for."""
    from keye.hf.sources import is_hf_directory
    from keye.parallel.dist_checkpoint import is_checkpoint

    if is_checkpoint(path / "weights"):
        return KEYE
    if is_hf_directory(path):
        return HF
    if is_checkpoint(path / "model") and (path / "keye_checkpoint.json").is_file():
        raise KeyeUserError(f"{key}: {path} was written by an older keye-launch convert (model/ instead of weights/); "
                            "convert the Hugging Face checkpoint again")
    raise KeyeUserError(f"{key}: no weights at {path / 'weights'} and no config.json in {path} (expected a stage's "
                        "folder, a keye-launch convert output or a Hugging Face directory)")


def check_sources(cfg: Any, stage_index: int, registry: Any) -> None:
    """Before any process starts: every folder an ``init_from`` names is there and of a known kind, and each
    Hugging Face directory fits the modules it fills (config.json keys, weight names and shapes from the
    safetensors headers). Earlier stages of this run are not looked at: they may not have run yet."""
    from keye.config import build_component_config
    from keye.config.schema import MODULES
    from keye.hf.sources import check_module, open_hf_directory

    init_from = cfg.stages[stage_index].init_from
    for source in plan(init_from, stage_index, cfg.run.output_dir, None):
        if source.path is None or source.earlier_stage or folder_kind(source.path, source.key) != HF:
            continue
        directory = open_hf_directory(source.path, source.key)
        modules = source.modules or tuple(m for m in directory.modules if m in MODULES and cfg.model[m] is not None)
        for module in modules:
            cls, config = build_component_config(module, cfg.model[module], registry)
            check_module(directory, module, cls, config, source.key)
