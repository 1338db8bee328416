"""The ``grpo`` / ``gspo`` losses: advantages, clipped ratio objectives, the three aggregations, GSPO's
sequence ratio and the k1/k3 KL checked against the published formulas written out here per element in
plain python; hand-checkable aggregation differences on unequal lengths; gradient direction and clipping;
dynamic sampling and overlong masking; the registered components."""

import math
import statistics

import pytest
import torch

from keye_plugins.loss.grpo import (GRPOLoss, GSPOLoss, group_advantages, grpo_loss, gspo_loss, informative_groups,
                                    kl_penalty, mask_truncated)


# --- the published formulas, element by element --------------------------------------------------------


def ref_advantages(rewards, G, scale=True, eps=1e-6):
    out = []
    for g in range(0, len(rewards), G):
        group = rewards[g:g + G]
        mean = sum(group) / G
        std = statistics.stdev(group) if G > 1 else 0.0  # unbiased (n − 1)
        out += [(r - mean) / (std + eps) if scale and G > 1 else r - mean for r in group]
    return out


def ref_kl(lp, rlp, estimator):
    if estimator == "k1":
        return lp - rlp
    d = rlp - lp
    return math.exp(d) - d - 1


def ref_clipped(ratio, adv, lo, hi):
    return min(ratio * adv, min(max(ratio, 1 - lo), 1 + hi) * adv)


def ref_grpo(lp, old, adv, lengths, *, lo, hi, aggregation, L=None, ref=None, beta=0.0, est="k3"):
    """−min(ρÂ, clip(ρ)Â) + β·KL per token; sequence_mean / token_mean / constant over the batch."""
    per_seq, total, tokens = [], 0.0, 0
    for i, n in enumerate(lengths):
        s = 0.0
        for t in range(n):
            term = -ref_clipped(math.exp(lp[i][t] - old[i][t]), adv[i], lo, hi)
            if beta:
                term += beta * ref_kl(lp[i][t], ref[i][t], est)
            s += term
        per_seq.append(s / n)
        total += s
        tokens += n
    if aggregation == "sequence_mean":
        return sum(per_seq) / len(per_seq)
    if aggregation == "token_mean":
        return total / tokens
    return total / (len(lengths) * L)


def ref_gspo(lp, old, adv, lengths, *, lo, hi, ref=None, beta=0.0, est="k3"):
    """GSPO: s_i = (πθ(y_i)/π_old(y_i))^(1/|y_i|); −(1/G) Σ min(s_i Â_i, clip(s_i) Â_i) (+ β·token-mean KL)."""
    total = 0.0
    for i, n in enumerate(lengths):
        s_i = math.exp(sum(lp[i][t] - old[i][t] for t in range(n)) / n)
        term = -ref_clipped(s_i, adv[i], lo, hi)
        if beta:
            term += beta * sum(ref_kl(lp[i][t], ref[i][t], est) for t in range(n)) / n
        total += term
    return total / len(lengths)


def _batch(seed=0, lengths=(3, 7, 1, 5), T=8, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    N = len(lengths)
    logp = -3 * torch.rand(N, T, generator=g, dtype=torch.float64)
    old = logp + spread * torch.randn(N, T, generator=g, dtype=torch.float64)  # ratios on both sides of the clip
    ref = logp + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    mask = torch.zeros(N, T, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return logp, old, ref, adv, mask, list(lengths)


# --- advantages, dynamic sampling, overlong masking ---------------------------------------------------------


def test_group_advantages_match_the_formula_and_dr_grpo_drops_the_std():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.25, 2.0, 2.0, -1.0]
    for G, scale in [(3, True), (3, False), (9, True), (1, True)]:
        got = group_advantages(torch.tensor(rewards), G, scale=scale)
        assert got.tolist() == pytest.approx(ref_advantages(rewards, G, scale), abs=1e-5)
    # a group whose rewards are all equal has advantage 0 (no division by zero)
    assert group_advantages(torch.tensor([0.7, 0.7, 0.7]), 3).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_dynamic_sampling_keeps_groups_with_a_reward_spread_and_overlong_rows_are_masked():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert informative_groups(rewards, 3).tolist() == [False, True, False]
    mask = torch.ones(3, 4)
    assert mask_truncated(mask, torch.tensor([False, True, False])).sum(dim=1).tolist() == [4.0, 0.0, 4.0]


def test_kl_estimators_match_k1_and_k3():
    logp, _, ref, _, _, _ = _batch()
    for est in ("k1", "k3"):
        got = kl_penalty(logp, ref, est).flatten().tolist()
        want = [ref_kl(a, b, est) for a, b in zip(logp.flatten().tolist(), ref.flatten().tolist())]
        assert got == pytest.approx(want, rel=1e-12)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()  # k3 is never negative; k1 can be
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logp, ref, "k2")


