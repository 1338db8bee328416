"""The tiny tokenizer: the released added tokens and their order, save/load, ids resolved by name."""

import random

import pytest
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from keye.data.tokenizer import ADDED_TOKENS, SpecialTokens, build_tiny_tokenizer, token_id

# Released ids from spec §1.3 (token table), written out here as the independent reference.
SPEC_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<tool_response>": 151665,
    "</tool_response>": 151666,
    "<think>": 151667,
    "</think>": 151668,
    "<|point_start|>": 151669,
    "<|point_end|>": 151670,
    "<|ocr_text_start|>": 151671,
    "<|ocr_text_end|>": 151672,
    "<|clip_time_start|>": 151673,
    "<|clip_time_end|>": 151674,
}

CORPUS = [
    "You are a helpful assistant.",
    "Describe this image. A cat sits on a red mat next to a window.",
    "What is shown in the video? Two people walk along the beach at sunset.",
    "The answer is 42. Therefore, /no_think mode is more appropriate.",
    "Let me think step by step: 3 + 4 = 7, so the total is \\boxed{7}.",
    "Der Hund läuft über die Straße. 猫が座っている。",
] * 20


def synthetic_corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Made-up words from syllables: enough distinct pairs for a BPE to fill its whole budget."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    return [" ".join("".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(12)) for _ in range(n_lines)]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(CORPUS)


def test_fits_the_budget_and_fills_it_when_the_corpus_allows(tok):
    assert len(tok) <= 1024
    full = build_tiny_tokenizer(synthetic_corpus(), vocab_size=600)
    assert len(full) == 600
    # the added tokens take the top of the budget
    assert token_id(full, ADDED_TOKENS[-1][0]) == 599


def test_added_tokens_are_single_ids_in_the_released_order(tok):
    base = token_id(tok, "<|endoftext|>")
    for token, released in SPEC_IDS.items():
        assert tok.encode(token, add_special_tokens=False) == [token_id(tok, token)]
        assert token_id(tok, token) - base + 151643 == released, token
    for tag in ("<analysis>", "</analysis>", "<answer>", "</answer>"):
        assert len(tok.encode(tag, add_special_tokens=False)) == 1


def test_special_flags_follow_the_released_tokenizer(tok):
    text = "<|im_start|>assistant\n<think>a</think><answer>b</answer><|box_start|>[[1,2,3,4]]<|box_end|><|im_end|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    # control tokens are dropped; <think> and the format tags stay (Qwen3 marks <think> non-special)
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>a</think><answer>b</answer>[[1,2,3,4]]"


def test_lossless_round_trip_and_no_bos(tok):
    text = "  Hello,\n\n\tworld!  Ünïcödé 猫 🐱 \\boxed{x^2}  \n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok("a")["input_ids"] == tok.encode("a", add_special_tokens=False)  # nothing prepended


def test_digits_are_split_one_by_one_like_qwen(tok):
    pieces = tok.convert_ids_to_tokens(tok.encode("[[123,456]]", add_special_tokens=False))
    for digit in "123456":
        assert digit in pieces


def test_special_tokens_by_name(tok):
    special = SpecialTokens.from_tokenizer(tok)
    assert special.eos == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    assert special.pad == tok.convert_tokens_to_ids("<|endoftext|>") == tok.pad_token_id
    assert special.image_pad == token_id(tok, "<|image_pad|>")
    assert special.video_pad == token_id(tok, "<|video_pad|>")
    assert special.vision_start == token_id(tok, "<|vision_start|>")
    assert special.vision_end == token_id(tok, "<|vision_end|>")
    assert (special.think, special.think_end) == (token_id(tok, "<think>"), token_id(tok, "</think>"))


def test_save_and_load_back_with_auto_tokenizer(tmp_path, tok):
    built = build_tiny_tokenizer(CORPUS, path=tmp_path / "tiny")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    assert len(loaded) == len(built)
    text = "<|im_start|>user\nDescribe this image./think<|im_end|>\n<think>hm</think><answer>cat</answer>"
    assert loaded.encode(text, add_special_tokens=False) == built.encode(text, add_special_tokens=False)
    assert SpecialTokens.from_tokenizer(loaded) == SpecialTokens.from_tokenizer(built)
    assert loaded.decode(loaded.encode("<|im_end|>x"), skip_special_tokens=True) == "x"


def test_training_is_deterministic(tok):
    again = build_tiny_tokenizer(CORPUS)
    assert again.get_vocab() == tok.get_vocab()


def test_missing_token_is_named():
    # a tokenizer without Qwen's added tokens: the lookup falls back to unk, which must not pass
    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")), unk_token="<unk>"
    )
    with pytest.raises(ValueError, match=r"tokenizer has no token '<\|im_end\|>'"):
        SpecialTokens.from_tokenizer(plain)


def test_too_small_a_budget_is_refused():
    with pytest.raises(ValueError, match="vocab_size 100 is too small"):
        build_tiny_tokenizer(CORPUS, vocab_size=100)
