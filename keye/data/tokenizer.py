"""A tiny Qwen-style tokenizer built locally, and the special-token ids every data step needs.

Tests and the `blueprints/tiny/` runs cannot download the released Keye tokenizer (151,936 entries, far
too many for a 1024-row tiny LLM), so `build_tiny_tokenizer` trains a small byte-level BPE on whatever
text is at hand, with the *same pipeline and the same added tokens* as the released Qwen2/Qwen3/Keye
tokenizer (spec §1.3):

- NFC normaliser, Qwen2's split regex (digits one by one: grounding coordinates stay short and
  regular), byte-level BPE without a prefix space, no BOS and no unknown token (every byte has an id);
- the added tokens in the released order, right after the BPE vocabulary, with the released
  ``special`` flags: the ``<|...|>`` control tokens are special (dropped by
  ``decode(skip_special_tokens=True)``), while ``<think>``/``</think>``, tool-call and FIM tokens are
  not, as in Qwen3, so decoded generations keep their ``<think>`` tags for the answer parser.
  Because the order is the released one, ``tiny_id - id("<|endoftext|>") + 151643`` is the released id.
- eos is ``<|im_end|>`` and pad is ``<|endoftext|>`` (spec §1.3).

Keye's own additions to Qwen3 (point, OCR text, clip time) follow; the spec gives their ids but not
their flags, so they are special like the box tokens. Our own ``<analysis>``, ``</analysis>``,
``<answer>``, ``</answer>`` come last as plain (non-special) added tokens so the tiny model sees each as
one token; the released tokenizer has no such entries and splits them into BPE pieces, which is why
nothing in keye may assume they are single tokens (the chat template works on text, not ids).

Code never uses these ids directly: `SpecialTokens.from_tokenizer` resolves them *by name*, so the
same pipeline runs with this tokenizer, the released one, or any HF directory loaded with
``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

#: Qwen2's pre-tokenizer split pattern (also Qwen3's and Keye's).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: (token, special) in the released id order, starting at 151643 (Qwen2.5/Qwen3 then Keye additions).
RELEASED_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # 151643: pad (and the config's bos)
    ("<|im_start|>", True),
    ("<|im_end|>", True),  # 151645: eos
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),  # 151652
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),  # 151655
    ("<|video_pad|>", True),
    ("<tool_call>", False),  # 151657
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),  # 151665
    ("</tool_response>", False),
    ("<think>", False),  # 151667
    ("</think>", False),
    ("<|point_start|>", True),  # 151669: Keye's additions from here
    ("<|point_end|>", True),
    ("<|ocr_text_start|>", True),
    ("<|ocr_text_end|>", True),
    ("<|clip_time_start|>", True),
    ("<|clip_time_end|>", True),  # 151674
)

#: Output-format tags made single tokens in the tiny tokenizer only (the released one splits them).
FORMAT_TAGS: tuple[str, ...] = ("<analysis>", "</analysis>", "<answer>", "</answer>")

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

#: Every token the tiny tokenizer adds after its BPE vocabulary, in id order.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = RELEASED_ADDED_TOKENS + tuple((t, False) for t in FORMAT_TAGS)

#: Byte-level BPE needs one id per byte before it can learn a single merge.
_BYTE_ALPHABET = 256


def build_tiny_tokenizer(
    corpus: Iterable[str], vocab_size: int = 1024, path: Path | str | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` and wrap it as a HF fast tokenizer of at most ``vocab_size`` ids.

    The added tokens take the last ``len(ADDED_TOKENS)`` ids of the budget, so ``len(tokenizer) <=
    vocab_size`` and the embedding table of a ``vocab_size``-row LLM covers every id. A small corpus
    may learn fewer merges than the budget allows; the ids then simply stop earlier. Training is
    deterministic for a given corpus. With ``path`` the tokenizer is also saved there
    (``save_pretrained``), loadable with ``AutoTokenizer.from_pretrained(path)``.
    """
    smallest = _BYTE_ALPHABET + len(ADDED_TOKENS)
    if vocab_size < smallest:
        raise ValueError(f"vocab_size {vocab_size} is too small: the byte alphabet and added tokens need {smallest}")

    tok = Tokenizer(models.BPE())  # no unk token: byte-level covers every input
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(ADDED_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)

    # One at a time so the ids follow ADDED_TOKENS exactly, special and plain interleaved.
    for content, special in ADDED_TOKENS:
        added = AddedToken(content, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[t for t, special in RELEASED_ADDED_TOKENS if special and t not in (EOS_TOKEN, PAD_TOKEN)],
        clean_up_tokenization_spaces=False,
    )
    if path is not None:
        tokenizer.save_pretrained(str(path))
    return tokenizer


@dataclass(frozen=True)
class SpecialTokens:
    """The ids the data pipeline and the model need, looked up by name in any Qwen-family tokenizer."""

    pad: int
    eos: int  # <|im_end|>: ends every turn, and generation
    im_start: int
    image_pad: int
    video_pad: int
    vision_start: int
    vision_end: int
    think: int
    think_end: int

    #: field → token name; ``pad`` falls back to this name when the tokenizer sets no pad token.
    NAMES: ClassVar[dict[str, str]] = {
        "pad": PAD_TOKEN,
        "eos": EOS_TOKEN,
        "im_start": "<|im_start|>",
        "image_pad": "<|image_pad|>",
        "video_pad": "<|video_pad|>",
        "vision_start": "<|vision_start|>",
        "vision_end": "<|vision_end|>",
        "think": "<think>",
        "think_end": "</think>",
    }

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> "SpecialTokens":
        """Resolve every id by token name; a token the tokenizer lacks is a ValueError naming it."""
        ids = {name: token_id(tokenizer, token) for name, token in cls.NAMES.items() if name != "pad"}
        pad = tokenizer.pad_token_id
        ids["pad"] = pad if pad is not None else token_id(tokenizer, PAD_TOKEN)
        return cls(**ids)


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of ``token``, which must be a single vocabulary entry (not split, not mapped to unk)."""
    found = tokenizer.convert_tokens_to_ids(token)
    unk = tokenizer.unk_token_id
    if found is None or (unk is not None and found == unk and token != tokenizer.unk_token):
        raise ValueError(f"tokenizer has no token {token!r} (needed as a single id by keye's chat template)")
    return found
