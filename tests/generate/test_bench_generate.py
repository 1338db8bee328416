"""``tools/bench/generate.py --quick`` runs (in its own process: it starts Megatron's parallel state) and prints
its table and ratios. Only the format is checked: speed targets live in the benchmark's output."""

from __future__ import annotations

import re

from keye.testing.bench import run_quick

CASES = (
    "keye megatron generator, kv_cache keye",
    "keye megatron generator, kv_cache keye, lean_decode off",
    "keye megatron generator, kv_cache megatron",
    "transformers Qwen2.5-VL generate",
    "keye without a cache (full forward per step)",
)
NUMBER = r"(\d+(?:\.\d+)?)"


def test_quick_run_prints_table_and_ratios() -> None:
    out = run_quick("generate.py")
    lines = out.splitlines()
    assert lines[0] == "generation: fp32, 1 CPU thread(s), cpu time, fastest of 3 runs (quick)"
    batch = re.match(r"batch: 2 prompts of \d+-\d+ tokens .* x 2 samples x 4 new tokens = (\d+) tokens$", lines[1])
    assert batch and int(batch[1]) == 16, lines[1]
    header = lines.index(next(line for line in lines if line.startswith("case ")))
    for case, line in zip(CASES, lines[header + 1:header + 1 + len(CASES)], strict=True):
        row = re.fullmatch(rf"{re.escape(case)}\s+{NUMBER}\s+{NUMBER}", line)
        assert row, line
        seconds, per_second = float(row[1]), float(row[2])
        assert per_second > 0 and abs(seconds - 16 / per_second) <= 0.0051  # seconds printed to 0.01
    names = ["kv_cache keye/transformers", "kv_cache keye, lean_decode off/transformers",
             "kv_cache megatron/transformers", "kv_cache keye/no cache"]
    ratios = re.findall(rf"^({'|'.join(names)}): {NUMBER}x", out, re.M)
    assert [name for name, _ in ratios] == names
