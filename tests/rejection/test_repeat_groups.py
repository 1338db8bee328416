"""``repeat`` groups in a blueprint (`keye.config.repeat`): expanded into rounds when the file is read, so
validation, overrides and print-config see plain stages; malformed groups are one line naming the key."""

from __future__ import annotations

import pytest

from keye.config import load_blueprint
from keye.errors import BlueprintError
from keye.testing import write_blueprint

MODEL = {"vision_encoder": {"name": "siglip_navit", "size": "tiny"},
         "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
         "language_model": {"name": "qwen3", "size": "tiny"}}
LM = {"kind": "lm", "steps": 1, "train": ["projector"], "data": {"sources": {"qa": {"name": "synthetic"}}}}


def group(rounds=2, **extra) -> dict:
    return {"repeat": rounds, **extra, "stages": [
        {"name": "look", "kind": "eval", "options": {"stage": "more", "synthetic_tasks": ["count"]}},
        {"name": "more", **LM, "init_from": "first",
         "data": {"sources": {"qa": {"name": "jsonl", "path": "${run.output_dir}/look_r{round}/x.jsonl"}}}},
        {"name": "tag_{round}_end", **LM},
    ]}


def blueprint(tmp_path, *stages) -> dict:
    return {"run": {"name": "x", "output_dir": str(tmp_path / "run")}, "model": MODEL,
            "stages": [{"name": "first", **LM}, {"name": "more", **LM}, *stages]}


def test_rounds_are_expanded_with_names_references_and_paths(tmp_path, keye_registry):
    spec = group(3)
    spec["stages"][0]["options"]["stage"] = "first"  # a stage outside the group: left as written
    path = write_blueprint(tmp_path / "bp.yaml", blueprint(tmp_path, spec, {"name": "last", **LM}))
    cfg = load_blueprint(path, ["stages.4.steps=7"], keye_registry)
    names = [stage.name for stage in cfg.stages]
    assert names == ["first", "more", "look_r1", "more_r1", "tag_1_end", "look_r2", "more_r2", "tag_2_end",
                     "look_r3", "more_r3", "tag_3_end", "last"]
    assert [cfg.stages[i].data.sources.qa.path for i in (3, 6, 9)] == [
        str(tmp_path / "run" / f"look_r{k}" / "x.jsonl") for k in (1, 2, 3)]
    assert {cfg.stages[i].init_from for i in (3, 6, 9)} == {"first"}  # outside the group: unchanged
    assert cfg.stages[4].steps == 7  # overrides index the expanded list
    assert cfg.stages[2].options.stage == "first"


def test_references_inside_the_group_follow_the_round(tmp_path, keye_registry):
    spec = {"repeat": 2, "stages": [
        {"name": "a", **LM},
        {"name": "b", **LM, "init_from": "a"},
        {"name": "look", "kind": "eval", "options": {"stage": "a", "synthetic_tasks": ["count"]}},
    ]}
    cfg = load_blueprint(write_blueprint(tmp_path / "bp.yaml", blueprint(tmp_path, spec)), [], keye_registry)
    by_name = {stage.name: stage for stage in cfg.stages}
    assert by_name["b_r1"].init_from == "a_r1" and by_name["b_r2"].init_from == "a_r2"
    assert by_name["look_r1"].options.stage == "a_r1" and by_name["look_r2"].options.stage == "a_r2"


@pytest.mark.parametrize("spec,message", [
    ({"repeat": 0, "stages": [{"name": "a", **LM}]}, "stages.2.repeat: expected a number of rounds from 1 to 1000, got 0"),
    ({"repeat": True, "stages": [{"name": "a", **LM}]}, "stages.2.repeat: expected a number of rounds"),
    ({"repeat": 2, "stages": []}, "stages.2.stages: expected a non-empty list of stages to repeat"),
    ({"repeat": 2, "stages": [{"name": "a", **LM}], "steps": 3}, "stages.2.steps: a repeat group has only"),
    ({"repeat": 2, "stages": [{"repeat": 2, "stages": [{"name": "a", **LM}]}]}, "stages.2.stages.0: repeat groups do not nest"),
    ({"repeat": 2, "stages": [{"kind": "lm"}]}, "stages.2.stages.0: expected a stage with a name"),
])
def test_malformed_groups_are_one_line(tmp_path, keye_registry, spec, message):
    path = write_blueprint(tmp_path / "bp.yaml", blueprint(tmp_path, spec))
    with pytest.raises(BlueprintError) as error:
        load_blueprint(path, [], keye_registry)
    assert message in str(error.value) and "bp.yaml" in str(error.value) and "\n" not in str(error.value)


def test_duplicate_names_after_expansion_are_refused(tmp_path, keye_registry):
    spec = {"repeat": 2, "stages": [{"name": "more_r{round}", **LM}]}  # more_r1 ... and "more" is not a clash
    cfg = load_blueprint(write_blueprint(tmp_path / "bp.yaml", blueprint(tmp_path, spec)), [], keye_registry)
    assert [s.name for s in cfg.stages][2:] == ["more_r1", "more_r2"]
    clash = {"repeat": 2, "stages": [{"name": "x", **LM}]}
    path = write_blueprint(tmp_path / "bp2.yaml", blueprint(tmp_path, {"name": "x_r2", **LM}, clash))
    with pytest.raises(BlueprintError, match="x_r2"):
        load_blueprint(path, [], keye_registry)


def test_print_config_shows_the_expanded_stages(tmp_path, keye_registry):
    from keye.config import render_blueprint  # what keye-launch print-config writes

    spec = {"repeat": 2, "stages": [{"name": "a", **LM}]}
    cfg = load_blueprint(write_blueprint(tmp_path / "bp.yaml", blueprint(tmp_path, spec)), [], keye_registry)
    shown = render_blueprint(cfg, keye_registry)
    assert "- name: a_r1" in shown and "- name: a_r2" in shown and "- repeat:" not in shown
