"""From a stage's data section to packed micro-batches: source → mixer → processor → packer.

``micro_batches(ctx, split="train")`` is what a stage iterates. Training mixes the stage's sources with
its mixer (endlessly: sources restart); evaluation reads the held-out sources in order, once. Each
data-parallel rank reads its own share of every source; tensor- and pipeline-parallel peers read the
same share, so they build identical micro-batches (every pipeline stage needs the positions and masks).
Processed samples are gathered ``pack_buffer`` at a time and packed first-fit-decreasing into
sequences of ``max_tokens``; a sample the processor rejects is skipped and counted by kind, and the run
stops only when the bad share passes ``max_bad_fraction``. A sample longer than ``max_tokens`` is skipped and
counted as ``over_budget``, which is reported (``stats()["over_budget"]``) but never counts toward that share
(``data.over_budget: error`` stops the run instead, naming it).

With ``data.balance: flops`` (next-token training streams over more than one data-parallel rank) the ranks
read their own shares as ever, but pack and deal each round's samples together by estimated FLOPs, exchanging
sizes rather than decoded data, and each decodes only the samples it trains on: `keye.data.balance`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque
from typing import Any, Callable, Collection, Iterable, Iterator

from omegaconf import OmegaConf

from keye.config import build_component_config
from keye.data.balance import RoundExchange, data_parallel_group, describe
from keye.data.batch import MicroBatch, collate_pack
from keye.data.packing import KEYE_8B_LLM, KEYE_VIT, PackItem, flops_cost, pack_samples
from keye.data.processor import PairItem, Processor, ProcessorSettings, SampleError
from keye.data.sources import BAD_KINDS, BadInputCounter, LoadedSample
from keye.errors import KeyeUserError

SYNTHETIC_TOKENIZER = "synthetic"
BALANCE_MODES = ("shard", "flops")


def _merged_counts(counters: list[BadInputCounter]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for counter in counters:
        for kind, count in counter.counts.items():
            merged[kind] = merged.get(kind, 0) + count
    return merged


def _patches(item: Any) -> int:
    return sum(int(v.patches.shape[0]) for v in (item.images, item.videos) if v is not None)


def _vision_tokens(item: Any, merge: int) -> int:
    return sum(int(v.grid_thw.prod(dim=1).sum()) // merge for v in (item.images, item.videos) if v is not None)


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: str, vocab_size: int = 1024):
    """A Hugging Face tokenizer directory, or the synthetic world's tiny BPE (deterministic, built in ~1 s)."""
    if spec == SYNTHETIC_TOKENIZER:
        from keye.data.tokenizer import build_tiny_tokenizer

        return build_tiny_tokenizer(synthetic_corpus(), vocab_size=vocab_size)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise KeyeUserError(f"model.tokenizer: cannot load a tokenizer from '{spec}': {str(exc).splitlines()[0]}") from None


def synthetic_corpus(num_samples: int = 400) -> list[str]:
    """Every text of the first samples of the synthetic world (train split, seed 0): the BPE's corpus."""
    from keye.data.sample import TextPart
    from keye.data.synthetic import generate_many

    texts = []
    for loaded in generate_many(num_samples):
        sample = loaded.sample
        texts.extend(getattr(sample, "caption", "") and [sample.caption])
        for attr in ("messages", "prompt"):
            for message in getattr(sample, attr, None) or []:
                texts.extend(part.text for part in message.content if isinstance(part, TextPart))
        for attr in ("chosen", "rejected"):
            message = getattr(sample, attr, None)
            if message is not None:
                texts.extend(part.text for part in message.content if isinstance(part, TextPart))
        if getattr(sample, "reference_answer", None):
            texts.append(sample.reference_answer)
    return texts


def vocab_size(model_cfg: Any) -> int:
    node = model_cfg.language_model
    return int(node.vocab_size) if node is not None and "vocab_size" in node else 1024


