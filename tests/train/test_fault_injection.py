"""The fault-injection suite's CI version (``tools/fault_inject.py`` runs it at will, at random): one run
of every stage kind killed with SIGKILL four times in a row, each attempt resuming the last, then resumed
to the end, must finish with every stage's weights and every logged loss bit-identical to an
uninterrupted run.

The kills, in order (the blueprint: contrastive stage0, lm stage2 with lr_scale, an anneal with
lr_scale, the merge of stage2 and the anneal):

1. while stage0's step-4 checkpoint is being written (its shards on disk, nothing published): the
   writer's test hook, as the moment lasts milliseconds; resume continues from step 2;
2. during stage2's first step, before it has a checkpoint: resume starts stage2 again, in a process
   that skipped stage0, so its fresh modules must initialise as in the uninterrupted run, and its
   logged lines are dropped, not duplicated;
3. as soon as stage2 is done (between stages: the anneal's start is killed);
4. while the merge publishes its weights (manifest written, folder not yet renamed): the hook again.

Per-module learning rates resumed from a checkpoint mid-stage are `test_resume.py`'s; data-parallel
ranks and random moments are the tool's (``--nproc 1,2``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("fault_inject", ROOT / "tools" / "fault_inject.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_inject"] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_killed_four_times_resumes_bit_identical(tmp_path):
    tool = _tool()
    Plan = tool.Plan
    plans = [
        Plan("mid-checkpoint-write", 1, hook="shards-written:2"),
        Plan("mid-step", 1, after_steps=7),
        Plan("between", 1, after_stage="stage2"),
        Plan("mid-checkpoint-write", 1, hook="before-rename@merge/weights"),
    ]
    tally = tool.run_suite([plans], tmp_path, progress=False)
    print(tool.report(tally))
    assert tally["failures"] == []
    assert tally["identical"] == 1
    assert tally["kills"] == 4, tally["moments"]
