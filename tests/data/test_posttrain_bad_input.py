"""Bad post-training input through the real data pipeline (JSONL source → processor → packer): a preference pair
with an empty or identical reply, a conversation without an assistant turn and an unknown mode tag are skipped,
counted by kind and named in the log, and the stream fails (one line, with the counts) only past the stage's
``max_bad_fraction``."""

import json
import logging
from types import SimpleNamespace

import pytest

from keye.config import load_blueprint
from keye.data.pipeline import micro_batches
from keye.data.sources import MIN_SEEN_BEFORE_FAILING, BadInputError
from keye.testing import write_blueprint

GOOD = 120  # past MIN_SEEN_BEFORE_FAILING, so the share is checked while the stream runs


def conversation(key: str, mode: str | None = "no_think", reply: str | None = "two") -> dict:
    messages = [{"role": "user", "content": "how many squares?"}]
    if reply is not None:
        messages.append({"role": "assistant", "content": reply})
    return {"kind": "conversation", "key": key, "thinking_mode": mode, "messages": messages}


def pair(key: str, chosen: str = "two", rejected: str = "three") -> dict:
    return {"kind": "preference", "key": key, "thinking_mode": "no_think",
            "prompt": [{"role": "user", "content": "how many squares?"}],
            "chosen": {"role": "assistant", "content": chosen}, "rejected": {"role": "assistant", "content": rejected}}


def stream(tmp_path, keye_registry, rows: list[dict], max_bad_fraction: float, preference: bool):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    bp = write_blueprint(tmp_path / "bp.yaml", {
        "model": {"language_model": {"name": "qwen3", "size": "tiny"}},
        "stages": [{"name": "s", "kind": "preference" if preference else "lm", "train": ["language_model"],
                    "steps": 1, "data": {"max_tokens": 256, "pack_buffer": 16, "max_bad_fraction": max_bad_fraction,
                                         "sources": {"d": {"name": "jsonl", "path": str(path),
                                                           "max_bad_fraction": max_bad_fraction}},
                                         "mixer": {"name": "weighted", "on_exhausted": "stop"}}}],
    })
    cfg = load_blueprint(bp, [], keye_registry)
    parallel = SimpleNamespace(dp_rank=0, dp_size=1, tp_rank=0, pp_rank=0)
    ctx = SimpleNamespace(blueprint=cfg, stage=cfg.stages[0], index=0, registry=keye_registry, parallel=parallel)
    return micro_batches(ctx, preference=preference)


def read_all(batches) -> list[str]:
    return [key for batch in batches.take(10_000) for key in batch.keys]


def test_bad_conversations_are_skipped_counted_and_named(tmp_path, keye_registry, caplog):
    rows = [conversation(f"c{i:03d}") for i in range(GOOD)]
    rows[10] = conversation("no-reply", reply=None)
    rows[20] = conversation("odd-mode", mode="ponder")
    with caplog.at_level(logging.WARNING):
        batches = stream(tmp_path, keye_registry, rows, 0.05, preference=False)
        keys = read_all(batches)
    assert len(keys) == GOOD - 2 and "no-reply" not in keys and "odd-mode" not in keys
    assert batches.stats()["skipped_by_kind"] == {"no_assistant_turn": 1, "invalid_sample": 1}
    logged = caplog.text
    assert "'no-reply' (no_assistant_turn)" in logged and "odd-mode" in logged and "ponder" in logged


def test_bad_pairs_are_skipped_counted_and_named(tmp_path, keye_registry, caplog):
    rows = [pair(f"p{i:03d}") for i in range(GOOD)]
    rows[5] = pair("empty", chosen="  ")
    rows[6] = pair("same", rejected="two")
    with caplog.at_level(logging.WARNING):
        batches = stream(tmp_path, keye_registry, rows, 0.05, preference=True)
        keys = read_all(batches)
    assert len(keys) == GOOD - 2 and not {"empty", "same"} & set(keys)
    assert batches.stats()["skipped_by_kind"] == {"empty_reply": 1, "identical_replies": 1}
    assert "'empty' (empty_reply)" in caplog.text and "'same' (identical_replies)" in caplog.text


@pytest.mark.parametrize("preference", [False, True])
def test_the_stream_fails_only_past_the_configured_share(tmp_path, keye_registry, preference):
    """3 bad in 120 (2.5%): fine under a 5% share, one line with the counts under a 1% share. (The processor's
    counter checks the share at each skip once 100 samples were seen, so the bad ones come after those.)"""
    make = (lambda i: pair(f"e{i}", chosen="")) if preference else (lambda i: conversation(f"n{i}", reply=None))
    rows = [pair(f"p{i:03d}") if preference else conversation(f"c{i:03d}") for i in range(GOOD)]
    for i in (100, 105, 110):
        rows[i] = make(i)
    assert len(read_all(stream(tmp_path, keye_registry, rows, 0.05, preference))) == GOOD - 3
    with pytest.raises(BadInputError) as info:
        read_all(stream(tmp_path, keye_registry, rows, 0.01, preference))
    kind = "empty_reply" if preference else "no_assistant_turn"
    message = str(info.value)
    # it stops at the second bad one (2 of 106 > 1%), naming the counts by kind
    assert message.startswith("data source 'stage s processor': 2 of 106 samples were bad"), message
    assert f"(1.9% > max_bad_fraction 1.0%): {kind} 2;" in message and len(message.splitlines()) == 1
    assert MIN_SEEN_BEFORE_FAILING <= 100
