"""`weighted`: interleave several data sources by fixed ratios, deterministically and resumably.

Which source comes next is decided by the *largest deficit* rule that Megatron-Core's blended dataset
uses (``build_blending_indices``): after n samples, source k should have had ``w_k·n`` of them, so the
next sample comes from the source with the largest ``w_k·(n+1) − count_k``. We chose this over seeded
random sampling because

- it is smooth: at every prefix each source is within one sample of its target share, so a small
  global batch already has the right mix, and no random streak starves a source for a while;
- its state is a handful of integers (counts, positions, epochs), so resuming is exact and the state
  is plain JSON that sits next to the checkpoint (the paper's "sample-level auto-resume", spec §3.2).

The ``seed`` only fixes the order in which equal deficits are broken (e.g. who goes first with equal
weights), so two seeds give different but equally smooth interleavings; shuffling *within* a source is
the source's own business.

Sources are ``{label: factory | iterable | iterator}``. A factory (a zero-argument callable) or a
re-iterable (a list, a dataset) can be iterated again, which both ``on_exhausted: restart`` and
resuming need; a bare iterator is one-shot. On `load_state_dict` each source is rebuilt and
fast-forwarded to its position by skipping that many items, unless its iterator offers
``state_dict()``/``load_state_dict()`` itself: then that state is saved and restored instead
(no re-reading). Either way the mixer continues with exactly the next sample of the uninterrupted run,
provided every source yields the same sequence when iterated again.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from keye import hookimpl
from keye.config import doc
from keye.errors import KeyeUserError

EXHAUSTION_MODES = ("restart", "stop")
STATE_VERSION = 1


class _Source:
    """One labelled source: how to (re)start it, the live iterator, and where it is."""

    def __init__(self, label: str, spec: Any) -> None:
        self.label = label
        if callable(spec) and not isinstance(spec, Iterator):
            self._start: Callable[[], Iterator] | None = lambda: iter(spec())
        elif isinstance(spec, Iterator):
            self._start = None
        elif isinstance(spec, Iterable):
            self._start = lambda: iter(spec)
        else:
            raise KeyeUserError(f"data source '{label}' must be an iterable, an iterator or a factory, got {spec!r}")
        self.iterator: Iterator = spec if self._start is None else self._start()
        self.epoch = 0
        self.position = 0  # items taken from the current pass

    def restart(self) -> None:
        if self._start is None:
            raise KeyeUserError(
                f"data source '{self.label}' is a one-shot iterator and cannot be re-iterated "
                "(pass a factory or a re-iterable for on_exhausted='restart')"
            )
        self.iterator = self._start()
        self.epoch += 1
        self.position = 0

    def state(self) -> dict:
        out: dict[str, Any] = {"epoch": self.epoch, "position": self.position}
        if hasattr(self.iterator, "state_dict"):
            out["iterator"] = self.iterator.state_dict()
        return out

    def load(self, state: dict) -> None:
        """Re-create this pass and move to ``position`` (through the iterator's own state if it has one)."""
        if self._start is not None:
            self.iterator = self._start()
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if "iterator" in state and hasattr(self.iterator, "load_state_dict"):
            self.iterator.load_state_dict(state["iterator"])
            return
        for skipped in range(self.position):
            try:
                next(self.iterator)
            except StopIteration:
                raise KeyeUserError(
                    f"data source '{self.label}' ended after {skipped} items while resuming to position "
                    f"{self.position} of epoch {self.epoch}: it is not the source the state was saved with"
                ) from None


class WeightedMixer:
    """Interleave labelled sources by ratio (largest-deficit rule); an iterator of samples."""

    @dataclass
    class Config:
        weights: dict[str, float] = doc(
            "Source label → mixing ratio (relative, need not sum to 1). Every source needs a weight; "
            "a weight of 0 disables a source.",
            default_factory=dict,
        )
        seed: int = doc("Mixing seed: breaks ties between equal deficits (e.g. which source goes first).", 0)
        on_exhausted: str = doc(
            "What happens when a source runs out: 'restart' re-iterates it (a new epoch of that source), "
            "'stop' ends the whole mix, so the ratios are never silently distorted.",
            "restart",
        )

    @classmethod
    def check_config(cls, config: "WeightedMixer.Config", check: Any) -> None:
        """The run-time check (`_check`) against the stage's source labels; empty weights mean equal ones."""
        labels = dict.fromkeys(check.stage.data.sources)
        if not labels and not config.weights:  # nothing to mix (an evaluation-only stage)
            labels = {"(none)": None}
        weights = config.weights or dict.fromkeys(labels, 1.0)
        cls._check(cls.Config(weights=weights, seed=config.seed, on_exhausted=config.on_exhausted), labels)

    def __init__(self, config: "WeightedMixer.Config", sources: dict[str, Any]) -> None:
        self.config = config
        self._check(config, sources)
        self._labels = sorted(sources)
        total = float(sum(config.weights.values()))
        self._share = {label: config.weights[label] / total for label in self._labels}
        order = list(self._labels)
        random.Random(config.seed).shuffle(order)
        self._tie_rank = {label: rank for rank, label in enumerate(order)}
        self._sources = {label: _Source(label, sources[label]) for label in self._labels}
        self._counts = {label: 0 for label in self._labels}
        self._stopped = False

    @staticmethod
    def _check(config: "WeightedMixer.Config", sources: dict[str, Any]) -> None:
        if config.on_exhausted not in EXHAUSTION_MODES:
            raise KeyeUserError(
                f"data mixer 'weighted': on_exhausted must be one of {', '.join(EXHAUSTION_MODES)}, "
                f"got {config.on_exhausted!r}"
            )
        for label in config.weights:
            if label not in sources:
                raise KeyeUserError(
                    f"data mixer 'weighted': weight for unknown source '{label}'; sources: {', '.join(sorted(sources))}"
                )
        for label in sources:
            if label not in config.weights:
                raise KeyeUserError(f"data mixer 'weighted': source '{label}' has no weight")
        for label, weight in config.weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise KeyeUserError(
                    f"data mixer 'weighted': weight of '{label}' must be a finite number, got {weight!r}"
                )
            if weight < 0:
                raise KeyeUserError(f"data mixer 'weighted': weight of '{label}' is negative ({weight})")
        if sum(config.weights.values()) <= 0:
            raise KeyeUserError("data mixer 'weighted': weights sum to 0; at least one source needs a positive weight")

    # --- iteration --------------------------------------------------------------------------------

    def __iter__(self) -> "WeightedMixer":
        return self

    def __next__(self) -> Any:
        return self.next_with_label()[1]

    def next_with_label(self) -> tuple[str, Any]:
        """The next ``(source label, sample)``; raises StopIteration once a source ends under 'stop'."""
        if self._stopped:
            raise StopIteration
        label = self._pick()
        source = self._sources[label]
        try:
            item = next(source.iterator)
        except StopIteration:
            if self.config.on_exhausted == "stop":
                self._stopped = True
                raise
            source.restart()
            try:
                item = next(source.iterator)
            except StopIteration:
                raise KeyeUserError(f"data source '{label}' is empty after a restart; nothing to mix") from None
        source.position += 1
        self._counts[label] += 1
        return label, item

    def _pick(self) -> str:
        n = sum(self._counts.values()) + 1
        return max(
            (label for label in self._labels if self._share[label] > 0),
            key=lambda label: (self._share[label] * n - self._counts[label], -self._tie_rank[label]),
        )

    # --- reporting and resume ---------------------------------------------------------------------

    def realised_ratios(self) -> dict[str, dict[str, float]]:
        """Per source: samples emitted, their share of all emitted, the target share, and epochs started."""
        total = sum(self._counts.values())
        return {
            label: {
                "count": self._counts[label],
                "share": self._counts[label] / total if total else 0.0,
                "target": self._share[label],
                "epoch": self._sources[label].epoch,
            }
            for label in self._labels
        }

    def state_dict(self) -> dict:
        """Plain JSON: enough to continue with exactly the next sample after a restart."""
        return {
            "version": STATE_VERSION,
            "weights": {label: float(self.config.weights[label]) for label in self._labels},
            "seed": self.config.seed,
            "counts": dict(self._counts),
            "stopped": self._stopped,
            "sources": {label: source.state() for label, source in self._sources.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore counts and move every source to its saved position (see the module docstring).

        The sources and weights must be the ones the state was saved with: a different mix would not
        continue the same sequence, so it is an error rather than a silent drift.
        """
        if state.get("version") != STATE_VERSION:
            raise KeyeUserError(f"data mixer 'weighted': state version {state.get('version')!r} is not {STATE_VERSION}")
        saved = set(state["sources"])
        if saved != set(self._labels):
            missing, extra = sorted(saved - set(self._labels)), sorted(set(self._labels) - saved)
            raise KeyeUserError(
                f"data mixer 'weighted': sources differ from the saved state (missing: {missing}, new: {extra})"
            )
        for label in self._labels:
            if float(state["weights"][label]) != float(self.config.weights[label]):
                raise KeyeUserError(
                    f"data mixer 'weighted': weight of '{label}' changed from {state['weights'][label]} to "
                    f"{self.config.weights[label]} since the state was saved"
                )
        if state["seed"] != self.config.seed:
            raise KeyeUserError(f"data mixer 'weighted': seed changed from {state['seed']} to {self.config.seed}")
        for label in self._labels:
            self._sources[label].load(state["sources"][label])
        self._counts = {label: int(state["counts"][label]) for label in self._labels}
        self._stopped = bool(state["stopped"])


@hookimpl
def keye_register_data_mixers(register):
    register("weighted", WeightedMixer)
