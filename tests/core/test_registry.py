"""The registry: lookup, provenance, helpful misses, duplicates, and what a component must look like."""

from dataclasses import dataclass

import pytest

from keye.errors import DuplicateComponentError, UnknownComponentError
from keye.registry import KINDS, Provenance, Registry
from keye.testing.stubs import Stub

HERE = Provenance("keye-test", "1.0", "here")
THERE = Provenance("keye-other", "2.3", "there")


class Good(Stub):
    @dataclass
    class Config:
        width: int = 4


def test_register_and_get_records_provenance():
    registry = Registry()
    registry.register("projector", "good", Good, HERE)
    component = registry.get("projector", "good")
    assert component.cls is Good and component.provenance == HERE
    assert registry.names("projector") == ["good"]
    assert ("projector", "good") in registry and ("projector", "bad") not in registry


def test_unknown_name_lists_known_names():
    registry = Registry()
    registry.register("vision_encoder", "siglip_navit", Good, HERE)
    registry.register("vision_encoder", "eva", Good, HERE)
    with pytest.raises(UnknownComponentError) as info:
        registry.get("vision_encoder", "sigclip")
    assert str(info.value) == "unknown vision_encoder 'sigclip'; known: eva, siglip_navit"


def test_unknown_kind_lists_kinds():
    with pytest.raises(UnknownComponentError, match="unknown component kind 'encoder'; known: vision_encoder"):
        Registry().get("encoder", "x")


def test_duplicate_name_names_both_distributions():
    registry = Registry()
    registry.register("loss", "next_token", Good, HERE)
    with pytest.raises(DuplicateComponentError) as info:
        registry.register("loss", "next_token", Good, THERE)
    message = str(info.value)
    assert "keye-test 1.0 (plugin here)" in message and "keye-other 2.3 (plugin there)" in message


def test_replace_is_explicit_and_find_does_not_raise():
    registry = Registry()
    assert registry.find("loss", "next_token") is None and registry.find("loss", ["not", "a", "name"]) is None
    registry.register("loss", "next_token", Good, HERE)
    registry.register("loss", "next_token", Good, THERE, replace=True)  # only for an override the user asked for
    assert registry.find("loss", "next_token").provenance == THERE


def test_same_name_in_two_kinds_is_fine():
    registry = Registry()
    registry.register("loss", "x", Good, HERE)
    registry.register("stage", "x", Good, THERE)
    assert [c.kind for c in registry] == ["loss", "stage"]


class NoConfig:
    pass


@pytest.mark.parametrize(
    "kind, name, cls, error",
    [
        ("projector", "NoCaps", Good, "lower_snake_case"),
        ("projector", "ok", NoConfig, "needs a nested `Config` dataclass"),
        ("projector", "ok", Good(), "must be registered as a class"),
        ("widget", "ok", Good, "unknown component kind 'widget'"),
    ],
)
def test_bad_registrations_are_refused(kind, name, cls, error):
    with pytest.raises((TypeError, ValueError), match=error):
        Registry().register(kind, name, cls, HERE)


def test_kinds_match_the_design():
    assert KINDS == (
        "vision_encoder", "projector", "language_model", "text_encoder", "position_encoding", "data_source",
        "data_mixer", "loss", "reward_model", "merger", "generator", "video_decoder", "stage",
    )
