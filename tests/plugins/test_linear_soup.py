"""linear_soup: a hand-checkable weighted average, dtype kept, mismatches refused."""

import pytest
import torch

from keye_plugins.merger.linear_soup import LinearSoup


def test_weighted_average_by_hand():
    a = {"w": torch.tensor([0.0, 4.0]), "steps": torch.tensor(7)}
    b = {"w": torch.tensor([2.0, 8.0]), "steps": torch.tensor(7)}
    merged = LinearSoup(LinearSoup.Config())([a, b], [1.0, 3.0])  # 1/4·a + 3/4·b
    assert torch.equal(merged["w"], torch.tensor([1.5, 7.0]))
    assert merged["steps"].item() == 7
    equal = LinearSoup(LinearSoup.Config())([a, b], [1.0, 1.0])
    assert torch.equal(equal["w"], torch.tensor([1.0, 6.0]))


def test_unnormalised_weights_and_dtype():
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    merged = LinearSoup(LinearSoup.Config(normalize=False))([a, a], [0.5, 0.25])
    assert merged["w"].dtype == torch.bfloat16
    assert torch.equal(merged["w"], torch.tensor([0.75, 1.5], dtype=torch.bfloat16))


@pytest.mark.parametrize(
    "states, weights, message",
    [
        ([{"w": torch.zeros(2)}], [1.0, 2.0], "1 checkpoints but 2 weights"),
        ([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}], [1.0, 1.0], "different tensors"),
        ([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], [1.0, 1.0], "has shape"),
        ([{"w": torch.zeros(2)}, {"w": torch.zeros(2)}], [1.0, -1.0], "non-negative"),
    ],
)
def test_mismatches_are_refused(states, weights, message):
    with pytest.raises(ValueError, match=message):
        LinearSoup(LinearSoup.Config())(states, weights)
