"""FLOPs balancing across data-parallel ranks from sample sizes known before decoding (spec §3.2, infra).

Why: a data-parallel step waits for its slowest rank, and multimodal samples differ in cost by orders of
magnitude (a 24K-token video against a 200-token caption; attention grows with the square of a sample's
length). The paper balances globally: sort the samples by estimated FLOPs, heaviest first, each to the
least-loaded rank. Doing that by decoding every sample on every rank would multiply the decode work by the
data-parallel size, so the exchange here carries sizes, not pixels:

1. each rank reads its own share of a *round* (``data.pack_buffer`` samples) and `describe`\\ s each one from
   what is known without decoding: an image's size from its header (PIL reads no pixels until asked), a
   video's frame count, rate and size from its container (the ``video_decoder``'s ``probe``), the text's
   tokens from the chat template with those vision token counts;
2. the ranks exchange these descriptions (``all_gather_object`` of small tuples) and every rank computes the
   same `plan_round`: the round's samples dealt by the greedy rule, heaviest first to the least-loaded rank
   (FLOPs from `keye.data.packing.estimate_flops`, attention's quadratic term included), each into the
   first of that rank's packed sequences of ``max_tokens`` with room, every rank with as many sequences;
3. each rank sends the *encoded* bytes of the samples it read to the rank that owns them (one
   ``scatter_object_list`` per rank) and decodes only its own.

Every rank gets the same number of packs in a round, so the ranks stay in step: each asks for the next round
at the same micro-batch and the collectives pair up. A pack whose samples all fail to decode becomes a
micro-batch of padding (no loss tokens) rather than a missing one, for the same reason. The unit balanced is
the round: set ``pack_buffer`` so that a round fills about one optimiser step's micro-batches (each rank's
packs are listed heaviest first, so the ranks' i-th micro-batches also cost about the same). The plan depends
only on the descriptions, which depend only on each rank's mixer state: resuming re-reads the round from the
saved mixer state (as the unbalanced stream does) and gets the same plan.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from PIL import Image

from keye.data.chat import encode_conversation
from keye.data.packing import PackItem, pack_samples
from keye.data.processor import TOKEN, Processor, SampleError, caption_conversation
from keye.data.sample import ConversationSample, ImagePart, PairSample, VideoPart
from keye.data.sources import LoadedSample
from keye.data.video import frame_size, smart_nframes
from keye.data.vision import IMAGE_FACTOR, PATCH_SIZE, smart_resize

#: One sample of a round, as a pair: the data-parallel rank that read it, its index in that rank's round.
Origin = tuple[int, int]


# --- sizes before decoding ----------------------------------------------------------------------------


def describe(processor: Processor, loaded: LoadedSample) -> PackItem:
    """The sizes the processor will produce for ``loaded``, without decoding a pixel.

    Raises `SampleError` for what can be judged here (an unreadable image header or video container, a
    sample over ``max_tokens``, no assistant turn); everything else is found when the owner decodes.
    Conversations and image-text pairs (as captioning conversations) only: those are what next-token
    stages pack.
    """
    sample = loaded.sample
    if isinstance(sample, PairSample):
        sample = caption_conversation(sample)
    if not isinstance(sample, ConversationSample):
        raise SampleError(sample.key, "unsupported", f"FLOPs balancing packs conversations, not '{sample.kind}'")
    if not any(message.role == "assistant" for message in sample.messages):
        raise SampleError(sample.key, "no_assistant_turn", "the conversation has no assistant turn")
    counts, patches = [], 0
    for message in sample.messages:
        for part in message.content:
            if isinstance(part, ImagePart):
                grid = _image_grid(processor, part.image, loaded.media, sample.key)
            elif isinstance(part, VideoPart):
                grid = _video_grid(processor, part.video, loaded.media, sample.key)
            else:
                continue
            cells = grid[0] * grid[1] * grid[2]
            patches += cells
            counts.append(cells // processor.merge)
    encoded = encode_conversation(sample.messages, processor.tokenizer, counts, sample.thinking_mode)
    length = len(encoded.input_ids)
    processor._check_length(sample.key, length)
    vision = sum(counts)
    return PackItem(sample.key, length - vision, patches, vision)


def _image_grid(processor: Processor, ref: Any, media: Any, key: str) -> tuple[int, int, int]:
    """``(1, h/14, w/14)`` from the image header, as `keye.data.vision.preprocess_image` resizes it."""
    s = processor.settings
    try:
        with Image.open(io.BytesIO(processor._bytes(ref, media, key))) as image:  # reads the header only
            width, height = image.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise SampleError(key, "corrupt_image", str(exc).splitlines()[0]) from None
    try:
        h, w = smart_resize(height, width, IMAGE_FACTOR, s.image_min_tokens * TOKEN, s.image_max_tokens * TOKEN)
    except ValueError as exc:
        raise SampleError(key, "over_budget", f"{key}: {exc}") from None
    return 1, h // PATCH_SIZE, w // PATCH_SIZE


def _video_grid(processor: Processor, ref: Any, media: Any, key: str) -> tuple[int, int, int]:
    """``(frames, h/14, w/14)`` from the container's metadata, as the processor samples and resizes it."""
    s = processor.settings
    with processor.video_file(ref, media, key) as path:
        info = processor.video_decoder.probe(path)
        frames = smart_nframes(info.total_frames, info.video_fps, s.video_fps, max_video_tokens=s.video_max_tokens,
                               min_tokens_per_frame=s.video_min_frame_tokens)
    try:
        h, w = frame_size(info.height, info.width, frames, min_pixels=s.video_min_frame_tokens * TOKEN,
                          max_pixels=s.video_max_frame_tokens * TOKEN, max_video_tokens=s.video_max_tokens)
    except ValueError as exc:
        raise SampleError(key, "over_budget", f"{key}: {exc}") from None
    return frames, h // PATCH_SIZE, w // PATCH_SIZE


