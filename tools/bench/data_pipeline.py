"""Data-pipeline throughput with decord and with PyAV, side by side, against the training step it feeds.

    python tools/bench/data_pipeline.py            # the full measurement (about a minute)
    python tools/bench/data_pipeline.py --quick    # CI: a few micro-batches, one model size (checks that it runs)

Why: the pipeline (read shards → mix → decode images and videos → resize → patchify → chat template and
tokenize → pack) runs in the training process, between steps. At the tiny and small sizes it must never
be what the step waits for, and the video decoder is its heaviest part, so both decoders are measured.

What runs, all from ``blueprints/tiny/pretrain.yaml``'s ``stage2_multitask`` (the multi-task mix: image QA
0.6, video QA 0.3, reasoning 0.1; 512-token packs; images ≤ 16 tokens, video frames 4-16 tokens):

1. The stage's synthetic sources are first written to webdataset shards in a temporary folder (untimed),
   and read back through the ``webdataset`` source, so the timed pipeline is the one a real run has.
2. For each decoder: the stage's mix (samples/s, micro-batches/s), and its video source alone (samples/s,
   decoded frames/s, milliseconds per video spent inside the decoder). Rates are processed samples over
   wall time across whole refills of the stage's pack buffer (64 samples), after a warm-up refill, the
   four rows taking turns refill by refill; frames are counted at the decoder.
3. The training step: ``lm`` steps (forward, backward, optimiser) of the model at each size (``tiny``, and
   ``small`` unless ``--quick``) on pre-built micro-batches, against the time the pipeline (decord, the
   default) takes to produce one micro-batch. The verdict line says whether the pipeline keeps ahead.

Prints the decoder table, the decord/pyav ratios, then the step table. Numbers are single-process CPU
(OMP threads as set): a data-loader worker per core would multiply the pipeline's rate.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
BLUEPRINT = ROOT / "blueprints" / "tiny" / "pretrain.yaml"
STAGE = "stage2_multitask"
DECODERS = ("decord", "pyav")
SMALL = [  # the small size: ViT, projector and LLM widths to match (256)
    "model.vision_encoder.size=small", "model.projector.in_dim=256", "model.projector.out_dim=256",
    "model.language_model.size=small",
]  # fmt: skip


class CountingDecoder:
    """Wraps a video decoder: counts videos and frames and the seconds spent decoding."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.videos = self.frames = 0
        self.seconds = 0.0

    def read(self, path: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        decoded = self.inner.read(path, **kwargs)
        self.seconds += time.perf_counter() - start
        self.videos += 1
        self.frames += len(decoded.frames)
        return decoded

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class Rate:
    samples_per_s: float
    micro_batches_per_s: float
    frames_per_s: float
    ms_per_video: float


def load(overrides: list[str]) -> tuple[Any, Any, int]:
    """The validated blueprint, the plugin host, and the index of the measured stage."""
    from keye.config import load_blueprint
    from keye.plugins import get_host

    host = get_host()
    cfg = load_blueprint(BLUEPRINT, overrides, host.registry)
    index = next(i for i, stage in enumerate(cfg.stages) if stage.name == STAGE)
    return cfg, host, index


def write_shards(cfg: Any, index: int, folder: Path, per_source: int) -> dict[str, list[str]]:
    """Each synthetic source of the stage as webdataset shards (same tasks and seed); urls by label."""
    from keye.data.synthetic import generate_many

    spec = importlib.util.spec_from_file_location("keye_make_synthetic_data", ROOT / "tools" / "make_synthetic_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    urls = {}
    for label, node in cfg.stages[index].data.sources.items():
        items = generate_many(per_source, tasks=list(node.tasks), seed=node.seed)
        urls[label] = tool.write_shards(items, str(folder / f"{label}-%06d.tar"), max(1, per_source // 2))
    return urls


def stage_context(cfg: Any, host: Any, index: int, urls: dict[str, list[str]], decoder: str, only: str | None) -> Any:
    """A context for `MicroBatchStream`: the stage with shard sources, ``decoder``, and maybe one source."""
    from keye.config.validate import validate_component

    stage = OmegaConf.create(OmegaConf.to_container(cfg.stages[index], resolve=True))
    labels = [only] if only else list(urls)
    stage.data.sources = {
        label: validate_component("data_source", {"name": "webdataset", "urls": urls[label]}, label, host.registry, str)
        for label in labels
    }
    if only:
        stage.data.mixer.weights = {only: 1.0}
    stage.data.video_decoder = validate_component("video_decoder", {"name": decoder}, "video_decoder", host.registry, str)
    return SimpleNamespace(blueprint=cfg, stage=stage, index=index, host=host, registry=host.registry, parallel=None)


class Meter:
    """One stream, timed refill by refill.

    The stream processes ``pack_buffer`` samples at a time and packs them into many micro-batches, so a
    timed unit is one whole refill: from just after one refill to just after the next. Meters of all rows
    take turns refill by refill, so a change in machine load hits every row alike.
    """

    def __init__(self, ctx: Any) -> None:
        from keye.data.pipeline import MicroBatchStream

        self.stream = MicroBatchStream(ctx, split="train")
        self.decoder = CountingDecoder(self.stream.processor.video_decoder)
        self.stream.processor.video_decoder = self.decoder
        self.delivered: list[int] = []
        next(self.stream)  # warm-up: tokenizer, first refill
        self.seconds = 0.0
        self.samples0, self.frames0 = self._done(), self.decoder.frames
        self.videos0, self.decode0 = self.decoder.videos, self.decoder.seconds

    def _done(self) -> int:
        return self.stream.bad.good + self.stream.bad.bad  # samples the processor has handled

    def refill(self) -> None:
        seen = self._done()
        start = time.perf_counter()
        while self._done() == seen:
            self.delivered.append(len(next(self.stream).keys))
        self.seconds += time.perf_counter() - start

    def rate(self) -> Rate:
        samples = self._done() - self.samples0
        videos = self.decoder.videos - self.videos0
        return Rate(
            samples_per_s=samples / self.seconds,
            micro_batches_per_s=samples / self.seconds / statistics.mean(self.delivered),
            frames_per_s=(self.decoder.frames - self.frames0) / self.seconds,
            ms_per_video=1000 * (self.decoder.seconds - self.decode0) / videos if videos else float("nan"),
        )


def step_time(cfg: Any, host: Any, index: int, urls: dict[str, list[str]], steps: int) -> tuple[float, float, int]:
    """Median seconds of one ``lm`` train step on pre-built micro-batches; tokens per step; parameters."""
    from keye.data.pipeline import MicroBatchStream
    from keye.model.composition import build_component
    from keye.model.protocols import BuildContext
    from keye.parallel import destroy_parallel, init_parallel
    from keye.train.engine import TrainEngine
    from keye.train.freezing import apply_freezing
    from keye_plugins.stage.lm import LMStage

    ctx = stage_context(cfg, host, index, urls, "decord", None)
    ctx.parallel = init_parallel(tensor=1, pipeline=1, seed=cfg.run.seed)
    try:
        model = LMStage(LMStage.Config(), ctx).build_model()
        apply_freezing(model, ctx.stage.train)
        loss = build_component("loss", {"name": "next_token"}, host.registry, BuildContext(ctx.parallel))
        engine = TrainEngine([model], ctx.stage, torch.float32)
        batches = MicroBatchStream(ctx, split="train").take(steps + 1)
        seq_len = ctx.stage.data.max_tokens

        def forward(data, module):
            batch = next(data)
            output = module(batch.input_ids, batch.position_ids, batch.attention_mask, labels=batch.labels,
                            images=batch.images, videos=batch.videos)  # fmt: skip
            return output, partial(_loss, loss, batch)

        times = []
        for batch in batches:
            start = time.perf_counter()
            engine.train_step(forward, iter([batch]), 1, seq_len, 1)
            times.append(time.perf_counter() - start)
        parameters = sum(p.numel() for p in model.parameters())
        tokens = statistics.mean(b.num_tokens for b in batches)
        return statistics.median(times[1:]), tokens, parameters
    finally:
        destroy_parallel()


def _loss(loss: Any, batch: Any, output: torch.Tensor):
    """Megatron's loss_func: the stage's next-token loss over the batch's answer positions."""
    return loss(output, batch.loss_mask)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI size: a few micro-batches, tiny model only")
    parser.add_argument("--fills", type=int, help="timed pack-buffer refills (64 samples) per row (default 6; quick 1)")
    parser.add_argument("--steps", type=int, help="timed train steps per size (default 5; quick 2)")
    args = parser.parse_args(argv)
    fills = args.fills or (1 if args.quick else 6)
    steps = args.steps or (2 if args.quick else 5)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="keye-bench-") as tmp:
        cfg, host, index = load([])
        urls = write_shards(cfg, index, Path(tmp), 48 if args.quick else 400)
        video = next(label for label, node in cfg.stages[index].data.sources.items() if "video_qa" in node.tasks)
        meters = {
            (decoder, workload): Meter(stage_context(cfg, host, index, urls, decoder, only))
            for decoder in DECODERS
            for workload, only in (("mix", None), ("video", video))
        }
        for _ in range(fills):
            for meter in meters.values():
                meter.refill()
        rows = {decoder: {workload: meters[decoder, workload].rate() for workload in ("mix", "video")} for decoder in DECODERS}
        print_decoders(rows, fills * cfg.stages[index].data.pack_buffer)
        sizes = {"tiny": []} if args.quick else {"tiny": [], "small": SMALL}
        results = []
        for size, overrides in sizes.items():
            sized, _, _ = load(overrides)
            seconds, tokens, parameters = step_time(sized, host, index, urls, steps)
            results.append((size, parameters, seconds, tokens))
        print_steps(results, rows["decord"]["mix"])
    return 0


def print_decoders(rows: dict[str, dict[str, Rate]], samples: int) -> None:
    print(f"data pipeline, {STAGE} of {BLUEPRINT.relative_to(ROOT)}, {samples} samples per row, "
          f"{torch.get_num_threads()} torch thread(s)")  # fmt: skip
    print(f"{'decoder':<8} {'mix samples/s':>14} {'mix micro-batches/s':>20} {'video samples/s':>16} "
          f"{'video frames/s':>15} {'decode ms/video':>16}")  # fmt: skip
    for decoder, rate in rows.items():
        mix, video = rate["mix"], rate["video"]
        print(f"{decoder:<8} {mix.samples_per_s:>14.1f} {mix.micro_batches_per_s:>20.2f} {video.samples_per_s:>16.1f} "
              f"{video.frames_per_s:>15.1f} {video.ms_per_video:>16.2f}")  # fmt: skip
    d, p = rows["decord"], rows["pyav"]
    print(f"ratio decord/pyav: mix samples/s {d['mix'].samples_per_s / p['mix'].samples_per_s:.2f}x, "
          f"video frames/s {d['video'].frames_per_s / p['video'].frames_per_s:.2f}x, "
          f"decode time per video {p['video'].ms_per_video / d['video'].ms_per_video:.2f}x faster")  # fmt: skip


def print_steps(results: list[tuple[str, int, float, float]], pipeline: Rate) -> None:
    produce = 1.0 / pipeline.micro_batches_per_s
    print(f"\ntraining step (lm, 1 micro-batch of 512 positions) vs producing that micro-batch (decord mix: {produce * 1000:.0f} ms)")
    print(f"{'size':<6} {'parameters':>11} {'step ms':>9} {'tokens/s':>9} {'pipeline/step':>14}  verdict")
    for size, parameters, seconds, tokens in results:
        share = produce / seconds
        verdict = "pipeline keeps ahead" if share < 1 else "the step WAITS for the pipeline"
        print(f"{size:<6} {parameters:>11,} {seconds * 1000:>9.0f} {tokens / seconds:>9.0f} {share:>13.2f}x  {verdict}")


if __name__ == "__main__":
    sys.exit(main())
