"""Drop near-duplicate images and benchmark images from a data set (pHash → MinHash → Jaccard, spec §3.1).

    python tools/dedup.py data/train.jsonl --benchmark data/bench.jsonl --out-jsonl data/train.dedup.jsonl
    python tools/dedup.py 'data/train-{000000..000009}.tar' --benchmark 'bench-{000000..000001}.tar' \\
        --out-keys kept.txt

Input is read through the registered data sources: a ``.jsonl`` file with the ``jsonl`` source, anything
else (paths, brace patterns, URLs) as webdataset shards. Every image of every sample is pHashed
(`keye.data.dedup`); videos and text are not looked at. Then, in read order:

1. a sample with ANY image matching a benchmark image (``--benchmark``, repeatable) is dropped as contaminated;
2. a sample with an image in the same near-duplicate group as an image of an earlier kept sample is dropped
   as a duplicate (the first sample of a group is kept; a sample's own images never drop it);
3. everything else is kept, samples without images included.

Outputs: ``--out-keys`` (the kept sample keys, one a line, any input) and ``--out-jsonl`` (the kept samples,
JSONL input only: media paths are rewritten relative to the output file). The kept samples' JSON is held in
memory until the end (text only, a few hundred bytes a sample). A sample whose image will not decode is
dropped with one line naming it and counted as bad.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import UnidentifiedImageError
from tqdm import tqdm

from keye.config import build_component_config
from keye.data.dedup import THRESHOLD, MinHasher, phash, select_samples
from keye.data.sample import ImageRef
from keye.data.sources import LoadedSample, media_name, media_refs
from keye.errors import KeyeUserError
from keye.plugins import get_host

logger = logging.getLogger("keye.dedup")


def open_source(spec: str, max_bad_fraction: float) -> Any:
    """The registered data source for ``spec``: ``jsonl`` for a .jsonl file, else ``webdataset``."""
    if spec.endswith(".jsonl"):
        node = {"name": "jsonl", "path": spec}
    else:
        node = {"name": "webdataset", "urls": [spec]}
    node.update(max_bad_fraction=max_bad_fraction, check_media=False)  # images are decoded for hashing anyway
    cls, config = build_component_config("data_source", node, get_host().registry)
    return cls(config)


@dataclass
class Hashed:
    """The pHashes of one data set's samples, in read order."""

    keys: list[str] = field(default_factory=list)
    hashes: list[list[int]] = field(default_factory=list)
    json: list[str] = field(default_factory=list)  # only with keep_json
    bad: int = 0


def hash_samples(spec: str, what: str, max_bad_fraction: float, rewrite_to: Path | None = None) -> Hashed:
    """pHash every image of every sample of ``spec`` (a progress bar per data set)."""
    source = open_source(spec, max_bad_fraction)
    out = Hashed()
    for loaded in tqdm(source, desc=f"hashing {what}", unit="sample", dynamic_ncols=True):
        hashes = image_hashes(loaded)
        if hashes is None:
            out.bad += 1
            continue
        out.keys.append(loaded.sample.key)
        out.hashes.append(hashes)
        if rewrite_to is not None:
            out.json.append(rewritten_json(loaded, Path(spec).parent, rewrite_to))
    out.bad += source.bad_inputs.bad
    return out


def image_hashes(loaded: LoadedSample) -> list[int] | None:
    """The pHash of each image of a sample; None (and one log line) when an image does not decode."""
    hashes = []
    for ref in media_refs(loaded.sample):
        if not isinstance(ref, ImageRef):
            continue
        name = media_name(ref)
        try:
            hashes.append(phash(loaded.media[name]))
        except KeyError:
            reason = "not among the sample's media"
        except UnidentifiedImageError:
            reason = "not an image PIL can decode"
        except Exception as exc:  # PIL raises many types for damaged bytes
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        else:
            continue
        where = f" ({loaded.origin})" if loaded.origin else ""
        logger.warning("skipped %r%s: image %r: %s", loaded.sample.key, where, name, reason)
        return None
    return hashes


def rewritten_json(loaded: LoadedSample, source_dir: Path, out_dir: Path) -> str:
    """The sample as a JSON line whose relative media paths still work from ``out_dir``."""
    for ref in media_refs(loaded.sample):
        if ref.path is not None and "://" not in ref.path and not os.path.isabs(ref.path):
            ref.path = os.path.relpath(source_dir / ref.path, out_dir)
    return loaded.sample.to_json()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="a .jsonl file or webdataset shards (paths, brace patterns, URLs)")
    parser.add_argument("--benchmark", action="append", default=[], help="benchmark data to decontaminate against")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help=f"Jaccard above which images match ({THRESHOLD})")
    parser.add_argument("--bands", type=int, help="LSH bands of the 128 MinHash slots (default: chosen for the threshold)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the MinHash permutations (default 0)")
    parser.add_argument("--out-keys", type=Path, help="write the kept sample keys here, one a line")
    parser.add_argument("--out-jsonl", type=Path, help="write the kept samples here (JSONL input only)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01, help="stop past this share of bad samples")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.out_jsonl is not None and not args.input.endswith(".jsonl"):
        parser.error("--out-jsonl needs a .jsonl input (its media are files); for shards use --out-keys")
    try:
        hasher = MinHasher(bands=args.bands, seed=args.seed, threshold=args.threshold)
        out_dir = args.out_jsonl.resolve().parent if args.out_jsonl else None
        data = hash_samples(args.input, "input", args.max_bad_fraction, out_dir)
        benchmark = [h for spec in args.benchmark for hs in hash_samples(spec, spec, 1.0).hashes for h in hs]
    except (KeyeUserError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    chosen = select_samples(data.hashes, benchmark, threshold=args.threshold, hasher=hasher)
    kept, contaminated, duplicates = chosen.kept, chosen.contaminated, chosen.duplicates
    seen = len(data.keys) + data.bad
    print(f"seen {seen} samples ({sum(map(len, data.hashes))} images), {len(benchmark)} benchmark images")
    print(f"dropped {data.bad} bad, {len(contaminated)} contaminated, {len(duplicates)} duplicates; kept {len(kept)}")
    if args.out_keys is not None:
        args.out_keys.parent.mkdir(parents=True, exist_ok=True)
        args.out_keys.write_text("".join(f"{data.keys[i]}\n" for i in kept))
        print(f"wrote {len(kept)} keys to {args.out_keys}")
    if args.out_jsonl is not None:
        args.out_jsonl.parent.mkdir(parents=True, exist_ok=True)
        args.out_jsonl.write_text("".join(f"{data.json[i]}\n" for i in kept), encoding="utf-8")
        print(f"wrote {len(kept)} samples to {args.out_jsonl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
