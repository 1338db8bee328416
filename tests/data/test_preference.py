"""Preference pairs as one shared-prompt sample: layout, labels, tree attention, packing; bad pairs → SampleError
with their kind; the synthetic world's pairs process; a next-token stage's processor refuses pairs and a
preference stage's refuses everything else."""

import io

import pytest
import torch
from PIL import Image

from keye.data.batch import IGNORE, collate_pack
from keye.data.preference import tree_attention
from keye.data.processor import Processor, ProcessorSettings, SampleError
from keye.data.sample import Sample
from keye.data.synthetic import generate
from keye.data.tokenizer import SpecialTokens, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(["a red circle on the left", "how many squares are there? two three"] * 20, vocab_size=512)


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def preference(chosen="two", rejected="three", key="p1") -> Sample:
    return Sample.from_dict({
        "kind": "preference", "key": key,
        "prompt": [{"role": "user", "content": [{"type": "image", "image": {"key": "img.png"}},
                                                {"type": "text", "text": "how many squares?"}]}],
        "chosen": {"role": "assistant", "content": chosen},
        "rejected": {"role": "assistant", "content": rejected},
    })


def conversation(reply: str) -> Sample:
    raw = preference().to_dict()
    return Sample.from_dict({"kind": "conversation", "key": "c", "messages": [*raw["prompt"], {"role": "assistant", "content": reply}]})


def test_tree_attention_by_hand():
    keep = tree_attention(2, 2, 3).int().tolist()
    assert keep == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],  # chosen: the prefix and itself
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # rejected: the prefix and itself, never chosen
        [1, 1, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 1, 1, 1],
    ]


def test_shared_prompt_layout_equals_two_conversations(tokenizer):
    processor = Processor(tokenizer, ProcessorSettings())
    media = {"img.png": png(56, 56)}
    item = processor(preference(), media, preference=True)
    chosen, rejected = processor(conversation("two"), media), processor(conversation("three"), media)
    special = SpecialTokens.from_tokenizer(tokenizer)
    # the vision appears once: one image, its pad tokens once
    assert item.images.grid_thw.tolist() == [[1, 4, 4]]
    assert int((item.input_ids == special.image_pad).sum()) == 4
    # the prompt without its last token is written once; then each conversation from that token on
    shared = len(chosen) + len(rejected) - len(item)
    assert item.input_ids[shared] == chosen.input_ids[shared] and tokenizer.decode(item.input_ids[:shared + 1]).endswith("<|im_start|>assistant\n")
    assert torch.equal(item.input_ids[:shared], chosen.input_ids[:shared])
    branch_c = len(chosen) - shared
    assert torch.equal(item.input_ids[shared:shared + branch_c], chosen.input_ids[shared:])
    assert torch.equal(item.input_ids[shared + branch_c:], rejected.input_ids[shared:])
    assert torch.equal(item.position_ids[:, :shared + branch_c], chosen.position_ids)
    assert torch.equal(item.position_ids[:, shared + branch_c:], rejected.position_ids[:, shared:])
    # labels: the conversations' own labels on each branch, IGNORE on the prefix
    assert (item.labels[:shared] == IGNORE).all()
    assert torch.equal(item.labels[shared:shared + branch_c], chosen.labels[shared:])
    assert torch.equal(item.labels[shared + branch_c:], rejected.labels[shared:])
    assert tokenizer.decode(item.labels[item.answer_mask]) == "two<|im_end|>"
    assert tokenizer.decode(item.labels[item.rejected_mask]) == "three<|im_end|>"
    assert not (item.answer_mask & item.rejected_mask).any()


def test_packed_pairs_keep_their_tree_and_positions(tokenizer):
    processor = Processor(tokenizer, ProcessorSettings())
    media = {"img.png": png(56, 56)}
    a = processor(conversation("two"), media)
    b = processor(preference(), media, preference=True)
    batch = collate_pack([a, b], seq_len=len(a) + len(b) + 3)
    keep = ~batch.attention_mask.dense()[0, 0]
    start = len(a)
    assert torch.equal(keep[start:start + len(b), start:start + len(b)], b.attention)
    assert not keep[start:, :start].any() and not keep[:start, start:].any()  # samples stay apart
    assert len(batch.pairs) == 1
    chosen, rejected = batch.pairs[0]
    assert torch.equal(chosen, torch.nonzero(b.answer_mask).flatten() + start)
    assert torch.equal(rejected, torch.nonzero(b.rejected_mask).flatten() + start)
    assert batch.images.grid_thw.shape[0] == 2  # one image per sample, the pair's only once


@pytest.mark.parametrize("chosen, rejected, kind", [
    ("", "three", "empty_reply"),
    ("two", "   ", "empty_reply"),
    ("two", "two", "identical_replies"),
    ("two", " two ", "identical_replies"),
])
def test_bad_pairs_are_sample_errors_with_their_kind(tokenizer, chosen, rejected, kind):
    processor = Processor(tokenizer, ProcessorSettings())
    with pytest.raises(SampleError) as info:
        processor(preference(chosen, rejected), {"img.png": png(56, 56)}, preference=True)
    assert info.value.kind == kind and info.value.key == "p1"


