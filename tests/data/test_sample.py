"""The sample schema: every kind round-trips through dict and JSON; bad input names the key and the field."""

import copy
import json
import pickle

import pytest

from keye.data.sample import (
    BadSampleError,
    ConversationSample,
    ImagePart,
    ImageRef,
    Message,
    PairSample,
    PreferenceSample,
    RLPromptSample,
    Sample,
    TextPart,
    VideoPart,
    VideoRef,
)
from keye.errors import KeyeUserError

USER_TURN = {
    "role": "user",
    "content": [
        {"type": "image", "image": {"path": "imgs/cat.jpg"}},
        {"type": "video", "video": {"key": "000017.mp4", "timestamps": [0.0, 0.5, 1.0]}},
        {"type": "text", "text": "What happens? /think"},
    ],
}

GOOD = {
    "pair": {"kind": "pair", "key": "laion/1", "image": {"key": "1.jpg"}, "caption": "a red bicycle"},
    "conversation": {
        "kind": "conversation",
        "key": "sft/17",
        "source": "sft_mix",
        "meta": {"task": "vqa", "difficulty": 3},
        "thinking_mode": "think",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            USER_TURN,
            {"role": "assistant", "content": [{"type": "text", "text": "<think>…</think><answer>jumps</answer>"}]},
        ],
    },
    "preference": {
        "kind": "preference",
        "key": "mpo/3",
        "prompt": [USER_TURN],
        "chosen": {"role": "assistant", "content": [{"type": "text", "text": "It jumps."}]},
        "rejected": {"role": "assistant", "content": [{"type": "text", "text": "It sleeps."}]},
        "thinking_mode": "no_think",
    },
    "rl_prompt": {
        "kind": "rl_prompt",
        "key": "rl/9",
        "messages": [USER_TURN],
        "reference_answer": "42",
        "reward_names": ["answer_match", "format"],
        "thinking_mode": "auto",
    },
}


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_every_kind_round_trips(kind):
    raw = GOOD[kind]
    sample = Sample.from_dict(copy.deepcopy(raw))
    assert sample.kind == kind
    assert sample.to_dict() == raw  # the canonical form is a fixed point
    assert Sample.from_dict(sample.to_dict()) == sample
    assert Sample.from_json(sample.to_json()) == sample
    assert json.loads(sample.to_json()) == raw


def test_parsed_objects_are_typed():
    conv = Sample.from_dict(GOOD["conversation"])
    assert isinstance(conv, ConversationSample) and conv.source == "sft_mix" and conv.meta["task"] == "vqa"
    image, video, text = conv.messages[1].content
    assert image == ImagePart(ImageRef(path="imgs/cat.jpg"))
    assert video == VideoPart(VideoRef(key="000017.mp4", timestamps=[0.0, 0.5, 1.0]))
    assert text == TextPart("What happens? /think")
    assert conv.messages[2].text.endswith("<answer>jumps</answer>")
    assert isinstance(Sample.from_dict(GOOD["pair"]), PairSample)
    assert isinstance(Sample.from_dict(GOOD["preference"]), PreferenceSample)
    rl = Sample.from_dict(GOOD["rl_prompt"])
    assert isinstance(rl, RLPromptSample) and rl.reward_names == ["answer_match", "format"]


def test_built_in_code_round_trips_and_defaults_stay_out_of_json():
    sample = RLPromptSample("rl/1", [Message("user", [TextPart("2+2?")])], ["answer_match"])
    assert sample.to_dict() == {
        "kind": "rl_prompt",
        "key": "rl/1",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "2+2?"}]}],
        "reward_names": ["answer_match"],
    }
    assert Sample.from_json(sample.to_json()) == sample
    assert sample.thinking_mode is None and sample.reference_answer is None


def test_string_content_is_one_text_part():
    raw = {"kind": "conversation", "key": "pt/1", "messages": [{"role": "assistant", "content": "plain text"}]}
    sample = Sample.from_dict(raw)
    assert sample.messages[0].content == [TextPart("plain text")]
    assert sample.to_dict()["messages"][0]["content"] == [{"type": "text", "text": "plain text"}]


