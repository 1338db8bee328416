"""``grpo`` and ``gspo``: the policy-gradient objectives of the ``rl`` stage, as pure functions.

Notation: a batch of N replies in groups of G (the G rollouts of one prompt are contiguous), reply i has
|y_i| tokens (``mask[i]`` marks them), log-probabilities ``logp`` under the policy being trained (πθ), ``old_logp``
under the policy that sampled (π_old; the caller passes ``logp.detach()`` when there is one update per
batch), ``ref_logp`` under the frozen reference.

- Advantages (`group_advantages`): Â_i = (r_i − mean_g r) / (std_g r + ε) over the group (GRPO; unbiased
  std as TRL and verl compute it, ε 1e-6 as verl); without the division (``scale=False``) it is Dr. GRPO.
- Token ratio ρ_i,t = exp(logp − old_logp), clipped objective o_i,t = min(ρ Â_i, clip(ρ, 1 − ε_low, 1 +
  ε_high) Â_i) (PPO; DAPO's "clip higher" when ε_high > ε_low), per-token loss l_i,t = −o_i,t + β·KL_i,t.
- Aggregation of l over the batch (`AGGREGATIONS`):
  ``sequence_mean``: (1/N) Σ_i (1/|y_i|) Σ_t l_i,t, GRPO as written in the Keye-VL paper (and TRL's
  ``grpo``): every reply weighs the same, so a long reply's tokens each weigh less;
  ``token_mean``: Σ_i,t l_i,t / Σ_i |y_i| (DAPO): every token weighs the same;
  ``constant``: Σ_i,t l_i,t / (N · L) with a fixed L (Dr. GRPO; L = ``max_tokens``, the generation limit).
- GSPO (`gspo_loss`, Zheng et al. 2025, as Keye-VL-1.5 uses it): one ratio per reply, s_i = (πθ(y_i)/
  π_old(y_i))^(1/|y_i|) = exp(mean_t (logp − old_logp)), objective min(s_i Â_i, clip(s_i, 1 − ε_low, 1 +
  ε_high) Â_i) averaged over replies; the KL term (β 0 in the paper) is each reply's token mean.
- KL to the reference (`kl_penalty`): k1 = logp − ref_logp; k3 = exp(ref − logp) − (ref − logp) − 1,
  unbiased, non-negative and lower variance (Schulman's estimator, verl's ``low_var_kl``, which clamps the
  log difference to ±20 and the value to ±10: so do we).
- DAPO's dynamic sampling (`informative_groups`: drop groups whose rewards are all equal; their advantages
  are all 0 and give no gradient) and overlong masking (`mask_truncated`: a reply cut by the length limit
  adds no loss).

Each loss returns the scalar and detached metrics: ``clip_fraction`` (share of tokens, or replies for
GSPO, where the clipped term is the smaller one and so carries no gradient), ``ratio`` (mean ρ or s),
``kl`` (token mean, when a reference is given), ``entropy`` (token mean, when given).
`GRPOLoss` and `GSPOLoss` are the registered components: the settings around these functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from keye import hookimpl
from keye.config import doc

AGGREGATIONS = ("sequence_mean", "token_mean", "constant")
KL_ESTIMATORS = ("k1", "k3")


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Â = (r − group mean) / (group std + eps), or r − group mean when not ``scale`` (Dr. GRPO).

    ``rewards`` is ``[N]`` with N a multiple of ``group_size``, each group contiguous. The std is the
    unbiased one (n − 1), as ``torch.std`` gives it; a group of one has advantage 0.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: rewards {tuple(rewards.shape)} do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale and group_size > 1:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def informative_groups(rewards: torch.Tensor, group_size: int, *, tol: float = 0.0) -> torch.Tensor:
    """DAPO's dynamic sampling: ``[N // G]`` bools, True for a group whose rewards are not all equal
    (max − min > tol). The others have zero advantage and would only dilute the batch."""
    groups = rewards.view(-1, group_size)
    return (groups.max(dim=1).values - groups.min(dim=1).values) > tol


def mask_truncated(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """DAPO's overlong filtering: ``mask`` ``[N, T]`` with the rows of truncated replies (``[N]`` bools,
    finish reason ``length``) zeroed, so a reply cut mid-thought is neither rewarded nor punished."""
    return mask * (~truncated.bool()).to(mask.dtype).unsqueeze(1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(πθ ‖ π_ref) from samples of πθ: k1 = logp − ref_logp, or k3 = e^d − d − 1
    with d = ref_logp − logp (clamped as verl does: d to ±20, the value to ±10)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        d = torch.clamp(ref_logp - logp, -20.0, 20.0)
        return torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)
    raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; known: {', '.join(KL_ESTIMATORS)}")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _clipped(ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float):
    """(objective, clip-active flags) of min(ρÂ, clip(ρ)Â)."""
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    return torch.minimum(unclipped, clipped), (clipped < unclipped)


def _metrics(mask: torch.Tensor, kl: torch.Tensor | None, entropy: torch.Tensor | None, **extra: torch.Tensor):
    with torch.no_grad():
        metrics = dict(extra)
        if kl is not None:
            metrics["kl"] = _masked_mean(kl, mask)
        if entropy is not None:
            metrics["entropy"] = _masked_mean(entropy.float(), mask)
    return {name: value.detach() for name, value in metrics.items()}


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "sequence_mean",
    max_tokens: int | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token clipped GRPO loss (to minimise) of ``[N, T]`` log-probs, ``[N]`` advantages and a
    ``[N, T]`` 0/1 mask of reply tokens, aggregated as ``aggregation`` says (module docstring); ``max_tokens``
    is L of ``constant``. The KL term is added when ``beta`` > 0 (then ``ref_logp`` is required) and
    reported whenever ``ref_logp`` is given. A reply with no tokens counts as 0 in ``sequence_mean``."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"grpo_loss: unknown aggregation {aggregation!r}; known: {', '.join(AGGREGATIONS)}")
    if beta and ref_logp is None:
        raise ValueError("grpo_loss: beta > 0 needs ref_logp")
    mask = mask.float()
    ratio = torch.exp(logp.float() - old_logp.float())
    objective, clip_active = _clipped(ratio, advantages.float().unsqueeze(1), clip_low, clip_high)
    per_token = -objective
    kl = kl_penalty(logp.float(), ref_logp.float(), kl_estimator) if ref_logp is not None else None
    if beta:
        per_token = per_token + beta * kl
    if aggregation == "sequence_mean":
        lengths = mask.sum(dim=1)
        loss = ((per_token * mask).sum(dim=1) / lengths.clamp(min=1.0)).mean()
    elif aggregation == "token_mean":
        loss = _masked_mean(per_token, mask)
    else:
        if not max_tokens:
            raise ValueError("grpo_loss: the constant aggregation needs max_tokens")
        loss = (per_token * mask).sum() / (mask.shape[0] * max_tokens)
    metrics = _metrics(mask, kl, entropy, clip_fraction=_masked_mean(clip_active.float(), mask),
                       ratio=_masked_mean(ratio, mask))
    return loss, metrics


def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GSPO loss (to minimise): the sequence ratio s_i = exp(mean_t (logp − old_logp)) clipped per
    reply, −mean_i min(s_i Â_i, clip(s_i) Â_i), plus β times each reply's token-mean KL averaged over
    replies. Shapes as `grpo_loss`; the defaults are the GSPO paper's ε 3e-4 / 4e-4 and β 0."""
    if beta and ref_logp is None:
        raise ValueError("gspo_loss: beta > 0 needs ref_logp")
    mask = mask.float()
    lengths = mask.sum(dim=1).clamp(min=1.0)
    log_ratio = ((logp.float() - old_logp.float()) * mask).sum(dim=1) / lengths
    ratio = torch.exp(log_ratio)
    objective, clip_active = _clipped(ratio, advantages.float(), clip_low, clip_high)
    per_reply = -objective
    kl = kl_penalty(logp.float(), ref_logp.float(), kl_estimator) if ref_logp is not None else None
    if beta:
        per_reply = per_reply + beta * (kl * mask).sum(dim=1) / lengths
    metrics = _metrics(mask, kl, entropy, clip_fraction=clip_active.float().mean(), ratio=ratio.mean())
    return per_reply.mean(), metrics


