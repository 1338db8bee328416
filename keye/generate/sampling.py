"""Token sampling as pure functions: filter the logits, draw a token, report its log-probability.

Order of the filters (Hugging Face ``generate``'s, ``_get_logits_processor``): **temperature, then top-k,
then top-p, then min-p**, each on the output of the one before; a removed token gets ``-inf``. Keye's
released ``generation_config.json`` (temperature 0.6, top-k 20, top-p 0.95) was written for that
pipeline. vLLM (v1) applies min-p *before* top-k/top-p: the top-k and min-p sets do not depend on the
order (min-p is relative to the top token, which every filter keeps), but top-p after min-p measures
its mass on the renormalised min-p survivors, so with both top-p and min-p set, vLLM can keep fewer tokens.

- temperature ``t``: ``logits / t``;
- top-k: keep the tokens whose logit is at least the k-th largest (ties at the boundary kept, as HF);
- top-p: keep the smallest set of most probable tokens whose mass reaches ``top_p`` (HF: sort ascending,
  drop a token when the cumulative mass up to and including it is ``<= 1 - top_p``); the top token stays;
- min-p: drop tokens whose probability is below ``min_p`` times the top token's probability.

`sample` draws from ``softmax(filtered)`` with one seeded ``torch.Generator`` per row (an exponential race on
its uniform draws), and returns each token's log-probability under that distribution (``log_softmax(filtered)``):
the distribution actually sampled from. Greedy (temperature 0) takes the argmax of the raw logits and reports
its log-probability under the plain softmax (temperature 1, no filter), as documented in
`keye.generate.contract`.

Measured and not taken: inverse-CDF sampling (one uniform per row, an fp32 cumulative sum, ``searchsorted``)
costs 0.37 against 1.07 ms for 32 rows of a 4,096 vocabulary, as the race draws one uniform per vocabulary
entry. But it draws other tokens from the same seed, and seeded runs are relied on: the rejection-sampling
test's rounds (tests/rejection) need both right and wrong replies among their few samples, and the tiny
blueprints' headers quote measured RL and CoT numbers. Worth taking together with re-measuring those.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

NEG_INF = float("-inf")


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature`` (float32); temperature must be > 0 here (0 is greedy, handled by `sample`)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to scale logits, got {temperature}")
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the logits ``>=`` the k-th largest per row ``[N, V]``; ``k = 0`` or ``k >= V``: unchanged."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (N, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filter per row ``[N, V]`` (HF's ``TopPLogitsWarper`` with ``min_tokens_to_keep=1``)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)  # ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # mass up to and including each token
    remove_sorted = cumulative <= 1.0 - top_p
    remove_sorted[..., -1] = False  # the top token always stays
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens with ``p < min_p * p_max`` per row ``[N, V]`` (HF's ``MinPLogitsWarper``); the top stays."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)  # (N, 1)
    remove = probs < threshold
    remove.scatter_(-1, logits.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, NEG_INF)


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> Tensor:
    """Temperature, top-k, top-p, min-p in that order: float32 scores ``[N, V]``, ``-inf`` where removed."""
    scores = apply_temperature(logits, temperature)
    scores = top_k_filter(scores, top_k)
    scores = top_p_filter(scores, top_p)
    return min_p_filter(scores, min_p)


def sample(logits: Tensor, generators: Sequence[torch.Generator], temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, min_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """One token per row of ``logits [N, V]`` and its log-probability: ``(tokens [N] long, logprobs [N] float32)``.

    ``temperature == 0``: greedy (argmax; log-prob under the plain softmax). Otherwise row ``i`` draws from
    ``softmax(filter_logits(...))`` with ``generators[i]``; its log-prob is under that same distribution.
    """
    logits = logits.float()
    if temperature == 0.0:
        top, tokens = logits.max(dim=-1)  # (N,) each; the first maximum, as argmax (max is ~1.6x faster on CPU)
        return tokens, top - logits.logsumexp(dim=-1)
    if len(generators) != logits.shape[0]:
        raise ValueError(f"sample: {len(generators)} generators for {logits.shape[0]} rows")
    scores = filter_logits(logits, temperature, top_k, top_p, min_p)  # (N, V)
    logp = scores.log_softmax(dim=-1)
    # Exponential race: argmax p_i / E_i with E_i ~ Exp(1) i.i.d. draws token i with probability p_i (what
    # torch.multinomial does for one sample). E = -log(U) from each row's own generator; rand + log is ~10x
    # faster on CPU than exponential_ with a generator.
    # One buffer written in place (no per-row tensors, stack or temporaries: this runs at every decode step).
    noise = logp.new_empty(logp.shape)  # (N, V)
    for row, g in zip(noise, generators):
        torch.rand(logp.shape[-1], generator=g, out=row)  # U
    noise.log_().neg_().log_()  # log(E) = log(-log(U))
    race = torch.sub(logp, noise, out=noise)  # log(p / E); removed tokens stay -inf
    tokens = race.max(dim=-1).indices  # (N,): the first maximum, as argmax (max is ~1.6x faster on CPU)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def sample_generator(seed: int | None, request_index: int, sample_index: int,
                     device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one sample, on ``device`` (where its logits are): seeded from (seed, request, sample), so
    a sample's draws do not depend on the rest of its batch; ``seed=None`` draws a fresh seed from torch's
    default generator. (CPU and CUDA generators are different streams: the same seed draws differently.)"""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    mixed = np.random.SeedSequence([seed, request_index, sample_index]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(mixed[0]) << 32 | int(mixed[1]))
