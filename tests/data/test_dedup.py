"""pHash / MinHash / LSH dedup and decontamination (`keye.data.dedup`) and the ``tools/dedup.py`` CLI.

The pHash is checked against a DCT-II written from its definition as a plain sum; copies are made for real
(resized, JPEG re-encoded, brightened) from photo-like pictures drawn here (smooth colour waves and discs:
a flat synthetic scene has too many near-median DCT terms to say anything about robustness).
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from keye.data.dedup import (
    dct_matrix,
    MinHasher,
    decontaminate,
    duplicate_groups,
    estimated_jaccard,
    jaccard,
    near_duplicates,
    one_positions,
    phash,
    phash_bits,
    select_samples,
)

ROOT = Path(__file__).resolve().parents[2]


def photo(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A photo-like RGB picture: a sum of random colour waves with a few discs on top."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    pixels = np.zeros((h, w, 3))
    for _ in range(6):
        fx, fy = rng.uniform(0, 4, 2)
        phase = rng.uniform(0, 2 * math.pi)
        pixels += rng.uniform(20, 50, 3) * np.cos(2 * math.pi * (fx * x + fy * y) + phase)[..., None]
    pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()) * 180 + 30
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0, s = rng.integers(0, w - 60), rng.integers(0, h - 60), rng.integers(30, 90)
        draw.ellipse([x0, y0, x0 + s, y0 + s], fill=tuple(int(c) for c in rng.integers(20, 230, 3)))
    return image


def jpeg(image: Image.Image, quality: int = 85) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def copies(image: Image.Image) -> dict[str, Image.Image]:
    w, h = image.size
    brighter = np.clip(np.asarray(image).astype(int) + 12, 0, 255).astype(np.uint8)
    return {
        "resized": image.resize((w // 2, h // 2), Image.Resampling.BICUBIC),
        "jpeg": jpeg(image, 85),
        "brighter": Image.fromarray(brighter),
    }


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# --- pHash ---------------------------------------------------------------------------------------------


def reference_phash_bits(image: Image.Image) -> list[bool]:
    """imagehash's recipe with the 2-D DCT-II written out as its defining double sum."""
    gray = image.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    x = [[float(v) for v in row] for row in np.asarray(gray)]
    n = 32
    cos = [[math.cos(math.pi * k * (2 * i + 1) / (2 * n)) for i in range(n)] for k in range(8)]
    low = [
        sum(x[i][j] * cos[u][i] * cos[v][j] for i in range(n) for j in range(n)) for u in range(8) for v in range(8)
    ]
    median = sorted(low)[31:33]
    return [c > (median[0] + median[1]) / 2 for c in low]


@pytest.mark.parametrize("seed", [0, 1])
def test_phash_bits_match_the_dct_definition(seed):
    image = photo(seed)
    assert phash_bits(image).tolist() == reference_phash_bits(image)
    value = phash(image)
    assert one_positions(value) == {i for i, bit in enumerate(reference_phash_bits(image)) if bit}
    assert phash(png(image)) == value  # bytes or PIL image alike


def test_hand_checked_hashes():
    # The unnormalised DCT-II matrix: C[k, j] = cos(pi k (2j + 1) / 2n).
    r = math.sqrt(0.5)
    assert np.allclose(dct_matrix(2), [[1, 1], [r, -r]])
    assert np.allclose(dct_matrix(4) @ np.ones(4), [4, 0, 0, 0])  # a constant has only a DC term
    # Jaccard of the 1-bit sets, by hand: one extra bit 32/33, one swapped bit 31/33.
    a = (1 << 32) - 1
    assert jaccard(a, a | 1 << 40) == pytest.approx(32 / 33)
    assert jaccard(a, (a & ~1) | 1 << 40) == pytest.approx(31 / 33)
    assert jaccard(0, 0) == 1.0 and jaccard(a, 0) == 0.0


# --- MinHash and LSH ------------------------------------------------------------------------------------


