"""Blueprints: YAML recipes loaded with OmegaConf onto a structured schema, validated per component."""

from keye.config.fields import component, doc

__all__ = ["component", "doc"]
