"""The choices of `keye.data.rejection`: which replies make a pair or an SFT target, and which mode a prompt
is sampled in."""

from __future__ import annotations

from collections import Counter

from keye.data.rejection import mode_for, pick_pair, pick_sft, writable


def test_best_against_worst_above_the_margin():
    assert pick_pair([0.2, 1.0, 0.0, 0.7], ["a", "b", "c", "d"], 0.5) == (1, 2)
    assert pick_pair([0.2, 0.6, 0.3], ["a", "b", "c"], 0.5) == "below_margin"
    assert pick_pair([1.0, 0.0, 1.0, 0.0], ["a", "b", "c", "d"], 0.5) == (0, 3)  # ties: earliest best, latest worst
    assert pick_pair([1.0, 0.0], [" same ", "same"], 0.5) == "identical"


def test_unwritable_replies_are_never_picked():
    replies = ["<|image_pad|> red", "", "blue", "red", "   "]
    scores = [5.0, -5.0, 1.0, 0.0, -9.0]
    assert [writable(r) for r in replies] == [False, False, True, True, False]
    assert pick_pair(scores, replies, 0.5) == (2, 3)
    assert pick_pair(scores[:4], ["", "x<|im_start|>", "ok", ""], 0.5) == "unwritable"
    assert pick_sft(scores, replies, 1.0) == 2 and pick_sft(scores, replies, 1.5) is None
    assert pick_sft([1.0], [""], 0.0) is None


def test_modes_follow_the_weights_and_repeat_per_key():
    modes = {"think": 3.0, "no_think": 1.0, "auto": 0.0}
    drawn = Counter(mode_for(f"k{i}", modes, 5) for i in range(4000))
    assert set(drawn) == {"think", "no_think"} and abs(drawn["think"] / 4000 - 0.75) < 0.03
    assert [mode_for("k1", modes, 5) for _ in range(3)] == [mode_for("k1", modes, 5)] * 3
    assert any(mode_for(f"k{i}", modes, 5) != mode_for(f"k{i}", modes, 6) for i in range(50))  # the seed matters
