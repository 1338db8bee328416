"""The `weighted` data mixer: deterministic, smooth ratios, exact resume, exhaustion modes, clear errors."""

import dataclasses
import itertools
import json

import pytest

import keye_plugins.data_mixer.weighted as weighted_module
from keye.config.fields import field_doc
from keye.errors import KeyeUserError
from keye_plugins.data_mixer.weighted import WeightedMixer


def mixer(weights, sources, seed=0, on_exhausted="restart"):
    return WeightedMixer(WeightedMixer.Config(weights=weights, seed=seed, on_exhausted=on_exhausted), sources)


def endless(label):
    """A factory for an infinite, deterministic source: label/0, label/1, ..."""
    return lambda: (f"{label}/{i}" for i in itertools.count())


def finite(label, n):
    return [f"{label}/{i}" for i in range(n)]


def take(mix, n):
    return [next(mix) for _ in range(n)]


def test_registered_through_the_hook_with_documented_config(keye_empty_host):
    keye_empty_host.add_plugin(weighted_module, "weighted_test")
    assert keye_empty_host.registry.get("data_mixer", "weighted").cls is WeightedMixer
    assert all(field_doc(f) for f in dataclasses.fields(WeightedMixer.Config))


def test_deterministic_for_a_seed():
    weights = {"a": 2.0, "b": 1.0, "c": 1.0}

    def sources():
        return {label: endless(label) for label in weights}

    assert take(mixer(weights, sources(), seed=3), 200) == take(mixer(weights, sources(), seed=3), 200)
    # the seed breaks ties: with equal weights, different seeds start with different sources
    firsts = {next(mixer({"a": 1, "b": 1}, {"a": endless("a"), "b": endless("b")}, seed=s)) for s in range(10)}
    assert firsts == {"a/0", "b/0"}


def test_order_within_each_source_is_kept():
    mix = mixer({"a": 1, "b": 3}, {"a": endless("a"), "b": endless("b")})
    out = take(mix, 100)
    for label in "ab":
        mine = [x for x in out if x.startswith(label)]
        assert mine == [f"{label}/{i}" for i in range(len(mine))]


