"""Blueprint loading: extends chains, overrides, schema and per-component validation, print-config."""

import types
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import pytest
import yaml
from omegaconf import MISSING, OmegaConf

from keye import hookimpl
from keye.config import component, doc, load_blueprint, render_blueprint
from keye.errors import BlueprintError
from keye.testing.stubs import Stub


class ToyEncoder(Stub):
    @dataclass
    class Config:
        width: int = doc("Feature width.", 16)
        depth: int = doc("Layers.", 2)
        rope: Dict[str, Any] = component("position_encoding", "Rotary scheme.", {"name": "toy_rope"})


class ToyRope(Stub):
    @dataclass
    class Config:
        theta: float = doc("Base.", 10000.0)


class ToyProjector(Stub):
    @dataclass
    class Config:
        out_dim: int = doc("Output width (required).", MISSING)
        act: str = doc("Activation.", "gelu")


class ToyStage(Stub):
    @dataclass
    class Config:
        eval_every: int = doc("Evaluate every N steps.", 0)
        tags: List[str] = doc("Free-form tags.", default_factory=list)


class Plain(Stub):
    @dataclass
    class Config:
        path: Optional[str] = None


def _plugin():
    module = types.ModuleType("toys")
    module.keye_register_vision_encoders = hookimpl(lambda register: register("toy_vit", ToyEncoder))
    module.keye_register_position_encodings = hookimpl(lambda register: register("toy_rope", ToyRope))
    module.keye_register_projectors = hookimpl(lambda register: register("toy_proj", ToyProjector))
    module.keye_register_stages = hookimpl(lambda register: register("toy_stage", ToyStage))
    module.keye_register_data_mixers = hookimpl(lambda register: register("weighted", Plain))
    module.keye_register_video_decoders = hookimpl(lambda register: register("decord", Plain))
    module.keye_register_data_sources = hookimpl(lambda register: register("files", Plain))
    return module


@pytest.fixture
def registry(keye_empty_host):
    keye_empty_host.add_plugin(_plugin(), "toys", distribution="keye-toys", version="1.0")
    return keye_empty_host.registry


BASE = {
    "run": {"name": "base", "seed": 7},
    "model": {"vision_encoder": {"name": "toy_vit", "width": 32}, "projector": {"name": "toy_proj", "out_dim": 8}},
    "stages": [{"name": "align", "kind": "toy_stage", "train": ["projector"], "steps": 10}],
}


def test_extends_chain_with_relative_paths_and_later_wins(blueprint_file, registry):
    blueprint_file(BASE, "bases/base.yaml")
    blueprint_file({"extends": ["base.yaml"], "run": {"seed": 8}}, "bases/mid.yaml")
    top = blueprint_file(
        {"extends": "bases/mid.yaml", "run": {"name": "top"}, "model": {"vision_encoder": {"name": "toy_vit", "depth": 3}}},
        "top.yaml",
    )
    cfg = load_blueprint(top, [], registry)
    assert (cfg.run.name, cfg.run.seed) == ("top", 8)
    assert cfg.run.output_dir == "runs/top"  # interpolation resolved after the merge
    assert cfg.model.vision_encoder == {"name": "toy_vit", "width": 32, "depth": 3, "rope": {"name": "toy_rope", "theta": 10000.0}}
    assert cfg.stages[0].optimizer.lr == 1e-4  # schema defaults filled in
    assert OmegaConf.is_readonly(cfg)


def test_dotted_overrides_reach_lists_and_components(blueprint_file, registry):
    path = blueprint_file(BASE)
    cfg = load_blueprint(path, ["stages.0.steps=3", "model.projector.act=silu", "stages.0.options.tags=[a,b]"], registry)
    assert cfg.stages[0].steps == 3
    assert cfg.model.projector.act == "silu"
    assert list(cfg.stages[0].options.tags) == ["a", "b"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.vision_encoder.widht=3", "override 'model.vision_encoder.widht=3': model.vision_encoder.widht: unknown key for vision_encoder 'toy_vit'; known: width, depth, rope"),
        ("model.vision_encoder.width=wide", "override 'model.vision_encoder.width=wide': model.vision_encoder.width: Value 'wide' of type 'str' could not be converted to Integer (vision_encoder 'toy_vit')"),
        ("model.vision_encoder.name=sigclip", "override 'model.vision_encoder.name=sigclip': model.vision_encoder.name: unknown vision_encoder 'sigclip'; known: toy_vit"),
        ("run.sede=1", "override 'run.sede=1': run.sede: Key 'sede' not in 'RunConfig'"),
        ("stages.0.steps=many", "override 'stages.0.steps=many': stages.0.steps: Value 'many' of type 'str' could not be converted to Integer"),
        ("model.vision_encoder.rope.thetta=2", "model.vision_encoder.rope.thetta: unknown key for position_encoding 'toy_rope'; known: theta"),
        ("stages.0.options.every=2", "stages.0.options.every: unknown key for stage 'toy_stage'; known: eval_every, tags"),
        ("stages.0.kind=nope", "stages.0.kind: unknown stage 'nope'; known: toy_stage"),
        ("stages.0.train=[text_encoder]", "stages.0.train: 'text_encoder' is not set in model"),
        ("stages.0.train=[vit]", "stages.0.train: unknown module 'vit'; known: vision_encoder, projector, language_model, text_encoder"),
        ("justakey", "override 'justakey': expected KEY=VALUE"),
        ("precision.dtype=fp16", "override 'precision.dtype=fp16': precision.dtype: 'fp16' is not one of fp32, bf16"),
    ],
)
def test_bad_overrides_give_one_line_naming_the_key(blueprint_file, registry, override, message):
    path = blueprint_file(BASE)
    with pytest.raises(BlueprintError) as info:
        load_blueprint(path, [override], registry)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_errors_name_the_file_that_set_the_key(blueprint_file, registry):
    base = dict(BASE, model={"vision_encoder": {"name": "toy_vit", "colour": "red"}})
    blueprint_file(base, "base.yaml")
    top = blueprint_file({"extends": ["base.yaml"], "run": {"name": "x"}}, "top.yaml")
    with pytest.raises(BlueprintError) as info:
        load_blueprint(top, [], registry)
    assert str(info.value) == (
        f"{top.parent / 'base.yaml'}: model.vision_encoder.colour: unknown key for vision_encoder 'toy_vit'; "
        "known: width, depth, rope"
    )


