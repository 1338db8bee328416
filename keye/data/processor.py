"""The processor: one `Sample` (plus its media bytes) → model-ready tensors.

For a conversation: every image and video part is decoded and patchified within the token budgets
(`keye.data.vision`, `keye.data.video`, videos at the recomputed sampling fps), the chat template
expands each into its merged token count and produces labels on assistant tokens only, and the position
ids are computed for the sample on its own (so they stay valid when packed) by the language model's
position encoding: the processor is given the built ``model.language_model.position_encoding`` node
(`keye.data.pipeline.build_processor`), so its ``mrope_section``, ``tokens_per_second`` and
``spatial_merge_size`` (the pad tokens per image/video) are those the model trains with.
For an image-text pair (stage 0): the image patches and the caption's token ids. For a preference pair
(MPO): one sample whose chosen and rejected replies share the prompt and its vision (`keye.data.preference`).

Errors raise `SampleError` with the sample key and a ``kind`` (corrupt_image, unreadable_video,
over_budget, ...), so the loader can skip the sample, count it by kind and go on.
"""

from __future__ import annotations

import io
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from PIL import Image, UnidentifiedImageError

from keye.data.batch import IGNORE, TokenSample
from keye.data.chat import encode_conversation
from keye.data.modes import ModeStats
from keye.data.sample import ConversationSample, ImagePart, PairSample, PreferenceSample, Sample, TextPart, VideoPart
from keye.data.tokenizer import SpecialTokens
from keye.data.video import preprocess_video
from keye.data.vision import preprocess_image
from keye.model.composition import VisionInputs
from keye.model.protocols import BuildContext

#: The position encoding of a processor given none: Keye's (the ``qwen3`` default).
DEFAULT_POSITIONS = {"name": "mrope_time_aligned"}

TOKEN = 28 * 28  # pixels per merged LLM token (14-px patches, 2×2 merge)


class SampleError(ValueError):
    """A sample that cannot be used; ``kind`` names the failure for the bad-input counters."""

    def __init__(self, key: str, kind: str, reason: str) -> None:
        super().__init__(f"sample '{key}': {kind}: {reason}")
        self.key, self.kind, self.reason = key, kind, reason


@dataclass
class PairItem:
    """An image-text pair for the contrastive stage."""

    key: str
    images: VisionInputs  # one image
    caption_ids: torch.Tensor  # (L,) long, padded/truncated to the text encoder's length
    caption: str = ""  # the text itself, for a text tower with its own tokenizer (SigLIP's: siglip_text.tokenize)


@dataclass
class ProcessorSettings:
    image_min_tokens: int = 4
    image_max_tokens: int = 16384
    video_fps: float = 2.0
    video_min_frame_tokens: int = 128
    video_max_frame_tokens: int = 768
    video_max_tokens: int = 24576
    max_tokens: int | None = None  # a sample longer than this is over budget
    caption_length: int = 16


