"""Contrastive-score filtering of image-text pairs (spec §3.1: "for caption pairs, keep CLIP score > 0.9").

Why: web captions often do not describe their image (alt text, file names, ads). The paper scores every
pair with a CLIP-style model and keeps the pairs above a threshold. Here the scorer is any registered
``vision_encoder`` + ``text_encoder`` pair, composed exactly as the contrastive stage 0 composes them
(the vision encoder's own pooling head, e.g. SigLIP's, or patch features mean-pooled per image, then a linear
head to the text tower's width; captions with the text tower's own tokenizer when it has one; see
``keye_plugins.stage.contrastive``), so a stage-0 checkpoint scores with the towers it trained, and any
third-party towers work the same way. The score of a pair is the cosine similarity of the pooled image
embedding and the text embedding, in [-1, 1].

The module names (``vision_encoder``, ``text_encoder``, ``vision_head``) match the contrastive stage's
model, so `ContrastiveScorer.load_weights` reads a stage-0 weights folder with the stages' own loader
(its ``loss`` module, the SigLIP temperature and bias, is not needed for a cosine and is left out).

Keep rule: ``score > threshold`` (strictly above, as the paper words it). `ScoreReport` gives the score
histogram and the kept share, which is what one looks at to choose the threshold for a new scorer: an
untrained or differently trained model has its own score scale, and 0.9 is the paper's value for its CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from keye.data.processor import PairItem, Processor, SampleError
from keye.data.sample import PairSample
from keye.data.sources import LoadedSample
from keye.model.composition import VisionInputs


def pooled_images(vision_encoder: torch.nn.Module, vision_head: torch.nn.Module | None,
                  images: VisionInputs) -> torch.Tensor:
    """Packed images → (K, D), unnormalised, as stage 0 embeds them: the encoder's own pooling head where
    ``vision_head`` is None (SigLIP's), else each image's mean patch feature through ``vision_head``."""
    features = vision_encoder(images.patches, images.grid_thw)  # (N, D)
    if vision_head is None:
        return vision_encoder.head(features, images.grid_thw)
    counts = images.grid_thw.prod(dim=1)  # (K,)
    return vision_head(torch.stack([chunk.mean(0) for chunk in features.split(counts.tolist())]))


def tower_caption_ids(text_encoder: torch.nn.Module, items: Sequence[PairItem]) -> torch.Tensor:
    """``[K, L]`` caption ids as stage 0 feeds them: the text tower's own tokenizer's where it has one
    (``tokenize``, e.g. SigLIP's), else the ones the processor made with the blueprint's tokenizer."""
    tokenize = getattr(text_encoder, "tokenize", None)
    ids = tokenize([item.caption for item in items]) if tokenize is not None else None
    return ids if ids is not None else torch.stack([item.caption_ids for item in items])


class ContrastiveScorer(torch.nn.Module):
    """Scores image-text pairs by the cosine of their pooled embeddings (see the module docstring)."""

    def __init__(
        self,
        vision_encoder: torch.nn.Module,
        text_encoder: torch.nn.Module,
        vision_head: torch.nn.Module | None = None,
        *,
        seed: int = 0,
    ) -> None:
        """Without ``vision_head`` a fresh one is drawn from ``seed`` (same seed, same scores)."""
        super().__init__()
        self.vision_encoder = vision_encoder
        self.text_encoder = text_encoder
        # an encoder with its own pooling head (siglip_navit pooling_head) embeds images with it, as stage 0 does
        if vision_head is None and getattr(vision_encoder, "head", None) is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                vision_head = torch.nn.Linear(vision_encoder.out_dim, text_encoder.out_dim)
            dtype = next(vision_encoder.parameters(), torch.empty(0)).dtype
            vision_head = vision_head.to(dtype)
        self.vision_head = vision_head
        self.eval()

    def load_weights(self, path: str | Path) -> Path:
        """Load the towers and head from a contrastive stage's weights: its folder (``<run>/<stage>``), its
        ``weights/`` folder or one of its files. Any saved tensor/pipeline layout works (a Megatron-Core
        distributed checkpoint, see `keye.train.stage_weights`); the saved ``loss`` module is not part of the
        scorer and is left out."""
        from keye.train.stage_weights import load_weights_from

        folder = Path(path).resolve()
        if folder.is_file():
            folder = folder.parent
        if folder.name == "weights":
            folder = folder.parent
        return load_weights_from(self, folder)

    @torch.no_grad()
    def embed_images(self, images: VisionInputs) -> torch.Tensor:
        """Packed images → (K, text width), unnormalised."""
        return pooled_images(self.vision_encoder, self.vision_head, images)

    @torch.no_grad()
    def score(self, items: Sequence[PairItem]) -> torch.Tensor:
        """Cosine similarity of each pair's image and caption embeddings: (len(items),) float32."""
        images = VisionInputs(
            torch.cat([item.images.patches for item in items]), torch.cat([item.images.grid_thw for item in items])
        )
        captions = tower_caption_ids(self.text_encoder, items)  # (K, L)
        image_emb = torch.nn.functional.normalize(self.embed_images(images).float(), dim=-1)  # (K, D)
        text_emb = torch.nn.functional.normalize(self.text_encoder(captions).float(), dim=-1)  # (K, D)
        return (image_emb * text_emb).sum(-1)


def keep_mask(scores: torch.Tensor | np.ndarray | Sequence[float], threshold: float) -> np.ndarray:
    """Which pairs to keep: ``score > threshold``."""
    return np.asarray(scores, dtype=np.float64) > threshold


@dataclass
class ScoredPair:
    key: str
    score: float
    kept: bool


@dataclass
class ScoreReport:
    """What a filtering run saw: the score histogram over [-1, 1] and the share kept."""

    threshold: float
    bins: int = 20
    scores: list[float] = field(default_factory=list)

    def add(self, score: float) -> None:
        self.scores.append(float(score))

    @property
    def kept(self) -> int:
        return int(keep_mask(self.scores, self.threshold).sum()) if self.scores else 0

    @property
    def kept_fraction(self) -> float:
        return self.kept / len(self.scores) if self.scores else 0.0

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, edges)`` of the scores over ``bins`` equal bins of [-1, 1]."""
        return np.histogram(np.clip(self.scores, -1.0, 1.0), bins=self.bins, range=(-1.0, 1.0))

    def render(self, width: int = 40) -> str:
        """The histogram as text bars (empty bins at either end left out) and a summary line."""
        if not self.scores:
            return "no pairs scored"
        counts, edges = self.histogram()
        used = np.nonzero(counts)[0]
        lines = []
        for i in range(used[0], used[-1] + 1):
            bar = "#" * int(round(width * counts[i] / counts.max()))
            lines.append(f"  [{edges[i]:+.2f}, {edges[i + 1]:+.2f})  {counts[i]:7d}  {bar}")
        values = np.asarray(self.scores)
        lines.append(
            f"{len(values)} pairs, score mean {values.mean():+.4f} (min {values.min():+.4f}, max {values.max():+.4f}); "
            f"kept {self.kept} with score > {self.threshold:g} ({self.kept_fraction:.1%})"
        )
        return "\n".join(lines)


def score_pairs(
    scorer: ContrastiveScorer,
    processor: Processor,
    samples: Iterable[LoadedSample],
    threshold: float,
    *,
    batch_size: int = 64,
    report: ScoreReport | None = None,
    on_skip: Any = None,
) -> Iterator[ScoredPair]:
    """Score pair samples in batches and decide each; other kinds and unusable samples are skipped.

    ``on_skip(key, kind, reason)`` is told about every skipped sample (``kind``: ``not_a_pair`` or the
    processor's error kind, e.g. ``corrupt_image``); ``report`` collects the scores.
    """
    batch: list[PairItem] = []

    def flush() -> Iterator[ScoredPair]:
        scores = scorer.score(batch).tolist()
        for item, score, kept in zip(batch, scores, keep_mask(scores, threshold).tolist()):
            if report is not None:
                report.add(score)
            yield ScoredPair(item.key, score, kept)
        batch.clear()

    for loaded in samples:
        sample = loaded.sample
        if not isinstance(sample, PairSample):
            if on_skip is not None:
                on_skip(sample.key, "not_a_pair", f"a '{sample.kind}' sample, not an image-text pair")
            continue
        try:
            batch.append(processor.pair(sample, loaded.media))
        except SampleError as exc:
            if on_skip is not None:
                on_skip(sample.key, exc.kind, exc.reason)
            continue
        if len(batch) == batch_size:
            yield from flush()
    if batch:
        yield from flush()
