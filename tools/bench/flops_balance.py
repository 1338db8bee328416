"""Per-rank FLOPs per optimiser step with and without FLOPs balancing, side by side, with the ratio.

    python tools/bench/flops_balance.py                 # both data sets, 8 data-parallel ranks, 200 steps
    python tools/bench/flops_balance.py --quick         # CI: a few steps (checks that it runs)

Why: a data-parallel step waits for its slowest rank, so what balancing buys is max/mean of the ranks' FLOPs
per step (1.0: nobody waits). Two data sets:

* ``mixed files``: a JSONL set of real PNGs and MP4s of many sizes plus text-only turns
  (`keye.testing.mixed_media`), each sample described from its headers by the real processor
  (`keye.data.balance.describe`), at small budgets (max_tokens 1024, images up to 256 tokens, videos up to 512);
* ``paper mix``: sizes drawn at the 8B blueprints' budgets (max_tokens 32768; images 64-16384 tokens, videos
  1024-24576, log-uniform; text 50-4000), in Keye-VL 1.5's long-context token mix (24% video, 50% image,
  26% text-only samples), where attention's quadratic term makes long samples dearer per token.

For each, the same samples in the same order go through the pipeline's two paths, computed as the pipeline
computes them (no processes, no decoding: the plans depend only on the sizes):

* shard: data-parallel rank r reads samples r, r+R, ...; each ``pack_buffer`` it reads are packed first-fit-
  decreasing (`keye.data.packing.pack_samples`) into its micro-batches;
* flops: each round, every rank's ``pack_buffer`` samples are dealt by `keye.data.balance.plan_round`.

Every rank runs ``--microbatches`` micro-batches a step (16, as the 8B blueprints); a step's load on a rank is
the estimated FLOPs (`keye.data.packing.estimate_flops`, Keye-VL-8B's widths) of its micro-batches. Printed:
mean and worst max/mean over the steps, and the share of the step the average rank computes (mean/max).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from keye.data.balance import plan_round  # noqa: E402
from keye.data.packing import KEYE_8B_LLM, KEYE_VIT, PackItem, flops_cost, pack_samples  # noqa: E402

COST = flops_cost(KEYE_8B_LLM, KEYE_VIT)


def mixed_file_sizes(num_samples: int) -> tuple[list[PackItem], int]:
    """Sizes of a real mixed JSONL set (written to a temporary folder), described from headers."""
    from keye.config import load_blueprint
    from keye.data.balance import describe
    from keye.data.pipeline import build_processor, build_sources
    from keye.plugins import PluginHost
    from keye.testing import write_blueprint
    from keye.testing.mixed_media import write_mixed_dataset

    host = PluginHost(strict=True)
    host.load_entry_points()
    with tempfile.TemporaryDirectory() as folder:
        data = write_mixed_dataset(Path(folder) / "data", num_samples)
        path = write_blueprint(Path(folder) / "bp.yaml", {
            "model": {"language_model": {"name": "qwen3", "size": "tiny"}},
            "stages": [{"name": "s", "kind": "lm", "train": ["language_model"], "steps": 1, "data": {
                "max_tokens": 1024, "image_max_tokens": 256, "video_max_tokens": 512, "video_frame_tokens": [4, 16],
                "sources": {"mixed": {"name": "jsonl", "path": str(data), "check_media": False}}}}],
        })
        cfg = load_blueprint(path, [], host.registry)
        ctx = SimpleNamespace(blueprint=cfg, stage=cfg.stages[0], index=0, registry=host.registry,
                              parallel=SimpleNamespace(dp_rank=0, dp_size=1))
        processor = build_processor(ctx)
        (source,) = build_sources(ctx, "sources").values()
        return [describe(processor, loaded) for loaded in source], 1024


def paper_mix_sizes(num_samples: int, seed: int = 0) -> tuple[list[PackItem], int]:
    """Sizes at the 8B budgets in Keye-VL 1.5's long-context token mix (see the module docstring)."""
    rng = random.Random(seed)

    def log_uniform(low: int, high: int) -> int:
        return int(math.exp(rng.uniform(math.log(low), math.log(high))))

    sizes = []
    for index in range(num_samples):
        text, draw = log_uniform(50, 4000), rng.random()
        vision = log_uniform(1024, 24576) if draw < 0.24 else log_uniform(64, 16384) if draw < 0.74 else 0
        text = min(text, 32768 - vision)
        sizes.append(PackItem(f"s{index}", text, 4 * vision, vision))
    return sizes, 32768


