"""The ``rl`` stage's options are checked before anything is built: each mistake is one line naming the key."""

import pytest

from keye.errors import KeyeUserError

CASES = {
    "group_size: must be an integer from 2": {"options": {"group_size": 1}},
    "temperature: must be a finite number > 0.0": {"options": {"temperature": 0.0}},
    "mode_mix: unknown thinking mode 'deep'": {"options": {"mode_mix": {"deep": 1.0}}},
    "rewards.answer_macth: unknown reward_model 'answer_macth'": {"options": {"rewards": {"answer_macth": {}}}},
    "rewards.format.strict: unknown key for reward_model 'format'": {"options": {"rewards": {"format": {"strict": 1}}}},
    "rewards.format.weight: must be a finite number": {"options": {"rewards": {"format": {"weight": "high"}}}},
    "max_new_tokens: 64 leaves no room for the prompt": {"data": {"max_tokens": 64}},
    "'next_token' is not a policy loss": {"loss": {"name": "next_token"}},
}


@pytest.mark.parametrize("expected", list(CASES))
def test_bad_options_fail_in_one_line(keye_registry, blueprint_file, expected):
    from keye.config import load_blueprint

    stage = {"name": "rl", "kind": "rl", "steps": 1, "train": ["language_model"],
             "data": {"max_tokens": 256, "sources": {"p": {"name": "synthetic", "tasks": ["rl"]}}}}
    change = CASES[expected]
    stage["options"] = change.get("options", {})
    stage["data"].update(change.get("data", {}))
    if "loss" in change:
        stage["loss"] = change["loss"]
    path = blueprint_file({"model": {"language_model": {"name": "qwen3", "size": "tiny"}}, "stages": [stage]},
                          "bad.yaml")
    with pytest.raises(KeyeUserError) as caught:
        load_blueprint(path, [], keye_registry)
    message = str(caught.value)
    assert expected in message and "stages.0" in message and "\n" not in message, message


def test_the_rewards_a_blueprint_names_are_all_it_gets():
    """A mapping default would be merged into the user's mapping: naming answer_match alone kept format too."""
    from omegaconf import OmegaConf

    from keye_plugins.stage.rl import RLStage, rewards_of

    def config(options: dict):
        return OmegaConf.merge(OmegaConf.structured(RLStage.Config), options)

    assert rewards_of(config({"rewards": {"answer_match": {"weight": 1.0}}})) == {"answer_match": {"weight": 1.0}}
    assert rewards_of(config({})) == {"answer_match": {"weight": 1.0}, "format": {"weight": 0.5}}
