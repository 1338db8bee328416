"""``mpo``: mixed preference optimisation (InternVL's MPO), the loss of the ``preference`` stage.

MPO (Wang et al. 2024, arXiv 2411.10442) is a weighted sum of three terms on a preference pair
(prompt x, chosen y_c, rejected y_r), with the implicit reward r(y) = β·(log πθ(y|x) − log π_ref(y|x)),
sequence log-probabilities summed over the answer tokens:

- ``sigmoid`` (DPO, preference):      −log σ(r_c − r_r)
- ``bco_pair`` (BCO, quality):        −log σ(r_c − δ) − log σ(−(r_r − δ))
- ``sft`` (generation, on y_c only):  the token-mean negative log-likelihood of the chosen answer

InternVL trains with ``--loss_type sigmoid,bco_pair --sigmoid_loss_weight 0.8 --bco_pair_loss_weight 0.2
--rpo_alpha 1`` and TRL's default β = 0.1: those are the defaults here (Keye-VL does not publish its own).

δ is the BCO reward shift: a running mean of the batch-mean reward (the mean of r_c and r_r together,
detached), gathered over data-parallel ranks and **updated with the current batch before it is used**, as
TRL's ``RunningMoments`` does in 0.20-0.28 (TRL 0.29 dropped it, δ = 0; we follow InternVL and keep it).
Each update adds one value per rank (the rank's batch mean), so δ is the plain mean of every batch mean
seen so far. `RunningMean` holds it and has a state dict, so a resumed run continues with the same δ.

The math is `mpo_loss`, a pure function; `MPOLoss` is the registered component that owns δ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from keye import hookimpl
from keye.config import doc

#: the terms, in the order they are reported
TERMS = ("sigmoid", "bco_pair", "sft")
DEFAULT_WEIGHTS = {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}


def mpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor | None,
    *,
    beta: float = 0.1,
    weights: dict[str, float] | None = None,
    delta: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MPO loss of a batch of ``B`` preference pairs, averaged over the batch.

    ``*_logps`` are per-sequence sums of answer-token log-probabilities ``[B]`` (policy and reference);
    ``chosen_nll`` is each chosen answer's token-mean negative log-likelihood ``[B]`` (may be None when the
    ``sft`` weight is 0). ``weights`` maps ``sigmoid`` / ``bco_pair`` / ``sft`` to floats (missing = 0; a term
    whose weight is 0 is switched off: not computed into the loss, so it cannot add NaN or gradient).
    ``delta`` is the BCO shift, already updated with this batch (`RunningMean`).

    Returns the scalar loss and detached metrics: each term's batch mean (``loss_<term>``, active terms
    only), ``reward_accuracy`` (share of pairs with r_c > r_r), ``margin`` (mean r_c − r_r),
    ``chosen_reward`` and ``rejected_reward`` (means) and ``delta``.
    """
    weights = DEFAULT_WEIGHTS if weights is None else weights
    unknown = sorted(set(weights) - set(TERMS))
    if unknown:
        raise ValueError(f"mpo_loss: unknown weight(s) {', '.join(unknown)}; known: {', '.join(TERMS)}")
    chosen_rewards = beta * (chosen_logps.float() - ref_chosen_logps.float())  # [B]
    rejected_rewards = beta * (rejected_logps.float() - ref_rejected_logps.float())  # [B]
    delta = torch.as_tensor(delta, dtype=torch.float32, device=chosen_rewards.device).detach()
    terms: dict[str, torch.Tensor] = {}
    if weights.get("sigmoid", 0.0):
        terms["sigmoid"] = -F.logsigmoid(chosen_rewards - rejected_rewards)  # [B]
    if weights.get("bco_pair", 0.0):
        terms["bco_pair"] = -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))  # [B]
    if weights.get("sft", 0.0):
        if chosen_nll is None:
            raise ValueError("mpo_loss: the sft term needs chosen_nll")
        terms["sft"] = chosen_nll.float()  # [B]
    if not terms:
        raise ValueError("mpo_loss: every weight is 0; switch on at least one of " + ", ".join(TERMS))
    loss = sum(weights[name] * value for name, value in terms.items()).mean()
    with torch.no_grad():
        metrics = {f"loss_{name}": value.mean() for name, value in terms.items()}
        metrics.update(
            reward_accuracy=(chosen_rewards > rejected_rewards).float().mean(),
            margin=(chosen_rewards - rejected_rewards).mean(),
            chosen_reward=chosen_rewards.mean(),
            rejected_reward=rejected_rewards.mean(),
            delta=delta.clone(),
        )
    return loss, {name: value.detach() for name, value in metrics.items()}


