"""Optimiser and learning-rate schedule: Megatron-Core's, configured from a stage.

``get_megatron_optimizer`` builds Adam over the trainable parameters only (frozen modules get no
optimiser state), with one parameter group per module whose ``lr_scale`` differs, and Megatron's
``OptimizerParamScheduler`` drives warmup + cosine, WSD (warmup-stable-decay, i.e. the final low-LR
anneal) or a constant rate, per group.

A scaled group's peak rate is its ``max_lr`` (what Megatron 0.16's scheduler reads); its ``lr_mult`` is
set to the scale too, but only as the group's *name*: Megatron matches a checkpoint's parameter groups
to the optimiser's by ``(wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr)`` when it loads them, so
groups that differed only in ``max_lr`` collapsed into one there and ``--resume`` failed ("a parameter
group that doesn't match the size of optimizer's group"). Megatron 0.16 no longer multiplies the rate
by ``lr_mult`` (the scheduler sets each group's ``lr`` from its own ``max_lr``/``min_lr``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

SCHEDULES = {"constant": "constant", "cosine": "cosine", "wsd": "WSD", "linear": "linear"}


def build_optimizer(chunks: Sequence[torch.nn.Module], optim_cfg: Any, dtype: torch.dtype, *, distributed: bool = False):
    """A Megatron optimizer over the trainable parameters of ``chunks`` (DDP-wrapped modules)."""
    from megatron.core.optimizer import OptimizerConfig, ParamKey, get_megatron_optimizer, get_standard_config_overrides

    config = OptimizerConfig(
        optimizer="adam",
        lr=optim_cfg.lr,
        min_lr=0.0,
        weight_decay=optim_cfg.weight_decay,
        adam_beta1=optim_cfg.beta1,
        adam_beta2=optim_cfg.beta2,
        adam_eps=optim_cfg.eps,
        clip_grad=optim_cfg.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=distributed,
    )
    # Megatron's standard groups (no weight decay on biases and 1-D parameters) apply only when no
    # overrides are passed; they are kept explicitly, so lr_scale does not change what is decayed.
    overrides = get_standard_config_overrides(config)
    for module, scale in dict(optim_cfg.lr_scale).items():
        if scale != 1.0:
            overrides[ParamKey(name=f"*{module}.*")] = {"max_lr": optim_cfg.lr * scale, "lr_mult": scale}
    return get_megatron_optimizer(config, list(chunks), config_overrides=overrides)


def build_scheduler(optimizer: Any, optim_cfg: Any, schedule_cfg: Any, steps: int):
    """Megatron's scheduler; ``min_lr_ratio`` applies to every group's own peak."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if schedule_cfg.kind not in SCHEDULES:
        from keye.errors import KeyeUserError

        raise KeyeUserError(f"schedule.kind '{schedule_cfg.kind}' is not one of {', '.join(SCHEDULES)}")
    for group in optimizer.param_groups:
        peak = group.get("max_lr", optim_cfg.lr)
        group["max_lr"] = peak
        group["min_lr"] = peak * schedule_cfg.min_lr_ratio
    steps = max(steps, 1)
    warmup = min(schedule_cfg.warmup_steps, steps - 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim_cfg.lr,
        min_lr=optim_cfg.lr * schedule_cfg.min_lr_ratio,
        lr_warmup_steps=warmup,
        lr_decay_steps=steps,
        lr_decay_style=SCHEDULES[schedule_cfg.kind],
        start_wd=optim_cfg.weight_decay,
        end_wd=optim_cfg.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=max(1, int(round(steps * schedule_cfg.decay_fraction))),
        lr_wsd_decay_style="cosine",
    )
    # Megatron's scheduler gives step k the rate at k-1 (so step 1 of a warmup would use lr 0): advance
    # it once, so step k trains at the rate of k and the last step at the final, annealed rate.
    scheduler.step(1)
    return scheduler
