"""The Keye-VL chat template in Python, with training labels; thinking modes, output formats, grounding.

The released Keye processor uses Qwen2-VL's Jinja chat template (spec §1.6)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n     (only if the first turn is not system)
    <|im_start|>user\\n<|vision_start|><|image_pad|>…<|vision_end|>Describe this image./think<|im_end|>\\n
    <|im_start|>assistant\\n<think>…</think><answer>…</answer><|im_end|>\\n

and the processor then repeats each ``<|image_pad|>``/``<|video_pad|>`` ``grid.prod() // 4`` times (the
tokens left after the 2×2 patch merge). It is written here in Python rather than rendered from Jinja so
that labels come out exactly: `encode_conversation` knows which characters belong to which turn, so the
loss covers each assistant reply and its closing ``<|im_end|>`` and nothing else (no role headers,
no user text, no system prompt, no image/video tokens, not the ``\\n`` after ``<|im_end|>``).
`render_conversation` gives the same conversation as text; the tests check it against the Jinja template.

Tokenisation is piecewise so training sees what inference sees: the prompt up to
``<|im_start|>assistant\\n`` is tokenised as `add_generation_prompt=True` would tokenise it, and each reply
on its own, as the model would generate it. For ordinary text this equals tokenising the whole rendered
string; it differs only when a reply *starts* with whitespace that BPE would otherwise have merged with
the ``\\n`` of the header, and there the piecewise ids are the ones generation produces. Vision blocks
are emitted as ids (``vision_start``, N pads, ``vision_end``) without passing thousands of pad tokens
through the tokenizer. Token ids are resolved by name (`SpecialTokens`), so any Qwen-family tokenizer works.

Thinking modes (spec §1.6) are a suffix on the last user text, written straight after it as in the
Keye README (``"Describe this image./think"``): ``think`` → ``/think``, ``no_think`` → ``/no_think``,
``agentic`` → ``/agentic_think``; ``auto`` (the released default) and ``None`` add nothing. In an agentic
reply the ``<sandbox_output>…</sandbox_output>`` blocks the runtime injects get no loss (`_text_spans`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from keye.data.sample import ROLES, ImagePart, Message, TextPart, VideoPart
from keye.data.tokenizer import SpecialTokens

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
#: Label value that the next-token loss ignores (PyTorch's cross_entropy default).
IGNORE_INDEX = -100

#: thinking mode → suffix appended to the last user text.
MODE_SUFFIXES: dict[str | None, str] = {
    None: "",
    "auto": "",
    "think": "/think",
    "no_think": "/no_think",
    "agentic": "/agentic_think",
}

#: The block the agentic runtime injects into a reply (spec §1.6): never trained on.
SANDBOX_OPEN, SANDBOX_CLOSE = "<sandbox_output>", "</sandbox_output>"

#: Tokens that would break the turn or vision structure if they came from message text.
_STRUCTURAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

_MEDIA_PAD = {"image": "<|image_pad|>", "video": "<|video_pad|>"}
_MEDIA_LABEL = {"image": "Picture", "video": "Video"}


@dataclass
class Encoded:
    """One tokenised conversation: ``labels[i]`` is ``input_ids[i]`` where the loss applies, else -100."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass(frozen=True)
class _Span:
    """A piece of the rendered conversation: template/message text, or one vision block."""

    text: str = ""
    media: str | None = None  # "image" or "video": a block of `count` pad tokens
    count: int = 0
    train: bool = False


# --- rendering ---------------------------------------------------------------------------------------


def render_conversation(
    messages: Sequence[Message],
    vision_token_counts: Sequence[int] = (),
    thinking_mode: str | None = None,
    add_generation_prompt: bool = False,
    add_vision_id: bool = False,
) -> str:
    """The conversation as the released template + processor write it, pads expanded."""
    out = []
    for span in _spans(messages, vision_token_counts, thinking_mode, add_generation_prompt, add_vision_id):
        if span.media is None:
            out.append(span.text)
        else:
            out.append("<|vision_start|>" + _MEDIA_PAD[span.media] * span.count + "<|vision_end|>")
    return "".join(out)


def encode_conversation(
    messages: Sequence[Message],
    tokenizer: PreTrainedTokenizerBase,
    vision_token_counts: Sequence[int] = (),
    thinking_mode: str | None = None,
    add_generation_prompt: bool = False,
    add_vision_id: bool = False,
) -> Encoded:
    """Token ids and labels for a conversation.

    ``vision_token_counts`` has one entry per image/video part, in reading order across all messages:
    the LLM tokens each contributes after the 2×2 merge (``grid_thw.prod() // 4``, from the vision
    processor). ``thinking_mode`` is one of `MODE_SUFFIXES`. ``add_generation_prompt`` ends with an open
    ``<|im_start|>assistant\\n`` for generation (RL rollouts, evaluation).
    """
    special = SpecialTokens.from_tokenizer(tokenizer)
    pads = {"image": special.image_pad, "video": special.video_pad}
    input_ids: list[int] = []
    labels: list[int] = []
    buffer: list[str] = []
    buffer_train = False

    def flush() -> None:
        if buffer:
            ids = tokenizer.encode("".join(buffer), add_special_tokens=False)
            input_ids.extend(ids)
            labels.extend(ids if buffer_train else [IGNORE_INDEX] * len(ids))
            buffer.clear()

    for span in _spans(messages, vision_token_counts, thinking_mode, add_generation_prompt, add_vision_id):
        if span.media is not None:
            flush()
            block = [special.vision_start] + [pads[span.media]] * span.count + [special.vision_end]
            input_ids.extend(block)
            labels.extend([IGNORE_INDEX] * len(block))
            continue
        if span.train != buffer_train:  # e.g. the header "assistant\n" | the reply: tokenised apart
            flush()
            buffer_train = span.train
        buffer.append(span.text)
    flush()
    return Encoded(input_ids, labels)


