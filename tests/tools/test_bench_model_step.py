"""``tools/bench/model_step.py --quick`` runs (in its own process: it starts Megatron's parallel state and
the CPU bridge) and prints its table and the two ratios. Only the format is checked: speed targets live in
the benchmark's output, not in a timed test."""

from __future__ import annotations

import re

from keye.testing.bench import run_quick

CASES = (
    "keye: siglip_navit + patch_merge_mlp + qwen3 (Megatron)",
    "transformers: Qwen2_5_VLForConditionalGeneration",
    "vision packed: one NaViT sequence, block-diagonal mask",
    "vision padded: batch padded to the longest image",
    "keye, video attended frame by frame (as Qwen2.5-VL; not Keye)",
)
NUMBER = r"(\d+(?:\.\d+)?)"


def test_quick_run_prints_table_and_ratios() -> None:
    out = run_quick("model_step.py")
    lines = out.splitlines()

    assert lines[0].startswith("model step: forward + backward, fp32, 1 CPU thread(s), cpu time")
    batch = re.match(r"batch: one sequence of (\d+) LLM tokens; .*; (\d+) ViT patches .* max diff (\S+)$", lines[1])
    assert batch, lines[1]
    tokens, patches = int(batch[1]), int(batch[2])
    assert float(batch[3]) < 1e-4  # packed and padded encodings agree
    header = next(i for i, line in enumerate(lines) if line.startswith("case "))
    assert lines[header].split() == ["case", "count", "unit", "ms/step", "per", "second"]
    counts = [(tokens, "tokens")] * 2 + [(patches, "patches")] * 2 + [(tokens, "tokens")]
    for case, line, (count, unit) in zip(CASES, lines[header + 1 : header + 6], counts, strict=True):
        row = re.fullmatch(rf"{re.escape(case)}\s+(\d+)\s+(\w+)\s+{NUMBER}\s+{NUMBER}", line)
        assert row, line
        assert (int(row[1]), row[2]) == (count, unit)
        ms, per_second = float(row[3]), float(row[4])
        assert ms > 0 and abs(per_second - count / (ms / 1e3)) <= max(1.0, 0.01 * per_second)

    found = re.finditer(rf"^(ours/transformers|packed/padded|ours with the same attention work .*/transformers): "
                        rf"{NUMBER}x", out, re.M)
    ratios = {m[1].split(" (")[0]: float(m[2]) for m in found}
    assert sorted(ratios) == ["ours with the same attention work as transformers", "ours/transformers", "packed/padded"]
    assert all(value > 0 for value in ratios.values())
