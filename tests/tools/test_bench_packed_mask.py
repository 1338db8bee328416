"""``tools/bench/packed_mask.py --quick`` runs end to end and prints both variants and the ratio line. What must
hold is checked, not the numbers: the micro-batch without the dense mask holds at least the T² bytes less
(T = 4096: 16 MiB), and its collate does not raise the process's peak memory by the dense mask's size."""

from __future__ import annotations

import re

from keye.testing.bench import run_quick



def test_quick_run_prints_before_now_and_the_ratio():
    out = run_quick("packed_mask.py")
    rows = {}
    for variant in ("before", "now"):
        row = re.search(rf"^\s+4096\s+{variant}\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)$", out, re.MULTILINE)
        assert row, f"no '{variant}' row in:\n{out}"
        rows[variant] = [float(value) for value in row.groups()]
    assert re.search(r"^\s+4096\s+ratio\s+\d+x\s+\d+x\s+\d+x\s+\(before / now\)$", out, re.MULTILINE), out
    (peak_before, held_before, _), (peak_now, held_now, _) = rows["before"], rows["now"]
    assert held_before - held_now >= 16.0 and held_now < 1.0  # the (1, 1, 4096, 4096) bool mask is 16 MiB
    assert peak_now < 8.0 < peak_before
