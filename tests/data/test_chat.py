"""The Python chat template against the released Jinja one, labels, thinking modes, answers, grounding.

The independent formulation is the Qwen2-VL ``chat_template`` that Keye's processor ships (spec §1.6),
copied below and rendered by transformers' ``apply_chat_template``, followed by the pad expansion the
Qwen2-VL processor does (each pad replaced by ``grid.prod() // 4`` copies, in order, per media kind).
"""

import copy
import math
import random
import re
from fractions import Fraction

import pytest

from keye.data.chat import (
    IGNORE_INDEX,
    encode_conversation,
    format_auto_think,
    format_box,
    format_point,
    format_thinking,
    normalize_coordinate,
    parse_answer,
    render_conversation,
)
from keye.data.sample import Message, TextPart
from keye.data.tokenizer import build_tiny_tokenizer

# Qwen2-VL's chat_template.json, as released with Keye-VL-8B-Preview's processor.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

IMG = {"type": "image", "image": {"path": "a.jpg"}}
VID = {"type": "video", "video": {"path": "v.mp4"}}


def text(t):
    return {"type": "text", "text": t}


# (messages as the JSON/OpenAI layout, vision token count per image/video in order)
CONVERSATIONS = {
    "one_image": (
        [
            {"role": "user", "content": [IMG, text("Describe this image.")]},
            {"role": "assistant", "content": "A cat on a mat."},
        ],
        [6],
    ),
    "string_content_no_media": (
        [
            {"role": "user", "content": "What is 3 + 4?"},
            {"role": "assistant", "content": "<think>3 + 4 = 7</think><answer>\\boxed{7}</answer>"},
        ],
        [],
    ),
    "multi_turn_system_images_videos": (
        [
            {"role": "system", "content": "You are Keye, a careful assistant."},
            {"role": "user", "content": [text("Compare "), IMG, text(" and "), IMG, text(" please.")]},
            {"role": "assistant", "content": "The first is brighter."},
            {"role": "user", "content": [VID, text("What happens in the video?")]},
            {"role": "assistant", "content": [text("Two people walk along the beach.")]},
            {"role": "user", "content": [text("And here?"), VID, IMG]},
            {
                "role": "assistant",
                "content": "<analysis>Easy. /no_think mode is more appropriate.</analysis>A dog runs.",
            },
        ],
        [4, 9, 12, 3, 5],
    ),
    "grounding_reply": (
        [
            {"role": "user", "content": [IMG, text("Where is the cat?")]},
            {
                "role": "assistant",
                "content": "<|object_ref_start|>cat<|object_ref_end|><|box_start|>[[10,20,500,999]]<|box_end|>",
            },
        ],
        [8],
    ),
}


def split_counts(raw_messages, counts):
    """Per-kind counts in order, as the processor receives image_grid_thw and video_grid_thw."""
    kinds = [
        p["type"]
        for m in raw_messages
        if not isinstance(m["content"], str)
        for p in m["content"]
        if p["type"] in ("image", "video")
    ]
    return [c for k, c in zip(kinds, counts) if k == "image"], [c for k, c in zip(kinds, counts) if k == "video"]


def expand_pads(rendered, image_counts, video_counts):
    """What Qwen2VLProcessor.__call__ does to the rendered template."""
    for pad, counts in (("<|image_pad|>", image_counts), ("<|video_pad|>", video_counts)):
        index = 0
        while pad in rendered:
            rendered = rendered.replace(pad, "<|placeholder|>" * counts[index], 1)
            index += 1
        rendered = rendered.replace("<|placeholder|>", pad)
    return rendered


def reference_text(tok, raw_messages, counts, add_generation_prompt=False, add_vision_id=False):
    rendered = tok.apply_chat_template(
        raw_messages,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        add_vision_id=add_vision_id,
    )
    return expand_pads(rendered, *split_counts(raw_messages, counts))


def parse(raw_messages):
    return [Message.from_dict(m) for m in raw_messages]


def label_runs(tok, encoded):
    """Decode each maximal run of supervised tokens."""
    runs, current = [], []
    for label in encoded.labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs


@pytest.fixture(scope="module")
def tok():
    corpus = ["You are a helpful assistant. Describe this image, please.", "A cat on a mat; a dog runs."] * 50
    return build_tiny_tokenizer(corpus)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("add_vision_id", [False, True])
