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
   slot with probability equal to the Jaccard similarity of the two sets. (A slot stores the rank of the
   minimum among the 64 possible values, one byte, computed from per-byte lookup tables: same equalities,
   a fraction of the work.)
3. **LSH banding**: the 128 slots are cut into ``bands`` bands of ``rows`` rows; images that agree on a
   whole band land in the same bucket and become candidate pairs. A pair at Jaccard J becomes a candidate
   with probability ``1 - (1 - J^rows)^bands``; the banding is chosen so that this is ≥ 0.99 at the
   threshold (8 bands × 16 rows for 0.95) with as few unrelated candidates as possible.
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
from dataclasses import dataclass, field
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


def choose_bands(num_perm: int, threshold: float, recall: float = 0.99) -> int:
    """The fewest bands (most rows each: fewest false candidates) that still make a pair at Jaccard
    ``threshold`` a candidate with probability ≥ ``recall``: ``1 - (1 - J^rows)^bands``."""
    for bands in sorted(b for b in range(1, num_perm + 1) if num_perm % b == 0):
        rows = num_perm // bands
        if 1 - (1 - threshold**rows) ** bands >= recall:
            return bands
    return num_perm


class MinHasher:
    """128 seeded universal hash functions over positions 0..63, and the banding of their signatures.

    ``bands=None`` picks the banding for ``threshold`` (`choose_bands`): 8 bands of 16 rows at 0.95,
    16 of 8 at 0.9. Over a 64-element universe fewer, longer bands matter: two unrelated 32-bit sets
    share a third of their elements, so 16 bands of 8 rows would make about 0.2% of all pairs candidates.
    """

    def __init__(
        self, num_perm: int = NUM_PERM, bands: int | None = None, seed: int = 0, threshold: float = THRESHOLD
    ) -> None:
        bands = bands or choose_bands(num_perm, threshold)
        if num_perm % bands:
            raise ValueError(f"bands ({bands}) must divide num_perm ({num_perm})")
        rng = np.random.default_rng(seed)
        #: h_k(x) = (a_k·x + b_k) mod p, k < num_perm (Python ints: a·x overflows 64 bits)
        self.a = [int(v) for v in rng.integers(1, MERSENNE_61, size=num_perm, dtype=np.int64)]
        self.b = [int(v) for v in rng.integers(0, MERSENNE_61, size=num_perm, dtype=np.int64)]
        positions = HASH_SIZE * HASH_SIZE
        table = [[(self.a[k] * x + self.b[k]) % MERSENNE_61 for x in range(positions)] for k in range(num_perm)]
        # rank[k, x]: where position x comes in the order that h_k induces on 0..63
        rank = np.array([np.argsort(np.argsort(np.array(row, dtype=np.uint64), kind="stable")) for row in table])
        # Byte tables: lowest[k, j, v] = smallest rank[k, 8j + i] over the 1-bits i of byte value v (64: none),
        # so a signature slot is the min of 8 lookups instead of 64 comparisons.
        members = (np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1  # (256, 8)
        lowest = np.full((num_perm, 8, 256), 64, dtype=np.uint8)
        for j in range(8):
            ranks = rank[:, 8 * j : 8 * j + 8]  # (num_perm, 8)
            lowest[:, j] = np.where(members[None].astype(bool), ranks[:, None, :], 64).min(axis=2)
        self.rank = rank.astype(np.uint8)
        self.lowest = lowest
        self.num_perm = num_perm
        self.bands = bands
        self.rows = num_perm // bands

    def signatures(self, hashes: Sequence[int]) -> np.ndarray:
        """MinHash signatures ``(N, num_perm)`` uint8 of the 1-bit sets.

        Slot k holds the *rank* under h_k of the set's element with the smallest h_k (64 for an empty set)
        rather than that smallest value itself: over a 64-element universe the two determine each other,
        so slots agree exactly when the minima agree, and a byte per slot is 8× less to move than a uint64.
        """
        values = np.array([int(h) for h in hashes], dtype="<u8")  # (N,) little-endian whatever the machine
        octets = values.view(np.uint8).reshape(-1, 8)  # (N, 8): byte j holds bits 8j..8j+7
        out = np.full((self.num_perm, len(values)), 64, dtype=np.uint8)
        for j in range(8):
            np.minimum(out, self.lowest[:, j, octets[:, j]], out=out)  # (num_perm, N)
        return np.ascontiguousarray(out.T)

    def candidate_pairs(self, signatures: np.ndarray, split: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``(u, v)``, u < v, that agree on at least one whole band, each pair once.

        With ``split``, only pairs across it (``u < split <= v``): queries against an index.
        Pairs in a bucket are made by comparing each row with the one ``d`` places later in bucket order,
        for d = 1, 2, ... up to the largest bucket: array work, no Python loop over buckets.
        """
        n = len(signatures)
        found = []
        for band in range(self.bands):
            block = np.ascontiguousarray(signatures[:, band * self.rows : (band + 1) * self.rows])  # (N, rows)
            keys = block.view(np.dtype((np.void, self.rows))).ravel()  # one opaque key per row
            _, bucket, counts = np.unique(keys, return_inverse=True, return_counts=True)
            bucket = bucket.ravel()
            rows = np.nonzero(counts[bucket] > 1)[0]  # rows whose bucket has company, ascending
            rows = rows[np.argsort(bucket[rows], kind="stable")]  # grouped by bucket, ascending inside each
            for d in range(1, int(counts.max(initial=1))):
                rows = rows[counts[bucket[rows]] > d]  # only buckets with more than d rows have pairs d apart
                same = bucket[rows[:-d]] == bucket[rows[d:]]
                found.append(rows[:-d][same] * n + rows[d:][same])
        codes = np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
        u, v = codes // max(n, 1), codes % max(n, 1)
        if split is not None:
            across = (u < split) & (v >= split)
            u, v = u[across], v[across]
        return u, v


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def jaccard_many(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`jaccard` over two arrays of 64-bit hashes, element by element."""
    a, b = np.asarray(a, dtype="<u8"), np.asarray(b, dtype="<u8")

    def popcount(x: np.ndarray) -> np.ndarray:
        return _POPCOUNT8[x.view(np.uint8).reshape(-1, 8)].sum(axis=1, dtype=np.int64)

    union = popcount(a | b)
    return np.where(union > 0, popcount(a & b) / np.maximum(union, 1), 1.0)


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
    hasher = hasher or MinHasher(threshold=threshold)
    distinct, where = _unique(hashes)
    found = UnionFind(len(distinct))
    u, v = hasher.candidate_pairs(hasher.signatures(distinct))
    values = np.array(distinct, dtype="<u8")
    match = jaccard_many(values[u], values[v]) > threshold
    for a, b in zip(u[match].tolist(), v[match].tolist()):
        found.union(a, b)
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
    Benchmark and training hashes share the LSH buckets; only benchmark-training candidate pairs are
    verified, with the exact Jaccard, as in `duplicate_groups`.
    """
    hasher = hasher or MinHasher(threshold=threshold)
    bench = sorted({int(h) for h in benchmark_hashes})
    contaminated = set(bench)
    queries = sorted({int(h) for hashes in train_hashes for h in hashes} - contaminated)
    values = np.array(bench + queries, dtype="<u8")
    u, v = hasher.candidate_pairs(hasher.signatures(values.tolist()), split=len(bench))
    match = jaccard_many(values[u], values[v]) > threshold
    contaminated.update(int(value) for value in values[v[match]])
    return {i for i, hashes in enumerate(train_hashes) if any(int(h) in contaminated for h in hashes)}


@dataclass
class Selection:
    """What `select_samples` decided: kept sample indices in order, and why the others were dropped."""

    kept: list[int] = field(default_factory=list)
    contaminated: set[int] = field(default_factory=set)
    duplicates: dict[int, int] = field(default_factory=dict)  # dropped sample → the kept sample it repeats


def select_samples(
    sample_hashes: Sequence[Sequence[int]],
    benchmark_hashes: Iterable[int] = (),
    *,
    threshold: float = THRESHOLD,
    hasher: MinHasher | None = None,
) -> Selection:
    """Decontaminate, then deduplicate, samples given the pHashes of their images, in read order.

    A sample with ANY image matching a benchmark image is contaminated. Among the rest, a sample with an
    image in the same near-duplicate group as an image of an earlier *kept* sample is a duplicate of it;
    the first sample of a group is kept, a sample's own images never drop it, and samples without images
    are always kept (text duplicates are not this module's business).
    """
    hasher = hasher or MinHasher(threshold=threshold)
    benchmark = list(benchmark_hashes)
    chosen = Selection()
    if benchmark:
        chosen.contaminated = decontaminate(sample_hashes, benchmark, threshold=threshold, hasher=hasher)
    flat: list[int] = []  # hashes of the images of clean samples
    owner: list[int] = []  # image → its sample
    for index, hashes in enumerate(sample_hashes):
        if index not in chosen.contaminated:
            flat.extend(int(h) for h in hashes)
            owner.extend([index] * len(hashes))
    group_of = list(range(len(flat)))  # image → group id (itself when it has no duplicate)
    for group_id, members in enumerate(duplicate_groups(flat, threshold=threshold, hasher=hasher)):
        for image in members:
            group_of[image] = len(flat) + group_id
    groups_of: dict[int, set[int]] = defaultdict(set)
    for image, index in enumerate(owner):
        groups_of[index].add(group_of[image])
    claimed: dict[int, int] = {}  # group → the kept sample that owns it
    for index in range(len(sample_hashes)):
        if index in chosen.contaminated:
            continue
        earlier = [claimed[g] for g in groups_of.get(index, ()) if claimed.get(g, index) != index]
        if earlier:
            chosen.duplicates[index] = min(earlier)
            continue
        chosen.kept.append(index)
        for g in groups_of.get(index, ()):
            claimed.setdefault(g, index)
    return chosen
