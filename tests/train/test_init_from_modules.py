"""``init_from`` per module (`keye.train.init_plan`): what a blueprint may say, read into sources; validated in
one line naming the key before anything runs. Loading is tested end to end in tests/hf/test_qwen3_import.py
(stage name, Hugging Face directory, fresh and the previous stage in one real TP=2 run) and
tests/hf/test_convert_cli.py (a converted folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

from keye.config import check_runnable, load_blueprint
from keye.errors import BlueprintError
from keye.testing import write_blueprint
from keye.train.init_plan import Source, plan

MODEL = {"vision_encoder": {"name": "siglip_navit", "size": "tiny"},
         "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
         "language_model": {"name": "qwen3", "size": "tiny"}}
LM = {"kind": "lm", "steps": 1, "train": ["projector"], "data": {"sources": {"qa": {"name": "synthetic"}}}}


def _blueprint(tmp_path: Path, init_from, *more) -> Path:
    return write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "x", "output_dir": str(tmp_path / "run")}, "model": MODEL,
        "stages": [{"name": "first", **LM}, {"name": "second", **LM, "init_from": init_from}, *more]})


def test_a_mapping_is_read_into_one_source_per_module_and_the_previous_stage(tmp_path, keye_registry):
    init_from = {"vision_encoder": "first", "language_model": "/ckpt/Qwen3-8B", "projector": "fresh"}
    cfg = load_blueprint(_blueprint(tmp_path, init_from), [], keye_registry)
    run, previous = tmp_path / "run", tmp_path / "run" / "first"
    key = "stages.1.init_from"
    assert plan(cfg.stages[1].init_from, 1, cfg.run.output_dir, previous) == [
        Source(key, previous, None, ("vision_encoder", "language_model", "projector"), explicit=False),
        Source(f"{key}.vision_encoder", run / "first", ("vision_encoder",), earlier_stage=True),
        Source(f"{key}.language_model", Path("/ckpt/Qwen3-8B"), ("language_model",)),
        Source(f"{key}.projector", None, ("projector",)),
    ]
    # the string forms: the whole model from one source; null: the previous stage, if there is one
    assert plan("fresh", 1, run, previous) == [Source(key, None, None)]
    assert plan("first", 1, run, previous) == [Source(key, run / "first", None, earlier_stage=True)]
    assert plan(None, 1, run, previous) == [Source(key, previous, None, explicit=False)]
    assert plan(None, 0, run, None) == []


@pytest.mark.parametrize("init_from, message", [
    ({"vison_encoder": "first"},
     "stages.1.init_from.vison_encoder: unknown module 'vison_encoder'; known: vision_encoder, projector, language_model"),
    ({"text_encoder": "first"}, "stages.1.init_from.text_encoder: model.text_encoder is not set"),
    ({"projector": 3}, "stages.1.init_from.projector: expected an earlier stage's name, a folder (a path with '/') "
                       "or 'fresh'; got 3"),
    ({"projector": "third"}, "stages.1.init_from.projector: stage 'third' comes later"),
    ({"projector": "second"}, "stages.1.init_from.projector: a stage cannot start from its own weights"),
    ({"projector": "nowhere"}, "stages.1.init_from.projector: 'nowhere' is neither an earlier stage (first) nor a folder"),
    ({}, "stages.1.init_from: an empty mapping; name modules"),
    (7, "stages.1.init_from: expected an earlier stage's name, a folder (a path with '/') or 'fresh', or a mapping "
        "{module: source}; got 7"),
    ([1, 2], "stages.1.init_from: expected an earlier stage's name"),
])
def test_a_bad_value_is_one_line_naming_the_key(tmp_path, keye_registry, init_from, message):
    path = _blueprint(tmp_path, init_from, {"name": "third", **LM})
    with pytest.raises(BlueprintError) as error:
        load_blueprint(path, [], keye_registry)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith(str(path))  # the file that set it


def test_an_override_replaces_the_mapping_or_one_module(tmp_path, keye_registry):
    path = _blueprint(tmp_path, {"vision_encoder": "first", "projector": "fresh"})
    assert load_blueprint(path, ["stages.1.init_from=first"], keye_registry).stages[1].init_from == "first"
    cfg = load_blueprint(path, ["stages.1.init_from.projector=/ckpt/p"], keye_registry)
    assert dict(cfg.stages[1].init_from) == {"vision_encoder": "first", "projector": "/ckpt/p"}


def test_a_repeat_group_renames_the_stages_a_mapping_names(tmp_path, keye_registry):
    group = {"repeat": 2, "stages": [{"name": "a", **LM},
                                     {"name": "b", **LM, "init_from": {"projector": "a", "vision_encoder": "first"}}]}
    cfg = load_blueprint(write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "x", "output_dir": str(tmp_path / "run")}, "model": MODEL,
        "stages": [{"name": "first", **LM}, group]}), [], keye_registry)
    by_name = {stage.name: stage for stage in cfg.stages}
    assert dict(by_name["b_r2"].init_from) == {"projector": "a_r2", "vision_encoder": "first"}


@pytest.mark.parametrize("layout, message", [
    ("nothing", "stages.1.init_from.language_model: no weights at {path}/weights and no config.json in {path}"),
    ("older_convert", "stages.1.init_from.language_model: {path} was written by an older keye-launch convert"),
])
def test_run_looks_at_each_folder_first(tmp_path, keye_registry, layout, message):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    if layout == "older_convert":
        (folder / "keye_checkpoint.json").write_text("{}")
        (folder / "model").mkdir()
        (folder / "model" / "metadata.json").write_text("{}")
    cfg = load_blueprint(_blueprint(tmp_path, {"language_model": str(folder)}), [], keye_registry)
    with pytest.raises(BlueprintError) as error:
        check_runnable(cfg)
    assert str(error.value).startswith(message.format(path=folder)) and "\n" not in str(error.value)