def _with(kind, path, value):
    """A copy of GOOD[kind] with the item at ``path`` (keys/indices) set, or deleted when value is DELETE."""
    raw = copy.deepcopy(GOOD[kind])
    node = raw
    for step in path[:-1]:
        node = node[step]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return raw


DELETE = object()

BAD = [
    # (kind, path to change, new value, expected field in the message, words in the reason)
    ("pair", ("caption",), DELETE, "caption", "missing"),
    ("pair", ("caption",), "", "caption", "empty"),
    ("pair", ("image",), {"path": "a.jpg", "key": "a.jpg"}, "image", "exactly one"),
    ("pair", ("image",), {}, "image", "exactly one"),
    ("pair", ("image",), "a.jpg", "image", "object"),
    ("pair", ("captoin",), "typo", "captoin", "unknown field"),
    ("pair", ("kind",), "pairs", "kind", "pair, conversation"),
    ("conversation", ("messages",), [], "messages", "empty"),
    ("conversation", ("messages", 1, "role"), "bot", "messages[1].role", "system, user, assistant"),
    ("conversation", ("messages", 1, "content", 2, "type"), "audio", "messages[1].content[2].type", "text, image"),
    ("conversation", ("messages", 1, "content", 2, "text"), 7, "messages[1].content[2].text", "string"),
    ("conversation", ("messages", 1, "content", 1, "video", "timestamps"), [0.0, 2.0, 1.0],
     "messages[1].content[1].video.timestamps[2]", "decrease"),
    ("conversation", ("messages", 1, "content", 1, "video", "timestamps"), [-1.0],
     "messages[1].content[1].video.timestamps[0]", ">= 0"),
    ("conversation", ("messages", 1, "content", 0, "image", "url"), "x", "messages[1].content[0].image.url", "unknown"),
    ("conversation", ("messages", 2, "role"), "system", "messages[2].role", "first"),
    ("conversation", ("thinking_mode",), "deep", "thinking_mode", "think, no_think, auto"),
    ("conversation", ("meta",), [1], "meta", "object"),
    ("preference", ("chosen", "role"), "user", "chosen.role", "assistant"),
    ("preference", ("rejected",), DELETE, "rejected", "missing"),
    ("preference", ("prompt", 0, "role"), "assistant", "prompt[0].role", "end with a user"),
    ("rl_prompt", ("reward_names",), [], "reward_names", "empty"),
    ("rl_prompt", ("reward_names",), ["format", 3], "reward_names[1]", "string"),
    ("rl_prompt", ("reference_answer",), 42, "reference_answer", "string"),
]


@pytest.mark.parametrize("kind,path,value,field,words", BAD, ids=[f"{b[0]}:{b[3]}" for b in BAD])
def test_bad_sample_names_key_and_field(kind, path, value, field, words):
    with pytest.raises(BadSampleError) as info:
        Sample.from_dict(_with(kind, path, value))
    err = info.value
    message = str(err)
    assert isinstance(err, KeyeUserError)
    assert "\n" not in message
    assert err.key == GOOD[kind]["key"] and repr(GOOD[kind]["key"]) in message
    assert err.field == field and f"field '{field}'" in message
    assert words in message


def test_missing_or_bad_key_and_non_objects():
    with pytest.raises(BadSampleError, match=r"<no key>: field 'key': missing"):
        Sample.from_dict({"kind": "pair", "image": {"key": "1.jpg"}, "caption": "c"})
    with pytest.raises(BadSampleError, match=r"field 'key': expected a string"):
        Sample.from_dict(_with("pair", ("key",), 12))
    with pytest.raises(BadSampleError, match=r"field '<sample>': expected an object, got list"):
        Sample.from_dict([1, 2])
    with pytest.raises(BadSampleError, match=r"field '<json>': not valid JSON"):
        Sample.from_json("{not json")


def test_error_survives_pickling():
    err = BadSampleError("k/1", "caption", "missing")
    again = pickle.loads(pickle.dumps(err))
    assert (again.key, again.field, str(again)) == ("k/1", "caption", str(err))
