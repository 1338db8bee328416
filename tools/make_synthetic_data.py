"""Write the synthetic world (`keye.data.synthetic`) to webdataset shards, with a JSONL copy.

    python tools/make_synthetic_data.py data/synthetic --num-samples 2000 --heldout 200 --seed 0

writes, for each split (``train``, and ``heldout`` unless ``--heldout 0``)::

    data/synthetic/train-000000.tar ...    webdataset shards: <key>.json (the sample), <key>.png / <key>.mp4
    data/synthetic/train.jsonl             the same samples, media as files (paths relative to the JSONL)
    data/synthetic/media/train/<key>.png

and, from the held-out split, one evaluation benchmark per task (`keye.eval.benchmark` JSONL; media beside it)::

    data/synthetic/benchmarks/<task>.jsonl
    data/synthetic/benchmarks/media/<key>.png

so the ``webdataset`` and ``jsonl`` sources read the same data the ``synthetic`` source generates in memory.
Same arguments, same samples (the tar members carry a fixed mtime, so the shards are byte-identical too).
Tests import `write_shards` and `write_jsonl` from this file.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path
from typing import Iterable

from keye.data.sources import LoadedSample, media_refs
from keye.data.synthetic import TASK_GROUPS, TASKS, benchmark_rows, expand_tasks, generate_many


def write_shards(items: Iterable[LoadedSample], pattern: str, shard_size: int) -> list[str]:
    """Write samples to shards named ``pattern % i`` (e.g. ``out/train-%06d.tar``), ``shard_size`` per shard.

    A sample's media go in as members named by their reference (``<key>.png``), next to ``<key>.json``.
    Returns the shard paths.
    """
    import webdataset as wds

    written: list[str] = []
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, mtime=0.0, post=written.append) as sink:
        for item in items:
            record = {"__key__": item.sample.key, "json": item.sample.to_json().encode("utf-8")}
            for name, data in item.media.items():
                prefix = item.sample.key + "."
                if not name.startswith(prefix):
                    raise ValueError(f"media {name!r} of sample {item.sample.key!r} is not named '<key>.<ext>'")
                record[name[len(prefix):]] = data
            sink.write(record)
    return written


def write_jsonl(items: Iterable[LoadedSample], path: Path, media_dir: str) -> int:
    """Write samples as JSONL with their media as files under ``media_dir`` (relative to the JSONL file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / media_dir).mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for item in items:
            for ref in media_refs(item.sample):
                relative = f"{media_dir}/{ref.key}"
                (path.parent / relative).write_bytes(item.media[ref.key])
                ref.path, ref.key = relative, None
            out.write(item.sample.to_json() + "\n")
            count += 1
    return count


def write_split(
    out: Path, split: str, num_samples: int, tasks: list[str], seed: int, shard_size: int, jsonl: bool
) -> dict:
    """Generate one split and write its shards (and JSONL copy); returns shard count and samples per task."""
    items = list(generate_many(num_samples, tasks=tasks, split=split, seed=seed))
    shards = write_shards(items, str(out / f"{split}-%06d.tar"), shard_size)
    if jsonl:  # after the shards: write_jsonl rewrites the media references to file paths
        write_jsonl(items, out / f"{split}.jsonl", f"media/{split}")
    return {"shards": len(shards), "tasks": collections.Counter(item.sample.meta["task"] for item in items)}


def write_benchmarks(out: Path, num_samples: int, tasks: list[str], seed: int) -> dict[str, int]:
    """The first ``num_samples`` held-out samples as benchmark files ``out/<task>.jsonl`` (media in
    ``out/media/``, paths relative to the files); returns questions per task."""
    import json

    (out / "media").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[str]] = {}
    for row, media in benchmark_rows(num_samples, tasks=tasks, seed=seed):
        for name, data in media.items():
            (out / "media" / name).write_bytes(data)
        for entry in row["media"]:
            kind, name = next(iter(entry.items()))
            entry[kind] = f"media/{name}"
        rows.setdefault(row["task"], []).append(json.dumps(row))
    for task, lines in rows.items():
        (out / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    return {task: len(lines) for task, lines in rows.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--num-samples", type=int, default=2000, help="train samples (default 2000)")
    parser.add_argument("--heldout", type=int, default=200, help="held-out samples (default 200; 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    names = ", ".join([*TASKS, *TASK_GROUPS])
    parser.add_argument("--tasks", nargs="+", default=["all"], help=f"tasks or groups (default all): {names}")
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard (default 500)")
    parser.add_argument("--no-jsonl", action="store_true", help="write the shards only")
    args = parser.parse_args(argv)
    try:
        tasks = expand_tasks(args.tasks)
    except ValueError as e:
        parser.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.num_samples), ("heldout", args.heldout)):
        if n <= 0:
            continue
        start = time.perf_counter()
        report = write_split(args.out, split, n, tasks, args.seed, args.shard_size, not args.no_jsonl)
        seconds = time.perf_counter() - start
        per_task = ", ".join(f"{task} {count}" for task, count in sorted(report["tasks"].items()))
        print(f"{split}: {n} samples in {report['shards']} shard(s), {seconds:.1f} s ({n / seconds:.0f}/s): {per_task}")
        if split == "heldout":
            counts = write_benchmarks(args.out / "benchmarks", n, tasks, args.seed)
            print(f"benchmarks: {len(counts)} files in {args.out / 'benchmarks'} ({sum(counts.values())} questions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