def build_processor(ctx: Any) -> Processor:
    bp, data = ctx.blueprint, ctx.stage.data
    tokenizer = load_tokenizer(bp.model.tokenizer, vocab_size(bp.model))
    cls, config = build_component_config("video_decoder", data.video_decoder, ctx.registry)
    settings = ProcessorSettings(
        image_min_tokens=data.image_min_tokens,
        image_max_tokens=data.image_max_tokens,
        video_fps=data.video_fps,
        video_min_frame_tokens=data.video_frame_tokens[0],
        video_max_frame_tokens=data.video_frame_tokens[1],
        video_max_tokens=data.video_max_tokens,
        max_tokens=data.max_tokens,
    )
    return Processor(tokenizer, settings, cls(config), language_positions(bp.model, ctx.registry))


def language_positions(model_cfg: Any, registry: Any) -> Any:
    """The language model's position encoding, built without weights (position ids of samples); None when the
    blueprint has no language model or it selects none (the processor then uses its default)."""
    from keye.model.protocols import BuildContext

    node = model_cfg.language_model
    if node is None or node.get("position_encoding") is None:
        return None
    owner = {"head_dim": node["head_dim"]} if "head_dim" in node else {}  # as the model builds it
    return BuildContext(registry=registry).build("position_encoding", node["position_encoding"], **owner)


def build_sources(ctx: Any, group: str, read_all: bool = False, *, check_media: bool = True) -> dict[str, Any]:
    """The stage's sources; each reads this data-parallel rank's share, or everything with ``read_all``.
    ``check_media=False`` turns the sources' own decode check off (FLOPs balancing: the rank that owns a sample
    decodes it, and counts it when it is broken; the rank that read it only looks at headers)."""
    sources = {}
    for label, node in ctx.stage.data[group].items():
        cls, config = build_component_config("data_source", node, ctx.registry)
        if not check_media:
            config.check_media = False
        sources[label] = cls(config, None if read_all else ctx.parallel)
    return sources


