"""Near-duplicate images and benchmark decontamination, the Keye-VL way (spec §3.1, paper appendix A).

Why: web-scale image-text data repeats the same picture many times (resized, re-encoded, re-exposed), and
some of those pictures are evaluation images. Repeats waste compute and tilt the mixture; benchmark images
in training inflate every reported number. The paper's recipe, implemented here:

1. **pHash** (`phash`): a 64-bit perceptual hash, computed as the ``imagehash`` library does: grayscale,
   resize to 32×32 (Lanczos), 2-D DCT-II, keep the top-left 8×8 low frequencies, and set bit ``i`` when
   coefficient ``i`` (row-major) is above their median. The DCT is a plain matrix product (`dct_matrix`):
   no scipy needed. Its scale is irrelevant: only comparisons with the median matter.
2. **MinHash** (`MinHasher`) over the *positions of the 1-bits* of the hash (a set ⊂ {0..63}), with 128
   seeded universal hash functions ``h(x) = (a·x + b) mod p``, p = 2^61 − 1. Two signatures agree in a
   slot with probability equal to the Jaccard similarity of the two sets.
3. **LSH banding**: the 128 slots are cut into ``bands`` bands of ``rows`` rows; images that agree on a
   whole band land in the same bucket and become candidate pairs (the S-curve's knee sits near
   ``(1/bands)^(1/rows)``, 0.71 for the default 16×8, well under the 0.95 threshold, so true matches are
   hardly ever missed).
4. **Verification**: a candidate pair is a duplicate when the *exact* Jaccard of the two 1-bit sets is
   above ``threshold`` (0.95 in the paper), and duplicates are grouped with union-find (transitively).

What 0.95 means in practice: the median rule sets exactly 32 of 64 bits whenever the 64 coefficients are
distinct, so two such hashes that differ at all differ by a swap, Jaccard 31/33 ≈ 0.94. The paper's
threshold therefore keeps only hashes that agree bit for bit (or nearly, when coefficients tie); pHash
absorbs resizing, mild re-compression and brightness shifts (the DC term only), which is what it is for.
Lower ``threshold`` (e.g. 0.8 ≈ up to three swapped bits) for a looser notion of "the same picture".

Exact repeats of a hash are collapsed before MinHash, so a picture seen ten thousand times costs one
signature and no quadratic bucket.

Decontamination (`decontaminate`) uses the same test against a benchmark's image hashes; a training sample
is dropped when ANY of its images matches ANY benchmark image.
"""

from __future__ import annotations

import io
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

HASH_SIZE = 8  # 8×8 low frequencies → 64 bits
HIGHFREQ_FACTOR = 4  # the image is resized to (8·4)² = 32×32, as in imagehash
NUM_PERM = 128
MERSENNE_61 = (1 << 61) - 1
THRESHOLD = 0.95


# --- pHash --------------------------------------------------------------------------------------------


def dct_matrix(n: int) -> np.ndarray:
    """Unnormalised DCT-II as an (n, n) matrix: ``C[k, j] = cos(π k (2j + 1) / 2n)``, so ``X = C @ x``."""
    k = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    return np.cos(np.pi * k * (2 * j + 1) / (2 * n))


_DCT32 = dct_matrix(HASH_SIZE * HIGHFREQ_FACTOR)


def phash_bits(image: Image.Image) -> np.ndarray:
    """The 64 pHash bits of an image as a bool array, row-major over the 8×8 low-frequency block."""
    side = HASH_SIZE * HIGHFREQ_FACTOR
    gray = image.convert("L").resize((side, side), Image.Resampling.LANCZOS)
    pixels = np.asarray(gray, dtype=np.float64)  # (32, 32)
    coefficients = _DCT32 @ pixels @ _DCT32.T  # (32, 32): DCT along columns, then rows
    low = coefficients[:HASH_SIZE, :HASH_SIZE]  # (8, 8)
    return (low > np.median(low)).flatten()


def bits_to_int(bits: np.ndarray) -> int:
    """64 bools → an int whose bit ``i`` is ``bits[i]``."""
    return int(sum(1 << i for i, bit in enumerate(bits.tolist()) if bit))


def phash(image: Image.Image | bytes) -> int:
    """64-bit pHash of a PIL image or encoded image bytes (bit ``i`` = low-frequency coefficient ``i``)."""
    if isinstance(image, (bytes, bytearray)):
        with Image.open(io.BytesIO(image)) as opened:
            return bits_to_int(phash_bits(opened))
    return bits_to_int(phash_bits(image))


def one_positions(hash_value: int) -> set[int]:
    """The positions of the 1-bits of a 64-bit hash: the set MinHash and Jaccard work on."""
    return {i for i in range(HASH_SIZE * HASH_SIZE) if hash_value >> i & 1}


def jaccard(a: int, b: int) -> float:
    """Exact Jaccard similarity of the 1-bit position sets of two hashes (two empty sets: 1.0)."""
    union = (a | b).bit_count()
    return (a & b).bit_count() / union if union else 1.0


# --- MinHash and LSH ------------------------------------------------------------------------------------


