"""Fuzzing ``keye-launch validate`` with mutations of the shipped blueprints.

Each case copies one shipped blueprint folder, mutates one file (a key deleted, a value of the wrong
type, a negative / huge / nan number, an unknown name, a list where a mapping belongs, garbage bytes,
a hostile ``extends:`` or resolver, ...) and runs the CLI's ``main(["validate", ...])`` in this process.
Whatever the mutation, the outcome is exit 0 with an ``ok:`` line, or exit 2 with exactly one
``keye-launch: error:`` line and no traceback; an exception escaping ``main`` fails the test with the
case that caused it. Mutations that keep the blueprint valid (a new seed, another positive step count)
must still exit 0. Seeded: a failure names its case, and the same seed gives the same cases.
"""

from __future__ import annotations

import copy
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from keye.launch.cli import main

ROOT = Path(__file__).resolve().parents[2]
#: The blueprints with stages (the bases are mutated through them: a mutated base breaks its children).
TARGETS = ["tiny/pretrain.yaml", "tiny/base.yaml", "tiny/posttrain.yaml", "keye-vl-8b/pretrain.yaml",
           "keye-vl-8b/stage0_vit.yaml", "keye-vl-8b/posttrain.yaml", "tiny/recipe.yaml", "keye-vl-8b/recipe.yaml"]
#: 0.2-0.5 s each (OmegaConf's merging dominates; the recipes are the big ones); KEYE_FUZZ_CASES=5000 runs a
#: longer campaign at will.
CASES = int(os.environ.get("KEYE_FUZZ_CASES", "100"))
SEED = int(os.environ.get("KEYE_FUZZ_SEED", "20261205"))

