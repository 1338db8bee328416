"""Host memory of packing one micro-batch: the dense ``(1, 1, T, T)`` mask (before) vs ``PackedMask`` (now).

    python tools/bench/packed_mask.py            # T = 16384 and 32768 (the 8B blueprints' max_tokens)
    python tools/bench/packed_mask.py --quick    # CI: T = 4096 (checks that it runs)

Why: ``collate_pack`` used to build the row's block-causal mask densely on the data path, T² bools per
micro-batch (and a second T² for its negation while building), only for the language model to turn it back
into cu_seqlens. It now carries a `keye.model.packing_masks.PackedMask` (the boundaries, tree blocks only).

What runs: one row of T tokens packed from eight text samples (T/8 - 64 tokens each, the rest padding).
Each variant runs in a fresh Python process, so one's freed pages do not hide the next one's peak:

* ``before``: ``collate_pack`` and then the dense mask exactly as it built it until now
  (``~block_attention_mask(cu_seqlens, T, causal=True)``, viewed ``(1, 1, T, T)``);
* ``now``: ``collate_pack`` alone.

Per variant: the growth of the process's peak resident memory (``ru_maxrss``) over the collate, the bytes of
every tensor the micro-batch holds, and the wall time. The ratio line is before / now (a peak growth under
1 MiB, below what ``ru_maxrss`` resolves reliably, counts as 1 MiB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = 8


def _measure(variant: str, seq_len: int) -> dict:
    """In this process: build the samples, then time and measure one collate of ``variant``."""
    import dataclasses
    import resource
    import time

    import torch

    from keye.data.batch import TokenSample, collate_pack
    from keye.data.packing import block_attention_mask

    n = seq_len // SAMPLES - 64
    samples = [TokenSample(key=f"s{i}", input_ids=torch.randint(0, 1000, (n,)), labels=torch.randint(0, 1000, (n,)),
                           position_ids=torch.arange(n).expand(3, n).clone()) for i in range(SAMPLES)]
    collate_pack(samples[:1], n + 1)  # warm the code path (imports, allocator) on a small row
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    batch = collate_pack(samples, seq_len)
    held = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    if variant == "before":
        held.append((~block_attention_mask(batch.cu_seqlens, seq_len, causal=True)).view(1, 1, seq_len, seq_len))
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib

    def tensor_bytes(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if dataclasses.is_dataclass(value):
            return sum(tensor_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
        if isinstance(value, dict):
            return sum(tensor_bytes(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(tensor_bytes(v) for v in value)
        return 0

    held_bytes = sum(tensor_bytes(value) for value in held)
    return {"variant": variant, "T": seq_len, "peak_mib": peak_kib / 1024, "held_mib": held_bytes / 2**20,
            "ms": seconds * 1e3}


def _run(variant: str, seq_len: int) -> dict:
    """``_measure`` in a fresh interpreter (its peak RSS is its own)."""
    out = subprocess.run([sys.executable, __file__, "--child", variant, str(seq_len)], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small row (T = 4096)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(_measure(args.child[0], int(args.child[1]))))
        return
    print(f"{'T':>6} {'variant':>8} {'peak RSS MiB':>13} {'held MiB':>10} {'ms':>8}")
    for seq_len in ([4096] if args.quick else [16384, 32768]):
        rows = {variant: _run(variant, seq_len) for variant in ("before", "now")}
        for row in rows.values():
            print(f"{row['T']:>6} {row['variant']:>8} {row['peak_mib']:>13.1f} {row['held_mib']:>10.2f} {row['ms']:>8.1f}")
        before, now = rows["before"], rows["now"]
        floor = max(now["peak_mib"], 1.0)  # RSS growth under 1 MiB is noise: count it as 1 MiB
        print(f"{seq_len:>6} {'ratio':>8} {before['peak_mib'] / floor:>12.0f}x "
              f"{before['held_mib'] / now['held_mib']:>9.0f}x {before['ms'] / now['ms']:>7.0f}x  (before / now)")


if __name__ == "__main__":
    main()
