"""Keep the image-text pairs whose contrastive score is above a threshold (spec §3.1 "CLIP score > 0.9").

    python tools/filter_pairs.py data/pairs.jsonl --blueprint blueprints/tiny/pretrain.yaml \\
        --weights runs/tiny-pretrain/stage0_vit --threshold 0.3 --out-keys kept.txt --out-scores scores.jsonl
    python tools/filter_pairs.py 'pairs-{000000..000009}.tar' --blueprint blueprints/tiny/pretrain.yaml --fresh

The scorer is the blueprint's ``model.vision_encoder`` and ``model.text_encoder`` (any registered pair),
composed as the contrastive stage composes them (`keye.data.filters`), with the weights of a contrastive
stage: ``--weights`` (a stage folder or weights file), else ``<run.output_dir>/<stage>`` of the blueprint's
contrastive stage (``--stage``, default the first one), or freshly initialised towers with ``--fresh``
(for smoke tests: their scores say nothing). Image budgets and the caption length come from that stage.

Input is read through the registered data sources (``.jsonl``: ``jsonl``, else ``webdataset`` shards).
Samples that are not pairs are counted; a pair whose image will not decode is skipped with one line.
Prints the score histogram and the kept share; ``--out-keys`` lists the kept keys, ``--out-scores``
writes ``{"key", "score", "kept"}`` per pair. Runs in one process (Megatron-Core on one rank).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from keye.config import build_component_config, load_blueprint
from keye.data.filters import ContrastiveScorer, ScoreReport, score_pairs
from keye.data.processor import Processor, ProcessorSettings
from keye.errors import KeyeUserError
from keye.plugins import get_host

logger = logging.getLogger("keye.filter_pairs")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def open_source(spec: str, max_bad_fraction: float) -> Any:
    """The registered data source for ``spec``: ``jsonl`` for a .jsonl file, else ``webdataset``."""
    node: dict[str, Any] = {"name": "jsonl", "path": spec} if spec.endswith(".jsonl") else {"name": "webdataset", "urls": [spec]}
    node.update(max_bad_fraction=max_bad_fraction, check_media=False)  # the processor decodes and reports
    cls, config = build_component_config("data_source", node, get_host().registry)
    return cls(config)


def contrastive_stage(cfg: Any, name: str | None) -> Any:
    """The named stage, else the blueprint's first contrastive stage, else None (defaults apply)."""
    for stage in cfg.stages:
        if stage.name == name or (name is None and stage.kind == "contrastive"):
            return stage
    if name is not None:
        raise KeyeUserError(f"--stage: no stage '{name}'; stages: {', '.join(s.name for s in cfg.stages)}")
    return None


def build_scorer(cfg: Any, stage: Any, weights: Path | None) -> ContrastiveScorer:
    """The blueprint's towers on one Megatron rank, with ``weights`` loaded (None: fresh)."""
    from keye.model.composition import build_component
    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel

    model = cfg.model
    if model.vision_encoder is None or model.text_encoder is None:
        raise KeyeUserError("model: scoring pairs needs model.vision_encoder and model.text_encoder")
    parallel = init_parallel(tensor=1, pipeline=1, seed=cfg.run.seed)
    build = BuildContext(parallel, DTYPES[cfg.precision.dtype], seed=cfg.run.seed)
    registry = get_host().registry
    scorer = ContrastiveScorer(
        build_component("vision_encoder", model.vision_encoder, registry, build),
        build_component("text_encoder", model.text_encoder, registry, build),
        seed=cfg.run.seed,
    )
    if weights is not None:
        scorer.load_weights(weights)
    return scorer


def build_processor(cfg: Any, stage: Any, caption_length: int | None) -> Processor:
    from keye.data.pipeline import load_tokenizer, vocab_size

    data = stage.data if stage is not None else None
    options = stage.options if stage is not None else {}
    settings = ProcessorSettings(
        image_min_tokens=data.image_min_tokens if data is not None else 4,
        image_max_tokens=data.image_max_tokens if data is not None else 16384,
        caption_length=caption_length or int(options.get("caption_length", 16)),
    )
    return Processor(load_tokenizer(cfg.model.tokenizer, vocab_size(cfg.model)), settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="a .jsonl file or webdataset shards (paths, brace patterns, URLs)")
    parser.add_argument("--blueprint", required=True, type=Path, help="blueprint naming the two towers")
    parser.add_argument("--override", action="append", default=[], help="blueprint override, e.g. run.seed=3")
    parser.add_argument("--stage", help="contrastive stage for weights, image budget, caption length (default: first)")
    parser.add_argument("--weights", type=Path, help="stage folder or weights file (default: the stage's output)")
    parser.add_argument("--fresh", action="store_true", help="score with freshly initialised towers (smoke tests)")
    parser.add_argument("--threshold", type=float, default=0.9, help="keep pairs with score > this (default 0.9)")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per forward pass (default 64)")
    parser.add_argument("--caption-length", type=int, help="caption tokens (default: the stage's, else 16)")
    parser.add_argument("--bins", type=int, default=20, help="histogram bins over [-1, 1] (default 20)")
    parser.add_argument("--out-keys", type=Path, help="write the kept keys here, one a line")
    parser.add_argument("--out-scores", type=Path, help="write {key, score, kept} per pair here (JSONL)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01, help="stop past this share of bad samples")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        cfg = load_blueprint(args.blueprint, args.override, get_host().registry)
        stage = contrastive_stage(cfg, args.stage)
        weights = None
        if not args.fresh:
            weights = args.weights or (Path(cfg.run.output_dir) / stage.name if stage is not None else None)
            if weights is None or not weights.exists():
                raise KeyeUserError(f"no contrastive weights at {weights}; pass --weights, or --fresh for untrained towers")
        processor = build_processor(cfg, stage, args.caption_length)
        scorer = build_scorer(cfg, stage, weights)
        source = open_source(args.input, args.max_bad_fraction)
        report = ScoreReport(args.threshold, args.bins)
        skipped: dict[str, int] = {}

        def skip(key: str, kind: str, reason: str) -> None:
            skipped[kind] = skipped.get(kind, 0) + 1
            if kind != "not_a_pair":  # bad input: one line each; other kinds are only counted
                logger.warning("skipped %r (%s): %s", key, kind, reason)

        scored = score_pairs(scorer, processor, source, args.threshold, batch_size=args.batch_size, report=report, on_skip=skip)
        results = list(tqdm(scored, desc="scoring", unit="pair", dynamic_ncols=True))
    except (KeyeUserError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        from keye.parallel import destroy_parallel

        destroy_parallel()
    print(report.render())
    if source.bad_inputs.bad:
        skipped["unreadable (source)"] = source.bad_inputs.bad
    print(f"skipped {sum(skipped.values())} samples" + "".join(f", {n} {kind}" for kind, n in sorted(skipped.items())))
    if args.out_keys is not None:
        args.out_keys.parent.mkdir(parents=True, exist_ok=True)
        args.out_keys.write_text("".join(f"{r.key}\n" for r in results if r.kept))
    if args.out_scores is not None:
        args.out_scores.parent.mkdir(parents=True, exist_ok=True)
        lines = (json.dumps({"key": r.key, "score": round(r.score, 6), "kept": r.kept}) for r in results)
        args.out_scores.write_text("".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