# --- the objectives against the formulas ----------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "constant"])
@pytest.mark.parametrize("lo,hi,beta,est", [(0.2, 0.2, 0.0, "k3"), (0.2, 0.28, 0.04, "k3"), (0.1, 0.3, 0.5, "k1")])
def test_grpo_matches_the_published_formula_per_element(aggregation, lo, hi, beta, est):
    logp, old, ref, adv, mask, lengths = _batch()
    loss, metrics = grpo_loss(logp, old, adv, mask, clip_low=lo, clip_high=hi, aggregation=aggregation, max_tokens=8,
                              ref_logp=ref, beta=beta, kl_estimator=est)
    want = ref_grpo(logp.tolist(), old.tolist(), adv.tolist(), lengths, lo=lo, hi=hi, aggregation=aggregation, L=8,
                    ref=ref.tolist(), beta=beta, est=est)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    kl_tokens = [ref_kl(logp[i, t].item(), ref[i, t].item(), est) for i, n in enumerate(lengths) for t in range(n)]
    assert metrics["kl"].item() == pytest.approx(sum(kl_tokens) / len(kl_tokens), rel=1e-6)


@pytest.mark.parametrize("lo,hi,beta", [(3e-4, 4e-4, 0.0), (0.05, 0.1, 0.0), (0.05, 0.1, 0.2)])
def test_gspo_matches_the_published_formula_per_reply(lo, hi, beta):
    logp, old, ref, adv, mask, lengths = _batch(seed=1, spread=0.1)
    loss, _ = gspo_loss(logp, old, adv, mask, clip_low=lo, clip_high=hi, ref_logp=ref, beta=beta)
    want = ref_gspo(logp.tolist(), old.tolist(), adv.tolist(), lengths, lo=lo, hi=hi, ref=ref.tolist(), beta=beta)
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_gspo_equals_grpo_on_one_token_replies():
    logp, old, _, adv, mask, _ = _batch(seed=2, lengths=(1, 1, 1, 1))
    a, _ = grpo_loss(logp, old, adv, mask, clip_low=0.1, clip_high=0.2)
    b, _ = gspo_loss(logp, old, adv, mask, clip_low=0.1, clip_high=0.2)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_the_aggregations_differ_on_unequal_lengths_by_hand():
    # two replies of 1 and 3 tokens, on-policy (ρ = 1), advantages +2 and −1: per-token losses −2 and +1, +1, +1
    logp = torch.zeros(2, 4)
    mask = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 0]])
    adv = torch.tensor([2.0, -1.0])
    value = {agg: grpo_loss(logp, logp, adv, mask, aggregation=agg, max_tokens=4)[0].item()
             for agg in ("sequence_mean", "token_mean", "constant")}
    assert value["sequence_mean"] == pytest.approx((-2 + 1) / 2)        # each reply weighs the same
    assert value["token_mean"] == pytest.approx((-2 + 3) / 4)           # each token weighs the same (DAPO)
    assert value["constant"] == pytest.approx((-2 + 3) / (2 * 4))       # Dr. GRPO: N·L
    assert gspo_loss(logp, logp, adv, mask)[0].item() == pytest.approx((-2 + 1) / 2)


# --- gradients, clipping, metrics -----------------------------------------------------------------------------


@pytest.mark.parametrize("objective", [grpo_loss, gspo_loss])
def test_gradient_raises_good_replies_and_lowers_bad_ones(objective):
    logp = (-2 * torch.rand(2, 5, generator=torch.Generator().manual_seed(3))).requires_grad_()
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    loss, _ = objective(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask)
    loss.backward()
    assert (logp.grad[0, :3] < 0).all() and (logp.grad[1] > 0).all()  # descent raises row 0, lowers row 1
    assert (logp.grad[0, 3:] == 0).all()  # padding gets nothing