class MinHasher:
    """128 seeded universal hash functions over positions 0..63, and the banding of their signatures."""

    def __init__(self, num_perm: int = NUM_PERM, bands: int = 16, seed: int = 0) -> None:
        if num_perm % bands:
            raise ValueError(f"bands ({bands}) must divide num_perm ({num_perm})")
        rng = np.random.default_rng(seed)
        a = [int(v) for v in rng.integers(1, MERSENNE_61, size=num_perm, dtype=np.int64)]
        b = [int(v) for v in rng.integers(0, MERSENNE_61, size=num_perm, dtype=np.int64)]
        positions = HASH_SIZE * HASH_SIZE
        # (num_perm, 64): h_k(x) for every possible element x; Python ints avoid uint64 overflow in a·x
        self.table = np.array(
            [[(a[k] * x + b[k]) % MERSENNE_61 for x in range(positions)] for k in range(num_perm)], dtype=np.uint64
        )
        self.num_perm = num_perm
        self.bands = bands
        self.rows = num_perm // bands

    def signatures(self, hashes: Sequence[int]) -> np.ndarray:
        """MinHash signatures ``(N, num_perm)`` of the 1-bit sets; an empty set gets p in every slot."""
        if not len(hashes):
            return np.zeros((0, self.num_perm), dtype=np.uint64)
        values = np.array([int(h) for h in hashes], dtype=np.uint64)  # (N,)
        bits = (values[:, None] >> np.arange(64, dtype=np.uint64)[None, :]) & np.uint64(1)  # (N, 64)
        out = np.empty((len(values), self.num_perm), dtype=np.uint64)
        chunk = 512  # (chunk, num_perm, 64) uint64 = 32 MiB at a time
        for start in range(0, len(values), chunk):
            mask = bits[start : start + chunk, None, :].astype(bool)  # (n, 1, 64)
            masked = np.where(mask, self.table[None], np.uint64(MERSENNE_61))  # (n, num_perm, 64)
            out[start : start + chunk] = masked.min(axis=2)
        return out

    def band_keys(self, signature: np.ndarray) -> list[tuple[int, bytes]]:
        """One bucket key per band: (band index, the band's slot values as bytes)."""
        return [(i, signature[i * self.rows : (i + 1) * self.rows].tobytes()) for i in range(self.bands)]


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The MinHash estimate of Jaccard: the share of slots where two signatures agree."""
    return float(np.mean(sig_a == sig_b))


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def groups(self) -> list[list[int]]:
        """Every set with two or more members, each sorted, ordered by first member."""
        members: dict[int, list[int]] = defaultdict(list)
        for x in range(len(self.parent)):
            members[self.find(x)].append(x)
        return sorted((m for m in members.values() if len(m) > 1), key=lambda m: m[0])


# --- the two operations ---------------------------------------------------------------------------------


def _unique(hashes: Sequence[int]) -> tuple[list[int], dict[int, list[int]]]:
    """Distinct hash values (first-seen order) and, for each, the indices that carry it."""
    where: dict[int, list[int]] = {}
    for index, value in enumerate(hashes):
        where.setdefault(int(value), []).append(index)
    return list(where), where


def duplicate_groups(
    hashes: Sequence[int], *, threshold: float = THRESHOLD, hasher: MinHasher | None = None
) -> list[list[int]]:
    """Groups (index lists, two or more members) of hashes whose 1-bit sets have Jaccard > ``threshold``."""
    hasher = hasher or MinHasher()
    distinct, where = _unique(hashes)
    signatures = hasher.signatures(distinct)
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    for u, signature in enumerate(signatures):
        for key in hasher.band_keys(signature):
            buckets[key].append(u)
    found = UnionFind(len(distinct))
    checked: set[tuple[int, int]] = set()
    for members in buckets.values():
        for i, u in enumerate(members):
            for v in members[i + 1 :]:
                if (u, v) in checked or found.find(u) == found.find(v):
                    continue
                checked.add((u, v))
                if jaccard(distinct[u], distinct[v]) > threshold:
                    found.union(u, v)
    everyone = UnionFind(len(hashes))
    for u, value in enumerate(distinct):
        indices = where[value]
        for index in indices[1:]:
            everyone.union(indices[0], index)  # exact repeats of one hash
        root = found.find(u)
        if root != u:
            everyone.union(where[distinct[root]][0], indices[0])
    return everyone.groups()


def near_duplicates(
    images: Iterable[Image.Image | bytes], *, threshold: float = THRESHOLD, hasher: MinHasher | None = None
) -> list[list[int]]:
    """Groups of near-duplicate images (indices into ``images``, each group sorted, two or more members)."""
    return duplicate_groups([phash(image) for image in images], threshold=threshold, hasher=hasher)


def decontaminate(
    train_hashes: Sequence[Sequence[int]],
    benchmark_hashes: Iterable[int],
    *,
    threshold: float = THRESHOLD,
    hasher: MinHasher | None = None,
) -> set[int]:
    """Indices of training samples to drop: those with ANY image whose hash matches ANY benchmark image.

    ``train_hashes[i]`` holds the pHashes of sample ``i``'s images (empty for a text-only sample).
    Benchmark hashes are indexed by their LSH buckets; each training image is looked up and verified
    with the exact Jaccard, as in `duplicate_groups`.
    """
    hasher = hasher or MinHasher()
    bench = sorted({int(h) for h in benchmark_hashes})
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    for value, signature in zip(bench, hasher.signatures(bench)):
        for key in hasher.band_keys(signature):
            buckets[key].append(value)
    exact = set(bench)
    distinct = sorted({int(h) for hashes in train_hashes for h in hashes} - exact)
    contaminated = set(exact)
    for value, signature in zip(distinct, hasher.signatures(distinct)):
        candidates = {b for key in hasher.band_keys(signature) for b in buckets.get(key, ())}
        if any(jaccard(value, b) > threshold for b in candidates):
            contaminated.add(value)
    return {i for i, hashes in enumerate(train_hashes) if any(int(h) in contaminated for h in hashes)}