def test_minhash_estimates_jaccard():
    hasher = MinHasher(seed=3)
    rng = random.Random(0)
    pairs = []
    for _ in range(200):
        a = sum(1 << i for i in rng.sample(range(64), rng.randint(8, 40)))
        b = a
        for i in rng.sample(range(64), rng.randint(0, 30)):
            b ^= 1 << i
        pairs.append((a, b))
    signatures = hasher.signatures([h for pair in pairs for h in pair])
    errors = [
        estimated_jaccard(signatures[2 * k], signatures[2 * k + 1]) - jaccard(a, b) for k, (a, b) in enumerate(pairs)
    ]
    assert max(abs(e) for e in errors) < 0.16  # σ ≤ sqrt(0.25 / 128) = 0.044: over 3.5σ
    assert abs(float(np.mean(errors))) < 0.02  # unbiased
    # the same set gives the same signature; a different seed gives other permutations
    assert (hasher.signatures([pairs[0][0]])[0] == signatures[0]).all()
    assert not (MinHasher(seed=4).signatures([pairs[0][0]])[0] == signatures[0]).all()


def test_signature_slots_follow_the_universal_hashes():
    """Slot k is the rank, in the order h_k(x) = (a_k·x + b_k) mod p induces, of the set's h_k-minimiser."""
    hasher = MinHasher(seed=5)
    p = (1 << 61) - 1
    rng = random.Random(1)
    values = [sum(1 << i for i in rng.sample(range(64), rng.randint(1, 64))) for _ in range(8)] + [0]
    signatures = hasher.signatures(values)
    for value, signature in zip(values, signatures):
        members = one_positions(value)
        for k in range(hasher.num_perm):
            h = [(hasher.a[k] * x + hasher.b[k]) % p for x in range(64)]
            if not members:
                assert signature[k] == 64
                continue
            winner = min(members, key=h.__getitem__)
            assert signature[k] == sum(1 for x in range(64) if h[x] < h[winner])


def test_candidate_pairs_are_the_rows_sharing_a_band():
    hasher = MinHasher(bands=16, seed=0)
    rng = np.random.default_rng(0)
    signatures = rng.integers(0, 3, size=(60, 128)).astype(np.uint8)  # few values: many shared bands
    signatures[7] = signatures[3]
    brute = {
        (u, v)
        for u in range(60)
        for v in range(u + 1, 60)
        if any((signatures[u, b * 8 : b * 8 + 8] == signatures[v, b * 8 : b * 8 + 8]).all() for b in range(16))
    }
    u, v = hasher.candidate_pairs(signatures)
    assert set(zip(u.tolist(), v.tolist())) == brute and (3, 7) in brute
    u, v = hasher.candidate_pairs(signatures, split=20)
    assert set(zip(u.tolist(), v.tolist())) == {(a, b) for a, b in brute if a < 20 <= b}


def test_copies_are_found_and_different_pictures_are_not():
    originals = [photo(seed) for seed in range(6)]
    images, expected = [], []
    for k, image in enumerate(originals):
        expected.append([len(images)])
        images.append(image)
        if k == 0:  # this picture's copies keep every hash bit, so the paper's 0.95 finds them
            for copy in copies(image).values():
                expected[-1].append(len(images))
                images.append(copy)
    assert near_duplicates(images) == [expected[0]]
    assert near_duplicates([png(image) for image in images]) == [expected[0]]


def test_copies_at_a_looser_threshold():
    """At 0.95 a copy whose hash swapped one bit pair (Jaccard 31/33) is missed; 0.9 allows one swap."""
    images, groups = [], []
    for seed in range(8):
        image = photo(seed)
        group = [len(images)]
        images.append(image)
        for copy in copies(image).values():
            group.append(len(images))
            images.append(copy)
        groups.append(group)
    assert near_duplicates(images, threshold=0.9) == groups


def test_exact_repeats_and_transitive_groups():
    base = (1 << 32) - 1
    hashes = [base, 7, base, base | 1 << 40, 7, 1 << 63]
    # 0, 2 identical; 3 has one extra bit (32/33 > 0.95); 1, 4 identical; 5 alone
    assert duplicate_groups(hashes) == [[0, 2, 3], [1, 4]]


# --- decontamination and selection -----------------------------------------------------------------------