def test_clipped_tokens_get_no_gradient_and_are_counted():
    # A > 0: ρ = e^0.5 > 1.2 is clipped (no gradient), ρ = 1 is not; A < 0: ρ = e^−0.5 < 0.8 clipped
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.5, 0.0], [-0.5, 0.0]], requires_grad=True)
    loss, metrics = grpo_loss(logp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2), clip_low=0.2, clip_high=0.2)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[1, 0] == 0 and logp.grad[0, 1] != 0 and logp.grad[1, 1] != 0
    assert metrics["clip_fraction"].item() == 0.5
    # the clip-higher side: with ε_high 0.7 the ratio e^0.5 ≈ 1.65 is inside the range again
    _, wide = grpo_loss(logp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2), clip_low=0.2, clip_high=0.7)
    assert wide["clip_fraction"].item() == 0.25


def test_metrics_are_masked_means_and_detached():
    logp, old, ref, adv, mask, lengths = _batch()
    entropy = torch.arange(32, dtype=torch.float64).view(4, 8)
    _, metrics = grpo_loss(logp.requires_grad_(), old, adv, mask, ref_logp=ref, entropy=entropy)
    tokens = [(i, t) for i, n in enumerate(lengths) for t in range(n)]
    assert metrics["entropy"].item() == pytest.approx(sum(entropy[i, t].item() for i, t in tokens) / len(tokens))
    ratios = [math.exp(logp[i, t].item() - old[i, t].item()) for i, t in tokens]
    assert metrics["ratio"].item() == pytest.approx(sum(ratios) / len(ratios))
    assert not any(v.requires_grad for v in metrics.values())
    assert set(metrics) == {"clip_fraction", "ratio", "kl", "entropy"}
    _, bare = grpo_loss(logp, old, adv, mask)
    assert set(bare) == {"clip_fraction", "ratio"}
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_tokens"):
        grpo_loss(logp, old, adv, mask, aggregation="constant")


# --- the components ------------------------------------------------------------------------------------------


def test_components_are_registered_and_apply_their_settings():
    from keye.plugins import get_registry

    registry = get_registry()
    assert registry.get("loss", "grpo").cls is GRPOLoss and registry.get("loss", "gspo").cls is GSPOLoss
    logp, old, ref, adv, mask, lengths = _batch()
    dapo = GRPOLoss(GRPOLoss.Config(clip_high=0.28, aggregation="token_mean", beta=0.01))
    loss, _ = dapo(logp, old, adv, mask, ref_logp=ref)
    want = ref_grpo(logp.tolist(), old.tolist(), adv.tolist(), lengths, lo=0.2, hi=0.28, aggregation="token_mean",
                    ref=ref.tolist(), beta=0.01)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    assert GRPOLoss(GRPOLoss.Config(scale_advantages=False)).advantages(rewards, 2).tolist() == [0.5, -0.5, 0.0, 0.0]
    gspo = GSPOLoss(GSPOLoss.Config())
    assert gspo(logp, old, adv, mask)[0].item() == pytest.approx(
        ref_gspo(logp.tolist(), old.tolist(), adv.tolist(), lengths, lo=3e-4, hi=4e-4), rel=1e-6)


def test_check_config_names_the_bad_setting(keye_registry, blueprint_file):
    from keye.config import load_blueprint
    from keye.errors import KeyeUserError

    def stage_loss(loss):
        return {"model": {"language_model": {"name": "qwen3", "size": "tiny"}},
                "stages": [{"name": "s", "kind": "lm", "loss": loss}]}

    cases = [({"name": "grpo", "clip_low": 1.5}, r"clip_low.*<= 1"),
             ({"name": "grpo", "aggregation": "token_sum"}, "aggregation.*sequence_mean"),
             ({"name": "grpo", "aggregation": "constant"}, "max_tokens"),
             ({"name": "gspo", "kl_estimator": "k2"}, "kl_estimator"),
             ({"name": "gspo", "beta": -0.1}, "beta")]
    for i, (loss, message) in enumerate(cases):
        with pytest.raises(KeyeUserError, match=message):
            load_blueprint(blueprint_file(stage_loss(loss), f"bad{i}.yaml"), [], keye_registry)
    load_blueprint(blueprint_file(stage_loss({"name": "grpo", "aggregation": "constant", "max_tokens": 64}), "ok.yaml"),
                   [], keye_registry)
