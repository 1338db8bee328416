"""``keye-launch eval SOURCE [STAGE] BENCHMARK... [--mode M] [--max-samples N] [--out DIR]``.

SOURCE is a released-format folder (``keye-launch export`` writes one) or a blueprint file followed by the
name of one of its finished stages (its weights are read from ``run.output_dir/<stage>``, in any layout;
``KEY=VALUE`` overrides apply to the blueprint, e.g. ``run.output_dir=...``). Writes ``results.jsonl``,
``summary.json`` and ``report.md`` to ``--out`` (`keye.eval.run.evaluate`) and prints the overall score.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from keye.errors import KeyeUserError


def split_arguments(source: str, rest: list[str]) -> tuple[str | None, list[str], list[str]]:
    """``(stage, benchmarks, overrides)`` from the positional words after SOURCE."""
    from keye.eval.model import is_blueprint

    overrides = [word for word in rest if "=" in word and not Path(word).exists()]
    words = [word for word in rest if word not in overrides]
    stage = None
    if is_blueprint(source):
        if not words:
            raise KeyeUserError(f"{source}: a blueprint source needs the stage to load (SOURCE STAGE BENCHMARK...)")
        stage, words = words[0], words[1:]
    return stage, words, overrides


def cmd_eval(args: argparse.Namespace) -> int:
    from keye.eval.model import check_mode, load_source
    from keye.eval.run import read_benchmarks, evaluate

    stage, benchmarks, overrides = split_arguments(args.source, list(args.rest) + list(args.overrides))
    check_mode(args.mode)
    read_benchmarks(benchmarks, args.max_samples)  # a bad file fails before the model loads
    model = load_source(args.source, stage, overrides, max_new_tokens=args.max_new_tokens)
    name = Path(args.source).stem if stage is None else f"{Path(args.source).stem}-{stage}"
    out = Path(args.out) if args.out else Path("eval") / name
    label = args.source if stage is None else f"{args.source} {stage}"
    summary = evaluate(benchmarks, model, out, args.mode, args.max_samples, args.batch_size, source=label)
    overall = summary["overall"]
    score = "n/a" if overall["score"] is None else f"{overall['score']:.4f}"
    print(f"eval: {overall['samples']} samples scored, {summary['bad_samples']} skipped; overall score {score}; "
          f"results in {out}")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser("eval", help="answer benchmark questions with a model and score the answers")
    parser.add_argument("source", help="released-format folder, or a blueprint file (then STAGE follows)")
    parser.add_argument("rest", nargs="+", metavar="[STAGE] BENCHMARK", help="benchmark files (.jsonl, .tsv)")
    parser.add_argument("--mode", default="auto", help="thinking mode: think, no_think, auto (default), agentic")
    parser.add_argument("--max-samples", type=int, default=None, help="at most this many questions per file")
    parser.add_argument("--out", default=None, help="output folder (default eval/<source>)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most (default 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions generated together (default 8)")
    parser.set_defaults(func=cmd_eval, overrides=[])