class Processor:
    def __init__(self, tokenizer: Any, settings: ProcessorSettings, video_decoder: Any = None, positions: Any = None,
                 root: str | Path | None = None) -> None:
        """``positions``: the language model's built position encoding (`keye.model.protocols.TokenPositions`);
        None builds `DEFAULT_POSITIONS` from the registry."""
        self.tokenizer = tokenizer
        self.settings = settings
        self.video_decoder = video_decoder
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self.positions = positions if positions is not None else BuildContext().build("position_encoding", DEFAULT_POSITIONS)
        self.merge = self.positions.spatial_merge_size ** 2  # ViT patches per LLM token
        self.root = Path(root) if root is not None else None
        self._tag_ids: dict[str, list[int]] = {}
        self.modes = ModeStats()  # conversations and loss tokens per thinking mode (keye.data.modes)

    # --- media ---------------------------------------------------------------------------------

    def _bytes(self, ref: Any, media: Mapping[str, bytes], key: str) -> bytes:
        """Media bytes from the source (by ``ref.key`` or ``ref.path``), else the file at ``ref.path``."""
        name = ref.key if ref.key is not None else ref.path
        if name in media:
            return media[name]
        if ref.key is not None:
            raise SampleError(key, "missing_media", f"no member '{ref.key}' beside the sample")
        path = Path(ref.path)
        if not path.is_absolute() and self.root is not None:
            path = self.root / path
        try:
            return path.read_bytes()
        except OSError as exc:
            raise SampleError(key, "missing_media", f"{path}: {exc.strerror}") from None

    def image(self, ref: Any, media: Mapping[str, bytes], key: str) -> VisionInputs:
        s = self.settings
        try:
            image = Image.open(io.BytesIO(self._bytes(ref, media, key)))
            image.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise SampleError(key, "corrupt_image", str(exc).splitlines()[0]) from None
        try:
            patches, grid = preprocess_image(image, s.image_min_tokens * TOKEN, s.image_max_tokens * TOKEN, name=key)
        except ValueError as exc:
            raise SampleError(key, "over_budget", str(exc)) from None
        return VisionInputs(patches, torch.tensor([grid], dtype=torch.long))

    @contextmanager
    def video_file(self, ref: Any, media: Mapping[str, bytes], key: str) -> Iterator[str]:
        """The video's bytes in a temporary file, for the decoder (decoders read files); a decoder's
        ``ValueError`` inside the block is the sample's ``unreadable_video``, naming the video, not the file."""
        if self.video_decoder is None:
            raise SampleError(key, "unreadable_video", "no video decoder configured")
        data = self._bytes(ref, media, key)
        handle, path = tempfile.mkstemp(suffix=".mp4")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            yield path
        except ValueError as exc:
            raise SampleError(key, "unreadable_video", str(exc).replace(path, ref.key or str(ref.path))) from None
        finally:
            os.unlink(path)

    def video(self, ref: Any, media: Mapping[str, bytes], key: str) -> tuple[VisionInputs, float]:
        s = self.settings
        with self.video_file(ref, media, key) as path:
            decoded = self.video_decoder.read(path, fps=s.video_fps, max_video_tokens=s.video_max_tokens,
                                              min_tokens_per_frame=s.video_min_frame_tokens)
        try:
            inputs = preprocess_video(
                decoded.frames, decoded.timestamps, decoded.video_fps, decoded.total_frames,
                min_pixels=s.video_min_frame_tokens * TOKEN, max_pixels=s.video_max_frame_tokens * TOKEN,
                max_video_tokens=s.video_max_tokens, name=key,
            )
        except ValueError as exc:
            raise SampleError(key, "over_budget", str(exc)) from None
        return VisionInputs(inputs.patches, torch.tensor([inputs.grid_thw], dtype=torch.long)), inputs.second_per_grid_ts

    # --- samples -------------------------------------------------------------------------------

    def _vision(self, messages: list, media: Mapping[str, bytes], key: str) -> _Vision:
        """Every image and video part of ``messages``, processed, in reading order."""
        vision = _Vision([], [], [], [])
        for message in messages:
            for part in message.content:
                if isinstance(part, ImagePart):
                    inputs = self.image(part.image, media, key)
                    vision.images.append(inputs)
                elif isinstance(part, VideoPart):
                    inputs, step = self.video(part.video, media, key)
                    vision.videos.append(inputs)
                    vision.seconds.append(step)
                else:
                    continue
                vision.counts.append(int(inputs.grid_thw.prod()) // self.merge)
        return vision

    def position_ids(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                     video_grid_thw: torch.Tensor | None = None, seconds: list[float] | None = None) -> torch.Tensor:
        """Position ids ``(3, L)`` of one sample ``(L,)`` on its own, from the language model's position encoding
        (grids in reading order; ``seconds``: per video, seconds per temporal grid step)."""
        return self.positions.position_ids(
            input_ids, image_token_id=self.special.image_pad, video_token_id=self.special.video_pad,
            image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, second_per_grid_ts=seconds or None,
        )

    def _positions(self, input_ids: torch.Tensor, vision: _Vision) -> torch.Tensor:
        image_grids = torch.cat([i.grid_thw for i in vision.images]) if vision.images else None
        video_grids = torch.cat([v.grid_thw for v in vision.videos]) if vision.videos else None
        return self.position_ids(input_ids, image_grids, video_grids, vision.seconds)  # (3, L)

    def _check_length(self, key: str, length: int) -> None:
        if self.settings.max_tokens is not None and length > self.settings.max_tokens:
            raise SampleError(key, "over_budget", f"{length} tokens > max_tokens {self.settings.max_tokens}")

    def conversation(self, sample: ConversationSample, media: Mapping[str, bytes]) -> TokenSample:
        """A conversation's tokens, labels on assistant text only; one without an assistant turn is bad
        input (``no_assistant_turn``): it has nothing to train on and no answer to score."""
        if not any(message.role == "assistant" for message in sample.messages):
            raise SampleError(sample.key, "no_assistant_turn", "the conversation has no assistant turn")
        vision = self._vision(sample.messages, media, sample.key)
        images, videos = vision.images, vision.videos
        encoded = encode_conversation(sample.messages, self.tokenizer, vision.counts, sample.thinking_mode)
        input_ids = torch.tensor(encoded.input_ids, dtype=torch.long)  # (L,)
        self._check_length(sample.key, len(input_ids))
        targets = torch.tensor(encoded.labels, dtype=torch.long)
        labels = torch.cat([targets[1:], torch.tensor([IGNORE])])  # predict token t+1 at position t
        positions = self._positions(input_ids, vision)  # (3, L)
        self.modes.record(sample.key, sample.thinking_mode, encoded.num_loss_tokens)
        return TokenSample(
            key=sample.key,
            input_ids=input_ids,
            labels=labels,
            position_ids=positions,
            images=_join(images),
            videos=_join(videos),
            answer_mask=self._final_answer(_last_reply(labels), labels),
        )

    def _final_answer(self, reply: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The part of the last reply the answer is read from (`keye.data.chat.parse_answer`): the tokens after
        its last ``<answer>`` tag, else after its last ``</analysis>``; so held-out answer accuracy in a
        thinking mode scores the answer given the thought, not the whole thought. The tag is found as its own
        token sequence; where the tokenizer merged it with a neighbour, the whole reply is kept (as before)."""
        positions = torch.nonzero(reply).flatten()
        ids = labels[positions].tolist()
        for tag in ("<answer>", "</analysis>"):
            tag_ids = self._tag_ids.setdefault(tag, self.tokenizer.encode(tag, add_special_tokens=False))
            starts = [i for i in range(len(ids) - len(tag_ids), -1, -1) if ids[i : i + len(tag_ids)] == tag_ids]
            if starts:
                mask = reply.clone()
                mask[positions[: starts[0] + len(tag_ids)]] = False
                return mask
        return reply

    def preference(self, sample: PreferenceSample, media: Mapping[str, bytes]) -> TokenSample:
        """A preference pair as one sample whose chosen and rejected replies share the prompt (and its
        vision) in one forward: `keye.data.preference`. An empty reply, identical replies, or media in a
        reply are bad input (skipped and counted by kind)."""
        from keye.data.preference import shared_prompt_sample

        key = sample.key
        for name, reply in (("chosen", sample.chosen), ("rejected", sample.rejected)):
            if any(not isinstance(part, TextPart) for part in reply.content):
                raise SampleError(key, "invalid_sample", f"the {name} reply has images or videos; replies are text")
            if not reply.text.strip():
                raise SampleError(key, "empty_reply", f"the {name} reply is empty")
        if sample.chosen.text.strip() == sample.rejected.text.strip():
            raise SampleError(key, "identical_replies", "the chosen and rejected replies are the same text")
        vision = self._vision(sample.prompt, media, key)
        prompt = encode_conversation(sample.prompt, self.tokenizer, vision.counts, sample.thinking_mode,
                                     add_generation_prompt=True)
        branches = []
        for reply in (sample.chosen, sample.rejected):
            encoded = encode_conversation([*sample.prompt, reply], self.tokenizer, vision.counts, sample.thinking_mode)
            ids = torch.tensor(encoded.input_ids, dtype=torch.long)
            branches.append((ids, torch.tensor(encoded.labels, dtype=torch.long), self._positions(ids, vision)))
        try:
            item = shared_prompt_sample(key, len(prompt.input_ids), *branches[0], *branches[1],
                                        images=_join(vision.images), videos=_join(vision.videos))
        except ValueError as exc:
            raise SampleError(key, "invalid_sample", str(exc)) from None
        self._check_length(key, len(item))
        return item

    def pair(self, sample: PairSample, media: Mapping[str, bytes]) -> PairItem:
        image = self.image(sample.image, media, sample.key)
        ids = self.tokenizer.encode(sample.caption, add_special_tokens=False)[: self.settings.caption_length - 1]
        ids = ids + [self.special.eos] + [self.special.pad] * (self.settings.caption_length - 1 - len(ids))
        return PairItem(sample.key, image, torch.tensor(ids, dtype=torch.long), sample.caption)

    def __call__(self, sample: Sample, media: Mapping[str, bytes] | None = None, *, pairs: bool = False,
                 preference: bool = False) -> TokenSample | PairItem:
        """``pairs``: image-text pairs for a contrastive stage; otherwise pairs become captioning conversations.
        ``preference``: for a preference stage, which takes preference pairs only; elsewhere they are
        unsupported input, so a next-token stage never trains on a rejected reply."""
        media = media or {}
        if preference:
            if isinstance(sample, PreferenceSample):
                return self.preference(sample, media)
            raise SampleError(sample.key, "unsupported", f"a preference stage takes preference samples, not '{sample.kind}'")
        if isinstance(sample, PairSample):
            return self.pair(sample, media) if pairs else self.conversation(caption_conversation(sample), media)
        if isinstance(sample, ConversationSample):
            return self.conversation(sample, media)
        raise SampleError(sample.key, "unsupported", f"the processor has no path for '{sample.kind}' samples yet")


CAPTION_PROMPT = "Describe the image."


def caption_conversation(sample: PairSample) -> ConversationSample:
    """An image-text pair as a captioning turn, so next-token stages (stage 1 alignment) train on pairs."""
    return ConversationSample.from_dict({
        "kind": "conversation",
        "key": sample.key,
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": sample.image.to_dict()},
                                         {"type": "text", "text": CAPTION_PROMPT}]},
            {"role": "assistant", "content": sample.caption},
        ],
    })


@dataclass
class _Vision:
    """The processed media of one sample, in reading order."""

    images: list[VisionInputs]
    videos: list[VisionInputs]
    seconds: list[float]  # per video: seconds per temporal grid step (time-aligned M-RoPE)
    counts: list[int]  # per image/video part: LLM tokens after the 2×2 merge


def _join(items: list[VisionInputs]) -> VisionInputs | None:
    if not items:
        return None
    return VisionInputs(torch.cat([i.patches for i in items]), torch.cat([i.grid_thw for i in items]))


def _last_reply(labels: torch.Tensor) -> torch.Tensor:
    """Label positions of the last assistant reply: the last run of trained labels."""
    trained = labels != IGNORE
    mask = torch.zeros_like(trained)
    positions = torch.nonzero(trained).flatten()
    if len(positions) == 0:
        return mask
    end = int(positions[-1])
    start = end
    while start > 0 and bool(trained[start - 1]):
        start -= 1
    mask[start : end + 1] = True
    return mask