def test_a_next_token_stage_refuses_preference_pairs(tokenizer):
    processor = Processor(tokenizer, ProcessorSettings())
    with pytest.raises(SampleError) as info:
        processor(preference(), {"img.png": png(56, 56)})  # preference=False: never train on the rejected reply
    assert info.value.kind == "unsupported"


def test_a_preference_stage_refuses_other_kinds(tokenizer):
    processor = Processor(tokenizer, ProcessorSettings())
    with pytest.raises(SampleError) as info:
        processor(conversation("two"), {"img.png": png(56, 56)}, preference=True)  # no pair: nothing to prefer
    assert info.value.kind == "unsupported" and "preference samples" in info.value.reason


def test_synthetic_world_pairs_process():
    from keye.data.pipeline import load_tokenizer
    from keye_plugins.video_decoder.decord import DecordVideoDecoder

    settings = ProcessorSettings(image_max_tokens=16, video_max_tokens=64, video_max_frame_tokens=16, video_min_frame_tokens=4)
    processor = Processor(load_tokenizer("synthetic"), settings, DecordVideoDecoder())
    for index in range(6):
        loaded = generate(index, tasks=["preference"])
        item = processor(loaded.sample, loaded.media, preference=True)
        meta = loaded.sample.meta
        assert meta["answer"] != meta["rejected_answer"]
        decoded_c = processor.tokenizer.decode(item.labels[item.answer_mask])
        decoded_r = processor.tokenizer.decode(item.labels[item.rejected_mask])
        assert decoded_c.replace(" ", "") == (meta["answer"] + "<|im_end|>").replace(" ", "")
        assert decoded_r.replace(" ", "") == (meta["rejected_answer"] + "<|im_end|>").replace(" ", "")


def test_synthetic_pairs_in_every_mode_ask_in_it_and_differ_only_in_the_answer():
    """With a mode_mix, a pair's prompt carries the mode's suffix and both replies are written in that mode
    (after the cold start a suffix-less prompt means auto-think, so bare-answer pairs would ask in the wrong
    mode); the rejected reply is the chosen one with the wrong final answer, the sandbox output masked in both;
    the chosen answer the preference stage scores is the final answer."""
    from collections import Counter

    from keye.data.pipeline import load_tokenizer
    from keye.data.synthetic import MODES, generate_many
    from keye_plugins.video_decoder.decord import DecordVideoDecoder

    settings = ProcessorSettings(image_max_tokens=16, video_max_tokens=64, video_max_frame_tokens=16, video_min_frame_tokens=4)
    processor = Processor(load_tokenizer("synthetic"), settings, DecordVideoDecoder())
    suffix = {"think": "/think", "no_think": "/no_think", "agentic": "/agentic_think"}
    seen = Counter()
    for loaded in generate_many(16, tasks=["preference"], seed=3, mode_mix=dict.fromkeys(MODES, 1.0)):
        sample, meta = loaded.sample, loaded.sample.meta
        mode = sample.thinking_mode
        seen[mode] += 1
        chosen, rejected = sample.chosen.text, sample.rejected.text
        direct = mode == "no_think" or meta.get("analysis_choice") == "no_think"
        assert chosen.endswith(meta["answer"] if direct else f"<answer>{meta['answer']}</answer>")
        last = chosen.rindex(meta["answer"])  # the final answer: the one thing the rejected reply changes
        assert rejected == chosen[:last] + meta["rejected_answer"] + chosen[last + len(meta["answer"]):]
        item = processor(sample, loaded.media, preference=True)
        first_label = int(torch.nonzero(item.labels != IGNORE)[0])
        prompt = processor.tokenizer.decode(item.input_ids[: first_label + 1]).replace(" ", "")
        if mode == "auto":  # the released default: no suffix (spec §1.6)
            assert not any(s in prompt for s in suffix.values()) and chosen.startswith("<analysis>")
        else:
            assert suffix[mode] in prompt
        for mask, reply in ((item.answer_mask, chosen), (item.rejected_mask, rejected)):
            trained = processor.tokenizer.decode(item.labels[mask]).replace(" ", "")
            if mode == "agentic":
                start, end = reply.index("<sandbox_output>"), reply.index("</sandbox_output>") + len("</sandbox_output>")
                reply = reply[:start] + reply[end:]
            assert trained == (reply + "<|im_end|>").replace(" ", "")
        # what the preference stage scores as the chosen answer: the final answer, as the lm stage does
        final = processor.tokenizer.decode(item.labels[processor._final_answer(item.answer_mask, item.labels)])
        assert final.replace(" ", "") == (meta["answer"] + ("" if direct else "</answer>") + "<|im_end|>").replace(" ", "")
    assert set(seen) == set(MODES)
