"""The non-finite guard: a step whose loss is NaN is skipped (no update) and counted; too many in a row
stop the run with a clear error. The NaN comes from a real loss plugin registered inline."""

import types
from dataclasses import dataclass, field
from typing import List

import pytest

from keye import hookimpl
from keye.testing import write_blueprint
from keye.testing.distributed import DistributedError, run_distributed


class NaNOnSomeSteps:
    """next_token, except that calls listed in ``bad_calls`` return NaN."""

    @dataclass
    class Config:
        bad_calls: List[int] = field(default_factory=list)

    def __init__(self, config, ctx=None):
        from keye_plugins.loss.next_token import NextTokenLoss

        self.inner = NextTokenLoss(NextTokenLoss.Config())
        self.bad = set(config.bad_calls)
        self.calls = 0

    def __call__(self, per_token_loss, loss_mask):
        self.calls += 1
        loss_sum, tokens, report = self.inner(per_token_loss, loss_mask)
        if self.calls in self.bad:
            loss_sum = loss_sum * float("nan")
            report = {**report, "loss_sum": loss_sum.detach().clone()}
        return loss_sum, tokens, report


def _run(path: str, overrides: list[str]):
    from keye.config import load_blueprint
    from keye.plugins import PluginHost
    from keye.train.runner import run_blueprint

    plugin = types.ModuleType("nan_loss")
    plugin.keye_register_losses = hookimpl(lambda register: register("nan_on_some_steps", NaNOnSomeSteps))
    host = PluginHost(strict=True)
    host.load_entry_points()
    host.add_plugin(plugin, "nan_loss")
    return run_blueprint(load_blueprint(path, overrides, host.registry), host)


@pytest.fixture
def blueprint(tmp_path):
    return str(write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "guard", "output_dir": str(tmp_path / "run"), "seed": 2},
        "model": {"language_model": {"name": "qwen3", "size": "tiny"}, "vision_encoder": {"name": "siglip_navit", "size": "tiny"},
                  "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64}},
        "stages": [{"name": "s", "kind": "lm", "train": ["language_model"], "steps": 5,
                    "loss": {"name": "nan_on_some_steps", "bad_calls": [2, 3]},
                    "options": {"max_bad_steps": 2, "eval_batches": 1},
                    "data": {"max_tokens": 128, "pack_buffer": 8,
                             "sources": {"t": {"name": "synthetic", "tasks": ["ocr"], "num_samples": 50}}}}],
    }))


def test_nan_steps_are_skipped_and_counted(blueprint, tmp_path):
    [summary] = run_distributed(_run, 1, blueprint, [])
    assert summary["stages"]["s"]["skipped_steps"] == 2
    import json

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_step"] for r in records] == [False, True, True, False, False]
    assert [r["loss"] for r in records][1:3] == ["nan", "nan"]
    # A skipped step does not move the schedule: step 4 trains at the rate step 2 would have had.
    assert records[3]["lr"] == records[1]["lr"] == records[2]["lr"]


def test_too_many_in_a_row_stop_the_run(blueprint):
    with pytest.raises(DistributedError, match="3 steps in a row had a non-finite loss or gradient"):
        run_distributed(_run, 1, blueprint, ["stages.0.loss.bad_calls=[2,3,4]"])