@pytest.mark.parametrize("weights", [{"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 7, "b": 2, "c": 1.5, "d": 0.01}])
def test_realised_ratios_are_smooth_over_10k_samples(weights):
    mix = mixer(weights, {label: endless(label) for label in weights}, seed=1)
    total = sum(weights.values())
    counts = dict.fromkeys(weights, 0)
    for n in range(1, 10_001):
        label, _ = mix.next_with_label()
        counts[label] += 1
        if n % 97 == 0 or n == 10_000:  # every prefix stays within a sample of its target
            for lab, w in weights.items():
                assert abs(counts[lab] - n * w / total) <= 1.0 + 1e-9, (n, lab)
    report = mix.realised_ratios()
    for label, w in weights.items():
        assert report[label]["count"] == counts[label]
        assert report[label]["target"] == pytest.approx(w / total)
        assert report[label]["share"] == pytest.approx(w / total, abs=1e-4)


def test_zero_weight_source_is_never_drawn():
    mix = mixer({"a": 1, "b": 0}, {"a": endless("a"), "b": endless("b")})
    assert all(x.startswith("a/") for x in take(mix, 50))
    assert mix.realised_ratios()["b"] == {"count": 0, "share": 0.0, "target": 0.0, "epoch": 0}


class ResumableRange:
    """An iterator with its own state (a source that can seek); counts how often `next` is called."""

    calls = 0

    def __init__(self, label, n):
        self.label, self.n, self.i = label, n, 0

    def __iter__(self):
        return self

    def __next__(self):
        ResumableRange.calls += 1
        if self.i >= self.n:
            raise StopIteration
        self.i += 1
        return f"{self.label}/{self.i - 1}"

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def resume_sources():
    # finite sources of different lengths, so several restarts happen before and after the checkpoint
    return {
        "caption": lambda: iter(finite("caption", 40)),  # factory
        "ocr": finite("ocr", 23),  # re-iterable
        "video": lambda: ResumableRange("video", 17),  # seeks through its own state
    }


def test_exact_resume_after_137_samples():
    weights = {"caption": 5, "ocr": 3, "video": 2}
    uninterrupted = take(mixer(weights, resume_sources(), seed=7), 137 + 400)

    first = mixer(weights, resume_sources(), seed=7)
    head = take(first, 137)
    state = json.loads(json.dumps(first.state_dict()))  # the state is plain JSON
    assert state["sources"]["video"]["iterator"] == {"i": state["sources"]["video"]["position"]}
    assert any(s["epoch"] > 0 for s in state["sources"].values())

    restarted = mixer(weights, resume_sources(), seed=7)
    ResumableRange.calls = 0
    restarted.load_state_dict(state)
    assert ResumableRange.calls == 0  # restored from its own state, not re-read
    assert head + take(restarted, 400) == uninterrupted
    assert restarted.realised_ratios() == mixer_after(weights, 537).realised_ratios()


def mixer_after(weights, n):
    mix = mixer(weights, resume_sources(), seed=7)
    take(mix, n)
    return mix


def test_restart_counts_epochs():
    mix = mixer({"a": 1, "b": 1}, {"a": finite("a", 3), "b": endless("b")}, seed=0)
    out = take(mix, 20)
    assert [x for x in out if x.startswith("a/")] == ["a/0", "a/1", "a/2"] * 3 + ["a/0"]
    assert mix.realised_ratios()["a"]["epoch"] == 3
    assert mix.state_dict()["sources"]["a"] == {"epoch": 3, "position": 1}


def test_stop_ends_the_mix_at_the_first_exhausted_source():
    mix = mixer({"a": 1, "b": 1}, {"a": finite("a", 3), "b": endless("b")}, on_exhausted="stop")
    out = list(mix)
    assert [x for x in out if x.startswith("a/")] == ["a/0", "a/1", "a/2"]
    assert len(out) in (6, 7)  # a ran dry when its 4th turn came
    with pytest.raises(StopIteration):
        next(mix)
    state = mix.state_dict()
    assert state["stopped"] is True
    again = mixer({"a": 1, "b": 1}, {"a": finite("a", 3), "b": endless("b")}, on_exhausted="stop")
    again.load_state_dict(state)
    assert list(again) == []


def test_one_shot_iterators_work_until_they_need_a_restart():
    mix = mixer({"a": 1, "b": 1}, {"a": iter(finite("a", 2)), "b": endless("b")}, seed=0)
    take(mix, 4)
    with pytest.raises(KeyeUserError, match="'a' is a one-shot iterator"):
        take(mix, 2)


def test_empty_source_is_an_error_not_a_hang():
    mix = mixer({"a": 1}, {"a": []})
    with pytest.raises(KeyeUserError, match="'a' is empty"):
        next(mix)


@pytest.mark.parametrize(
    "weights,sources,message",
    [
        ({"a": 1, "typo": 1}, {"a": [1]}, "weight for unknown source 'typo'; sources: a"),
        ({"a": 1}, {"a": [1], "b": [2]}, "source 'b' has no weight"),
        ({"a": 1, "b": -0.5}, {"a": [1], "b": [2]}, "weight of 'b' is negative"),
        ({"a": 0, "b": 0}, {"a": [1], "b": [2]}, "weights sum to 0"),
        ({"a": float("nan")}, {"a": [1]}, "weight of 'a' must be a finite number"),
        ({"a": 1}, {"a": 5}, "data source 'a' must be an iterable"),
    ],
)
def test_bad_configuration_is_a_clear_error(weights, sources, message):
    with pytest.raises(KeyeUserError, match=message):
        mixer(weights, sources)


def test_bad_exhaustion_mode():
    with pytest.raises(KeyeUserError, match="on_exhausted must be one of restart, stop"):
        mixer({"a": 1}, {"a": [1]}, on_exhausted="loop")


def test_resume_refuses_a_different_mix():
    state = mixer({"a": 1, "b": 1}, {"a": [1], "b": [2]}).state_dict()
    with pytest.raises(KeyeUserError, match="weight of 'a' changed"):
        mixer({"a": 2, "b": 1}, {"a": [1], "b": [2]}).load_state_dict(state)
    with pytest.raises(KeyeUserError, match="sources differ"):
        mixer({"a": 1}, {"a": [1]}).load_state_dict(state)
    with pytest.raises(KeyeUserError, match="seed changed"):
        mixer({"a": 1, "b": 1}, {"a": [1], "b": [2]}, seed=5).load_state_dict(state)


def test_resume_against_a_shorter_source_says_so():
    first = mixer({"a": 1}, {"a": finite("a", 10)})
    take(first, 6)
    with pytest.raises(KeyeUserError, match="'a' ended after 3 items while resuming to position 6"):
        mixer({"a": 1}, {"a": finite("a", 3)}).load_state_dict(first.state_dict())


def test_a_one_shot_iterator_is_fast_forwarded_on_resume():
    first = mixer({"a": 1, "b": 1}, {"a": iter(range(100)), "b": endless("b")})
    take(first, 10)
    again = mixer({"a": 1, "b": 1}, {"a": iter(range(100)), "b": endless("b")})
    again.load_state_dict(first.state_dict())
    assert take(again, 4) == take(first, 4)
