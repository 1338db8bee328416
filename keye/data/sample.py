"""The sample schema: one record type per training objective, shared by every stage.

A sample is what a data source yields and what the processor (vision resize, chat template, labels)
consumes. Four kinds cover the whole recipe:

| kind           | stages                                        | payload                                      |
|----------------|-----------------------------------------------|----------------------------------------------|
| `pair`         | 0 (SigLIP contrastive ViT pre-training)       | one image + its caption                      |
| `conversation` | 1-3 pre-training, SFT, CoT cold start         | messages with interleaved text/image/video   |
| `preference`   | MPO, iterative alignment                      | prompt messages + chosen + rejected reply    |
| `rl_prompt`    | mix-mode RL (GRPO/GSPO), rejection sampling   | prompt messages + reference + reward names   |

The JSON form follows the Qwen2-VL / OpenAI chat layout so existing data converts with little effort::

    {"kind": "conversation", "key": "sft/000017", "thinking_mode": "think",
     "messages": [{"role": "user", "content": [{"type": "image", "image": {"path": "a.jpg"}},
                                               {"type": "text", "text": "What is shown?"}]},
                  {"role": "assistant", "content": "<think>...</think><answer>a cat</answer>"}]}

A plain string ``content`` is shorthand for one text part; `to_dict` always writes the list form and
leaves out fields that are ``None`` (and an empty ``meta``), which parse back to the same value.
Media are *references* (a file path, or the member key of a shard: ``{"key": "000017.jpg"}``), never
bytes, so a sample stays small and JSON-safe; the loader resolves them.

Parsing is strict, like blueprint loading: an unknown field, a wrong type or a bad value raises
`BadSampleError` with one line naming the sample key and the field path (``messages[1].content[0].type``),
so the loader can skip the sample, count it and say why (DESIGN "Data flow").
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from keye.errors import KeyeUserError

ROLES = ("system", "user", "assistant")
#: `think` / `no_think` are the `/think` and `/no_think` suffixes of spec §1.6, `auto` the default
#: auto-think; `agentic` is the `/agentic_think` mode named for cold start and RL (spec §1.6, §3.4).
#: ``None`` on a sample means "no mode": the template adds no suffix (pre-training text, plain SFT).
THINKING_MODES = ("think", "no_think", "auto", "agentic")


class BadSampleError(KeyeUserError):
    """A sample that does not match the schema. The message is one line: sample key, field, reason."""

    def __init__(self, key: str | None, field_path: str, reason: str) -> None:
        self.key = key
        self.field = field_path
        self.reason = reason
        shown = repr(key) if key is not None else "<no key>"
        super().__init__(f"bad sample {shown}: field '{field_path}': {reason}")

    def __reduce__(self):  # survive pickling across data-loader worker processes
        return type(self), (self.key, self.field, self.reason)


# --- parsing helpers: each takes the sample key and the field path so errors can name both ----------


def _fail(key: str | None, path: str, reason: str) -> BadSampleError:
    return BadSampleError(key, path, reason)


def _mapping(value: Any, key: str | None, path: str, allowed: set[str], required: set[str] = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise _fail(key, path or "<sample>", f"expected an object, got {type(value).__name__}")
    for name in value:
        if name not in allowed:
            raise _fail(key, _join(path, str(name)), f"unknown field; known: {', '.join(sorted(allowed))}")
    for name in sorted(required):
        if name not in value:
            raise _fail(key, _join(path, name), "missing")
    return value


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _str(value: Any, key: str | None, path: str, *, optional: bool = False, nonempty: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _fail(key, path, f"expected a string, got {type(value).__name__}")
    if nonempty and not value:
        raise _fail(key, path, "must not be empty")
    return value


def _list(value: Any, key: str | None, path: str, *, nonempty: bool = False) -> list:
    if not isinstance(value, list):
        raise _fail(key, path, f"expected a list, got {type(value).__name__}")
    if nonempty and not value:
        raise _fail(key, path, "must not be empty")
    return value


def _mode(value: Any, key: str | None, path: str) -> str | None:
    if value is None:
        return None
    if value not in THINKING_MODES:
        raise _fail(key, path, f"expected one of {', '.join(THINKING_MODES)} or null, got {value!r}")
    return value


def _encode(value: Any) -> Any:
    """Dataclass → JSON-ready dict: its fields in order, ``None`` and an empty ``meta`` left out,
    preceded by the ``type`` tag of a content part or the ``kind`` tag of a sample."""
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return dict(value)
    if not dataclasses.is_dataclass(value):
        return value
    out: dict[str, Any] = {}
    for tag in ("type", "kind"):
        if hasattr(type(value), tag):
            out[tag] = getattr(type(value), tag)
    for f in dataclasses.fields(value):
        v = getattr(value, f.name)
        if v is not None and not (f.name == "meta" and not v):
            out[f.name] = _encode(v)
    return out


class _Record:
    """Gives a schema dataclass its `to_dict` (see `_encode`)."""

    def to_dict(self) -> dict:
        return _encode(self)


# --- media references -------------------------------------------------------------------------------


def _media_source(raw: dict, key: str | None, path: str) -> tuple[str | None, str | None]:
    """Exactly one of ``path`` (a file or URL) and ``key`` (a member of the sample's shard)."""
    media_path = _str(raw.get("path"), key, _join(path, "path"), optional=True, nonempty=True)
    media_key = _str(raw.get("key"), key, _join(path, "key"), optional=True, nonempty=True)
    if (media_path is None) == (media_key is None):
        raise _fail(key, path, "needs exactly one of 'path' and 'key'")
    return media_path, media_key


@dataclass
class ImageRef(_Record):
    """An image by reference: a file path/URL, or the key of a member in the sample's shard."""

    path: str | None = None
    key: str | None = None

    @classmethod
    def from_dict(cls, raw: Any, sample_key: str | None = None, path: str = "image") -> "ImageRef":
        raw = _mapping(raw, sample_key, path, {"path", "key"})
        media_path, media_key = _media_source(raw, sample_key, path)
        return cls(path=media_path, key=media_key)


@dataclass
class VideoRef(_Record):
    """A video by reference, with optional per-frame timestamps in seconds.

    ``timestamps`` are for data whose frames were chosen upstream (e.g. the 16/32-frame cold-start
    samples, spec §1.5); without them the video decoder samples frames at the recomputed fps. They feed
    the time-aligned M-RoPE, so they must be finite, non-negative and non-decreasing.
    """

    path: str | None = None
    key: str | None = None
    timestamps: list[float] | None = None

    @classmethod
    def from_dict(cls, raw: Any, sample_key: str | None = None, path: str = "video") -> "VideoRef":
        raw = _mapping(raw, sample_key, path, {"path", "key", "timestamps"})
        media_path, media_key = _media_source(raw, sample_key, path)
        stamps = raw.get("timestamps")
        if stamps is not None:
            where = _join(path, "timestamps")
            stamps = _list(stamps, sample_key, where, nonempty=True)
            for i, t in enumerate(stamps):
                if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
                    raise _fail(sample_key, f"{where}[{i}]", f"expected a finite number >= 0, got {t!r}")
                if i and t < stamps[i - 1]:
                    raise _fail(sample_key, f"{where}[{i}]", f"timestamps must not decrease ({stamps[i - 1]} > {t})")
            stamps = [float(t) for t in stamps]
        return cls(path=media_path, key=media_key, timestamps=stamps)


# --- message content ----------------------------------------------------------------------------------


@dataclass
class TextPart(_Record):
    text: str
    type: ClassVar[str] = "text"


@dataclass
class ImagePart(_Record):
    image: ImageRef
    type: ClassVar[str] = "image"


@dataclass
class VideoPart(_Record):
    video: VideoRef
    type: ClassVar[str] = "video"


Part = Union[TextPart, ImagePart, VideoPart]


def part_from_dict(raw: Any, sample_key: str | None, path: str) -> Part:
    if not isinstance(raw, dict):
        raise _fail(sample_key, path, f"expected an object, got {type(raw).__name__}")
    kind = raw.get("type")
    if kind == "text":
        raw = _mapping(raw, sample_key, path, {"type", "text"}, {"text"})
        return TextPart(_str(raw["text"], sample_key, _join(path, "text")))
    if kind == "image":
        raw = _mapping(raw, sample_key, path, {"type", "image"}, {"image"})
        return ImagePart(ImageRef.from_dict(raw["image"], sample_key, _join(path, "image")))
    if kind == "video":
        raw = _mapping(raw, sample_key, path, {"type", "video"}, {"video"})
        return VideoPart(VideoRef.from_dict(raw["video"], sample_key, _join(path, "video")))
    raise _fail(sample_key, _join(path, "type"), f"expected one of text, image, video, got {kind!r}")


@dataclass
class Message(_Record):
    """One chat turn: a role and interleaved content parts, in reading order."""

    role: str
    content: list[Part]

    @classmethod
    def from_dict(cls, raw: Any, sample_key: str | None = None, path: str = "message") -> "Message":
        raw = _mapping(raw, sample_key, path, {"role", "content"}, {"role", "content"})
        role = raw["role"]
        if role not in ROLES:
            raise _fail(sample_key, _join(path, "role"), f"expected one of {', '.join(ROLES)}, got {role!r}")
        content = raw["content"]
        if isinstance(content, str):  # shorthand: one text part
            return cls(role, [TextPart(content)])
        where = _join(path, "content")
        parts = _list(content, sample_key, where, nonempty=True)
        return cls(role, [part_from_dict(p, sample_key, f"{where}[{i}]") for i, p in enumerate(parts)])

    @property
    def text(self) -> str:
        """The text parts joined (media dropped): handy for rewards and logs."""
        return "".join(part.text for part in self.content if isinstance(part, TextPart))


def _messages(raw: Any, sample_key: str | None, path: str) -> list[Message]:
    items = _list(raw, sample_key, path, nonempty=True)
    messages = [Message.from_dict(m, sample_key, f"{path}[{i}]") for i, m in enumerate(items)]
    for i, message in enumerate(messages):
        if message.role == "system" and i != 0:
            raise _fail(sample_key, f"{path}[{i}].role", "a system message may only come first")
    return messages


def _prompt(raw: Any, sample_key: str | None, path: str) -> list[Message]:
    """A prompt is a conversation that ends with the user's turn (the model answers next)."""
    messages = _messages(raw, sample_key, path)
    if messages[-1].role != "user":
        raise _fail(sample_key, f"{path}[{len(messages) - 1}].role", "a prompt must end with a user message")
    return messages


def _reply(raw: Any, sample_key: str | None, path: str) -> Message:
    message = Message.from_dict(raw, sample_key, path)
    if message.role != "assistant":
        raise _fail(sample_key, _join(path, "role"), f"a reply must be an assistant message, got {message.role!r}")
    return message


# --- samples ------------------------------------------------------------------------------------------

_COMMON = ("key", "source", "meta")


@dataclass
class Sample(_Record):
    """Fields every kind has. ``key`` is unique within a data set (logs, dedup, resume);
    ``source`` is the mixer label it came from; ``meta`` is free-form JSON for provenance/filters."""

    key: str
    source: str | None = field(default=None, kw_only=True)
    meta: dict[str, Any] = field(default_factory=dict, kw_only=True)

    kind: ClassVar[str] = ""

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @staticmethod
    def from_dict(raw: Any) -> "Sample":
        """Parse and validate any kind; the ``kind`` field selects the class."""
        key = raw.get("key") if isinstance(raw, dict) else None
        key = key if isinstance(key, str) else None
        if not isinstance(raw, dict):
            raise _fail(None, "<sample>", f"expected an object, got {type(raw).__name__}")
        kind = raw.get("kind")
        cls = SAMPLE_KINDS.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise _fail(key, "kind", f"expected one of {', '.join(SAMPLE_KINDS)}, got {kind!r}")
        if "key" not in raw:
            raise _fail(None, "key", "missing")
        _str(raw["key"], key, "key", nonempty=True)
        own = [f for f in dataclasses.fields(cls) if f.name not in _COMMON]
        missing = dataclasses.MISSING
        required = {f.name for f in own if f.default is missing and f.default_factory is missing}
        raw = _mapping(raw, key, "", {"kind", *_COMMON, *(f.name for f in own)}, required)
        source = _str(raw.get("source"), key, "source", optional=True, nonempty=True)
        meta = raw.get("meta", {})
        if not isinstance(meta, dict):
            raise _fail(key, "meta", f"expected an object, got {type(meta).__name__}")
        return cls(key, source=source, meta=dict(meta), **cls._parse(raw, key))

    @staticmethod
    def from_json(text: str) -> "Sample":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise _fail(None, "<json>", f"not valid JSON: {err}") from None
        return Sample.from_dict(raw)

    @classmethod
    def _parse(cls, raw: dict, key: str) -> dict:
        raise NotImplementedError


@dataclass
class PairSample(Sample):
    """Image-text pair for the contrastive stage 0 (SigLIP sigmoid loss)."""

    image: ImageRef
    caption: str

    kind: ClassVar[str] = "pair"

    @classmethod
    def _parse(cls, raw: dict, key: str) -> dict:
        return {
            "image": ImageRef.from_dict(raw["image"], key, "image"),
            "caption": _str(raw["caption"], key, "caption", nonempty=True),
        }


@dataclass
class ConversationSample(Sample):
    """Messages trained with next-token loss: pre-training (interleaved), SFT and CoT cold start.

    Which turns carry loss is the processor's business (by default the assistant turns).
    """

    messages: list[Message]
    thinking_mode: str | None = None

    kind: ClassVar[str] = "conversation"

    @classmethod
    def _parse(cls, raw: dict, key: str) -> dict:
        return {
            "messages": _messages(raw["messages"], key, "messages"),
            "thinking_mode": _mode(raw.get("thinking_mode"), key, "thinking_mode"),
        }


@dataclass
class PreferenceSample(Sample):
    """A preference pair for MPO: the same prompt, a chosen and a rejected assistant reply."""

    prompt: list[Message]
    chosen: Message
    rejected: Message
    thinking_mode: str | None = None

    kind: ClassVar[str] = "preference"

    @classmethod
    def _parse(cls, raw: dict, key: str) -> dict:
        return {
            "prompt": _prompt(raw["prompt"], key, "prompt"),
            "chosen": _reply(raw["chosen"], key, "chosen"),
            "rejected": _reply(raw["rejected"], key, "rejected"),
            "thinking_mode": _mode(raw.get("thinking_mode"), key, "thinking_mode"),
        }


@dataclass
class RLPromptSample(Sample):
    """A prompt for RL rollouts (and rejection sampling).

    ``reward_names`` are reward_model registry names that score its rollouts (e.g. answer match +
    format); ``reference_answer`` is what rule rewards and judges compare against, ``None`` when the
    rewards need none (e.g. a judge that scores reasoning/answer consistency only). ``thinking_mode``
    ``None`` leaves the prompt without a suffix, i.e. the model's auto-think default; RL stages that mix
    modes per rollout (spec §3.4) override it there.
    """

    messages: list[Message]
    reward_names: list[str]
    reference_answer: str | None = None
    thinking_mode: str | None = None

    kind: ClassVar[str] = "rl_prompt"

    @classmethod
    def _parse(cls, raw: dict, key: str) -> dict:
        names = _list(raw["reward_names"], key, "reward_names", nonempty=True)
        for i, name in enumerate(names):
            _str(name, key, f"reward_names[{i}]", nonempty=True)
        return {
            "messages": _prompt(raw["messages"], key, "messages"),
            "reward_names": list(names),
            "reference_answer": _str(raw.get("reference_answer"), key, "reference_answer", optional=True),
            "thinking_mode": _mode(raw.get("thinking_mode"), key, "thinking_mode"),
        }


#: kind → class; `Sample.from_dict` dispatches on it.
SAMPLE_KINDS: dict[str, type[Sample]] = {
    cls.kind: cls for cls in (PairSample, ConversationSample, PreferenceSample, RLPromptSample)
}


def asked(sample: Sample) -> tuple[list[Message], Any] | str:
    """What a sample asks a model, for the stages that sample answers (CoT build, RL, rejection sampling): its
    prompt messages and reference answer. An ``rl_prompt`` gives its messages and ``reference_answer``; a
    conversation its messages up to the last user turn and ``meta["answer"]`` (None when absent). Otherwise a
    short reason the caller counts: ``no_user_turn`` or ``not_a_prompt``."""
    if isinstance(sample, RLPromptSample):
        return list(sample.messages), sample.reference_answer
    if isinstance(sample, ConversationSample):
        last_user = max((i for i, m in enumerate(sample.messages) if m.role == "user"), default=None)
        if last_user is None:
            return "no_user_turn"
        return list(sample.messages[: last_user + 1]), (sample.meta or {}).get("answer")
    return "not_a_prompt"
