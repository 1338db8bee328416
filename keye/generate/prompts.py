"""A generation request from a conversation, rendered by the same code as training data.

A rollout in a thinking mode must look exactly like a training sample in that mode: the same system prompt,
the same ``/think`` / ``/no_think`` / ``/agentic_think`` suffix on the last user text, the same vision
blocks, the same piecewise tokenisation (`keye.data.chat.encode_conversation`), the same image/video
preprocessing and token budgets (`keye.data.processor.Processor`) and the same M-RoPE ids as the data
pipeline gives a sample on its own. `conversation_request` is that path with the open
``<|im_start|>assistant\\n`` header added, so the prompt ids are a prefix of the training ids of the same
conversation once the reply is appended.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from keye.data.chat import encode_conversation
from keye.data.processor import Processor
from keye.data.sample import ImagePart, Message, VideoPart
from keye.generate.contract import GenerationRequest
from keye.model.composition import VisionInputs


def conversation_request(
    messages: Sequence[Message],
    processor: Processor,
    thinking_mode: str | None = None,
    *,
    n: int = 1,
    media: Mapping[str, bytes] | None = None,
    key: str = "prompt",
) -> GenerationRequest:
    """The request that asks the model for the next assistant turn of ``messages``.

    ``processor`` (with the run's tokenizer and token budgets) reads and preprocesses each image/video part
    (``media``: bytes by member key or path, else the files at the parts' paths). ``thinking_mode``: one of
    ``think``, ``no_think``, ``auto``, ``agentic`` or None (`keye.data.chat.MODE_SUFFIXES`). Bad media raise
    the processor's one-line `SampleError` naming ``key``.
    """
    media = media or {}
    images: list[VisionInputs] = []
    videos: list[VisionInputs] = []
    seconds: list[float] = []
    counts: list[int] = []
    for message in messages:
        for part in message.content:
            if isinstance(part, ImagePart):
                inputs = processor.image(part.image, media, key)
                images.append(inputs)
            elif isinstance(part, VideoPart):
                inputs, step = processor.video(part.video, media, key)
                videos.append(inputs)
                seconds.append(step)
            else:
                continue
            counts.append(int(inputs.grid_thw.prod()) // processor.merge)
    encoded = encode_conversation(messages, processor.tokenizer, counts, thinking_mode, add_generation_prompt=True)
    ids = torch.tensor(encoded.input_ids, dtype=torch.long)  # (L,)
    image_pack, video_pack = _pack(images), _pack(videos)
    positions = processor.position_ids(  # the language model's position encoding, as for training samples
        ids, image_pack.grid_thw if image_pack else None, video_pack.grid_thw if video_pack else None, seconds,
    )  # (3, L)
    return GenerationRequest(ids, images=image_pack, videos=video_pack, video_seconds=seconds or None,
                             position_ids=positions, thinking_mode=thinking_mode, n=n)


def _pack(parts: list[VisionInputs]) -> VisionInputs | None:
    if not parts:
        return None
    return VisionInputs(torch.cat([p.patches for p in parts]), torch.cat([p.grid_thw for p in parts]))
