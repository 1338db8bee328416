"""Every example in CONTRIBUTING.md runs: each Python block is executed as a plugin module (and registered
in a strict host next to the built-ins), the YAML and TOML blocks are loaded, the test example is called,
and each worked example does what the page says it does."""

import re
import tomllib
import types
from pathlib import Path

import pytest
import torch
import yaml

from keye.plugins import PluginHost
from keye.testing import write_blueprint

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "CONTRIBUTING.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", TEXT, flags=re.S)


@pytest.fixture(scope="module")
def examples():
    """The plugin blocks as modules, and a strict host with every built-in plus them."""
    host = PluginHost(strict=True)
    host.load_entry_points()
    modules = {}
    for index, code in enumerate(blocks("python")):
        if "@hookimpl" not in code:
            continue
        module = types.ModuleType(f"contributing_example_{index}")
        exec(compile(code, f"CONTRIBUTING.md python block {index}", "exec"), module.__dict__)
        host.add_plugin(module, module.__name__, distribution="contributing")
        modules[module.__doc__.split(":")[0].split(" ")[0]] = module
    return host, modules


def test_every_plugin_block_registers(examples):
    host, _ = examples
    mine = {(c.kind, c.name) for c in host.registry if c.provenance.distribution == "contributing"}
    assert mine == {("vision_encoder", "eva_vit"), ("position_encoding", "rope_scaled"),
                    ("data_mixer", "round_robin"), ("reward_model", "keyword")}


def test_the_yaml_and_toml_blocks_and_the_test_example(examples, tmp_path):
    from keye.config import load_blueprint

    host, _ = examples
    [selection] = [b for b in blocks("yaml") if "eva_vit" in b]
    path = write_blueprint(tmp_path / "bp.yaml", yaml.safe_load(selection))
    assert load_blueprint(path, [], host.registry).model.vision_encoder.depth == 12
    for toml in blocks("toml"):
        assert tomllib.loads(toml)["project"]["entry-points"]["keye"] == {"eva_vit": "keye_eva_vit.plugin"}
    [test_code] = [b for b in blocks("python") if b.lstrip().startswith("def test_")]
    namespace: dict = {}
    exec(compile(test_code, "CONTRIBUTING.md test example", "exec"), namespace)
    namespace["test_blueprint_selects_eva"](host.registry, lambda content, name="bp.yaml": write_blueprint(
        tmp_path / name, content))


def test_the_vision_encoder_example_swaps_in_with_one_override(examples):
    from keye.config import load_blueprint

    host, modules = examples
    cfg = load_blueprint(ROOT / "blueprints" / "tiny" / "pretrain.yaml",
                         ["model.vision_encoder.name=eva_vit", "model.vision_encoder.hidden_size=32"], host.registry)
    assert dict(cfg.model.vision_encoder) == {"name": "eva_vit", "hidden_size": 32, "depth": 24}
    encoder = modules["EVA"].EvaViT(modules["EVA"].EvaViT.Config(hidden_size=8))
    assert encoder(torch.zeros(5, 3, 14, 14), torch.tensor([[1, 1, 5]])).shape == (5, 8)


def test_the_position_scheme_example(examples):
    _, modules = examples
    scheme_cls = modules["rope_scaled"].RopeScaled
    scheme = scheme_cls(scheme_cls.Config(factor=2.0, theta=100.0, head_dim=4))
    ids = scheme.position_ids(torch.arange(5))  # (3, 5)
    assert ids.tolist() == [list(range(5))] * 3
    assert scheme.decode_position_ids(ids, 2).tolist() == [[5, 6]] * 3
    angles = scheme.rotary_pos_emb(ids[:, None, :])  # (L, B, 1, D)
    # angle (p, k) = p / factor * theta^(-2k/d), halves repeated: p = 3 -> 1.5 * [1, 0.1, 1, 0.1]
    torch.testing.assert_close(angles[3, 0, 0], torch.tensor([1.5, 0.15, 1.5, 0.15]))


def test_the_mixer_example_interleaves_and_resumes(examples):
    _, modules = examples
    mixer_cls = modules["round_robin"].RoundRobin
    sources = {"a": ["a0", "a1"], "b": ["b0"]}
    mixer = mixer_cls(mixer_cls.Config(), sources)
    assert [next(mixer) for _ in range(6)] == ["a0", "b0", "a1", "b0", "a0", "b0"]
    resumed = mixer_cls(mixer_cls.Config(), sources)
    resumed.load_state_dict(mixer_cls(mixer_cls.Config(), sources).state_dict() | {"turn": 3})
    assert [next(resumed) for _ in range(3)] == ["b0", "a0", "b0"]


def test_the_reward_example_scores_and_counts_bad_input(examples):
    from keye.rewards.contract import RewardSample

    _, modules = examples
    reward_cls = modules["keyword"].KeywordReward
    out = reward_cls(reward_cls.Config()).score([RewardSample("q", "Yes, because 2 > 1."), RewardSample("q", "no"),
                                                 RewardSample("q", "  ")])
    assert (out.scores, out.counts) == ([1.0, 0.0, 0.0], {"empty_reply": 1})
