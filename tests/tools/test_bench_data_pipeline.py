"""``tools/bench/data_pipeline.py --quick`` runs end to end and prints both decoder rows, the ratio and a verdict.

The numbers themselves are not checked (speed targets live in the benchmark's output, not in timed tests).
"""

from __future__ import annotations

import re

from keye.testing.bench import run_quick



def test_quick_run_prints_both_decoders_and_the_ratio():
    out = run_quick("data_pipeline.py")
    number = r"\s+([0-9]+\.[0-9]+)"
    for decoder in ("decord", "pyav"):
        row = re.search(rf"^{decoder}{number * 5}\s*$", out, re.MULTILINE)
        assert row, f"no {decoder} row in:\n{out}"
        assert all(float(value) > 0 for value in row.groups())
    ratio = re.search(r"^ratio decord/pyav: mix samples/s ([0-9.]+)x, video frames/s ([0-9.]+)x", out, re.MULTILINE)
    assert ratio and float(ratio.group(1)) > 0 and float(ratio.group(2)) > 0, out
    step = re.search(r"^tiny\s+[0-9,]+\s+[0-9]+\s+[0-9]+\s+([0-9.]+)x\s+(pipeline keeps ahead|the step WAITS)", out, re.MULTILINE)
    assert step, out
