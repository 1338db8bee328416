"""Budgets that fit (issue 15 item 4): over-budget samples are counted apart from bad input and never stop a run
by ``max_bad_fraction``; ``data.over_budget: error`` stops it naming the sample; ``keye-launch validate`` warns,
naming the keys, when a stage's largest allowed image or video cannot fit its ``max_tokens``; the 8B blueprints'
budgets fit."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from keye.config import load_blueprint
from keye.config.semantics import budget_warnings
from keye.data.pipeline import micro_batches
from keye.data.sources import BadInputCounter, BadInputError
from keye.errors import KeyeUserError
from keye.launch.cli import main
from keye.testing import write_blueprint

BLUEPRINTS = Path(__file__).resolve().parents[2] / "blueprints"


def test_over_budget_skips_do_not_count_toward_the_bad_share():
    counter = BadInputCounter("demo", max_bad_fraction=0.01, min_seen=10)
    for index in range(50):
        counter.ok()
        counter.skip("over_budget", f"long-{index}", "too long")  # half of everything: still no failure
    assert (counter.bad, counter.corrupt, counter.seen) == (50, 0, 100)
    counter.check()
    with pytest.raises(BadInputError, match="2 of 102 samples were bad .*corrupt_image 2, over_budget 50"):
        counter.skip("corrupt_image", "x", "random bytes")  # 1 of 101 is under 1%: the second one is over
        counter.skip("corrupt_image", "y", "random bytes")


def conversation(key: str, words: int) -> dict:
    return {"kind": "conversation", "key": key, "messages": [
        {"role": "user", "content": "how many squares?"}, {"role": "assistant", "content": " ".join(["two"] * words)}]}


def stream(tmp_path, keye_registry, policy: str):
    rows = [conversation(f"short-{i}", 3) for i in range(6)] + [conversation("long", 400)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = write_blueprint(tmp_path / f"{policy}.yaml", {
        "model": {"language_model": {"name": "qwen3", "size": "tiny"}},
        "stages": [{"name": "s", "kind": "lm", "train": ["language_model"], "steps": 1, "data": {
            "max_tokens": 128, "pack_buffer": 8, "max_bad_fraction": 0.0, "over_budget": policy,
            "sources": {"d": {"name": "jsonl", "path": str(data)}}, "mixer": {"name": "weighted", "on_exhausted": "stop"}}}],
    })
    cfg = load_blueprint(path, [], keye_registry)
    parallel = SimpleNamespace(dp_rank=0, dp_size=1, tp_rank=0, pp_rank=0)
    return micro_batches(SimpleNamespace(blueprint=cfg, stage=cfg.stages[0], index=0, registry=keye_registry,
                                         parallel=parallel))


def test_the_stream_skips_over_budget_samples_and_reports_them_apart(tmp_path, keye_registry):
    skipping = stream(tmp_path, keye_registry, "skip")
    keys = [key for batch in skipping.take(100) for key in batch.keys]  # max_bad_fraction 0 and it still runs
    assert sorted(keys) == [f"short-{i}" for i in range(6)]
    stats = skipping.stats()
    assert stats["over_budget"] == 1 and stats["skipped_by_kind"] == {"over_budget": 1}
    with pytest.raises(KeyeUserError, match=r"^sample 'long' is over budget \(\d+ tokens > max_tokens 128\) and "
                                            "data.over_budget is error$"):
        stream(tmp_path, keye_registry, "error").take(100)


def test_validate_warns_naming_the_keys_when_budgets_do_not_fit(keye_registry, capsys):
    pretrain = BLUEPRINTS / "keye-vl-8b" / "pretrain.yaml"
    assert budget_warnings(load_blueprint(pretrain, [], keye_registry)) == []  # the shipped budgets fit
    narrow = load_blueprint(pretrain, ["stages.1.data.max_tokens=8192"], keye_registry)
    assert budget_warnings(narrow) == [
        f"stages.1.data.{key} ({budget}) + 512 tokens of text exceed stages.1.data.max_tokens (8192): such "
        "samples are skipped as over_budget (apart from bad input); raise max_tokens or lower the budget"
        for key, budget in (("image_max_tokens", 16384), ("video_max_tokens", 24576))]
    assert main(["validate", str(pretrain), "stages.1.data.video_max_tokens=40000"]) == 0  # a warning, not an error
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"ok: {pretrain} (5 stages)"
    assert out[1].startswith(f"warning: {pretrain}: stages.1.data.video_max_tokens (40000) + 512 tokens of text "
                             "exceed stages.1.data.max_tokens (32768)")
    assert len(out) == 2