def test_text_matches_the_released_template(tok, name, add_generation_prompt, add_vision_id):
    raw, counts = CONVERSATIONS[name]
    expected = reference_text(tok, raw, counts, add_generation_prompt, add_vision_id)
    messages = parse(raw)
    assert render_conversation(messages, counts, None, add_generation_prompt, add_vision_id) == expected
    encoded = encode_conversation(messages, tok, counts, None, add_generation_prompt, add_vision_id)
    assert encoded.input_ids == tok.encode(expected, add_special_tokens=False)
    assert tok.decode(encoded.input_ids) == expected


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_labels_are_exactly_the_assistant_replies(tok, name):
    raw, counts = CONVERSATIONS[name]
    encoded = encode_conversation(parse(raw), tok, counts)
    assert len(encoded.labels) == len(encoded.input_ids)
    assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(encoded.labels, encoded.input_ids))
    expected = re.findall(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", reference_text(tok, raw, counts), re.S)
    assert label_runs(tok, encoded) == expected
    assert encoded.num_loss_tokens == sum(len(tok.encode(s, add_special_tokens=False)) for s in expected)


def test_vision_blocks_hold_the_given_counts_and_no_loss(tok):
    raw, counts = CONVERSATIONS["multi_turn_system_images_videos"]
    encoded = encode_conversation(parse(raw), tok, counts)
    ids = encoded.input_ids
    start, end = tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    pads = tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    blocks = []
    for i, t in enumerate(ids):
        if t == start:
            j = ids.index(end, i)
            blocks.append((tok.convert_ids_to_tokens(ids[i + 1])[2:7], j - i - 1))
            assert all(encoded.labels[k] == IGNORE_INDEX for k in range(i, j + 1))
            assert len(set(ids[i + 1 : j])) == 1 and ids[i + 1] in pads
    assert blocks == [("image", 4), ("image", 9), ("video", 12), ("video", 3), ("image", 5)]


def test_prompt_tokens_are_a_prefix_even_when_the_reply_starts_with_whitespace(tok):
    # A reply starting with "\n" is tokenised as generated after "assistant\n", not merged with it.
    for reply in ["\n\nLeading newlines.", "  spaced", "plain"]:
        raw = [{"role": "user", "content": [IMG, text("Hi")]}, {"role": "assistant", "content": reply}]
        full = encode_conversation(parse(raw), tok, [4])
        prompt = encode_conversation(parse(raw[:1]), tok, [4], add_generation_prompt=True)
        assert full.input_ids[: len(prompt.input_ids)] == prompt.input_ids
        assert tok.decode(full.input_ids) == reference_text(tok, raw, [4])
        assert label_runs(tok, full) == [reply + "<|im_end|>"]


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("think", "/think"), ("no_think", "/no_think"), ("agentic", "/agentic_think"), ("auto", ""), (None, "")],
)
def test_thinking_mode_suffix_goes_on_the_last_user_text(tok, mode, suffix):
    raw, counts = CONVERSATIONS["multi_turn_system_images_videos"]
    with_suffix = copy.deepcopy(raw)
    with_suffix[5]["content"][0]["text"] += suffix  # the eval harness appends to the last text element
    messages = parse(raw)
    before = copy.deepcopy(messages)
    assert render_conversation(messages, counts, mode) == reference_text(tok, with_suffix, counts)
    assert messages == before  # the caller's messages are untouched
    encoded = encode_conversation(messages, tok, counts, mode)
    assert tok.decode(encoded.input_ids) == reference_text(tok, with_suffix, counts)


def test_suffix_on_an_image_only_prompt_and_not_doubled(tok):
    image_only = parse([{"role": "user", "content": [IMG]}])
    assert render_conversation(image_only, [2], "no_think", add_generation_prompt=True).endswith(
        "<|vision_end|>/no_think<|im_end|>\n<|im_start|>assistant\n"
    )
    already = parse([{"role": "user", "content": "Why?/think"}])
    assert "Why?/think<|im_end|>" in render_conversation(already, [], "think")


def test_default_system_prompt_only_when_the_first_turn_is_not_system(tok):
    out = render_conversation(parse([{"role": "user", "content": "Hi"}]))
    assert out == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    out = render_conversation(parse([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]))
    assert out.count("<|im_start|>system") == 1 and "helpful" not in out


