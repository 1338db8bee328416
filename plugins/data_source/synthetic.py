"""``synthetic``: the synthetic world of `keye.data.synthetic`, generated on the fly, nothing on disk.

For tests and the tiny CPU blueprints: any stage gets learnable data with checkable answers without a data
preparation step. A pass yields samples ``0 .. num_samples-1`` (the same ones every pass: the world is a fixed
data set for a seed), split across data-parallel ranks and loader workers by index, so every sample is made
by exactly one reader. Media checks are off by default: the generator writes its own PNG/MP4 bytes.
``tools/make_synthetic_data.py`` writes the same samples to shards and JSONL for the other two sources.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator

from keye import hookimpl
from keye.config import doc
from keye.data.sources import DataSource, LoadedSample, Skipped, SourceConfig
from keye.data.synthetic import SPLITS, check_mode_mix, expand_tasks, generate
from keye.errors import KeyeUserError


class SyntheticSource(DataSource):
    """Generates the synthetic world's samples in memory; see the module docstring."""

    name = "synthetic"

    @dataclass
    class Config(SourceConfig):
        tasks: list[str] = doc(
            "Tasks to generate, in turn (sample i is tasks[i % n]): pair, caption, count, color, shape, position, "
            "grounding, ocr, video_direction, video_order, video_when, reasoning, preference, rl; or the groups "
            "image_qa, video_qa, all.",
            default_factory=lambda: ["all"],
        )
        split: str = doc("'train', or 'heldout' for evaluation (other seeds and scenes train never shows).", "train")
        seed: int = doc("World seed (and shuffle seed): the same seed gives the same samples, byte for byte.", 0)
        num_samples: int = doc("Samples per pass.", 1000)
        check_media: bool = doc("Decode the generated media before yielding (off: the generator made them).", False)
        mode_mix: dict[str, float] = doc(
            "Thinking modes of the conversations and preference pairs, by weight (think, no_think, auto, agentic), "
            "e.g. {think: 0.4, no_think: 0.3, auto: 0.2, agentic: 0.1}: each conversation (each pair's two replies) "
            "is written in a mode drawn by these weights. Empty: each task's own format.",
            default_factory=dict,
        )

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        """What ``__init__`` refuses: unknown tasks, an unknown split, a negative sample count."""
        if not all(isinstance(task, str) for task in config.tasks):
            check.fail("tasks", f"expected task names, got {list(config.tasks)!r}"[:200])
        try:
            expand_tasks(list(config.tasks))
        except ValueError as e:
            check.fail("tasks", str(e))
        try:
            check_mode_mix(dict(config.mode_mix))
        except (ValueError, TypeError) as e:
            check.fail("mode_mix", str(e))
        check.one_of(config, "split", SPLITS)
        check.count(config, "num_samples", minimum=0)

    def __init__(
        self, config: Config, ctx: Any = None, *, rank: int | None = None, world_size: int | None = None
    ) -> None:
        super().__init__(config, ctx, rank=rank, world_size=world_size)
        try:
            self.tasks = expand_tasks(list(config.tasks))
        except ValueError as e:
            raise KeyeUserError(f"data source 'synthetic': {e}") from None
        if config.split not in SPLITS:
            raise KeyeUserError(
                f"data source 'synthetic': split must be one of {', '.join(SPLITS)}, got {config.split!r}"
            )
        try:
            self.mode_mix = dict(config.mode_mix)
            check_mode_mix(self.mode_mix)
        except (ValueError, TypeError) as e:
            raise KeyeUserError(f"data source 'synthetic': mode_mix: {e}") from None
        if config.num_samples < 0:
            raise KeyeUserError(f"data source 'synthetic': num_samples must be >= 0, got {config.num_samples}")

    def _records(self, slot: tuple[int, int, int, int], rng: random.Random | None) -> Iterator[LoadedSample | Skipped]:
        for index in range(self.config.num_samples):
            if self.mine(index, slot):
                yield generate(index, tasks=self.tasks, split=self.config.split, seed=self.config.seed,
                               mode_mix=self.mode_mix or None)


@hookimpl
def keye_register_data_sources(register):
    register("synthetic", SyntheticSource)