WRONG_VALUES: list[Any] = [
    -1, 0, -(10**12), 10**12, 2**63, 1.5, math.nan, math.inf, -math.inf, 1e308, True, None, "",
    "garbage", "${nope.missing}", "${oc.decode:'[1]'}", "${python:__import__('os').system('true')}",
    [], [1, 2], [[1]], {}, {"x": 1}, {"name": "nonexistent_component"}, "pipe:touch /tmp/keye-fuzz-marker",
    "\x00\x01binary", "é" * 300,
]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a plain YAML tree (dict keys and list indices)."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append((*prefix, key))
            out.extend(_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out.append((*prefix, index))
            out.extend(_paths(value, (*prefix, index)))
    return out


def _parent(tree: Any, path: tuple) -> Any:
    for part in path[:-1]:
        tree = tree[part]
    return tree


def _delete(rng: random.Random, tree: dict) -> str:
    path = rng.choice(_paths(tree))
    parent = _parent(tree, path)
    del parent[path[-1]]
    return f"delete {'.'.join(map(str, path))}"


def _set(rng: random.Random, tree: dict) -> str:
    path = rng.choice(_paths(tree))
    value = rng.choice(WRONG_VALUES)
    _parent(tree, path)[path[-1]] = copy.deepcopy(value)
    return f"set {'.'.join(map(str, path))} = {value!r}"[:200]


def _rename(rng: random.Random, tree: dict) -> str:
    names = [p for p in _paths(tree) if p[-1] in ("name", "kind", "size", "act", "balance")]
    if not names:
        return _set(rng, tree)
    path = rng.choice(names)
    _parent(tree, path)[path[-1]] = "nonexistent_xyz"
    return f"rename {'.'.join(map(str, path))}"


def _unknown_key(rng: random.Random, tree: dict) -> str:
    dicts = [()] + [p for p in _paths(tree) if isinstance(_parent(tree, p)[p[-1]], dict)]
    path = rng.choice(dicts)
    node = _parent(tree, (*path, None))
    node["bogus_key"] = 1
    return f"unknown key under {'.'.join(map(str, path)) or '(top level)'}"


def _reshape(rng: random.Random, tree: dict) -> str:
    """A list where a mapping belongs, a mapping where a list belongs, a scalar where either belongs."""
    containers = [p for p in _paths(tree) if isinstance(_parent(tree, p)[p[-1]], (dict, list))]
    path = rng.choice(containers)
    parent, key = _parent(tree, path), path[-1]
    value = parent[key]
    parent[key] = (list(value.values()) if isinstance(value, dict) else {str(i): v for i, v in enumerate(value)}) \
        if rng.random() < 0.7 else 7
    return f"reshape {'.'.join(map(str, path))}"


def _extends(rng: random.Random, tree: dict) -> str:
    target = rng.choice(["/etc/passwd", "../base.yaml", "../../README.md", "nowhere.yaml", 5, ["base.yaml", None],
                         "x" * 400, ".", "???", "${run.name}", {"a": 1}, ["base.yaml", "base.yaml"]])
    tree["extends"] = target
    return f"extends = {target!r}"[:120]


def _numbers(rng: random.Random, tree: dict) -> str:
    numeric = [p for p in _paths(tree) if isinstance(_parent(tree, p)[p[-1]], (int, float))
               and not isinstance(_parent(tree, p)[p[-1]], bool)]
    if not numeric:
        return _set(rng, tree)
    path = rng.choice(numeric)
    value = rng.choice([-1, -0.5, 0, 10**15, math.nan, math.inf, -math.inf])
    _parent(tree, path)[path[-1]] = value
    return f"number {'.'.join(map(str, path))} = {value!r}"


MUTATIONS: list[Callable[[random.Random, dict], str]] = [_delete, _set, _rename, _unknown_key, _reshape, _extends, _numbers]


def _garbage(rng: random.Random, text: str) -> tuple[bytes, str]:
    data = text.encode()
    kind = rng.choice(["truncate", "bytes", "utf16", "random"])
    if kind == "truncate":
        return data[: rng.randrange(len(data))], "truncated"
    if kind == "bytes":
        at = rng.randrange(len(data))
        return data[:at] + bytes(rng.randrange(256) for _ in range(4)) + data[at:], "garbage bytes"
    if kind == "utf16":
        return text.encode("utf-16"), "utf-16"
    return bytes(rng.randrange(256) for _ in range(200)), "random bytes"


def _cases(count: int, seed: int) -> list[tuple[str, Any]]:
    """(target, mutation index) pairs; built lazily in the test so a failure reproduces from its id."""
    rng = random.Random(seed)
    return [(rng.choice(TARGETS), rng.randrange(10**9)) for _ in range(count)]


def _run_validate(capsys, path: Path, description: str) -> tuple[int, list[str], str]:
    try:
        code = main(["validate", str(path)])
    except BaseException as exc:  # noqa: BLE001 - anything escaping main is the bug this test looks for
        pytest.fail(f"{description}: {type(exc).__name__} escaped keye-launch validate: {exc}")
    out, err = capsys.readouterr()
    return code, [line for line in err.splitlines() if line.strip()], out


@pytest.fixture(scope="module")
def originals() -> dict[str, str]:
    return {target: (ROOT / "blueprints" / target).read_text() for target in TARGETS}


def test_mutated_blueprints_exit_0_or_one_line_with_exit_2(tmp_path, capsys, originals):
    marker = Path("/tmp/keye-fuzz-marker")
    marker.unlink(missing_ok=True)
    outcomes = {0: 0, 2: 0}
    for folder in {Path(target).parent for target in TARGETS}:  # each case writes one file beside the bases
        shutil.copytree(ROOT / "blueprints" / folder, tmp_path / folder)
    for number, (target, case_seed) in enumerate(_cases(CASES, SEED)):
        rng = random.Random(case_seed)
        path = tmp_path / Path(target).parent / f"case{number}.yaml"
        if rng.random() < 0.1:
            data, what = _garbage(rng, originals[target])
            path.write_bytes(data)
        else:
            tree = yaml.safe_load(originals[target])
            what = rng.choice(MUTATIONS)(rng, tree)
            path.write_text(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))
        description = f"case {number} ({target}, seed {case_seed}): {what}"
        code, lines, out = _run_validate(capsys, path, description)
        assert code in (0, 2), f"{description}: exit {code}"
        if code == 2:
            assert len(lines) == 1 and lines[0].startswith("keye-launch: error: "), f"{description}: {lines}"
            assert "Traceback" not in lines[0]
            assert len(lines[0]) < 1000, f"{description}: a {len(lines[0])}-character error line"
        else:
            assert not lines and out.startswith("ok: "), f"{description}: {lines} {out!r}"
        outcomes[code] += 1
    assert not marker.exists(), "a pipe: URL ran a shell command during validate"
    assert outcomes[2] > CASES // 2, outcomes  # most mutations break a blueprint; all of them were caught cleanly


VALID_EDITS: list[tuple[str, Callable[[dict], None]]] = [
    ("new seed", lambda bp: bp.setdefault("run", {}).update(seed=99)),
    ("fewer steps", lambda bp: bp["stages"][0].update(steps=3)),
    ("another lr", lambda bp: bp["stages"][0].setdefault("optimizer", {}).update(lr=2.0e-4)),
    ("no warmup", lambda bp: bp["stages"][0].setdefault("schedule", {}).update(warmup_steps=0)),
    ("constant schedule", lambda bp: bp["stages"][0].setdefault("schedule", {}).update(kind="constant")),
    ("checkpoint every 10", lambda bp: bp.setdefault("run", {}).update(checkpoint_every=10)),
    ("drop the last stage", lambda bp: bp["stages"].pop()),
]


@pytest.mark.parametrize("edit", VALID_EDITS, ids=[name for name, _ in VALID_EDITS])
@pytest.mark.parametrize("target", ["tiny/pretrain.yaml", "keye-vl-8b/stage0_vit.yaml"])
def test_mutations_that_keep_a_blueprint_valid_exit_0(tmp_path, capsys, originals, target, edit):
    name, change = edit
    shutil.copytree(ROOT / "blueprints" / Path(target).parent, tmp_path / "bp")
    path = tmp_path / "bp" / Path(target).name
    tree = yaml.safe_load(originals[target])
    change(tree)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    code, lines, out = _run_validate(capsys, path, name)
    assert (code, lines) == (0, []), f"{name}: {lines}"
    assert out.startswith(f"ok: {path}")