class RunningMean:
    """δ of the BCO-pair term: the running mean of batch-mean rewards, gathered over data-parallel ranks.

    ``update(batch_mean)`` adds every rank's value (all-gathered over ``group`` when torch.distributed is
    initialised) and returns the new mean; call it before using δ, as TRL does. Only the mean and the number
    of values seen are kept, so the state dict is two numbers.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, batch_mean: torch.Tensor | float, group: Any = None) -> float:
        value = torch.as_tensor(batch_mean, dtype=torch.float64).detach().reshape(1)
        values = value
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            size = torch.distributed.get_world_size(group)
            if size > 1:
                gathered = [torch.zeros_like(value) for _ in range(size)]
                torch.distributed.all_gather(gathered, value, group=group)
                values = torch.cat(gathered)
        total = self.count + values.numel()
        self.mean += (float(values.sum()) - values.numel() * self.mean) / total
        self.count = total
        return self.mean

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])


class MPOLoss:
    """The ``mpo`` loss component: `mpo_loss` with its settings and the running δ it owns."""

    @dataclass
    class Config:
        beta: float = doc("β of the implicit reward β·(log πθ − log π_ref) (TRL's and InternVL's default 0.1).", 0.1)
        weights: dict[str, float] = doc(
            "Weight of each term: sigmoid (DPO), bco_pair (BCO with the running shift δ), sft (NLL of the chosen "
            "answer); 0 switches a term off. Defaults are InternVL MPO's 0.8 / 0.2 / 1.0; a term left out keeps its "
            "default (plain DPO: {sigmoid: 1.0, bco_pair: 0, sft: 0}).",
            default_factory=lambda: dict(DEFAULT_WEIGHTS),
        )

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        """β > 0; only known terms, each weight finite and >= 0, at least one on."""
        check.number(config, "beta", above=0.0)
        for name, weight in config.weights.items():
            if name not in TERMS:
                check.fail(f"weights.{name}", f"unknown term; known: {', '.join(TERMS)}")
            finite = isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
            if not finite or weight < 0:
                check.fail(f"weights.{name}", f"must be a finite number >= 0, got {weight!r}")
        if not any(config.weights.get(name, 0.0) for name in TERMS):
            check.fail("weights", f"every weight is 0; switch on at least one of {', '.join(TERMS)}")

    def __init__(self, config: Config, ctx: Any = None) -> None:
        self.config = config
        self.weights = {name: float(config.weights.get(name, 0.0)) for name in TERMS}
        self.running = RunningMean()

    def __call__(self, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                 ref_rejected_logps: torch.Tensor, chosen_nll: torch.Tensor | None,
                 group: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Update δ with this batch (over ``group``, the data-parallel ranks), then `mpo_loss`."""
        beta = self.config.beta
        rewards = torch.cat([beta * (chosen_logps - ref_chosen_logps), beta * (rejected_logps - ref_rejected_logps)])
        self.running.update(rewards.detach().float().mean(), group)  # δ is reported even with bco_pair off
        return mpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_nll,
                        beta=beta, weights=self.weights, delta=self.running.mean)

    def state_dict(self) -> dict[str, Any]:
        return {"running_mean": self.running.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running.load_state_dict(state["running_mean"])


@hookimpl
def keye_register_losses(register):
    register("mpo", MPOLoss)