def test_missing_required_values(blueprint_file, registry):
    bp = dict(BASE, model={"projector": {"name": "toy_proj"}})
    with pytest.raises(BlueprintError, match="model.projector.out_dim: missing required value for projector 'toy_proj'"):
        load_blueprint(blueprint_file(bp), [], registry)
    bp = dict(BASE, stages=[{"kind": "toy_stage"}])
    with pytest.raises(BlueprintError, match="stages.0.name: missing required value"):
        load_blueprint(blueprint_file(bp), [], registry)


def test_component_node_without_name(blueprint_file, registry):
    bp = dict(BASE, model={"projector": {"out_dim": 3}})
    with pytest.raises(BlueprintError, match="model.projector: expected a projector node with a 'name' key; known: toy_proj"):
        load_blueprint(blueprint_file(bp), [], registry)


def test_duplicate_stage_names(blueprint_file, registry):
    stage = BASE["stages"][0]
    with pytest.raises(BlueprintError, match="stages.1.name: stage name 'align' is used twice"):
        load_blueprint(blueprint_file(dict(BASE, stages=[stage, stage])), [], registry)


def test_extends_cycle_and_missing_base(blueprint_file, registry):
    blueprint_file({"extends": ["b.yaml"]}, "a.yaml")
    b = blueprint_file({"extends": ["a.yaml"]}, "b.yaml")
    with pytest.raises(BlueprintError, match="extends: cycle"):
        load_blueprint(b, [], registry)
    c = blueprint_file({"extends": ["nowhere.yaml"]}, "c.yaml")
    with pytest.raises(BlueprintError, match="blueprint not found: .*nowhere.yaml \\(extended by .*c.yaml\\)"):
        load_blueprint(c, [], registry)


def test_invalid_yaml_names_the_file(tmp_path, registry):
    path = tmp_path / "broken.yaml"
    path.write_text("run: {name: [unclosed\n")
    with pytest.raises(BlueprintError, match="broken.yaml: invalid YAML"):
        load_blueprint(path, [], registry)


def test_print_config_is_a_commented_blueprint_that_loads_back(blueprint_file, registry, tmp_path):
    cfg = load_blueprint(blueprint_file(BASE), ["stages.0.options.tags=[x]"], registry)
    text = render_blueprint(cfg, registry)
    assert "# Feature width.\n    width: 32" in text
    assert "# vision_encoder registered by keye-toys 1.0 (plugin toys)" in text
    assert "# Evaluate every N steps." in text  # the stage kind's own docs inside options
    assert "# Peak learning rate." in text
    again = tmp_path / "again.yaml"
    again.write_text(text)
    reloaded = load_blueprint(again, [], registry)
    assert OmegaConf.to_container(reloaded) == OmegaConf.to_container(cfg)
    assert yaml.safe_load(text)["stages"][0]["name"] == "align"


