"""``include``: another blueprint's stages, taken where they run instead of copied.

Why: ``extends:`` merges mappings but *replaces* lists, so a blueprint that runs the stages of several others
in a row (the whole recipe: pre-training, post-training, RL) had to copy them, and copies drift. An ``include``
item in a ``stages`` list stands for the stage list of another blueprint::

    stages:
      - include: pretrain.yaml
        stages: [stage0_vit, stage1_align, stage2_multitask]   # optional: these, in this order (default: all)
        override:                                              # optional: settings merged onto named stages
          stage2_multitask: {steps: 400}
      - include: posttrain.yaml
        override: {sft: {init_from: stage3_merge}}             # posttrain alone starts from another run's folder
      - {name: eval, kind: eval, ...}

What is taken is the included blueprint's stage list as it would run: the last file of its ``extends`` chain
that sets ``stages``, with its own includes and ``repeat`` groups expanded. Nothing else of it is taken (its
``run``, ``model``, ... are the including blueprint's business). Values are taken as written: YAML anchors are
expanded inside the included file, and ``${run.output_dir}`` in an included stage resolves in the including
blueprint, so its data paths point into the including run's own folder. ``override`` merges a mapping onto a
stage as written (mappings key by key, any other value replaces, ``null`` too: ``init_from: null`` = start
from the stage before, as any stage does), by the rule overrides follow everywhere (`keye.config.swap
.merge_nodes`): a component node given another ``name`` replaces the old node rather than keeping its keys.

The included file is named as ``extends:`` names a base (`keye.config.loader`): relative to the including
file's folder, without ``..``, no symlink out of it; a blueprint cannot reach a file outside where the user
pointed. A cycle, a missing file, a stage name the file does not have, a malformed item: one `BlueprintError`
line naming the including file and ``stages.N.<key>``. The expansion happens per file, before the layers merge
onto the schema, so overrides (``stages.N.…``), validation, ``print-config`` and the runner see plain stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from keye.config.swap import merge_nodes
from keye.config.validate import short
from keye.errors import BlueprintError

#: the keys of an include item
INCLUDE_KEYS = ("include", "stages", "override")


def is_include(item: Any) -> bool:
    return isinstance(item, dict) and "include" in item


def include_stages(item: dict, label: str, index: int, chain: tuple[Path, ...],
                   locate: Callable[[Any, str], Path], read: Callable[[Path, tuple[Path, ...]], Any]) -> list[dict]:
    """The stages the include item ``stages[index]`` of the file ``label`` stands for, selected and overridden.

    ``chain``: the files being read, the including one last (for cycles); ``locate(name, key)``: the included
    file's path (refusing one that leaves the folder, naming ``key``); ``read(path, chain)``: that file's stage
    list as it would run (None when it sets none).
    """
    where = f"{label}: stages.{index}"
    extra = sorted(set(item) - set(INCLUDE_KEYS))
    if extra:
        raise BlueprintError(f"{where}.{extra[0]}: an include has only {', '.join(INCLUDE_KEYS)} "
                             "(put stage settings under override: {<stage name>: {...}})")
    name = item["include"]
    target = locate(name, f"stages.{index}.include")
    if target in chain:
        cycle = " -> ".join(str(p) for p in (*chain, target))
        raise BlueprintError(f"{where}.include: cycle {cycle}")
    try:
        found = target.is_file()
    except OSError as exc:  # a name too long, ...
        raise BlueprintError(f"{where}.include: '{short(name)}': {exc.strerror or exc}") from None
    if not found:
        raise BlueprintError(f"{where}.include: '{short(name)}' not found, or not a regular file ({short(target)})")
    stages = read(target, chain)
    if not isinstance(stages, list) or not stages:
        raise BlueprintError(f"{where}.include: '{short(name)}' has no list of stages to include")
    by_name = {stage["name"]: stage for stage in stages
               if isinstance(stage, dict) and isinstance(stage.get("name"), str)}
    taken = _select(item.get("stages"), by_name, stages, where, name)
    return _override(taken, item.get("override"), where)


def _select(wanted: Any, by_name: dict, stages: list, where: str, name: str) -> list[dict]:
    if wanted is None:
        return [dict(stage) if isinstance(stage, dict) else stage for stage in stages]
    if not isinstance(wanted, list) or not wanted or not all(isinstance(w, str) for w in wanted):
        raise BlueprintError(f"{where}.stages: expected a list of stage names of '{short(name)}', got {short(wanted)}")
    for index, stage_name in enumerate(wanted):
        if stage_name not in by_name:
            known = ", ".join(str(k) for k in by_name)
            raise BlueprintError(f"{where}.stages.{index}: '{short(stage_name)}' is not a stage of "
                                 f"'{short(name)}'; it has: {short(known)}")
    return [dict(by_name[stage_name]) for stage_name in wanted]


def _override(taken: list[dict], override: Any, where: str) -> list[dict]:
    if override is None:
        return taken
    if not isinstance(override, dict):
        raise BlueprintError(f"{where}.override: expected {{<stage name>: {{<key>: <value>}}}}, got {short(override)}")
    names = [stage["name"] for stage in taken if isinstance(stage, dict) and isinstance(stage.get("name"), str)]
    for stage_name, settings in override.items():
        if stage_name not in names:
            raise BlueprintError(f"{where}.override.{short(stage_name)}: not a stage taken by this include; "
                                 f"it takes: {short(', '.join(str(n) for n in names))}")
        if not isinstance(settings, dict):
            raise BlueprintError(f"{where}.override.{short(stage_name)}: expected a mapping of stage settings, "
                                 f"got {short(settings)}")
    return [merge_nodes(stage, override[stage["name"]]) if isinstance(stage, dict) and stage.get("name") in names
            and stage["name"] in override else stage for stage in taken]