def test_decontaminate_drops_exactly_the_contaminated_samples():
    bench = [photo(100 + k) for k in range(3)]
    bench_hashes = [phash(image) for image in bench]
    clean = [phash(photo(200 + k)) for k in range(6)]
    train = [
        [clean[0]],
        [clean[1], phash(jpeg(bench[0]))],  # one image of two is a benchmark copy
        [],  # text only
        [phash(bench[2].resize((160, 120)))],
        [clean[2], clean[3]],
        [bench_hashes[1]],  # the very image
        [clean[4]],
    ]
    assert decontaminate(train, bench_hashes, threshold=0.9) == {1, 3, 5}
    assert decontaminate(train, []) == set()
    # at the paper's 0.95 on hashes made by hand: an extra 1-bit matches (32/33), a swapped bit does not (31/33)
    base = (1 << 32) - 1
    train = [[base | 1 << 50], [(base & ~1) | 1 << 50], [1 << 63], [7, base]]
    assert decontaminate(train, [base]) == {0, 3}


def test_select_samples_keeps_the_first_of_each_group():
    a, b, c, d = (phash(photo(300 + k)) for k in range(4))
    bench = phash(photo(400))
    samples = [
        [a],  # 0 kept: first with a
        [b, b],  # 1 kept: its own two images are the same picture
        [a],  # 2 duplicate of 0
        [],  # 3 kept: no image
        [c, b],  # 4 duplicate of 1 (b)
        [bench],  # 5 contaminated
        [d],  # 6 kept
    ]
    chosen = select_samples(samples, [bench])
    assert chosen.kept == [0, 1, 3, 6]
    assert chosen.contaminated == {5}
    assert chosen.duplicates == {2: 0, 4: 1}


# --- the CLI ---------------------------------------------------------------------------------------------


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"keye_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _pair(key: str, path: str) -> dict:
    return {"kind": "pair", "key": key, "image": {"path": path}, "caption": f"picture {key}"}


def test_cli_on_jsonl_and_shards(tmp_path, capsys):
    media = tmp_path / "data" / "media"
    media.mkdir(parents=True)
    pictures = {
        "p0": photo(0), "p1": photo(1), "p0-copy": jpeg(photo(0)), "p2": photo(2), "bench": photo(100),
        "bench-copy": photo(100).resize((160, 120)),
    }  # fmt: skip
    for name, image in pictures.items():
        image.save(media / f"{name}.png")
    (media / "broken.png").write_bytes(b"not a png")
    order = ["p0", "p1", "p0-copy", "bench-copy", "p2", "broken"]
    train = tmp_path / "data" / "train.jsonl"
    train.write_text("".join(json.dumps(_pair(f"s{i}", f"media/{name}.png")) + "\n" for i, name in enumerate(order)))
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps(_pair("b0", "data/media/bench.png")) + "\n")

    tool = _tool("dedup")
    out = tmp_path / "out" / "kept.jsonl"
    argv = [str(train), "--benchmark", str(bench), "--out-keys", str(tmp_path / "kept.txt"), "--out-jsonl", str(out),
            "--max-bad-fraction", "0.5", "--threshold", "0.9"]  # fmt: skip
    assert tool.main(argv) == 0
    printed = capsys.readouterr().out
    assert "seen 6 samples" in printed
    assert "dropped 1 bad, 1 contaminated, 1 duplicates; kept 3" in printed
    assert (tmp_path / "kept.txt").read_text().split() == ["s0", "s1", "s4"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["key"] for row in rows] == ["s0", "s1", "s4"]
    assert all((out.parent / row["image"]["path"]).is_file() for row in rows)  # paths work from the new place

    # the same data as webdataset shards, through the webdataset source
    from keye.data.sample import Sample
    from keye.data.sources import LoadedSample

    make = _tool("make_synthetic_data")
    items = []
    for i, name in enumerate(order[:5]):
        sample = Sample.from_dict({"kind": "pair", "key": f"s{i}", "image": {"key": f"s{i}.png"}, "caption": "x"})
        items.append(LoadedSample(sample, {f"s{i}.png": (media / f"{name}.png").read_bytes()}))
    (tmp_path / "shards").mkdir()
    shards = make.write_shards(items, str(tmp_path / "shards" / "train-%06d.tar"), 2)
    assert len(shards) == 3
    pattern = str(tmp_path / "shards" / "train-{000000..000002}.tar")
    argv = [pattern, "--benchmark", str(bench), "--out-keys", str(tmp_path / "kept2.txt"), "--threshold", "0.9"]
    assert tool.main(argv) == 0
    assert "dropped 0 bad, 1 contaminated, 1 duplicates; kept 3" in capsys.readouterr().out
    assert (tmp_path / "kept2.txt").read_text().split() == ["s0", "s1", "s4"]