# --- files that are not blueprints, and what extends: may name (issue 10, item 8) ---------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xff\xfe\x00\x01binary", "not UTF-8 text (byte 0xff at offset 0); blueprints are UTF-8 YAML"),
        ("run: {name: x}\n".encode("utf-16"), "not UTF-8 text (byte 0xff at offset 0)"),
        (b"", "the file is empty (no settings)"),
        (b"# only a comment\n", "the file is empty (no settings)"),
        (b"- a\n- b\n", "a blueprint must be a mapping at the top level"),
        (b"42\n", "a blueprint must be a mapping at the top level"),
        (b"run:\n  name: [x\n", "invalid YAML at line 3"),
        (b"stages:\n  a: {name: x, kind: toy_stage}\n", "stages: expected a list of stages (- name: ..., kind: ...), got a mapping"),
        (b"stages: [{name: a, kind: toy_stage}, 5]\n", "stages.1: expected a stage (name: ..., kind: ...), got 5"),
        (b"run: [1]\n", "run: Merge error: list is not a subclass of RunConfig"),
        (b"run: {name: '${nope.x}'}\n", "run.name: Interpolation key 'nope.x' not found"),
    ],
)
def test_files_that_are_not_blueprints_give_one_line(tmp_path, registry, content, message):
    path = tmp_path / "bp.yaml"
    path.write_bytes(content)
    with pytest.raises(BlueprintError) as info:
        load_blueprint(path, [], registry)
    assert str(info.value).startswith(f"{path}: ") or str(info.value).startswith("bp.yaml")
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"name": "a", "kind": "toy_stage", "steps": "many"}, "stages.1.steps: Value 'many' of type 'str' could not be converted"),
        ({"name": "a", "kind": "toy_stage", "stepz": 1}, "stages.1.stepz: Key 'stepz' not in 'StageConfig'"),
        ({"name": "a", "kind": "toy_stage", "optimizer": {"lr": "fast"}}, "stages.1.optimizer.lr: Value 'fast'"),
        ({"name": "a", "kind": "toy_stage", "data": {"sources": 3}}, "stages.1.data.sources: Cannot assign int"),
    ],
)
def test_errors_inside_list_items_keep_the_stage_prefix(blueprint_file, registry, stage, message):
    path = blueprint_file(dict(BASE, stages=[BASE["stages"][0], stage]))
    with pytest.raises(BlueprintError) as info:
        load_blueprint(path, [], registry)
    assert str(info.value) == f"{path}: {message}" or message in str(info.value)
    assert str(info.value).startswith(str(path))


def test_an_override_with_a_word_for_a_list_index(blueprint_file, registry):
    with pytest.raises(BlueprintError, match=r"^override 'stages.x.steps=1': stages.x.steps: Index 'x' \(str\) is not an int"):
        load_blueprint(blueprint_file(BASE), ["stages.x.steps=1"], registry)


@pytest.mark.parametrize("base", ["/etc/passwd", "../outside.yaml", "sub/../../outside.yaml"])
def test_extends_stays_in_the_blueprints_folder(tmp_path, registry, base):
    (tmp_path / "outside.yaml").write_text("run: {seed: 1}\n")
    top = write_in(tmp_path / "inner" / "top.yaml", {"extends": [base]})
    with pytest.raises(BlueprintError) as info:
        load_blueprint(top, [], registry)
    assert str(info.value) == (
        f"{top}: extends: '{base}' must be relative to this file's folder, without '..' "
        "(keep bases beside the blueprint or below it)"
    )


@pytest.mark.parametrize("base", ["${run.name}", "???", 5, ""])
def test_extends_names_files_as_written(tmp_path, registry, base):
    top = write_in(tmp_path / "top.yaml", {"extends": [base], "run": {"name": "base.yaml"}})
    with pytest.raises(BlueprintError, match=r"top.yaml: extends: entries must be relative paths, got"):
        load_blueprint(top, [], registry)


def test_extends_through_a_symlink_out_of_the_folder_is_refused(tmp_path, registry):
    (tmp_path / "outside.yaml").write_text("run: {seed: 1}\n")
    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "base.yaml").symlink_to(tmp_path / "outside.yaml")
    top = write_in(tmp_path / "inner" / "top.yaml", {"extends": ["base.yaml"]})
    with pytest.raises(BlueprintError, match="extends: 'base.yaml' leaves this file's folder"):
        load_blueprint(top, [], registry)


def test_a_bad_base_is_named_not_echoed(tmp_path, registry):
    """A base that is some other text file, or a name too long, is named; its contents are not echoed."""
    secret = "root:x:0:0:" + "y" * 5000
    (tmp_path / "notes.yaml").write_text(f"{secret}\n{secret}\n")
    top = write_in(tmp_path / "top.yaml", {"extends": ["notes.yaml"]})
    with pytest.raises(BlueprintError) as info:
        load_blueprint(top, [], registry)
    assert str(info.value).startswith(f"{tmp_path / 'notes.yaml'}: ")
    assert len(str(info.value)) < 600  # a key or value is quoted cut short, never the file
    top = write_in(tmp_path / "top.yaml", {"extends": ["x" * 400]})
    with pytest.raises(BlueprintError) as info:
        load_blueprint(top, [], registry)
    assert len(str(info.value)) < 300 and "File name too long" in str(info.value)


def test_special_files_are_refused_without_reading_them(tmp_path, registry):
    import os

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # reading it would block forever
    top = write_in(tmp_path / "top.yaml", {"extends": ["fifo.yaml"]})
    with pytest.raises(BlueprintError, match="fifo.yaml: not a regular file"):
        load_blueprint(top, [], registry)
    with pytest.raises(BlueprintError, match="^/dev/zero: not a regular file"):
        load_blueprint("/dev/zero", [], registry)


def write_in(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content))
    return path
