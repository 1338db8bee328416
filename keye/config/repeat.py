"""``repeat``: a group of stages run K times in a row (iterative alignment), expanded when a file is read.

Why: Keye-VL's iterative alignment repeats [rejection sampling → MPO] several rounds, each round sampling from
the last round's model. Writing the rounds out by hand copies the same stages K times with names and paths
that differ by one digit; a group says it once::

    stages:
      - {name: rl, kind: rl, ...}
      - repeat: 2
        stages:
          - {name: rs, kind: rejection_sampling, ...}
          - name: mpo
            kind: preference
            data: {sources: {pairs: {name: jsonl, path: "${run.output_dir}/rs_r{round}/pairs.jsonl"}}}

becomes ``rs_r1, mpo_r1, rs_r2, mpo_r2``. Within round k (from 1):

- a stage's name gets ``_r<k>`` appended (or, when it holds ``{round}``, that is replaced by k);
- ``{round}`` in any string value of the group's stages is replaced by k (data paths of the round);
- ``init_from`` (or, per module, its mapping's values) and string values directly under ``options`` that name a
  stage of the group are rewritten to that stage of the same round (``options.stage: rs`` → ``rs_r2`` in round 2).

Nothing else changes: each round starts from the stage before it as any stage does (round 1 from the stage
before the group, round k from round k − 1's last stage), so the rounds chain. The expansion happens per
file, before the layers merge onto the schema, so everything downstream (overrides ``stages.N.…``,
validation, ``print-config``, the runner) sees plain stages; an error inside a round names the expanded stage
(``stages.N`` of the list print-config shows). A malformed group is one `BlueprintError` line naming the file
and ``stages.N``. Groups do not nest (the placeholder would be ambiguous).
"""

from __future__ import annotations

from typing import Any

from keye.config.validate import short
from keye.errors import BlueprintError

ROUND = "{round}"
#: the keys of a group item
GROUP_KEYS = ("repeat", "stages")


def is_group(item: Any) -> bool:
    return isinstance(item, dict) and "repeat" in item


def expand_stages(stages: list, label: str) -> list:
    """``stages`` (plain containers, as written) with every group replaced by its rounds."""
    expanded: list = []
    for index, item in enumerate(stages):
        expanded.extend(expand_group(item, f"{label}: stages.{index}") if is_group(item) else [item])
    return expanded


def expand_group(item: dict, where: str) -> list:
    """The rounds of one group; ``where`` (``"<file>: stages.N"``) names it in errors."""
    extra = sorted(set(item) - set(GROUP_KEYS))
    if extra:
        raise BlueprintError(f"{where}.{extra[0]}: a repeat group has only 'repeat' and 'stages' "
                             "(put stage settings inside its stages)")
    rounds, inner = item["repeat"], item.get("stages")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= 1000:
        raise BlueprintError(f"{where}.repeat: expected a number of rounds from 1 to 1000, got {short(rounds)}")
    if not isinstance(inner, list) or not inner:
        raise BlueprintError(f"{where}.stages: expected a non-empty list of stages to repeat, got {short(inner)}")
    names = []
    for j, stage in enumerate(inner):
        if is_group(stage):
            raise BlueprintError(f"{where}.stages.{j}: repeat groups do not nest")
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str) or not stage["name"]:
            raise BlueprintError(f"{where}.stages.{j}: expected a stage with a name (name: ..., kind: ...), "
                                 f"got {short(stage)}")
        names.append(stage["name"])
    expanded = []
    for k in range(1, rounds + 1):
        renamed = {name: round_name(name, k) for name in names}
        expanded.extend(_round_stage(stage, k, renamed) for stage in inner)
    return expanded


def round_name(name: str, k: int) -> str:
    """A group stage's name in round ``k``."""
    return name.replace(ROUND, str(k)) if ROUND in name else f"{name}_r{k}"


def _round_stage(stage: dict, k: int, renamed: dict[str, str]) -> dict:
    out = _substitute(stage, str(k))
    out["name"] = renamed[stage["name"]]
    init_from = stage.get("init_from")
    if isinstance(init_from, str) and init_from in renamed:
        out["init_from"] = renamed[init_from]
    if isinstance(init_from, dict):  # per module (keye.train.init_plan)
        for module, value in init_from.items():
            if isinstance(value, str) and value in renamed:
                out["init_from"][module] = renamed[value]
    options = out.get("options")
    if isinstance(options, dict):
        raw = stage["options"]
        for key, value in raw.items():
            if isinstance(value, str) and value in renamed:
                options[key] = renamed[value]
    return out


def _substitute(node: Any, k: str) -> Any:
    """A deep copy of ``node`` with ``{round}`` replaced by ``k`` in every string."""
    if isinstance(node, dict):
        return {key: _substitute(value, k) for key, value in node.items()}
    if isinstance(node, list):
        return [_substitute(value, k) for value in node]
    if isinstance(node, str):
        return node.replace(ROUND, k)
    return node
