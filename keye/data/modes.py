"""Per-thinking-mode accounting of a data stream: how many conversations of each mode, how many loss tokens.

Why: SFT and the CoT cold start mix think / no_think / auto / agentic conversations by configured ratios, and
the summary must show that the mix trained on is the one asked for, and what each mode costs in tokens (a
think reply is many times a no_think one). The processor records every conversation it encodes here; the
``lm`` stage reads the counts into its summary. Counts cover the samples processed, which run up to one
pack buffer ahead of the micro-batches consumed, and restart at zero on resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: the name a conversation without a thinking mode is counted under
NO_MODE = "none"


@dataclass
class ModeStats:
    """Samples and loss (response) tokens per mode; with ``keep_keys``, each sample's mode by key too
    (for held-out accuracy per mode; off for training streams, whose key count is unbounded)."""

    keep_keys: bool = False
    samples: dict[str, int] = field(default_factory=dict)
    loss_tokens: dict[str, int] = field(default_factory=dict)
    mode_of: dict[str, str] = field(default_factory=dict)

    def record(self, key: str, mode: str | None, loss_tokens: int) -> None:
        name = mode or NO_MODE
        self.samples[name] = self.samples.get(name, 0) + 1
        self.loss_tokens[name] = self.loss_tokens.get(name, 0) + loss_tokens
        if self.keep_keys:
            self.mode_of[key] = name

    def summary(self) -> dict[str, dict[str, float]]:
        """Per mode: ``samples``, ``share`` of all samples, ``loss_tokens`` and ``mean_response_tokens``."""
        total = sum(self.samples.values())
        return {
            mode: {
                "samples": count,
                "share": count / total,
                "loss_tokens": self.loss_tokens[mode],
                "mean_response_tokens": self.loss_tokens[mode] / count,
            }
            for mode, count in sorted(self.samples.items())
        }
