"""Sampling filters and draws (keye.generate.sampling) against an independent formulation written here.

The reference works on Python lists, one row at a time, and states each filter the "other way round" from
the implementation: top-p keeps a token while the mass of the tokens *strictly more probable* than it is
below ``top_p`` (the implementation drops tokens from the bottom by ascending cumulative mass, as HF does).
"""

from __future__ import annotations

import math

import pytest
import torch

from keye.generate.contract import SamplingSettings
from keye.generate.sampling import filter_logits, sample, sample_generator


def softmax(values: list[float]) -> list[float]:
    finite = [v for v in values if v != -math.inf]
    top = max(finite)
    exps = [math.exp(v - top) if v != -math.inf else 0.0 for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def reference_kept(logits: list[float], temperature: float, top_k: int, top_p: float, min_p: float) -> list[bool]:
    """Which tokens survive temperature → top-k → top-p → min-p."""
    scores = [x / temperature for x in logits]
    keep = [True] * len(scores)
    if 0 < top_k < len(scores):
        kth = sorted(scores, reverse=True)[top_k - 1]
        keep = [k and s >= kth for k, s in zip(keep, scores)]
    if top_p < 1.0:
        probs = softmax([s if k else -math.inf for s, k in zip(scores, keep)])
        for i, p in enumerate(probs):
            higher = sum(q for q in probs if q > p)
            keep[i] = keep[i] and higher < top_p
    if min_p > 0.0:
        probs = softmax([s if k else -math.inf for s, k in zip(scores, keep)])
        top = max(probs)
        keep = [k and p >= min_p * top for k, p in zip(keep, probs)]
    return keep


def reference_logprobs(logits: list[float], temperature: float, top_k: int, top_p: float, min_p: float) -> list[float]:
    keep = reference_kept(logits, temperature, top_k, top_p, min_p)
    probs = softmax([x / temperature if k else -math.inf for x, k in zip(logits, keep)])
    return [math.log(p) if p > 0 else -math.inf for p in probs]


PROBS = [0.5, 0.25, 0.15, 0.1]


@pytest.mark.parametrize("settings, kept", [
    (dict(), [True, True, True, True]),
    (dict(top_k=3), [True, True, True, False]),
    (dict(top_p=0.7), [True, True, False, False]),  # masses above: 0, .5, .75 → .75 >= .7 drops the third
    (dict(top_p=0.75), [True, True, False, False]),  # exactly reached after two tokens
    (dict(top_p=0.76), [True, True, True, False]),
    (dict(min_p=0.4), [True, True, False, False]),  # threshold 0.2
    (dict(min_p=0.25), [True, True, True, False]),  # threshold 0.125
    # top-k 3 renormalises to .556/.278/.167; top-p .8 keeps two (.833 >= .8); min-p .6: .278 < .333 drops
    (dict(top_k=3, top_p=0.8, min_p=0.6), [True, False, False, False]),
    (dict(temperature=2.0, top_p=0.7), [True, True, True, False]),  # flatter: .385/.272/.21/.172
])
def test_hand_checked_filters(settings, kept):
    logits = torch.tensor([PROBS]).log()
    s = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | settings
    filtered = filter_logits(logits, **s)[0]
    assert (filtered != -math.inf).tolist() == kept
    assert reference_kept(logits[0].tolist(), **s) == kept


def test_logprob_of_the_only_survivor_is_zero():
    gen = [torch.Generator().manual_seed(0)]
    tokens, logprobs = sample(torch.tensor([PROBS]).log(), gen, temperature=1.0, top_k=3, top_p=0.8, min_p=0.6)
    assert tokens.tolist() == [0] and logprobs.tolist() == [0.0]


@pytest.mark.parametrize("combo", [
    dict(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=5, top_p=1.0, min_p=0.0),
    dict(temperature=1.3, top_k=0, top_p=0.9, min_p=0.0),
    dict(temperature=0.6, top_k=0, top_p=1.0, min_p=0.05),
    dict(temperature=0.6, top_k=20, top_p=0.95, min_p=0.0),  # Keye's generation_config
    dict(temperature=0.9, top_k=12, top_p=0.8, min_p=0.1),
])
def test_random_logits_match_the_reference(combo):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 40, generator=gen, dtype=torch.float64).float() * 3  # (N, V), distinct values
    filtered = filter_logits(logits, **combo)
    ours = filtered.log_softmax(-1)
    for row in range(logits.shape[0]):
        expected = reference_logprobs(logits[row].tolist(), **combo)
        for got, want in zip(ours[row].tolist(), expected):
            assert (got == -math.inf) == (want == -math.inf)
            if want != -math.inf:
                assert got == pytest.approx(want, abs=1e-5)
    # sampled tokens are survivors, and their log-probs are those of the used distribution
    generators = [torch.Generator().manual_seed(i) for i in range(logits.shape[0])]
    tokens, logprobs = sample(logits, generators, **combo)
    for row, (token, logprob) in enumerate(zip(tokens.tolist(), logprobs.tolist())):
        expected = reference_logprobs(logits[row].tolist(), **combo)[token]
        assert expected != -math.inf and logprob == pytest.approx(expected, abs=1e-5)


def test_greedy_takes_the_argmax_with_its_plain_softmax_logprob():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]])
    tokens, logprobs = sample(logits, [], temperature=0.0, top_k=1, top_p=0.1, min_p=0.9)  # filters are moot
    assert tokens.tolist() == [1, 0]
    for row, token in enumerate(tokens.tolist()):
        assert logprobs[row].item() == pytest.approx(math.log(softmax(logits[row].tolist())[token]), abs=1e-6)


def test_draws_follow_the_filtered_distribution():
    """20,000 draws: each token's frequency within 0.015 of its probability after filtering (4 sigma is ~0.014)."""
    logits = torch.tensor([[math.log(p) for p in PROBS] + [math.log(0.0001)]])
    combo = dict(temperature=0.8, top_k=4, top_p=0.97, min_p=0.0)
    expected = [math.exp(lp) for lp in reference_logprobs(logits[0].tolist(), **combo)]
    generator = torch.Generator().manual_seed(11)
    draws = 20_000
    tokens, _ = sample(logits.expand(draws, -1), [generator] * draws, **combo)
    counts = torch.bincount(tokens, minlength=logits.shape[1]).tolist()
    assert counts[4] == 0  # filtered out by top-k
    for token, want in enumerate(expected):
        assert counts[token] / draws == pytest.approx(want, abs=0.015)


def test_seeded_draws_repeat_and_differ_by_sample():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)).expand(64, -1)

    def draw(seed: int, request: int, sample_index: int) -> list[int]:
        gens = [sample_generator(seed, request, sample_index) for _ in range(1)] * 64
        return sample(logits, gens, temperature=1.0)[0].tolist()

    assert draw(7, 0, 0) == draw(7, 0, 0)  # same seed, same sample: same tokens
    assert draw(7, 0, 0) != draw(7, 0, 1) != draw(7, 1, 0)  # another sample or request: another stream
    assert draw(7, 0, 0) != draw(8, 0, 0)


def test_settings_are_checked():
    assert SamplingSettings(temperature=0.0).greedy
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(min_p=1.5),
                dict(stop_strings=("",))):
        with pytest.raises(ValueError):
            SamplingSettings(**bad)
