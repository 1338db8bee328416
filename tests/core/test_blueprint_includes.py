"""``include`` items in a blueprint's stages (`keye.config.include`): another blueprint's stages taken as written,
selected and overridden, expanded when the file is read; hostile or broken includes are one line naming the key."""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from keye import hookimpl
from keye.config import doc, load_blueprint, render_blueprint
from keye.errors import BlueprintError
from keye.testing.stubs import Stub

ROOT = Path(__file__).resolve().parents[2]


class ToyStage(Stub):
    @dataclass
    class Config:
        tag: str = doc("Free-form tag.", "")


class Plain(Stub):
    @dataclass
    class Config:
        pass


@pytest.fixture
def registry(keye_empty_host):
    module = types.ModuleType("toys")
    module.keye_register_stages = hookimpl(lambda register: register("toy_stage", ToyStage))
    module.keye_register_data_mixers = hookimpl(lambda register: register("weighted", Plain))
    module.keye_register_video_decoders = hookimpl(lambda register: register("decord", Plain))
    keye_empty_host.add_plugin(module, "toys", distribution="keye-toys", version="1.0")
    return keye_empty_host.registry


def stage(name: str, **extra) -> dict:
    return {"name": name, "kind": "toy_stage", **extra}


def write(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


@pytest.fixture
def parts(tmp_path) -> Path:
    """first.yaml (its stages set by its base, one a repeat group) and second.yaml (which includes first.yaml)."""
    write(tmp_path / "parts" / "base.yaml", {"run": {"name": "base"}, "stages": [
        stage("a", steps=1, options={"tag": "${run.output_dir}/a"}),
        {"repeat": 2, "stages": [stage("b", steps=2)]},
        stage("c", init_from="elsewhere/a")]})
    write(tmp_path / "parts" / "first.yaml", {"extends": ["base.yaml"], "run": {"name": "first", "seed": 99}})
    write(tmp_path / "parts" / "second.yaml", {"run": {"name": "second"}, "stages": [
        {"include": "first.yaml", "stages": ["a"]}, stage("d")]})
    return tmp_path


def test_included_stages_are_selected_overridden_and_resolve_in_the_including_run(parts, registry):
    top = write(parts / "top.yaml", {"run": {"name": "top", "output_dir": "out/top"}, "stages": [
        {"include": "parts/first.yaml", "stages": ["c", "b_r2", "b_r1"],
         "override": {"c": {"init_from": None, "options": {"tag": "x"}}}},
        {"include": "parts/second.yaml", "override": {"a": {"steps": 5}}},
        stage("e", steps=3)]})
    cfg = load_blueprint(top, ["stages.5.steps=7"], registry, validate=False)  # semantics: elsewhere
    stages = OmegaConf.to_container(cfg.stages)
    assert [s["name"] for s in stages] == ["c", "b_r2", "b_r1", "a", "d", "e"]
    assert [s["steps"] for s in stages] == [0, 2, 2, 5, 0, 7]  # overrides index the expanded list
    assert stages[0]["init_from"] is None and stages[0]["options"]["tag"] == "x"  # null replaces, mappings merge
    assert stages[3]["options"]["tag"] == "out/top/a"  # ${run.output_dir} of the including blueprint
    assert cfg.run.seed != 99 and cfg.run.name == "top"  # only the stages are taken


def test_print_config_shows_the_expanded_stages(parts, registry):
    top = write(parts / "top.yaml", {"run": {"name": "top"}, "stages": [{"include": "parts/second.yaml"}]})
    shown = render_blueprint(load_blueprint(top, [], registry, validate=False), registry)
    assert "- name: a" in shown and "- name: d" in shown and "include" not in shown


def _error(path: Path, registry) -> str:
    with pytest.raises(BlueprintError) as info:
        load_blueprint(path, [], registry)
    message = str(info.value)
    assert "\n" not in message and len(message) < 600
    return message


@pytest.mark.parametrize("item, expected", [
    ({"include": "parts/nowhere.yaml"}, "top.yaml: stages.1.include: 'parts/nowhere.yaml' not found"),
    ({"include": "parts"}, "top.yaml: stages.1.include: 'parts' not found, or not a regular file"),
    ({"include": "../outside.yaml"}, "top.yaml: stages.1.include: '../outside.yaml' must be relative to this file's folder"),
    ({"include": "/etc/passwd"}, "top.yaml: stages.1.include: '/etc/passwd' must be relative to this file's folder"),
    ({"include": "${run.name}"}, "top.yaml: stages.1.include: entries must be relative paths"),
    ({"include": 5}, "top.yaml: stages.1.include: entries must be relative paths, got 5"),
    ({"include": "parts/first.yaml", "stages": ["a", "zz"]},
     "top.yaml: stages.1.stages.1: 'zz' is not a stage of 'parts/first.yaml'; it has: a, b_r1, b_r2, c"),
    ({"include": "parts/first.yaml", "stages": "a"}, "top.yaml: stages.1.stages: expected a list of stage names"),
    ({"include": "parts/first.yaml", "stages": ["a"], "override": {"c": {"steps": 1}}},
     "top.yaml: stages.1.override.c: not a stage taken by this include; it takes: a"),
    ({"include": "parts/first.yaml", "override": {"a": 3}}, "top.yaml: stages.1.override.a: expected a mapping"),
    ({"include": "parts/first.yaml", "override": [1]}, "top.yaml: stages.1.override: expected {<stage name>:"),
    ({"include": "parts/first.yaml", "steps": 3}, "top.yaml: stages.1.steps: an include has only include, stages, override"),
    ({"include": "parts/empty.yaml"}, "top.yaml: stages.1.include: 'parts/empty.yaml' has no list of stages to include"),
    ({"include": "parts/broken.yaml"}, "broken.yaml: invalid YAML"),
    ({"include": "parts/hostile.yaml"}, "hostile.yaml: stages.0.options.tag: resolver 'python' is not allowed"),
])
def test_bad_includes_are_one_line_naming_the_key(parts, registry, item, expected):
    (parts / "outside.yaml").write_text("stages: [{name: x, kind: toy_stage}]\n")
    write(parts / "parts" / "empty.yaml", {"run": {"name": "no stages"}})
    (parts / "parts" / "broken.yaml").write_text("stages: [unclosed\n")
    write(parts / "parts" / "hostile.yaml", {"stages": [stage("h", options={"tag": "${python:x}"})]})
    top = write(parts / "top.yaml", {"stages": [stage("z"), item]})
    message = _error(top, registry)
    assert expected in message, message


def test_a_symlink_out_of_the_folder_is_refused(parts, registry):
    """The included file must resolve inside the including file's folder: a link out of it is refused (the
    symlinked folder above is the same case)."""
    (parts / "inner").mkdir()
    (parts / "inner" / "first.yaml").symlink_to(parts / "parts" / "first.yaml")
    top = write(parts / "inner" / "top.yaml", {"stages": [{"include": "first.yaml"}]})
    assert "top.yaml: stages.0.include: 'first.yaml' leaves this file's folder (a symlink?)" in _error(top, registry)


def test_cycles_are_one_line(parts, registry):
    a = write(parts / "a.yaml", {"stages": [stage("x"), {"include": "b.yaml"}]})
    b = write(parts / "b.yaml", {"stages": [{"include": "a.yaml"}]})
    assert _error(b, registry) == f"{a}: stages.1.include: cycle {b} -> {a} -> {b}"
    itself = write(parts / "self.yaml", {"stages": [{"include": "self.yaml"}]})
    assert _error(itself, registry) == f"{itself}: stages.0.include: cycle {itself} -> {itself}"


def test_the_tiny_recipe_takes_the_stages_of_the_tiny_blueprints():
    """recipe.yaml copies no stage: what it runs is pretrain.yaml's (but its final_eval), posttrain.yaml's (SFT from
    the recipe's own merge) and rl.yaml's (from the stage before), stage for stage. (Every shipped blueprint is
    validated by tests/test_blueprints_all.py; here only what the stages are.)"""
    tiny = ROOT / "blueprints" / "tiny"
    same_folder = ["run.output_dir=runs/tiny-recipe"]  # ${run.output_dir} resolves in the including blueprint
    recipe, pretrain, posttrain, rl = (
        OmegaConf.to_container(load_blueprint(tiny / f"{name}.yaml", same_folder, validate=False).stages)
        for name in ("recipe", "pretrain", "posttrain", "rl"))
    assert [s["name"] for s in pretrain][-1] == "final_eval"
    assert recipe[:7] == pretrain[:7]
    assert recipe[7]["init_from"] == "stage3_merge" and posttrain[0]["init_from"].startswith("runs/tiny-pretrain/")
    assert recipe[8:11] == posttrain[1:]
    assert recipe[11]["name"] == "rl" and recipe[11]["init_from"] is None and rl[0]["init_from"] is not None
    assert recipe[11]["loss"] == rl[0]["loss"] and recipe[11]["options"]["rewards"] == rl[0]["options"]["rewards"]