# --- the plan (the same on every rank) -----------------------------------------------------------------


@dataclass
class RoundPlan:
    """Per rank, its packs, each a list of `Origin`; ``loads`` the estimated FLOPs each rank got."""

    ranks: list[list[list[Origin]]]
    loads: list[float]


def plan_round(sizes: Sequence[Sequence[PackItem]], max_tokens: int, max_vision_patches: int | None,
               cost: Callable[[PackItem], float]) -> RoundPlan:
    """Deal every rank's described samples (``sizes[r]``: what rank r read) to the ranks, packed.

    The paper's rule on samples: heaviest estimated FLOPs first, each to the least-loaded rank, into the first
    of that rank's packs with room (tokens and vision patches); a rank whose packs are full is passed over for
    the next least-loaded one. Every rank has the same number of packs, the fewest for which everything fits
    (starting from what first-fit-decreasing packing of the whole round needs, spread over the ranks), so the
    ranks stay in step. A pack left empty takes the cheapest sample of its rank's fullest pack (the rank's load
    does not change); only a rank with fewer samples than packs keeps an empty one (a padding micro-batch).
    Each rank's packs are listed heaviest first, so the ranks' i-th micro-batches cost about the same.
    Deterministic in its input, so every rank computes the same plan.
    """
    dp_size = len(sizes)
    origins = [(rank, index) for rank, items in enumerate(sizes) for index in range(len(items))]
    items = [item for rank_items in sizes for item in rank_items]
    if not items:
        return RoundPlan([[] for _ in range(dp_size)], [0.0] * dp_size)
    costs = [cost(item) for item in items]
    per_rank = -(-len(pack_samples(items, max_tokens, max_vision_patches).packs) // dp_size)
    while (dealt := _deal(items, costs, dp_size, per_rank, max_tokens, max_vision_patches)) is None:
        per_rank += 1  # ends: with one pack per sample everything fits (`describe` checked each one)
    ranks = []
    for packs in dealt:
        _fill_empty(packs, costs)
        packs.sort(key=lambda pack: (-sum(costs[i] for i in pack), pack))
        ranks.append([[origins[i] for i in sorted(pack)] for pack in packs])
    loads = [sum(costs[i] for pack in packs for i in pack) for packs in dealt]
    return RoundPlan(ranks, loads)


def _deal(items: Sequence[PackItem], costs: list[float], dp_size: int, per_rank: int, max_tokens: int,
          max_vision_patches: int | None) -> list[list[list[int]]] | None:
    """Samples to ``per_rank`` packs on each rank by the greedy rule; None when one does not fit anywhere."""
    patch_cap = float("inf") if max_vision_patches is None else max_vision_patches
    packs = [[[] for _ in range(per_rank)] for _ in range(dp_size)]
    tokens = [[0] * per_rank for _ in range(dp_size)]
    patches = [[0] * per_rank for _ in range(dp_size)]
    loads = [0.0] * dp_size
    for i in sorted(range(len(items)), key=lambda i: (-costs[i], i)):
        need, need_patches = items[i].num_tokens, items[i].num_vision_patches
        for rank in sorted(range(dp_size), key=lambda r: (loads[r], r)):
            room = [b for b in range(per_rank)
                    if tokens[rank][b] + need <= max_tokens and patches[rank][b] + need_patches <= patch_cap]
            if room:
                b = room[0]
                packs[rank][b].append(i)
                tokens[rank][b] += need
                patches[rank][b] += need_patches
                loads[rank] += costs[i]
                break
        else:
            return None
    return packs


def _fill_empty(packs: list[list[int]], costs: list[float]) -> None:
    """Give each empty pack the cheapest sample of the rank's pack with the most samples (when it has two)."""
    for empty in [pack for pack in packs if not pack]:
        fullest = max(packs, key=len)
        if len(fullest) < 2:
            return
        cheapest = min(fullest, key=lambda i: (costs[i], i))
        fullest.remove(cheapest)
        empty.append(cheapest)


# --- the exchange ---------------------------------------------------------------------------------------


def data_parallel_group() -> Any:
    """The group of this rank's data-parallel peers for object collectives: Megatron's gloo data-parallel group
    when Megatron is set up (object collectives on NCCL would stage pickles through the GPU), else its plain one,
    else None (the default group: every process is a data-parallel rank, as in tests)."""
    from megatron.core import parallel_state as mpu

    if not mpu.model_parallel_is_initialized():
        return None
    try:
        return mpu.get_data_parallel_group_gloo()
    except (AssertionError, RuntimeError):  # built without gloo groups: the backend is gloo already on CPU
        return mpu.get_data_parallel_group()


class RoundExchange:
    """Runs one round's collectives for a data-parallel rank: sizes out, plan computed, bytes to their owners."""

    def __init__(self, dp_rank: int, dp_size: int, max_tokens: int, max_vision_patches: int | None,
                 cost: Callable[[PackItem], float], group: Any = None) -> None:
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.max_tokens, self.max_vision_patches, self.cost = max_tokens, max_vision_patches, cost
        self.group = group

    def __call__(self, read: list[LoadedSample], sizes: list[PackItem], exhausted: bool
                 ) -> tuple[list[list[tuple[LoadedSample, PackItem]]], bool]:
        """This rank's packs of the round (samples with their descriptions), and whether every rank's data ended."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.dp_size
        dist.all_gather_object(gathered, ([_plain(item) for item in sizes], exhausted), group=self.group)
        all_sizes = [[PackItem(*fields) for fields in rank_sizes] for rank_sizes, _ in gathered]
        plan = plan_round(all_sizes, self.max_tokens, self.max_vision_patches, self.cost)
        outgoing: list[list[tuple[int, LoadedSample]]] = [[] for _ in range(self.dp_size)]
        for owner, packs in enumerate(plan.ranks):
            if owner != self.dp_rank:
                outgoing[owner] = [(index, read[index]) for pack in packs for reader, index in pack
                                   if reader == self.dp_rank]
        received: dict[Origin, LoadedSample] = {(self.dp_rank, i): loaded for i, loaded in enumerate(read)}
        for source in range(self.dp_size):
            box: list[Any] = [None]
            src = source if self.group is None else dist.get_global_rank(self.group, source)
            dist.scatter_object_list(box, outgoing if source == self.dp_rank else None, src=src, group=self.group)
            if source != self.dp_rank:
                received.update(((source, index), loaded) for index, loaded in box[0])
        mine = [[(received[origin], all_sizes[origin[0]][origin[1]]) for origin in pack]
                for pack in plan.ranks[self.dp_rank]]
        return mine, all(done for _, done in gathered)


def _plain(item: PackItem) -> tuple[str, int, int, int]:
    return item.key, item.num_text_tokens, item.num_vision_patches, item.vision_tokens
