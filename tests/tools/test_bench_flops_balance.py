"""``tools/bench/flops_balance.py --quick`` runs end to end and prints a row per data set, shard and flops side by
side with their ratio. Only what must hold is checked: max/mean is at least 1, and on the paper's mix (samples
from 64 to 24576 vision tokens) balancing lowers it; the numbers themselves are the benchmark's output."""

from __future__ import annotations

import re

from keye.testing.bench import run_quick



def test_quick_run_prints_both_modes_and_the_ratio():
    out = run_quick("flops_balance.py")
    rows = {}
    for name in ("mixed files", "paper mix"):
        row = re.search(rf"^{name}\s+(\d+)\s+(\d+) \|\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)% \|\s+([0-9.]+)\s+([0-9.]+)\s+"
                        r"([0-9.]+)% \|\s+([0-9.]+)$", out, re.MULTILINE)
        assert row, f"no '{name}' row in:\n{out}"
        rows[name] = [float(value) for value in row.groups()]
    for samples, steps, shard, shard_worst, _, flops, flops_worst, _, ratio in rows.values():
        assert steps >= 1 and 1.0 <= shard <= shard_worst and 1.0 <= flops <= flops_worst
        assert abs(ratio - round(shard / flops, 2)) <= 0.011
    assert rows["paper mix"][5] < rows["paper mix"][2]
