"""``keye-launch chat SOURCE [STAGE] [--image PATH]... [--video PATH]... [--mode M] [PROMPT]``.

One answer to PROMPT, or, without it, a conversation: each line read from stdin is a user turn (EOF ends
it), and earlier turns stay in the context (replies without their thinking, as Keye's template keeps
them). The images and videos go with the first turn. SOURCE is as for ``keye-launch eval``.

Tokens are printed as the generator samples them (its ``on_token`` callback). The reply's markup is shown
as plain headings so the thinking stands apart from the answer: ``<think>`` becomes ``[thinking]``,
``</think>`` ``[answer]``, ``<analysis>`` (auto mode's decision) ``[analysis]``; ``<answer>`` tags and stop
tokens are dropped. A tag split over several tokens is held back until it is complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from keye.errors import KeyeUserError

MARKUP = {"<think>": "[thinking]\n", "</think>": "\n[answer]\n", "<analysis>": "[analysis]\n", "</analysis>": "\n",
          "<answer>": "", "</answer>": "", "<|im_end|>": "", "<|endoftext|>": ""}
MAX_MEDIA_BYTES = 256 << 20


def render(text: str) -> str:
    for tag, shown in MARKUP.items():
        text = text.replace(tag, shown)
    return text


class Stream:
    """Prints a reply as its tokens come: the whole text is decoded again each time (a character may span
    tokens) and what was not yet printed of its rendering is written."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, _request: int, _sample: int, token: int) -> None:
        self.ids.append(token)
        self._show(final=False)

    def _show(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if not final:
            if text.endswith("\ufffd"):  # half a character
                return
            cut = text.rfind("<")
            if cut > text.rfind(">"):  # maybe the start of a tag: wait for the rest
                text = text[:cut]
        shown = render(text)
        if shown.startswith(self.printed):
            self.out.write(shown[len(self.printed):])
            self.printed = shown
        self.out.flush()

    def finish(self) -> None:
        self._show(final=True)
        self.out.write("\n")
        self.out.flush()


def _media(paths: list[str]) -> dict[str, bytes]:
    from keye.data.sources import MediaRefused, read_media_file

    media = {}
    for path in paths:
        file = Path(path).resolve()
        try:
            media[path] = read_media_file(file.name, file.parent, MAX_MEDIA_BYTES)
        except MediaRefused as exc:
            raise KeyeUserError(f"{path}: {exc}") from None
    return media


def _history_reply(reply: str) -> str:
    """A reply as it stays in the context: without the thinking (or auto mode's analysis)."""
    from keye.eval.extract import clean

    text = clean(reply)
    for tag in ("</analysis>", "</think>"):
        text = text[text.rfind(tag) + len(tag):] if tag in text else text
    return text.strip()


def cmd_chat(args: argparse.Namespace) -> int:
    from keye.data.processor import SampleError
    from keye.data.sample import ImagePart, ImageRef, Message, TextPart, VideoPart, VideoRef
    from keye.eval.model import check_mode, is_blueprint, load_source

    words = list(args.words)
    stage = words.pop(0) if is_blueprint(args.source) and words else None
    prompt = " ".join(words) or None
    check_mode(args.mode)
    media = _media([*args.image, *args.video])
    model = load_source(args.source, stage, args.overrides, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, seed=args.seed)
    vision = [ImagePart(ImageRef(path=p)) for p in args.image] + [VideoPart(VideoRef(path=p)) for p in args.video]
    messages: list[Message] = []
    lines = [prompt] if prompt is not None else (line.rstrip("\n") for line in sys.stdin)
    for text in lines:
        if not text.strip():
            continue
        messages.append(Message("user", (vision if not messages else []) + [TextPart(text)]))
        try:
            request = model.request(messages, args.mode, media, "chat")
        except SampleError as exc:
            raise KeyeUserError(f"{exc.kind}: {exc.reason}") from None
        stream = Stream(model.tokenizer, sys.stdout)
        [(reply, _)] = model.generate([request], on_token=stream)
        stream.finish()
        messages.append(Message("assistant", [TextPart(_history_reply(reply))]))
    return 0


class _OptionsFirst(argparse.ArgumentParser):
    """Options may come anywhere: they are moved before the words. (argparse fills a ``*`` positional at its
    first chance, right after SOURCE, so ``chat SOURCE --image a.png PROMPT`` would leave PROMPT over.)"""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        options, words = [], []
        while args:
            word = args.pop(0)
            action = self._option_string_actions.get(word.split("=", 1)[0]) if word.startswith("-") else None
            if word == "--":
                words += args
                break
            if action is None:
                words.append(word)
                continue
            options.append(word)
            if "=" not in word and action.nargs != 0 and args:
                options.append(args.pop(0))
        return super().parse_known_args(options + words, namespace)


def add_parser(commands) -> None:
    default, commands._parser_class = commands._parser_class, _OptionsFirst
    try:
        parser = commands.add_parser("chat", help="talk to a model: one answer to PROMPT, or a conversation on stdin")
    finally:
        commands._parser_class = default
    parser.add_argument("source", help="released-format folder, or a blueprint file (then STAGE follows)")
    parser.add_argument("words", nargs="*", metavar="[STAGE] [PROMPT]", help="the prompt (none: read turns from stdin)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="an image for the first turn")
    parser.add_argument("--video", action="append", default=[], metavar="PATH", help="a video for the first turn")
    parser.add_argument("--mode", default="auto", help="thinking mode: think, no_think, auto (default), agentic")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="tokens per answer at most (default 512)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--override", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="blueprint override (blueprint sources)")
    parser.set_defaults(func=cmd_chat)
