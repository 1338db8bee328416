"""Blueprints: YAML recipes loaded with OmegaConf onto a structured schema, validated per component."""

from keye.config.fields import component, doc
from keye.config.loader import load_blueprint
from keye.config.render import render_blueprint
from keye.config.semantics import ConfigCheck, check_runnable, launch_world_size
from keye.config.validate import build_component_config

__all__ = [
    "ConfigCheck", "build_component_config", "check_runnable", "component", "doc", "launch_world_size",
    "load_blueprint", "render_blueprint",
]