def _check_common(config: Any, check: Any) -> None:
    check.number(config, "clip_low", above=0.0, high=1.0)
    check.number(config, "clip_high", above=0.0)
    check.number(config, "beta", low=0.0)
    check.one_of(config, "kl_estimator", KL_ESTIMATORS)
    check.number(config, "eps", above=0.0)


class _PolicyLoss:
    """What both policy losses share: their settings and the group-normalised advantages."""

    def __init__(self, config: Any, ctx: Any = None) -> None:
        self.config = config

    def advantages(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        return group_advantages(rewards, group_size, scale=self.config.scale_advantages, eps=self.config.eps)


class GRPOLoss(_PolicyLoss):
    """The ``grpo`` loss component: `group_advantages` and `grpo_loss` with the blueprint's settings."""

    @dataclass
    class Config:
        clip_low: float = doc("ε_low: the ratio is clipped below at 1 − ε_low.", 0.2)
        clip_high: float = doc("ε_high: clipped above at 1 + ε_high (DAPO's clip-higher uses 0.28).", 0.2)
        aggregation: str = doc("sequence_mean (GRPO as in Keye-VL), token_mean (DAPO) or constant (Dr. GRPO).",
                               "sequence_mean")
        max_tokens: int = doc("L of the constant aggregation (the generation limit); unused otherwise.", 0)
        beta: float = doc("β of the KL penalty to the frozen reference (0: no reference needed).", 0.0)
        kl_estimator: str = doc("k1 or k3 (unbiased, non-negative, low variance).", "k3")
        scale_advantages: bool = doc("Divide by the group's reward std (GRPO); false is Dr. GRPO.", True)
        eps: float = doc("ε added to the group std.", 1e-6)

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        _check_common(config, check)
        check.one_of(config, "aggregation", AGGREGATIONS)
        if config.aggregation == "constant":
            check.count(config, "max_tokens")

    def __call__(self, logp, old_logp, advantages, mask, ref_logp=None, entropy=None):
        c = self.config
        return grpo_loss(logp, old_logp, advantages, mask, clip_low=c.clip_low, clip_high=c.clip_high,
                         aggregation=c.aggregation, max_tokens=c.max_tokens or None, ref_logp=ref_logp,
                         beta=c.beta, kl_estimator=c.kl_estimator, entropy=entropy)


class GSPOLoss(_PolicyLoss):
    """The ``gspo`` loss component: `group_advantages` and `gspo_loss` with the blueprint's settings."""

    @dataclass
    class Config:
        clip_low: float = doc("ε_low of the sequence ratio (GSPO paper: 3e-4).", 3e-4)
        clip_high: float = doc("ε_high of the sequence ratio (GSPO paper: 4e-4).", 4e-4)
        beta: float = doc("β of the KL penalty to the frozen reference (GSPO paper: 0).", 0.0)
        kl_estimator: str = doc("k1 or k3.", "k3")
        scale_advantages: bool = doc("Divide by the group's reward std.", True)
        eps: float = doc("ε added to the group std.", 1e-6)

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        _check_common(config, check)

    def __call__(self, logp, old_logp, advantages, mask, ref_logp=None, entropy=None):
        c = self.config
        return gspo_loss(logp, old_logp, advantages, mask, clip_low=c.clip_low, clip_high=c.clip_high,
                         ref_logp=ref_logp, beta=c.beta, kl_estimator=c.kl_estimator, entropy=entropy)


@hookimpl
def keye_register_losses(register):
    register("grpo", GRPOLoss)
    register("gspo", GSPOLoss)
