"""The reward models of a stage from its options: ``{<reward_model name>: {weight: w, <its Config fields>}}``.

Why this shape: a prompt names the reward models that score it by registry name (``rl_prompt.reward_names``),
so the options are keyed by that same name, and each entry carries its weight beside the model's own settings::

    rewards:
      answer_match: {weight: 1.0, metric: exact}
      format: {weight: 0.5}

`WeightedRewards` adds them by weight and keeps every model's score and components for the metrics. Each model
is built as ``Cls(config, ctx)`` with the stage's context (a judge needs the run's blueprint and layout).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from keye.config.validate import short
from keye.errors import KeyeUserError
from keye.rewards.contract import WeightedRewards

WEIGHT = "weight"


def _split(name: str, node: Any) -> tuple[float, dict[str, Any]]:
    if node is not None and not isinstance(node, Mapping):
        raise KeyeUserError(f"rewards.{name}: expected {{weight: w, <its settings>}}, got {short(node)}")
    node = dict(node or {})
    weight = node.pop(WEIGHT, 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise KeyeUserError(f"rewards.{name}.weight: must be a finite number, got {weight!r}")
    return float(weight), node


def reward_configs(spec: Mapping[str, Any], registry: Any) -> dict[str, tuple[type, Any, float]]:
    """Each reward model's (class, Config, weight). A one-line `KeyeUserError` that starts with the key at fault
    (``rewards.<name>[.<setting>]: ...``) for an unknown model, an unknown or mistyped setting, or a bad weight."""
    from omegaconf.errors import OmegaConfBaseException

    from keye.config import build_component_config
    from keye.config.validate import omegaconf_reason
    from keye.errors import UnknownComponentError

    if not spec:
        raise KeyeUserError("rewards: no reward model configured")
    out = {}
    for name, node in spec.items():
        weight, body = _split(name, node)
        try:
            cls = registry.cls("reward_model", name)
        except UnknownComponentError as exc:
            raise KeyeUserError(f"rewards.{name}: {exc}") from None
        known = [field.name for field in dataclasses.fields(cls.Config)]
        for key in body:
            if key not in known:
                raise KeyeUserError(f"rewards.{name}.{key}: unknown key for reward_model '{name}'; known: "
                                    f"{', '.join([WEIGHT, *known])}")
        try:
            _, config = build_component_config("reward_model", {"name": name, **body}, registry)
        except (OmegaConfBaseException, TypeError, ValueError) as exc:
            raise KeyeUserError(f"rewards.{name}: {omegaconf_reason(exc)}") from None
        out[name] = (cls, config, weight)
    return out


def build_rewards(spec: Mapping[str, Any], registry: Any, ctx: Any = None) -> WeightedRewards:
    configs = reward_configs(spec, registry)
    models = {name: cls(config, ctx) for name, (cls, config, _) in configs.items()}
    return WeightedRewards(models, {name: weight for name, (_, _, weight) in configs.items()})
