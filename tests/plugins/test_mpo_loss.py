"""The ``mpo`` loss: the published MPO / DPO / BCO-pair formulas written out here per element in plain
python math, hand-checkable values, weight switches, δ's update-before-use order (also over 2 real
ranks) and its resumable state, and the direction of the gradient."""

import math

import pytest
import torch

from keye.testing.distributed import run_distributed
from keye_plugins.loss.mpo import DEFAULT_WEIGHTS, MPOLoss, RunningMean, mpo_loss


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reference_mpo(pc, pr, rc, rr, nll, *, beta, weights, delta):
    """InternVL MPO as published, pair by pair: r = β(log πθ − log π_ref);
    w_p·−log σ(r_c − r_r) + w_q·(−log σ(r_c − δ) − log σ(−(r_r − δ))) + w_g·NLL_c, averaged over pairs."""
    total = 0.0
    for i in range(len(pc)):
        r_c, r_r = beta * (pc[i] - rc[i]), beta * (pr[i] - rr[i])
        dpo = -_log_sigmoid(r_c - r_r)
        bco = -_log_sigmoid(r_c - delta) - _log_sigmoid(-(r_r - delta))
        total += weights.get("sigmoid", 0) * dpo + weights.get("bco_pair", 0) * bco + weights.get("sft", 0) * nll[i]
    return total / len(pc)


def _batch(seed: int = 0, size: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [(-20 * torch.rand(size, generator=g, dtype=torch.float64)) for _ in range(4)] + [
        3 * torch.rand(size, generator=g, dtype=torch.float64)]


def test_matches_the_published_formula_per_element():
    tensors = _batch()
    lists = [t.tolist() for t in tensors]
    for beta, weights, delta in [(0.1, DEFAULT_WEIGHTS, 0.0), (0.1, DEFAULT_WEIGHTS, 0.37), (0.5, {"sigmoid": 1.0}, -1.2),
                                 (0.05, {"bco_pair": 2.0, "sft": 0.3}, 0.8)]:
        loss, _ = mpo_loss(*tensors, beta=beta, weights=weights, delta=delta)
        assert loss.item() == pytest.approx(reference_mpo(*lists, beta=beta, weights=weights, delta=delta), rel=1e-6)


def test_hand_checkable_values():
    one = torch.tensor([1.0])
    zero = torch.tensor([0.0])
    # policy == reference: r_c = r_r = 0, so DPO = log 2; with δ = 0 BCO-pair = 2 log 2; SFT = the NLL (2).
    loss, metrics = mpo_loss(-one, -one, -one, -one, 2 * one, beta=0.1, weights=DEFAULT_WEIGHTS, delta=0.0)
    assert loss.item() == pytest.approx(0.8 * math.log(2) + 0.2 * 2 * math.log(2) + 1.0 * 2)
    assert metrics["loss_sigmoid"].item() == pytest.approx(math.log(2))
    assert metrics["loss_bco_pair"].item() == pytest.approx(2 * math.log(2))
    assert metrics["reward_accuracy"].item() == 0.0  # a tie is not a win
    assert metrics["margin"].item() == 0.0
    # β = 1, chosen gained 2 nats over the reference, rejected lost 1: r_c = 2, r_r = -1, margin 3.
    loss, metrics = mpo_loss(2 * one, -one, zero, zero, zero, beta=1.0, weights={"sigmoid": 1.0}, delta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-3)))
    assert metrics["chosen_reward"].item() == 2.0 and metrics["rejected_reward"].item() == -1.0
    assert metrics["margin"].item() == 3.0 and metrics["reward_accuracy"].item() == 1.0
    assert metrics["delta"].item() == 0.5
    # BCO-pair alone with δ = r_c = r_r: 2 log 2, whatever the rewards are.
    loss, _ = mpo_loss(one, one, zero, zero, None, beta=0.3, weights={"bco_pair": 1.0}, delta=0.3)
    assert loss.item() == pytest.approx(2 * math.log(2))


def test_reward_accuracy_and_margin_over_a_batch():
    chosen = torch.tensor([1.0, 0.0, 3.0, -2.0])
    rejected = torch.tensor([0.0, 1.0, 2.0, -2.0])
    zeros = torch.zeros(4)
    _, metrics = mpo_loss(chosen, rejected, zeros, zeros, zeros, beta=1.0, weights={"sigmoid": 1.0})
    assert metrics["reward_accuracy"].item() == 0.5  # pairs 0 and 2 win, 1 loses, 3 ties
    assert metrics["margin"].item() == pytest.approx((1 - 1 + 1 + 0) / 4)