class MicroBatchStream:
    """An iterator of `MicroBatch` (or lists of `PairItem` for contrastive stages) with running stats."""

    def __init__(self, ctx: Any, split: str = "train", pairs: bool = False,
                 pair_batch: int = 32, caption_length: int = 16, *, preference: bool = False, once: bool = False,
                 view: Callable[[Iterator[Any]], Iterator[Any]] | None = None) -> None:
        data = ctx.stage.data
        self.view = view  # a transform of the samples read in order (held-out), e.g. `swapped_media`
        group = "sources" if split == "train" else "heldout"
        parallel = ctx.parallel
        self.dp_rank, self.dp_size = (parallel.dp_rank, parallel.dp_size) if parallel is not None else (0, 1)
        if data.balance not in BALANCE_MODES:
            raise KeyeUserError(f"stages.{ctx.index}.data.balance: '{data.balance}' is not one of {', '.join(BALANCE_MODES)}")
        # FLOPs balancing: next-token training streams (preference pairs and contrastive batches read their shard)
        self.balance = (data.balance == "flops" and self.dp_size > 1 and split == "train" and not pairs
                        and not preference and not once)
        self.over_budget = data.get("over_budget", "skip")
        self.sources = build_sources(ctx, group, check_media=not self.balance)
        self.processor = build_processor(ctx)
        self.processor.settings.caption_length = caption_length
        self.max_tokens = data.max_tokens
        self.max_vision_patches = data.max_vision_patches
        self.pack_buffer = pair_batch if pairs else data.pack_buffer
        self.cost = flops_cost(KEYE_8B_LLM, KEYE_VIT)  # relative costs: the real widths scale every pack alike
        self.exchange = (RoundExchange(self.dp_rank, self.dp_size, self.max_tokens, self.max_vision_patches,
                                       self.cost, data_parallel_group()) if self.balance else None)
        self.pairs = pairs
        self.preference = preference  # preference pairs as shared-prompt samples (keye.data.preference)
        self.produced = 0
        self.bad = BadInputCounter(f"stage {ctx.stage.name} processor", data.max_bad_fraction)
        self.real_tokens = 0
        self.capacity = 0
        self._ready: deque = deque()
        self.mixer = None
        # once: the training sources read in order, one pass (e.g. to precompute reference log-probs)
        self._samples = self._mixed(ctx) if split == "train" and not once else self._in_order()
        self._exhausted = False
        self._fill_state: dict | None = None  # the mixer's state when the current buffer started
        self._taken_from_fill = 0

    def _mixed(self, ctx: Any) -> Iterator[Any]:
        if not self.sources:
            raise KeyeUserError(f"stages.{ctx.index}.data.sources: the stage '{ctx.stage.name}' has no data sources")
        node = OmegaConf.to_container(ctx.stage.data.mixer)
        cls, config = build_component_config("data_mixer", node, ctx.registry)
        if not config.weights:
            config.weights = {label: 1.0 for label in self.sources}
        mixer = cls(config, self.sources)
        self.mixer = mixer
        return iter(mixer)

    def _in_order(self) -> Iterator[Any]:
        samples = (loaded for source in self.sources.values() for loaded in source)
        yield from (self.view(samples) if self.view is not None else samples)

    def _skip(self, exc: SampleError) -> None:
        """Count a rejected sample by kind; an over-budget one stops the run with ``over_budget: error``."""
        if exc.kind == "over_budget" and self.over_budget == "error":
            raise KeyeUserError(f"sample '{exc.key}' is over budget ({exc.reason}) and data.over_budget is error")
        self.bad.skip(exc.kind if exc.kind in BAD_KINDS else "invalid_sample", exc.key, exc.reason)

    def _process(self, loaded: LoadedSample) -> Any | None:
        try:
            item = self.processor(loaded.sample, loaded.media, pairs=self.pairs, preference=self.preference)
        except SampleError as exc:
            self._skip(exc)
            return None
        self.bad.ok()
        return item

    def _next_processed(self) -> Any | None:
        for loaded in self._samples:
            item = self._process(loaded)
            if item is not None:
                return item
        return None

    def _fill(self) -> None:
        """Process up to ``pack_buffer`` samples and turn them into ready micro-batches."""
        self._fill_state = self.mixer.state_dict() if self.mixer is not None else None
        self._taken_from_fill = 0
        if self.balance:
            return self._fill_balanced()
        items = []
        target = self.pack_buffer
        while len(items) < target:
            item = self._next_processed()
            if item is None:
                self._exhausted = True
                break
            items.append(item)
        if not items:
            return
        if self.pairs:
            self._ready.append(items)
            return
        packed = [PackItem(item.key, len(item) - _vision_tokens(item, self.processor.merge), _patches(item),
                           _vision_tokens(item, self.processor.merge)) for item in items]
        result = pack_samples(packed, self.max_tokens, self.max_vision_patches, cost=self.cost)
        for rejected in result.rejected:  # e.g. one sample with more patches than the cap: skipped, counted
            self.bad.good -= 1  # it was counted good when processed
            self._skip(SampleError(rejected.key, "over_budget", rejected.reason))
        for pack in result.packs:
            self._ready_pack([items[i] for i in pack.indices], pack.flops)

    def _ready_pack(self, samples: list[Any], flops: float) -> None:
        self.real_tokens += sum(len(s) for s in samples)
        self.capacity += self.max_tokens
        batch = collate_pack(samples, self.max_tokens, pad_id=self.processor.special.pad)
        batch.flops = flops
        self._ready.append(batch)

    def _fill_balanced(self) -> None:
        """One round of `keye.data.balance`: describe this rank's share, exchange, decode this rank's packs."""
        read, sizes = [], []
        exhausted = False
        while len(read) < self.pack_buffer:
            loaded = next(self._samples, None)
            if loaded is None:
                exhausted = True
                break
            try:
                sizes.append(describe(self.processor, loaded))
            except SampleError as exc:
                self._skip(exc)
                continue
            read.append(loaded)
        packs, self._exhausted = self.exchange(read, sizes, exhausted)
        for pack in packs:
            samples, flops = [], 0.0
            for loaded, size in pack:
                item = self._process(loaded)
                if item is not None and len(item) != size.num_tokens:  # describe and the processor disagree
                    self.bad.good -= 1
                    self._skip(SampleError(size.key, "invalid_sample", f"decoded to {len(item)} tokens, "
                                                                       f"described as {size.num_tokens}"))
                elif item is not None:
                    samples.append(item)
                    flops += self.cost(size)
            self._ready_pack(samples, flops)  # all failed: a padding micro-batch keeps the ranks in step

    def __iter__(self) -> "MicroBatchStream":
        return self

    def __next__(self) -> MicroBatch | list[PairItem]:
        while not self._ready:
            if self._exhausted:
                raise StopIteration
            self._fill()
        self.produced += 1
        self._taken_from_fill += 1
        return self._ready.popleft()

    # --- exact resume ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: the mixer state at the start of the current buffer and how much of it was used.

        Restoring re-reads that buffer (the same samples, processed and packed the same way) and skips the
        micro-batches already used, so a resumed run sees exactly the micro-batches it would have seen.
        """
        if self.mixer is None:
            raise RuntimeError("only a training stream (with a mixer) can be resumed")
        return {
            "fill_state": self._fill_state,
            "taken_from_fill": self._taken_from_fill,
            "produced": self.produced,
            "stats": {"real_tokens": self.real_tokens, "capacity": self.capacity,
                      "good": self.bad.good, "bad": dict(self.bad.counts)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["fill_state"] is not None:
            self.mixer.load_state_dict(state["fill_state"])
            self._ready.clear()
            self._fill()
            for _ in range(state["taken_from_fill"]):
                self._ready.popleft()
            self._taken_from_fill = state["taken_from_fill"]
        self.produced = state["produced"]
        stats = state["stats"]
        self.real_tokens, self.capacity = stats["real_tokens"], stats["capacity"]
        self.bad.good, self.bad.counts = stats["good"], dict(stats["bad"])

    def take(self, count: int) -> list[Any]:
        """Up to ``count`` items (fewer at the end of a finite split)."""
        out = []
        for item in self:
            out.append(item)
            if len(out) == count:
                break
        return out

    def stats(self) -> dict[str, Any]:
        stats = {
            "packing_efficiency": self.real_tokens / self.capacity if self.capacity else 0.0,
            "skipped": self.bad.bad + sum(s.bad_inputs.bad for s in self.sources.values()),
            "skipped_by_kind": _merged_counts([self.bad, *(s.bad_inputs for s in self.sources.values())]),
        }
        stats["over_budget"] = stats["skipped_by_kind"].get("over_budget", 0)  # never counts toward max_bad_fraction
        if self.mixer is not None and hasattr(self.mixer, "realised_ratios"):
            stats["realised_ratios"] = self.mixer.realised_ratios()
        return stats


def micro_batches(ctx: Any, split: str = "train", pairs: bool = False,
                  pair_batch: int = 32, caption_length: int = 16, *, preference: bool = False,
                  once: bool = False, view: Callable[[Iterator[Any]], Iterator[Any]] | None = None) -> MicroBatchStream:
    """Packed micro-batches of ``split``; with ``pairs``, lists of ``pair_batch`` image-text pairs instead;
    with ``preference``, preference pairs only (shared-prompt samples); with ``once``, the training sources
    in order, one pass; ``view`` transforms the samples of a split read in order (held-out, ``once``)."""
    return MicroBatchStream(ctx, split, pairs, pair_batch, caption_length, preference=preference, once=once, view=view)


def swapped_media(samples: Iterable[Any], keys: Collection[str] | None = None) -> Iterator[Any]:
    """The samples (only those named in ``keys``, when given), each with the media of the next one of the same
    kind (file extension; the last takes the first's): every question asked about another question's picture,
    every video question about another clip.

    Why: a model that answers from the question's wording alone does as well on these as on its own media;
    the held-out loss difference is how much it uses its images (the ``lm`` stage's ``eval_swapped_images``).
    ``keys`` lets that pass cover exactly the samples the first pass evaluated. A sample with several media
    members (a JSONL conversation can have them) keeps its own. Reads all of its input first.
    """
    items = [s for s in samples if keys is None or s.sample.key in keys]
    by_kind: dict[str, list[int]] = {}
    for index, loaded in enumerate(items):
        if len(loaded.media) == 1:
            by_kind.setdefault(next(iter(loaded.media)).rsplit(".", 1)[-1], []).append(index)
    out = list(items)
    for indices in by_kind.values():
        for mine, theirs in zip(indices, indices[1:] + indices[:1]):
            (name,) = items[mine].media
            out[mine] = dataclasses.replace(items[mine], media={name: next(iter(items[theirs].media.values()))})
    yield from out