def test_bad_input_is_one_clear_value_error(tok):
    ok = parse([{"role": "user", "content": [IMG, text("Hi")]}])
    with pytest.raises(ValueError, match="vision_token_counts has 2 entries but the messages have 1 images/videos"):
        encode_conversation(ok, tok, [4, 4])
    with pytest.raises(ValueError, match=r"vision_token_counts\[0\] must be a positive int"):
        encode_conversation(ok, tok, [0])
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        encode_conversation([Message("tool", [TextPart("x")])], tok)
    with pytest.raises(ValueError, match=r"messages\[0\]\.content\[0\]: text contains '<\|image_pad\|>'"):
        encode_conversation([Message("user", [TextPart("sneaky <|image_pad|>")])], tok)
    with pytest.raises(ValueError, match="unknown thinking_mode 'deep'"):
        encode_conversation(ok, tok, [4], thinking_mode="deep")


# --- output formats and the answer parser ------------------------------------------------------------------


def test_output_formats():
    assert format_thinking("3+4=7", "\\boxed{7}") == "<think>3+4=7</think><answer>\\boxed{7}</answer>"
    assert format_auto_think("simple", "7") == "<analysis>simple</analysis>7"
    thought = format_auto_think("hard", "7", think="...")
    assert thought == "<analysis>hard</analysis><think>...</think><answer>7</answer>"


@pytest.mark.parametrize(
    ("generated", "answer"),
    [
        ("<think>3 + 4 = 7</think><answer>The total is \\boxed{7}.</answer>", "7"),
        ("<analysis>Easy. /no_think mode is more appropriate.</analysis> B ", "B"),
        ("<analysis>Hard. /think mode is more appropriate.</analysis><think>a</think><answer>C</answer>", "C"),
        ("<think>maybe <answer>A</answer>?</think><answer>first</answer> then <answer>last</answer>", "last"),
        ("<answer>\\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),
        ("\\boxed{1} and finally \\boxed{2}", "2"),
        ("no tags at all ", "no tags at all"),
        ("<think>long thought, cut off", ""),
        ("<analysis>mentions <think> tags</analysis>direct", "direct"),
        ("<answer>truncated \\boxed{x", "truncated \\boxed{x"),
    ],
)
def test_parse_answer(generated, answer):
    assert parse_answer(generated) == answer


# --- grounding -------------------------------------------------------------------------------------------


def test_box_and_point_strings():
    assert format_box(0, 0, 640, 480, 640, 480) == "<|box_start|>[[0,0,999,999]]<|box_end|>"
    assert (
        format_box(64, 48, 320, 240, 640, 480, ref="the cat")
        == "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>[[100,100,500,500]]<|box_end|>"
    )
    assert format_point(639.9, 0.5, 640, 480) == "<|point_start|>[[999,1]]<|point_end|>"
    assert (
        format_point(1, 1, 3, 3, ocr_text="EXIT")
        == "<|ocr_text_start|>EXIT<|ocr_text_end|><|point_start|>[[333,333]]<|point_end|>"
    )


def test_coordinates_are_integers_in_0_1000():
    assert normalize_coordinate(1000, 1000) == 999  # the far edge
    assert normalize_coordinate(999.9999, 1000) == 999
    assert normalize_coordinate(0, 7) == 0
    assert normalize_coordinate(29, 100) == 290  # multiply before dividing: no 289 from float error
    assert normalize_coordinate(1, 3) == 333 and normalize_coordinate(2, 3) == 666
    rng = random.Random(0)
    for _ in range(2000):
        size = rng.choice([1, 3, 7, 640, 1001, rng.uniform(0.5, 5000)])
        value = rng.choice([0, size, rng.uniform(0, size)])
        c = normalize_coordinate(value, size)
        assert isinstance(c, int) and 0 <= c < 1000
        exact = min(999, math.floor(Fraction(value) * 1000 / Fraction(size)))  # exact rational arithmetic
        assert abs(c - exact) <= 1  # float rounding may only tip a value that is within an ulp of an integer


def test_bad_grounding_input():
    with pytest.raises(ValueError, match=r"x2=641 is outside the image \[0, 640\]"):
        format_box(0, 0, 641, 10, 640, 480)
    with pytest.raises(ValueError, match="corners out of order"):
        format_box(10, 0, 5, 10, 640, 480)
    with pytest.raises(ValueError, match="must be positive"):
        format_point(0, 0, 0, 480)
    with pytest.raises(ValueError, match="not both"):
        format_point(0, 0, 10, 10, ref="a", ocr_text="b")
    with pytest.raises(ValueError, match="outside"):
        normalize_coordinate(float("nan"), 10)


def test_grounding_tokens_stay_single_in_the_tokenizer(tok):
    box = format_box(10, 20, 30, 40, 100, 100, ref="cat")
    pieces = tok.convert_ids_to_tokens(tok.encode(box, add_special_tokens=False))
    for token in ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"):
        assert token in pieces
