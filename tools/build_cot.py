"""Build a CoT cold-start data set: K sampled reasoning paths per question, the verified most frequent one kept.

    python tools/build_cot.py runs/released-model questions.jsonl --out cot/cot.jsonl -k 8
    python tools/build_cot.py blueprints/tiny/posttrain.yaml sft questions.jsonl --out cot/cot.jsonl --modes think auto

The teacher is a released-format folder, or a blueprint and one of its finished stages (loaded as
``keye-launch eval`` loads them, `keye.eval.model.load_source`). Questions are samples of a ``.jsonl`` file
(the ``jsonl`` source) or webdataset shards: conversations with ``meta.answer`` (the last assistant turn is
dropped) or RL prompts with their reference answer; ``--synthetic N`` asks N questions of the synthetic world
instead. The output is a ``jsonl``-source data set with media beside it; each sample's ``meta.cot`` says which
teacher wrote it, K, the votes of the kept path and how many replies were correct (`keye.data.cot`).
Runs in one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterator

from keye.errors import KeyeUserError


def open_source(spec: str) -> Any:
    """The registered data source for ``spec``: ``jsonl`` for a .jsonl file, else ``webdataset``."""
    from keye.config import build_component_config
    from keye.plugins import get_host

    node: dict[str, Any] = {"name": "jsonl", "path": spec} if spec.endswith(".jsonl") else {"name": "webdataset", "urls": [spec]}
    node["check_media"] = False  # the teacher's processor decodes them; a question it cannot read is counted
    cls, config = build_component_config("data_source", node, get_host().registry)
    return cls(config)


def questions(samples: Any, limit: int | None, stats: Any) -> Iterator[Any]:
    from keye.data.cot import question_of

    for loaded in samples:
        if limit is not None and stats.questions >= limit:
            return
        question = question_of(loaded)
        if isinstance(question, str):
            stats.skipped[question] += 1
            continue
        yield question


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="+", help="released folder, or BLUEPRINT STAGE; then the questions "
                                                  "(.jsonl or shards) unless --synthetic")
    parser.add_argument("--out", required=True, type=Path, help="output JSONL (media go in media/ beside it)")
    parser.add_argument("--synthetic", type=int, metavar="N", help="ask N questions of the synthetic world")
    parser.add_argument("--synthetic-tasks", nargs="+", default=["image_qa", "video_qa"], help="their tasks")
    parser.add_argument("-k", type=int, default=8, help="replies sampled per question and mode (default 8)")
    parser.add_argument("--modes", nargs="+", default=["think"], help="think and/or auto (default think)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    parser.add_argument("--min-score", type=float, default=1.0, help="score an answer needs to count (default 1)")
    parser.add_argument("--max-questions", type=int, help="stop after this many questions")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply at most (default 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions generated together (default 8)")
    parser.add_argument("--no-require-thought", action="store_true",
                        help="accept think-mode replies without <think> (a teacher that never learnt the tags)")
    parser.add_argument("--override", action="append", default=[], help="blueprint override, e.g. run.seed=3")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from keye.data.cot import COT_MODES, CotStats, build_cot, write_jsonl
    from keye.eval.model import is_blueprint, load_source

    teacher_args = args.source[:2] if is_blueprint(args.source[0]) else args.source[:1]
    rest = args.source[len(teacher_args):]
    problem = None  # checked before anything loads (Megatron's import notices would bury the line)
    if any(mode not in COT_MODES for mode in args.modes):
        problem = f"--modes: expected modes among {', '.join(COT_MODES)}, got {args.modes}"
    elif args.k < 1 or args.temperature <= 0:
        problem = "-k must be >= 1 and --temperature > 0 (k different paths are sampled)"
    elif (args.synthetic is None) == (len(rest) != 1):
        problem = "give the questions (one .jsonl file or shard pattern) or --synthetic N, not both"
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        model = load_source(teacher_args[0], teacher_args[1] if len(teacher_args) == 2 else None, args.override,
                            max_new_tokens=args.max_new_tokens)
        if args.synthetic is not None:
            from keye.data.synthetic import generate_many

            samples = generate_many(args.synthetic, tasks=args.synthetic_tasks, split="train")
        else:
            samples = open_source(rest[0])
        stats = CotStats()
        records = build_cot(model, questions(samples, args.max_questions, stats), k=args.k, modes=args.modes,
                            temperature=args.temperature, min_score=args.min_score, batch_size=args.batch_size,
                            teacher=" ".join(teacher_args), require_thought=not args.no_require_thought,
                            stats=stats)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        written = write_jsonl(records, args.out)
    except (KeyeUserError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        from keye.parallel import destroy_parallel

        destroy_parallel()
    print(json.dumps({"output": str(args.out), "written": written, **stats.summary()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
