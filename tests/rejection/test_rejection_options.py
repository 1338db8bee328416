"""Bad ``rejection_sampling`` options (reward nodes included, checked against each reward's Config) are one line
naming the key and the file."""

from __future__ import annotations

import pytest

from keye.config import load_blueprint
from keye.errors import BlueprintError
from keye.testing import write_blueprint

GOOD = {"modes": {"think": 1}, "rewards": {"answer_match": {"weight": 1.0}}}


@pytest.mark.parametrize("options,key", [
    ({"rewards": {"answer_match": 3}}, "rewards.answer_match"),
    ({"rewards": {"answer_match": {"weight": "x"}}}, "rewards.answer_match.weight"),
    ({"rewards": {"nope": {}}}, "rewards.nope.name"),
    ({"rewards": {"answer_match": {"metric": "zz"}}}, "rewards.answer_match.metric"),
    ({"rewards": {"am": {"name": "answer_match", "tolerance": 1}}}, "rewards.am.tolerance"),
    ({"rewards": {}}, "rewards"),
    ({"modes": {"ponder": 1}}, "modes.ponder"),
    ({"modes": {"think": 0}}, "modes"),
    ({"modes": {"think": -1.0}}, "modes.think"),
    ({"n": 1}, "n"),
    ({"temperature": 0.0}, "temperature"),
    ({"margin": 0.0}, "margin"),
    ({"outputs": ["x"]}, "outputs"),
    ({"stage": "later"}, "stage"),
])
def test_bad_options_are_one_line(tmp_path, keye_registry, options, key):
    path = write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "x", "output_dir": str(tmp_path / "run")},
        "model": {"vision_encoder": {"name": "siglip_navit", "size": "tiny"},
                  "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
                  "language_model": {"name": "qwen3", "size": "tiny"}},
        "stages": [
            {"name": "a", "kind": "lm", "steps": 1, "train": ["projector"],
             "data": {"sources": {"q": {"name": "synthetic"}}}},
            {"repeat": 2, "stages": [{"name": "rs", "kind": "rejection_sampling", "options": {**GOOD, **options},
                                      "data": {"sources": {"q": {"name": "synthetic", "tasks": ["rl"]}}}}]},
        ]})
    with pytest.raises(BlueprintError) as error:
        load_blueprint(path, [], keye_registry)
    message = str(error.value)
    assert f"stages.1.options.{key}" in message and "\n" not in message and "bp.yaml" in message, message


def test_good_options_validate(tmp_path, keye_registry):
    path = write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "x", "output_dir": str(tmp_path / "run")},
        "model": {"language_model": {"name": "qwen3", "size": "tiny"}},
        "stages": [{"name": "a", "kind": "lm", "steps": 1, "train": ["language_model"],
                    "data": {"sources": {"q": {"name": "synthetic"}}}},
                   {"name": "rs", "kind": "rejection_sampling", "options": GOOD,
                    "data": {"sources": {"q": {"name": "synthetic", "tasks": ["rl"]}}}}]})
    cfg = load_blueprint(path, [], keye_registry)
    assert cfg.stages[1].options.rewards == {"answer_match": {"weight": 1.0}}  # no default reward merged in
    assert cfg.stages[1].options.modes == {"think": 1}
