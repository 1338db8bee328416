"""Safe plugin loading: inline plugins, failures isolated and recorded, duplicates, hook docs."""

import inspect
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from keye import hookimpl, hookspecs
from keye.errors import DuplicateComponentError
from keye.plugins import PluginHost, PluginLoadWarning
from keye.registry import KINDS
from keye.testing.stubs import Stub

ROOT = Path(__file__).resolve().parents[2]


class Toy(Stub):
    @dataclass
    class Config:
        width: int = 8


def make_plugin(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, hookimpl(function))
    return module


def registers(kind_name: str, *names: str):
    def hook(register):
        for name in names:
            register(name, Toy)

    hook.__name__ = kind_name
    return hook


def test_inline_plugin_registers_with_provenance(keye_empty_host):
    plugin = make_plugin("toy", keye_register_projectors=registers("p", "toy_proj"))
    record = keye_empty_host.add_plugin(plugin, "toy", distribution="keye-toy", version="0.3")
    assert record.status == "loaded"
    assert record.components == {"projector": ["toy_proj"]}
    component = keye_empty_host.registry.get("projector", "toy_proj")
    assert (component.provenance.distribution, component.provenance.version) == ("keye-toy", "0.3")


def test_a_failing_plugin_is_recorded_warned_once_and_isolated():
    host = PluginHost(strict=False)

    def broken(register):
        register("half", Toy)
        raise RuntimeError("boom")

    good = make_plugin("good", keye_register_losses=registers("l", "fine"))
    bad = make_plugin("bad", keye_register_losses=broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        host.add_plugin(bad, "bad")
    host.add_plugin(good, "good")
    assert [w.category for w in caught] == [PluginLoadWarning]
    assert "bad" in str(caught[0].message) and "boom" in str(caught[0].message)
    assert host.records[("(local)", "bad")].status == "failed"
    assert host.records[("(local)", "bad")].error == "RuntimeError: boom"
    # Nothing of the failed plugin stays registered, everything else works.
    assert host.registry.names("loss") == ["fine"]


def test_strict_mode_reraises(keye_empty_host):
    def broken(register):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="plugin 'bad'"):
        keye_empty_host.add_plugin(make_plugin("bad", keye_register_losses=broken), "bad")


def test_duplicate_across_plugins_names_both(keye_empty_host):
    keye_empty_host.add_plugin(make_plugin("a", keye_register_stages=registers("s", "lm")), "a", distribution="dist-a")
    with pytest.raises(DuplicateComponentError, match="dist-a 0 \\(plugin a\\).*dist-b 0 \\(plugin b\\)"):
        keye_empty_host.add_plugin(make_plugin("b", keye_register_stages=registers("s", "lm")), "b", distribution="dist-b")


def test_an_override_is_rolled_back_with_the_plugin_that_fails_half_way():
    host = PluginHost(strict=False, overrides={("loss", "fine"): "dist-b"})
    host.add_plugin(make_plugin("a", keye_register_losses=registers("l", "fine")), "a", distribution="dist-a")

    def replaces_then_breaks(register):
        register("fine", Toy)
        raise RuntimeError("boom")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = host.add_plugin(make_plugin("b", keye_register_losses=replaces_then_breaks), "b", distribution="dist-b")
    assert record.status == "failed"
    assert host.registry.get("loss", "fine").provenance.distribution == "dist-a"
    assert host.records[("dist-a", "a")].overridden == {}


def test_a_module_registered_twice_fails_the_second_and_keeps_the_first():
    host = PluginHost(strict=False)
    seen = []
    plugin = make_plugin("life", keye_configure=lambda blueprint: seen.append(blueprint))
    host.add_plugin(plugin, "life", distribution="dist-a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = host.add_plugin(plugin, "life", distribution="dist-b")
    assert again.status == "failed" and "already registered" in again.error
    host.hook.keye_configure(blueprint="bp")
    assert seen == ["bp"]


def test_a_hook_with_a_typo_fails_that_plugin_only():
    host = PluginHost(strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        host.add_plugin(make_plugin("typo", keye_register_projector=registers("p", "x")), "typo")
    assert host.records[("(local)", "typo")].status == "failed"
    assert "keye_register_projector" in host.records[("(local)", "typo")].error


def test_lifecycle_hooks_are_called(keye_empty_host):
    seen = []
    plugin = make_plugin("life", keye_configure=lambda blueprint: seen.append(("configure", blueprint)))
    keye_empty_host.add_plugin(plugin, "life")
    keye_empty_host.hook.keye_configure(blueprint="bp")
    assert seen == [("configure", "bp")]


def test_one_documented_registration_hook_per_kind():
    specs = {name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("keye_register_")}
    assert specs == {hookspecs.registration_hook(kind) for kind in KINDS}
    for name in specs:
        assert inspect.getdoc(getattr(hookspecs, name)), f"{name} has no docstring"


def test_every_hook_is_in_contributing():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    hooks = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("keye_")]
    missing = [name for name in hooks if name not in text]
    assert not missing, f"hooks missing from CONTRIBUTING.md: {missing}"
