"""SFT in every thinking mode: the synthetic mode mix, loss masks per mode, bad conversations, the lm summary."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from keye.data.chat import IGNORE_INDEX, encode_conversation
from keye.data.pipeline import load_tokenizer
from keye.data.processor import Processor, ProcessorSettings, SampleError
from keye.data.sample import ConversationSample, Message, TextPart
from keye.data.synthetic import MODES, generate, generate_many
from keye.testing import write_blueprint

MIX = {"think": 0.4, "no_think": 0.3, "auto": 0.2, "agentic": 0.1}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("synthetic")


def trained_text(tokenizer, sample) -> str:
    encoded = encode_conversation(sample.messages, tokenizer, [1], sample.thinking_mode)
    return tokenizer.decode([i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX])


def test_mode_mix_is_what_was_asked():
    n = 2000
    modes = Counter(s.sample.thinking_mode for s in generate_many(n, tasks=["image_qa"], mode_mix=MIX))
    for mode, weight in MIX.items():
        assert abs(modes[mode] / n - weight) < 0.035, (mode, modes)
    # the content does not depend on the mix: only the reply changes
    plain, mixed = generate(7, tasks=["count"]), generate(7, tasks=["count"], mode_mix=MIX)
    assert plain.media == mixed.media and plain.sample.messages[0] == mixed.sample.messages[0]
    assert plain.sample.meta["answer"] in mixed.sample.messages[-1].text


def test_each_mode_trains_on_its_reply_only(tokenizer):
    seen = set()
    for loaded in generate_many(40, tasks=["count", "color"], mode_mix=dict.fromkeys(MODES, 1.0)):
        sample = loaded.sample
        reply, mode = sample.messages[-1].text, sample.thinking_mode
        trained = trained_text(tokenizer, sample)
        seen.add(mode)
        assert "user" not in trained and "helpful" not in trained
        if mode == "agentic":  # the injected sandbox output is not trained on; the rest of the reply is
            start, end = reply.index("<sandbox_output>"), reply.index("</sandbox_output>") + len("</sandbox_output>")
            assert trained.replace(" ", "") == (reply[:start] + reply[end:] + "<|im_end|>").replace(" ", "")
            assert "sandbox_output" not in trained
        else:
            assert trained.replace(" ", "") == (reply + "<|im_end|>").replace(" ", "")
        if mode == "auto":
            assert reply.startswith("<analysis>")
            want = "/think" if sample.meta["analysis_choice"] == "think" else "/no_think"
            assert f"{want} mode is more appropriate" in reply
        if mode in ("think", "agentic"):
            assert reply.startswith("<think>") and reply.endswith(f"<answer>{sample.meta['answer']}</answer>")
        if mode == "no_think":
            assert reply == sample.meta["answer"]
    assert seen == set(MODES)


def test_unclosed_sandbox_block_is_masked_to_the_end(tokenizer):
    messages = [Message("user", [TextPart("hi")]),
                Message("assistant", [TextPart("<think>run<sandbox_output>partial output")])]
    encoded = encode_conversation(messages, tokenizer)
    trained = tokenizer.decode([i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX])
    assert trained.replace(" ", "") == "<think>run<|im_end|>"


def test_conversation_without_assistant_turn_is_skipped_by_kind(tokenizer):
    processor = Processor(tokenizer, ProcessorSettings())
    sample = ConversationSample("q-only", [Message("user", [TextPart("what colour?")])], thinking_mode="think")
    with pytest.raises(SampleError) as info:
        processor(sample, {})
    assert info.value.kind == "no_assistant_turn" and info.value.key == "q-only"
    assert processor.modes.samples == {}


def test_unknown_mode_tag_in_jsonl_is_skipped_and_counted(tmp_path):
    from keye_plugins.data_source.jsonl import JsonlSource

    good = {"kind": "conversation", "key": "a", "thinking_mode": "think",
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>x</think>hi"}]}
    bad = {**good, "key": "b", "thinking_mode": "ponder"}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    source = JsonlSource(JsonlSource.Config(path=str(path), max_bad_fraction=0.5))
    keys = [loaded.sample.key for loaded in source]
    assert keys == ["a"]
    assert source.bad_inputs.counts == {"invalid_sample": 1}


def test_bad_mode_mix_is_one_line():
    with pytest.raises(ValueError, match="unknown thinking mode 'ponder'"):
        generate(0, tasks=["count"], mode_mix={"ponder": 1.0})
    with pytest.raises(ValueError, match="every mode has weight 0"):
        generate(0, tasks=["count"], mode_mix={"think": 0})


def test_lm_summary_reports_modes(tmp_path):
    """A 2-step SFT on a mixed stream: the summary has the realised mix, tokens per mode and held-out accuracy
    per mode, and they agree with what the processor would count from the same samples."""
    data = {
        "max_tokens": 512, "pack_buffer": 8, "image_max_tokens": 16, "video_frame_tokens": [4, 16],
        "video_max_tokens": 64,
        "sources": {"qa": {"name": "synthetic", "tasks": ["color", "count"], "num_samples": 300, "mode_mix": MIX}},
        "heldout": {"qa": {"name": "synthetic", "tasks": ["color", "count"], "split": "heldout", "num_samples": 16,
                           "mode_mix": MIX}},
    }
    path = write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "modes", "output_dir": str(tmp_path / "run"), "seed": 5},
        "model": {"vision_encoder": {"name": "siglip_navit", "size": "tiny"},
                  "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
                  "language_model": {"name": "qwen3", "size": "tiny"}},
        "stages": [{"name": "sft", "kind": "lm", "train": ["projector", "language_model"], "steps": 2,
                    "optimizer": {"lr": 1e-3}, "schedule": {"kind": "cosine", "warmup_steps": 1}, "data": data,
                    "options": {"eval_batches": 4}}],
    })
    result = subprocess.run([sys.executable, "-m", "keye.launch.cli", "run", str(path)], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]["sft"]
    modes = summary["modes"]
    assert set(modes) <= set(MODES) and len(modes) >= 3
    assert abs(sum(m["share"] for m in modes.values()) - 1) < 1e-9
    for stats in modes.values():
        assert stats["loss_tokens"] > 0 and stats["mean_response_tokens"] == stats["loss_tokens"] / stats["samples"]
    if "think" in modes and "no_think" in modes:  # a think reply carries its steps; a no_think one just the answer
        assert modes["think"]["mean_response_tokens"] > 3 * modes["no_think"]["mean_response_tokens"]
    # the first samples processed are samples 0.. of the source: recount them independently
    tokenizer = load_tokenizer("synthetic")
    n = sum(m["samples"] for m in modes.values())
    expected = Counter(s.sample.thinking_mode for s in generate_many(n, tasks=["color", "count"], seed=0, mode_mix=MIX))
    assert {m: s["samples"] for m, s in modes.items()} == dict(expected)
    for when in ("eval_before", "eval_after"):
        by_mode, answers = summary[when]["answer_accuracy_by_mode"], summary[when]["answers_by_mode"]
        assert by_mode and set(by_mode) == set(answers) <= set(MODES) and all(0 <= v <= 1 for v in by_mode.values())
        # the per-mode tables add up to the overall accuracy the engine computes on its own
        total = sum(answers.values())
        overall = sum(by_mode[m] * answers[m] for m in answers) / total
        assert abs(overall - summary[when]["answer_accuracy"]) < 1e-9 and total == 16


def test_answer_mask_is_the_final_answer_in_every_mode(tokenizer):
    """Held-out answer accuracy scores the answer after the thought: the answer mask covers what follows the
    last <answer> (think, agentic, auto choosing /think) or </analysis> (auto choosing /no_think)."""
    processor = Processor(tokenizer, ProcessorSettings())
    seen = set()
    for loaded in generate_many(24, tasks=["count", "color"], mode_mix=dict.fromkeys(MODES, 1.0)):
        item = processor(loaded.sample, loaded.media)
        answer = tokenizer.decode(item.labels[item.answer_mask]).replace(" ", "")
        expected = loaded.sample.meta["answer"].replace(" ", "")
        mode = loaded.sample.thinking_mode
        seen.add(mode)
        if mode == "no_think" or (mode == "auto" and loaded.sample.meta["analysis_choice"] == "no_think"):
            assert answer == expected + "<|im_end|>", (mode, answer)
        else:
            assert answer == expected + "</answer><|im_end|>", (mode, answer)
    assert seen == set(MODES)
