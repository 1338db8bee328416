"""`Stub`: a base for component classes in tests that load plugins or blueprints but never run a component.

Registration checks every class against its kind's contract (`keye.contracts`: the methods it must have
and the constructor the host calls), so a test about *loading* (precedence, provenance, validation of a
blueprint) needs classes that meet it. ``class Toy(Stub)`` with a nested ``Config`` meets the contract of
every kind; each method raises, because such a test must never call one. A test about what a component
*does* writes the real methods (see `keye.testing.toys`).
"""

from __future__ import annotations

from typing import Any, NoReturn


class Stub:
    """Meets every kind's contract on paper (module docstring)."""

    def __init__(self, config: Any = None, ctx: Any = None) -> None:
        self.config = config

    def _never(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(f"{type(self).__name__} is a stub for loading tests; it does not run")

    # model parts, position encodings
    forward = embed = set_input_tensor = _never
    position_ids = decode_position_ids = rotary_pos_emb = patch_rotary_pos_emb = _never
    # data sources and mixers, losses, mergers
    __iter__ = __next__ = state_dict = load_state_dict = __call__ = _never
    # reward models, generators, video decoders, stages
    score = generate = sync_weights = read = probe = run = _never
