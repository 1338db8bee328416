"""One written contract per kind (`keye.contracts`), checked when a plugin registers a class; the hookspec
documents each; ``keye-launch plugins`` lists lifecycle-only plugins and filters by kind."""

import inspect
import json
import types
import warnings
from dataclasses import dataclass

import pytest
import torch

from keye import hookimpl, hookspecs
from keye.contracts import CONTRACTS, check_built, missing_members
from keye.errors import ContractError
from keye.plugins import PluginHost
from keye.registry import KINDS, Provenance, Registry

HERE = Provenance("keye-eva", "0.1", "eva")


class EvaNoForward:
    @dataclass
    class Config:
        depth: int = 2

    def __init__(self, config, ctx=None):
        self.out_dim = 8


class OneArgDecoder:
    @dataclass
    class Config:
        pass

    def __init__(self, config, ctx):  # the host builds a video decoder as Cls(config): refused
        pass

    def read(self, path, fps=2.0, **limits):
        return None

    def probe(self, path):
        return None


class PatchOnly:
    """A vision-side position scheme: one role of the position_encoding contract is enough."""

    @dataclass
    class Config:
        pass

    def __init__(self, config, ctx=None):
        pass

    def patch_rotary_pos_emb(self, grid_thw):
        return None


def test_every_kind_has_a_contract_with_a_resolvable_protocol():
    assert tuple(CONTRACTS) == KINDS
    for contract in CONTRACTS.values():
        protocols = contract.protocols()
        assert protocols and all(getattr(p, "_is_protocol", False) for p in protocols), contract.kind
        for group in contract.methods:  # each checked method is a member of the Protocol it names
            assert any(all(hasattr(p, name) for name in group) for p in protocols), (contract.kind, group)


def test_a_missing_method_fails_registration_in_one_line_naming_plugin_class_and_member():
    with pytest.raises(ContractError) as caught:
        Registry().register("vision_encoder", "eva_vit", EvaNoForward, HERE)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("vision_encoder 'eva_vit' (EvaNoForward) from keye-eva 0.1 (plugin eva) does not meet "
                              "the vision_encoder contract: missing forward()")
    assert "keye.model.protocols.VisionEncoder" in message


def test_a_constructor_the_host_cannot_call_is_refused():
    assert missing_members("video_decoder", OneArgDecoder) == [
        "an __init__ taking 1 argument(s), built as Cls(config)"]


def test_position_encodings_meet_one_role_of_two():
    assert missing_members("position_encoding", PatchOnly) == []
    assert missing_members("projector", PatchOnly) == ["forward()"]
    # neither role: the closest one is named
    class Nothing:
        @dataclass
        class Config:
            pass

        def __init__(self, config, ctx=None):
            pass

        def patch_rotary_pos_emb_typo(self, grid_thw):
            return None
    assert missing_members("position_encoding", Nothing) == ["patch_rotary_pos_emb()"]


def test_a_failing_contract_fails_the_plugin_only_and_is_listed():
    host = PluginHost(strict=False)
    bad = types.ModuleType("eva")
    bad.keye_register_vision_encoders = hookimpl(lambda register: register("eva_vit", EvaNoForward))
    life = types.ModuleType("wandb_log")
    life.keye_after_stage = hookimpl(lambda stage, blueprint, result: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = host.add_plugin(bad, "eva", distribution="keye-eva", version="0.1")
    assert record.status == "failed" and "missing forward()" in record.error
    assert len(caught) == 1 and "keye-eva 0.1 failed to load" in str(caught[0].message)
    lifecycle = host.add_plugin(life, "wandb_log", distribution="keye-wandb")
    assert (lifecycle.status, lifecycle.components, lifecycle.hooks) == ("loaded", {}, ["keye_after_stage"])


def test_built_objects_are_checked_for_the_attributes_of_their_protocol():
    class NoOutDim(torch.nn.Module):
        def forward(self, patches, grid_thw):
            return patches

    with pytest.raises(ContractError, match=r"vision_encoder 'x' \(.*NoOutDim\): the built object lacks out_dim"):
        check_built("vision_encoder", "x", NoOutDim())
    good = NoOutDim()
    good.out_dim = 4
    check_built("vision_encoder", "x", good)


@pytest.mark.parametrize("kind", KINDS)
def test_every_hookspec_states_how_its_kind_is_built_and_its_protocol(kind):
    text = inspect.getdoc(getattr(hookspecs, hookspecs.registration_hook(kind)))
    contract = CONTRACTS[kind]
    assert "Built as" in text and contract.built.split(" ")[0] in text, kind
    for protocol in contract.protocol.split(" | "):
        assert protocol.rpartition(".")[2] in text, (kind, protocol)
    assert "May ignore" in text, kind


def test_register_is_typed():
    assert hookspecs.Register.__call__.__annotations__ == {"name": "str", "cls": "type", "return": "None"}
    hooks = [getattr(hookspecs, hookspecs.registration_hook(kind)) for kind in KINDS]
    assert all(inspect.signature(h).parameters["register"].annotation == "Register" for h in hooks)


def test_plugins_command_lists_hooks_and_filters_by_kind(capsys):
    from keye.launch.cli import main

    assert main(["plugins", "--kind", "position_encoding", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert {name for r in records for name in r["components"]["position_encoding"]} == {
        "mrope_time_aligned", "none", "rope1d", "rope2d_vision"}
    assert all(list(r["components"]) == ["position_encoding"] for r in records)
    assert main(["plugins", "--kind", "widget"]) == 2
    assert "plugins --kind: unknown kind 'widget'; known: vision_encoder" in capsys.readouterr().err