def shard_flops(sizes: list[PackItem], dp: int, pack_buffer: int, max_tokens: int) -> list[list[float]]:
    """Per rank, each micro-batch's FLOPs when every rank packs its own share."""
    out = []
    for rank in range(dp):
        share, flops = sizes[rank::dp], []
        for start in range(0, len(share), pack_buffer):
            chunk = share[start:start + pack_buffer]
            flops.extend(sum(COST(chunk[i]) for i in pack.indices) for pack in pack_samples(chunk, max_tokens).packs)
        out.append(flops)
    return out


def balanced_flops(sizes: list[PackItem], dp: int, pack_buffer: int, max_tokens: int) -> list[list[float]]:
    """Per rank, each micro-batch's FLOPs when each round is dealt by `plan_round`."""
    shares = [sizes[rank::dp] for rank in range(dp)]
    out: list[list[float]] = [[] for _ in range(dp)]
    for start in range(0, max(len(s) for s in shares), pack_buffer):
        round_sizes = [share[start:start + pack_buffer] for share in shares]
        plan = plan_round(round_sizes, max_tokens, None, COST)
        for rank, packs in enumerate(plan.ranks):
            out[rank].extend(sum(COST(round_sizes[r][i]) for r, i in pack) for pack in packs)
    return out


def step_ratios(flops: list[list[float]], per_step: int) -> tuple[list[float], float]:
    """max/mean per step over the ranks, and the mean/max share of all steps together."""
    steps = min(len(f) for f in flops) // per_step
    ratios, busy, waited = [], 0.0, 0.0
    for step in range(steps):
        loads = [sum(f[step * per_step:(step + 1) * per_step]) for f in flops]
        ratios.append(max(loads) / statistics.fmean(loads))
        busy, waited = busy + statistics.fmean(loads), waited + max(loads)
    return ratios, busy / waited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, default=8, help="data-parallel ranks")
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps to measure (about)")
    parser.add_argument("--microbatches", type=int, default=16, help="micro-batches per rank a step")
    parser.add_argument("--pack-buffer", type=int, default=64, help="samples per rank a round")
    parser.add_argument("--quick", action="store_true", help="a few steps, a small file set")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.microbatches, args.dp = 4, 4, 4
    print(f"{args.dp} data-parallel ranks, {args.microbatches} micro-batches per rank a step, "
          f"{args.pack_buffer} samples per rank a round; FLOPs estimated at Keye-VL-8B's widths")
    print(f"{'data set':<12} {'samples':>7} {'steps':>5} | {'shard max/mean':>14} {'worst':>6} {'busy':>5} | "
          f"{'flops max/mean':>14} {'worst':>6} {'busy':>5} | {'ratio':>5}")
    for name in ("mixed files", "paper mix"):
        # enough samples for the steps: about max_tokens per micro-batch, measured on a first draw
        probe, max_tokens = (mixed_file_sizes(64) if name == "mixed files" else paper_mix_sizes(2000))
        per_sample = statistics.fmean(item.num_tokens for item in probe)
        wanted = int(1.3 * args.steps * args.microbatches * args.dp * max_tokens / per_sample)
        if name == "mixed files":
            wanted = min(wanted, 256 if args.quick else 2048)  # real files to write and read
        sizes, _ = mixed_file_sizes(wanted) if name == "mixed files" else paper_mix_sizes(wanted)
        rows = {}
        for mode, schedule in (("shard", shard_flops), ("flops", balanced_flops)):
            ratios, busy = step_ratios(schedule(sizes, args.dp, args.pack_buffer, max_tokens), args.microbatches)
            rows[mode] = (statistics.fmean(ratios), max(ratios), busy, len(ratios))
        (s_mean, s_worst, s_busy, steps), (f_mean, f_worst, f_busy, _) = rows["shard"], rows["flops"]
        print(f"{name:<12} {len(sizes):>7} {steps:>5} | {s_mean:>14.3f} {s_worst:>6.2f} {s_busy:>5.1%} | "
              f"{f_mean:>14.3f} {f_worst:>6.2f} {f_busy:>5.1%} | {s_mean / f_mean:>5.2f}")
    print("max/mean: the slowest rank's FLOPs over the average's, per step (mean over steps; worst step); "
          "busy: the share of the step the average rank computes; ratio: shard max/mean over flops max/mean")


if __name__ == "__main__":
    main()