def _spans(
    messages: Sequence[Message],
    vision_token_counts: Sequence[int],
    thinking_mode: str | None,
    add_generation_prompt: bool,
    add_vision_id: bool,
) -> list[_Span]:
    """The conversation as spans, in order; both `render_conversation` and `encode_conversation` read it."""
    messages = _with_mode_suffix(_checked(messages), thinking_mode)
    counts = _checked_counts(messages, vision_token_counts)
    spans: list[_Span] = []
    if messages and messages[0].role != "system":
        spans.append(_Span(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"))
    seen = {"image": 0, "video": 0}
    for message in messages:
        train = message.role == "assistant"
        spans.append(_Span(f"<|im_start|>{message.role}\n"))
        for part in message.content:
            if isinstance(part, TextPart):
                spans.extend(_text_spans(part.text, train))
                continue
            media = "image" if isinstance(part, ImagePart) else "video"
            seen[media] += 1
            if add_vision_id:
                spans.append(_Span(f"{_MEDIA_LABEL[media]} {seen[media]}: ", train=train))
            spans.append(_Span(media=media, count=counts[seen["image"] + seen["video"] - 1]))
        spans.append(_Span("<|im_end|>", train=train))
        spans.append(_Span("\n"))
    if add_generation_prompt:
        spans.append(_Span("<|im_start|>assistant\n"))
    return spans


def _text_spans(text: str, train: bool) -> list[_Span]:
    """A text part as spans; in an assistant reply, each ``<sandbox_output>…</sandbox_output>`` block (tags
    included) is its own untrained span: the agentic runtime injects it, the model never writes it (spec §1.6),
    so training on it would teach the model to invent tool results. An unclosed block runs to the end."""
    if not train or SANDBOX_OPEN not in text:
        return [_Span(text, train=train)]
    spans = []
    while text:
        start = text.find(SANDBOX_OPEN)
        if start == -1:
            spans.append(_Span(text, train=True))
            break
        end = text.find(SANDBOX_CLOSE, start)
        end = len(text) if end == -1 else end + len(SANDBOX_CLOSE)
        if start:
            spans.append(_Span(text[:start], train=True))
        spans.append(_Span(text[start:end], train=False))
        text = text[end:]
    return spans


# --- validation and the thinking-mode suffix ---------------------------------------------------------------


def _checked(messages: Sequence[Message]) -> list[Message]:
    """Reject what the template cannot render faithfully, with one line naming the message."""
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise ValueError(f"messages[{i}]: unknown role {message.role!r}; known: {', '.join(ROLES)}")
        for j, part in enumerate(message.content):
            if not isinstance(part, (TextPart, ImagePart, VideoPart)):
                raise ValueError(f"messages[{i}].content[{j}]: unknown part {type(part).__name__}")
            if isinstance(part, TextPart):
                for token in _STRUCTURAL_TOKENS:
                    if token in part.text:
                        raise ValueError(
                            f"messages[{i}].content[{j}]: text contains {token!r}; media go in image/video parts"
                        )
    return list(messages)


def _checked_counts(messages: Sequence[Message], vision_token_counts: Sequence[int]) -> list[int]:
    num_media = sum(isinstance(p, (ImagePart, VideoPart)) for m in messages for p in m.content)
    counts = list(vision_token_counts)
    if len(counts) != num_media:
        raise ValueError(
            f"vision_token_counts has {len(counts)} entries but the messages have {num_media} images/videos"
        )
    for i, count in enumerate(counts):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"vision_token_counts[{i}] must be a positive int, got {count!r}")
    return counts


def _with_mode_suffix(messages: list[Message], thinking_mode: str | None) -> list[Message]:
    """Append the mode's suffix to the last user message's last text part (a new part if it has none).

    Text that already ends with the suffix is left alone, so data that carries it is not doubled.
    The input messages are not modified.
    """
    if thinking_mode not in MODE_SUFFIXES:
        known = ", ".join(str(m) for m in MODE_SUFFIXES if m is not None)
        raise ValueError(f"unknown thinking_mode {thinking_mode!r}; known: {known} or None")
    suffix = MODE_SUFFIXES[thinking_mode]
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not suffix or not users:
        return messages
    last = messages[users[-1]]
    content = list(last.content)
    texts = [j for j, p in enumerate(content) if isinstance(p, TextPart)]
    if not texts:
        content.append(TextPart(suffix))
    elif not content[texts[-1]].text.endswith(suffix):
        content[texts[-1]] = TextPart(content[texts[-1]].text + suffix)
    messages = list(messages)
    messages[users[-1]] = Message(last.role, content)
    return messages


# --- assistant output formats (spec §1.6, paper App. C) ------------------------------------------------


def format_thinking(think: str, answer: str) -> str:
    """A thinking-mode reply: ``<think>…</think><answer>…</answer>``."""
    return f"<think>{think}</think><answer>{answer}</answer>"


def format_auto_think(analysis: str, answer: str, think: str | None = None) -> str:
    """An auto-think reply: the mode decision in ``<analysis>``, then the direct answer (``think`` None,
    the /no_think branch) or the thinking-mode reply (the /think branch)."""
    head = f"<analysis>{analysis}</analysis>"
    return head + (answer if think is None else format_thinking(think, answer))


def parse_answer(text: str) -> str:
    """The final answer in a generated reply, as the Keye eval post-processor reads it.

    Drop everything up to the last ``</analysis>``, then up to the last ``</think>``; keep the last
    ``<answer>…</answer>`` if there is one (an unclosed one runs to the end); then the content of the
    last ``\\boxed{…}`` if there is one (nested braces allowed). Surrounding whitespace is stripped.
    A ``<think>`` that never closes (generation cut off mid-thought) gives ``""``: no answer was
    reached, and the thought must not be scored as one (our choice; the harness does not say).
    """
    text = _after_last(text, "</analysis>")
    if text.rfind("<think>") > text.rfind("</think>"):
        return ""
    text = _after_last(text, "</think>")
    start = text.rfind("<answer>")
    if start != -1:
        text = text[start + len("<answer>") :]
        end = text.find("</answer>")
        if end != -1:
            text = text[:end]
    boxed = _last_boxed(text)
    return (boxed if boxed is not None else text).strip()


def _after_last(text: str, tag: str) -> str:
    cut = text.rfind(tag)
    return text if cut == -1 else text[cut + len(tag) :]


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    depth = 0
    begin = start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None  # unbalanced: leave the text as it is


# --- grounding (spec §1.6, paper Tab. 1) -------------------------------------------------------------


def normalize_coordinate(value: float, size: float, name: str = "coordinate") -> int:
    """A pixel coordinate in [0, size] as an integer in [0, 1000): ``floor(value / size · 1000)``,
    with the far edge (``value == size``) mapped to 999."""
    if not size > 0:
        raise ValueError(f"image size for {name} must be positive, got {size!r}")
    if not 0 <= value <= size:
        raise ValueError(f"{name}={value!r} is outside the image [0, {size}]")
    return min(999, math.floor(value * 1000 / size))


def format_box(
    x1: float,
    y1: float,
    x2: float,
    y2: float,
    width: float,
    height: float,
    ref: str | None = None,
    ocr_text: str | None = None,
) -> str:
    """``<|box_start|>[[x1,y1,x2,y2]]<|box_end|>`` in [0, 1000) coordinates, from pixels of a
    ``width``×``height`` image; ``ref`` prefixes ``<|object_ref_start|>ref<|object_ref_end|>``,
    ``ocr_text`` prefixes ``<|ocr_text_start|>text<|ocr_text_end|>`` (at most one of the two)."""
    if x1 > x2 or y1 > y2:
        raise ValueError(f"box corners out of order: ({x1}, {y1}) must be above-left of ({x2}, {y2})")
    xs = [normalize_coordinate(x, width, n) for x, n in ((x1, "x1"), (x2, "x2"))]
    ys = [normalize_coordinate(y, height, n) for y, n in ((y1, "y1"), (y2, "y2"))]
    box = f"[[{xs[0]},{ys[0]},{xs[1]},{ys[1]}]]"
    return _grounding_prefix(ref, ocr_text) + f"<|box_start|>{box}<|box_end|>"


def format_point(
    x: float, y: float, width: float, height: float, ref: str | None = None, ocr_text: str | None = None
) -> str:
    """``<|point_start|>[[x,y]]<|point_end|>`` in [0, 1000) coordinates, prefixed like `format_box`."""
    point = f"[[{normalize_coordinate(x, width, 'x')},{normalize_coordinate(y, height, 'y')}]]"
    return _grounding_prefix(ref, ocr_text) + f"<|point_start|>{point}<|point_end|>"


def _grounding_prefix(ref: str | None, ocr_text: str | None) -> str:
    if ref is not None and ocr_text is not None:
        raise ValueError("give ref or ocr_text, not both")
    if ref is not None:
        return f"<|object_ref_start|>{ref}<|object_ref_end|>"
    if ocr_text is not None:
        return f"<|ocr_text_start|>{ocr_text}<|ocr_text_end|>"
    return ""