def test_a_zero_weight_switches_its_term_off():
    tensors = _batch(1)
    full, metrics = mpo_loss(*tensors, beta=0.1, weights=DEFAULT_WEIGHTS, delta=0.2)
    no_sft, no_sft_metrics = mpo_loss(*tensors, beta=0.1, weights={**DEFAULT_WEIGHTS, "sft": 0.0}, delta=0.2)
    assert (full - no_sft).item() == pytest.approx(metrics["loss_sft"].item())
    assert "loss_sft" not in no_sft_metrics
    # a switched-off term is not computed: a NaN NLL cannot reach the loss
    nan_nll = torch.full_like(tensors[4], float("nan"))
    loss, _ = mpo_loss(*tensors[:4], nan_nll, beta=0.1, weights={"sigmoid": 0.8, "bco_pair": 0.2, "sft": 0.0}, delta=0.2)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(no_sft.item())
    only_dpo, _ = mpo_loss(*tensors, beta=0.1, weights={"sigmoid": 1.0, "bco_pair": 0.0, "sft": 0.0}, delta=0.2)
    assert only_dpo.item() == pytest.approx(metrics["loss_sigmoid"].item())
    with pytest.raises(ValueError, match="every weight is 0"):
        mpo_loss(*tensors, beta=0.1, weights={"sigmoid": 0.0})
    with pytest.raises(ValueError, match="unknown weight"):
        mpo_loss(*tensors, beta=0.1, weights={"ipo": 1.0})


def test_gradient_raises_chosen_and_lowers_rejected():
    tensors = [t.clone().requires_grad_() for t in _batch(2)]
    loss, _ = mpo_loss(*tensors, beta=0.1, weights=DEFAULT_WEIGHTS, delta=0.1)
    (-loss).backward()  # the direction gradient descent on the loss moves the log-probs in
    chosen, rejected, ref_chosen, ref_rejected, nll = (t.grad for t in tensors)
    assert (chosen > 0).all() and (rejected < 0).all()
    assert (nll < 0).all()  # lower NLL of the chosen answer
    # the reference is a constant in training, but the algebra is symmetric: its gradient is the opposite
    assert torch.allclose(ref_chosen, -chosen) and torch.allclose(ref_rejected, -rejected)


def test_running_mean_is_updated_with_the_batch_before_use():
    loss = MPOLoss(MPOLoss.Config(beta=1.0))
    zeros = torch.zeros(2)
    # batch 1: rewards r_c = [1, 3], r_r = [0, 0] -> batch mean 1; δ used in this batch is already 1
    _, metrics = loss(torch.tensor([1.0, 3.0]), zeros, zeros, zeros, zeros)
    assert metrics["delta"].item() == pytest.approx(1.0)
    # batch 2: rewards all 4 -> batch mean 4; δ = (1 + 4) / 2
    four = torch.full((2,), 4.0)
    value, metrics = loss(four, four, zeros, zeros, zeros)
    assert metrics["delta"].item() == pytest.approx(2.5)
    expected = reference_mpo([4.0, 4.0], [4.0, 4.0], [0, 0], [0, 0], [0, 0], beta=1.0, weights=DEFAULT_WEIGHTS, delta=2.5)
    assert value.item() == pytest.approx(expected)  # the loss used δ = 2.5, not the previous 1.0
    resumed = MPOLoss(MPOLoss.Config(beta=1.0))
    resumed.load_state_dict(loss.state_dict())  # what a checkpoint carries
    assert resumed.running.mean == 2.5 and resumed.running.count == 2
    three = torch.full((2,), 3.0)
    _, a = loss(three, three, zeros, zeros, zeros)
    _, b = resumed(three, three, zeros, zeros, zeros)
    assert a["delta"].item() == b["delta"].item() == pytest.approx((1 + 4 + 3) / 3)


def test_running_mean_state_dict_roundtrip():
    running = RunningMean()
    for value in (0.5, -1.0, 2.0):
        running.update(torch.tensor(value))
    assert running.mean == pytest.approx(0.5) and running.count == 3
    copy = RunningMean()
    copy.load_state_dict(running.state_dict())
    assert copy.update(1.0) == running.update(1.0) == pytest.approx((0.5 - 1 + 2 + 1) / 4)


def _two_rank_delta():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    running = RunningMean()
    first = running.update(torch.tensor([1.0, 5.0][rank]))  # ranks' batch means 1 and 5
    second = running.update(torch.tensor([0.0, 2.0][rank]))
    dist.destroy_process_group()
    return first, second, running.count


def test_running_mean_gathers_over_data_parallel_ranks():
    results = run_distributed(_two_rank_delta, 2)
    for first, second, count in results:
        assert first == pytest.approx(3.0)  # mean of both ranks' values, the same on each
        assert second == pytest.approx((1 + 5 + 0 + 2) / 4)
        assert count == 4


def test_check_config_names_the_bad_weight(keye_registry, blueprint_file):
    from keye.config import load_blueprint
    from keye.errors import KeyeUserError

    base = {"model": {"language_model": {"name": "qwen3", "size": "tiny"}},
            "stages": [{"name": "s", "kind": "lm", "loss": {"name": "mpo", "weights": {"sigmoid": -1.0}}}]}
    with pytest.raises(KeyeUserError, match=r"weights\.sigmoid.*>= 0"):
        load_blueprint(blueprint_file(base, "bad.yaml"), [], keye_registry)
    base["stages"][0]["loss"] = {"name": "mpo", "beta": 0.0}
    with pytest.raises(KeyeUserError, match="beta"):
        load_blueprint(blueprint_file(base, "beta.yaml"), [], keye_registry)
