"""One training step (forward + backward) of the small Keye-VL model, against transformers, and packed vs
padded vision encoding.

    python tools/bench/model_step.py            # the full measurement
    python tools/bench/model_step.py --quick    # CI: a small batch, few repeats (checks that it runs)

Two comparisons, in one process, on the same mixed batch (several image sizes, a multi-frame video, text):

1. **ours vs transformers**: keye's ``KeyeVLModel`` (``siglip_navit`` small → ``patch_merge_mlp`` → ``qwen3``
   small, on Megatron-Core, TP=1) against transformers' ``Qwen2_5_VLForConditionalGeneration`` built with
   the same dimensions, both in fp32 on the CPU, one sequence holding the whole batch, next-token loss, tokens/s
   counted as LLM positions. The two are not the same network; what is matched and what is not:

   - LLM: same width, depth, heads, GQA groups, head_dim, SwiGLU width, vocabulary, 3D M-RoPE sections.
     Qwen2.5-VL's LLM is Qwen2 (q/k/v biases, no q/k RMSNorm), ours is Qwen3 (q/k RMSNorm, no biases).
   - ViT: same depth, width, heads, patch size, 2x2 merge, per-frame patches (``temporal_patch_size=1``, as
     Keye; so both see the same patches and produce the same LLM tokens). Qwen2.5-VL's ViT block is
     RMSNorm + gated SiLU MLP (three matrices), ours is SigLIP's LayerNorm + GELU MLP (two): its
     intermediate size is set to 2/3 of ours so the MLP FLOPs match. Qwen2.5-VL's window attention is turned
     off (every layer full attention per image, ``fullatt_block_indexes`` = all), as Keye's ViT.
   - Projector: both LayerNorm/RMSNorm → 2x2 merge → Linear → GELU → Linear, same widths.
   - Loss: both the mean next-token cross-entropy over the positions that have a label (not those whose
     next token is an image/video pad: 484 of 1169 here). Ours is given that loss mask (as keye's ``lm``
     stage gives it) and computes the last layer's MLP, the final norm, the output layer and the
     cross-entropy only at those positions (``keye.model.loss_rows``; the loss and gradients are the same);
     transformers' model computes them at every position (its ``logits_to_keep`` is for generation: with
     labels it needs the full logits).
   - Attention kernels: transformers runs SDPA, the ViT one image (or video) at a time (it splits the pack
     at ``cu_seqlens``); ours runs SDPA per packed block (keye's attention without Transformer Engine), the ViT
     as one packed sequence whose blocks are the images and whole videos. On GPUs ours would use TE's varlen flash attention.

2. **packed vs padded** vision encoding, our ViT alone (forward + backward, patches/s): *packed* is the NaViT
   way (every image and video in one sequence, block-diagonal attention, no padding); *padded* is the
   batch way (each image/video padded to the longest one, run as a batch with a key-padding mask; the
   same per-image position embeddings and 2D RoPE). Both give the same features (checked).

3. **equal attention work**: ours again, with the video handed to the ViT as one-frame grids, so it attends
   frame by frame as Qwen2.5-VL does (``per_frame_videos``). Not Keye's semantics: it separates what the
   implementation costs from what Keye's whole-video attention costs.

Prints a table, then the three ratios (``ours/transformers``, ``packed/padded``, and ours on equal
attention work / transformers). Timings are the median of ``--repeats`` steps after ``--warmup`` steps,
the cases taking turns. By default both models run on one
CPU thread and the clock is this process's CPU time, so a busy machine (CI, a shared box) still gives the
numbers an idle core would; ``--threads N`` (wall-clock) measures a whole machine.

What it showed (2-core CPU box, AMD EPYC with AVX-512, one thread, full batch; November 2026), with keye's
SDPA attention split per packed block (``keye/model/sdpa_attention.py``, the default without Transformer
Engine): ours/transformers **1.01-1.05x** (seven runs; 0.96-0.97x before the changes of November 29,
0.91-0.92x before the ones before) and packed/padded 2.10-2.13x; on equal attention work (case 3)
1.11-1.14x. With two threads (``--threads 2``, wall clock) 1.00x in two runs, 1.04x when the two models
alone take turns. With Megatron's unfused local attention (``attention: megatron``) it was 0.56x and
0.93x. What made ours faster, same math:

- the local linears (and the patch embedding, the projector, the LLM's output layer) run their fp32 CPU
  GEMMs on oneDNN instead of MKL (``keye/model/onednn_linear.py``: 10-15% faster on these shapes, about
  85 ms a step);
- no last-layer MLP, output layer or cross-entropy at the 685 positions without a label
  (``keye/model/loss_rows.py``: 6.7 of 88.1 GFLOP of GEMMs, about 65 ms);
- the RoPE is applied inside the SDPA core attention with cos/sin computed once per forward
  (``KeyeSelfAttention``, about 15 ms), adding the swapped halves in place;
- the RMSNorms (Qwen3's per-head q/k norms above all) take their gradient in closed form on 2-D views
  (``keye/model/rms_norm.py``, about 10 ms);
- SwiGLU as one autograd function writing both halves' gradients into one buffer
  (``keye/model/swiglu.py``, about 20 ms);
- GQA without copying k/v, the ViT's blocks passed as cu_seqlens (no ``[N, N]`` mask to build and scan)
  and cut with one split (no zero-filled gradient per block slice).

What keeps the ratio near 1 is the model, not the implementation: Keye attends across a whole video as one
block (the released model and the spec), while Qwen2.5-VL with ``temporal_patch_size=1`` attends frame by
frame (4 x 256 instead of 1024 patches here), so it does less attention work for the same batch (about
145 ms of the step here; single SDPA calls of equal size cost the same in both). The GEMMs run at 96-107
GFLOP/s of this core's ~110 and SDPA's flash kernels near their own speed. SigLIP's GELU-tanh MLP also
costs about 2% more than Qwen's SiLU-gated one at equal FLOPs (torch's tanh is slow on this CPU; a
sigmoid form was 30% faster alone but not inside the step). Timings on this shared box drift by a few
percent between runs; the ratios, from cases taking turns, move by a few hundredths.
Note also that ``KeyeVLModel`` encodes a micro-batch's images and its videos as two packs, while the
packed/padded comparison here puts all of them in one pack (the harder case for a dense mask).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

# Token ids inside the small vocabulary (4096) for the vision pad and start tokens.
IMAGE_PAD, VIDEO_PAD, VISION_START = 4000, 4001, 4002
TEXT_IDS = 3900  # text tokens are drawn from [0, TEXT_IDS)
PATCH = 14


@dataclass
class Mix:
    """A batch: images as (h, w) in 14-px patches, videos as (frames, h, w), and text chunks (tokens)."""

    images: list[tuple[int, int]]
    videos: list[tuple[int, int, int]]
    text: list[int]  # text chunk lengths: one before the first image/video and one after each

    def grids(self) -> list[tuple[int, int, int]]:
        """Every image/video as a (t, h, w) grid, in the order they appear in the sequence."""
        return [(1, h, w) for h, w in self.images] + list(self.videos)

    def describe(self) -> str:
        images = ", ".join(f"{h * PATCH}x{w * PATCH}" for h, w in self.images)
        videos = ", ".join(f"{t} frames {h * PATCH}x{w * PATCH}" for t, h, w in self.videos)
        return f"images {images}; video {videos}; {sum(self.text)} text tokens"


FULL = Mix(images=[(32, 32), (16, 24), (8, 8), (12, 20)], videos=[(4, 16, 16)], text=[120, 60, 60, 60, 60, 120])
QUICK = Mix(images=[(8, 8), (4, 6)], videos=[(2, 4, 4)], text=[12, 8, 8, 12])


# --- inputs --------------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # (1, L)
    kinds: torch.Tensor  # (1, L): 0 text, 1 image pad, 2 video pad (transformers' mm_token_type_ids)
    labels: torch.Tensor  # (1, L): next token, -100 where it is a vision pad
    image_patches: torch.Tensor  # (N_img, 3, 14, 14)
    video_patches: torch.Tensor  # (N_vid, 3, 14, 14)
    image_grids: torch.Tensor  # (K_img, 3)
    video_grids: torch.Tensor  # (K_vid, 3)
    seconds_per_frame: list[float]


def make_batch(mix: Mix, seed: int = 0) -> Batch:
    """One sequence: text, then each image/video (a vision-start token and one pad per merged token), text."""
    generator = torch.Generator().manual_seed(seed)
    grids = mix.grids()
    if len(mix.text) != len(grids) + 1:
        raise ValueError(f"need {len(grids) + 1} text chunks for {len(grids)} images/videos, got {len(mix.text)}")
    ids, kinds = [torch.randint(0, TEXT_IDS, (mix.text[0],), generator=generator)], [torch.zeros(mix.text[0])]
    for index, (t, h, w) in enumerate(grids):
        is_video = index >= len(mix.images)
        merged = t * h * w // 4
        ids.append(torch.tensor([VISION_START] + [VIDEO_PAD if is_video else IMAGE_PAD] * merged))
        kinds.append(torch.tensor([0] + [2 if is_video else 1] * merged))
        chunk = mix.text[index + 1]
        ids.append(torch.randint(0, TEXT_IDS, (chunk,), generator=generator))
        kinds.append(torch.zeros(chunk))
    input_ids = torch.cat(ids)[None]  # (1, L)
    labels = torch.cat([input_ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    labels = labels.masked_fill((labels == IMAGE_PAD) | (labels == VIDEO_PAD), -100)

    def patches(grid_list: list[tuple[int, int, int]]) -> torch.Tensor:
        n = sum(t * h * w for t, h, w in grid_list)
        return torch.randn(n, 3, PATCH, PATCH, generator=generator)

    image_grids = [(1, h, w) for h, w in mix.images]
    return Batch(
        input_ids=input_ids,
        kinds=torch.cat(kinds).long()[None],
        labels=labels,
        image_patches=patches(image_grids),
        video_patches=patches(list(mix.videos)),
        image_grids=torch.tensor(image_grids).reshape(-1, 3),
        video_grids=torch.tensor(list(mix.videos)).reshape(-1, 3),
        seconds_per_frame=[0.5] * len(mix.videos),
    )


# --- the two models ----------------------------------------------------------------------------


def build_keye() -> tuple[torch.nn.Module, Any]:
    """The small Keye-VL model through the registry, in this process (TP=1, PP=1 on gloo)."""
    from keye.config.validate import validate_component
    from keye.model.composition import KeyeVLModel
    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel
    from keye.plugins import PluginHost

    ctx = init_parallel(tensor=1, pipeline=1, seed=1234)
    host = PluginHost(strict=True)
    host.load_entry_points()
    nodes = {
        "vision_encoder": {"name": "siglip_navit", "size": "small"},
        "projector": {"name": "patch_merge_mlp", "in_dim": 256, "out_dim": 256},
        "language_model": {"name": "qwen3", "size": "small"},
    }
    model_cfg = argparse.Namespace(**{
        kind: validate_component(kind, node, f"model.{kind}", host.registry, lambda _: "model_step.py")
        for kind, node in nodes.items()
    })
    model = KeyeVLModel(model_cfg, host.registry, BuildContext(ctx, seed=1234),
                        image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD)
    return model.train(), model_cfg


def build_transformers(model_cfg: Any) -> torch.nn.Module:
    """transformers' Qwen2.5-VL with our small model's dimensions (see the module docstring)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vit, lm = model_cfg.vision_encoder, model_cfg.language_model
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=lm["vocab_size"], hidden_size=lm["hidden_size"], intermediate_size=lm["ffn_hidden_size"],
            num_hidden_layers=lm["num_layers"], num_attention_heads=lm["num_attention_heads"],
            num_key_value_heads=lm["num_query_groups"], rms_norm_eps=lm["rms_norm_eps"],
            max_position_embeddings=lm["max_position_embeddings"], tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None, pad_token_id=None,  # Qwen's ids lie outside the small vocabulary
            rope_parameters={"rope_type": "default", "rope_theta": lm["position_encoding"]["theta"],
                             "mrope_section": list(lm["position_encoding"]["mrope_section"])},
        ),
        vision_config=dict(
            depth=vit["num_layers"], hidden_size=vit["hidden_size"], num_heads=vit["num_heads"],
            intermediate_size=vit["intermediate_size"] * 2 // 3,  # gated MLP: 3 matrices, same FLOPs as 2
            patch_size=vit["patch_size"], spatial_merge_size=2, temporal_patch_size=1,
            out_hidden_size=lm["hidden_size"], fullatt_block_indexes=list(range(vit["num_layers"])),
            tokens_per_second=2,
        ),
        image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
        tie_word_embeddings=False,
    )
    if lm["head_dim"] != lm["hidden_size"] // lm["num_attention_heads"]:
        raise ValueError("Qwen2.5-VL derives head_dim from hidden_size / heads; the sizes must agree")
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.config._attn_implementation = "sdpa"
    return model.train()


# --- one step of each ---------------------------------------------------------------------------


def keye_step(model: torch.nn.Module, batch: Batch, positions: torch.Tensor) -> None:
    from keye.model.composition import VisionInputs

    mask = (batch.labels >= 0).float()
    per_token = model(
        batch.input_ids, positions, None, labels=batch.labels.clamp(min=0),
        images=VisionInputs(batch.image_patches, batch.image_grids),
        videos=VisionInputs(batch.video_patches, batch.video_grids), loss_mask=mask,
    )  # (1, L): causal attention over the one sequence; output layer only where the loss counts
    ((per_token * mask).sum() / mask.sum()).backward()


def transformers_step(model: torch.nn.Module, batch: Batch) -> None:
    out = model(
        input_ids=batch.input_ids,
        attention_mask=torch.ones_like(batch.input_ids),
        mm_token_type_ids=batch.kinds,
        pixel_values=batch.image_patches.flatten(1),  # (N, 3 * 1 * 14 * 14): temporal_patch_size 1
        image_grid_thw=batch.image_grids,
        pixel_values_videos=batch.video_patches.flatten(1),
        video_grid_thw=batch.video_grids,
        second_per_grid_ts=torch.tensor(batch.seconds_per_frame),
        labels=batch.labels,
    )
    out.loss.backward()


def per_frame_videos(batch: Batch) -> Batch:
    """The same batch with each video's frames given to our ViT as separate one-frame grids, so it attends
    frame by frame as Qwen2.5-VL with ``temporal_patch_size=1`` does: the same patches, tokens and position
    ids, a quarter of the video's attention work. Not Keye's semantics (it attends across a whole video);
    it measures the implementations on equal work."""
    frames = [(1, h, w) for t, h, w in batch.video_grids.tolist() for _ in range(t)]
    return dataclasses.replace(batch, video_grids=torch.tensor(frames).reshape(-1, 3))


def keye_positions(batch: Batch, model_cfg: Any) -> torch.Tensor:
    """Keye's time-aligned 3D M-RoPE ids ``(3, 1, L)``, computed once by the data pipeline in training."""
    from keye_plugins.position_encoding.mrope_time_aligned import MRopeTimeAligned, packed_position_ids

    lm = model_cfg.language_model
    config = MRopeTimeAligned.Config(mrope_section=list(lm["position_encoding"]["mrope_section"]), head_dim=lm["head_dim"],
                                     image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD,
                                     vision_start_token_id=VISION_START)
    ids = batch.input_ids[0]
    return packed_position_ids(ids, [0, len(ids)], batch.image_grids, batch.video_grids,
                               batch.seconds_per_frame, config=config)[:, None, :]


# --- packed vs padded vision encoding -------------------------------------------------------------


def encode_packed(vit: torch.nn.Module, patches: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """NaViT: one sequence ``(N, 1, D)``, block-diagonal attention (the model's own forward)."""
    return vit(patches, grids)  # (N, D)


def encode_padded(vit: torch.nn.Module, patches: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """Batch way: each image/video padded to the longest, ``(S, B, D)`` with a key-padding mask; ``(N, D)`` back."""
    lengths = grids.prod(-1).tolist()
    longest, count = max(lengths), len(lengths)
    x = vit.embed_patches(patches) + vit.position_embeddings(grids)  # (N, D): per-image tables, as packed
    rotary = vit.rotary_pos_emb(grids)  # (N, 1, 1, head_dim)
    hidden = x.new_zeros(longest, count, x.shape[-1])  # (S, B, D)
    angles = rotary.new_zeros(longest, count, 1, rotary.shape[-1])  # (S, B, 1, head_dim): RoPE per image
    valid = torch.zeros(count, longest, dtype=torch.bool)  # (B, S)
    for b, (xs, rs) in enumerate(zip(x.split(lengths), rotary.split(lengths))):
        hidden[: len(xs), b] = xs
        angles[: len(rs), b] = rs[:, 0]
        valid[b, : len(xs)] = True
    mask = ~valid[:, None, None, :].expand(count, 1, longest, longest)  # (B, 1, S, S), True = masked key
    out = vit.decoder(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=angles)  # (S, B, D)
    return out.transpose(0, 1)[valid]  # (N, D), images in order


def vision_step(encode: Callable, vit: torch.nn.Module, patches: torch.Tensor, grids: torch.Tensor,
                weights: torch.Tensor) -> None:
    (encode(vit, patches, grids) * weights).sum().backward()


# --- timing and report ---------------------------------------------------------------------------


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def measure(
    cases: dict[str, tuple[Callable[[], None], torch.nn.Module]], warmup: int, repeats: int, clock: str
) -> dict[str, float]:
    """Median seconds per step of each case. The cases take turns (round after round), so a change in
    machine load during the run falls on all of them alike rather than on whichever ran last."""
    now = CLOCKS[clock]
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(warmup + repeats):
        for name, (step, module) in cases.items():
            module.zero_grad(set_to_none=True)
            start = now()
            step()
            if round_ >= warmup:
                times[name].append(now() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batch, 1 warmup + 2 repeats (for CI)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per case (default 5; quick: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; quick: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both models (default 1: "
                        "stable numbers on a shared machine; OpenMP threads collapse when cores are busy)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default=None,
                        help="cpu: this process's CPU time (default with 1 thread: other load on the machine does "
                        "not count); wall: elapsed time (default with more threads)")
    args = parser.parse_args(argv)
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    if clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (CPU time adds up over threads)")
    mix = QUICK if args.quick else FULL
    repeats = args.repeats or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    torch.set_num_threads(args.threads)

    batch = make_batch(mix)
    keye, model_cfg = build_keye()
    hf = build_transformers(model_cfg)
    positions = keye_positions(batch, model_cfg)
    tokens = batch.input_ids.shape[1]

    vit = keye.vision_encoder
    patches = torch.cat([batch.image_patches, batch.video_patches])
    grids = torch.cat([batch.image_grids, batch.video_grids])
    n = patches.shape[0]
    with torch.no_grad():  # the two encodings are the same function of the patches
        difference = (encode_packed(vit, patches, grids) - encode_padded(vit, patches, grids)).abs().max().item()
    if difference > 1e-4:
        raise AssertionError(f"packed and padded vision encodings differ by {difference:.2e}")
    weights = torch.randn(n, vit.out_dim, generator=torch.Generator().manual_seed(1))
    padded_slots = int(grids.prod(-1).max()) * grids.shape[0]

    frames = per_frame_videos(batch)
    cases = {  # name: (step, module whose gradients it fills)
        "keye: siglip_navit + patch_merge_mlp + qwen3 (Megatron)": (lambda: keye_step(keye, batch, positions), keye),
        "transformers: Qwen2_5_VLForConditionalGeneration": (lambda: transformers_step(hf, batch), hf),
        "vision packed: one NaViT sequence, block-diagonal mask": (
            lambda: vision_step(encode_packed, vit, patches, grids, weights), vit),
        "vision padded: batch padded to the longest image": (
            lambda: vision_step(encode_padded, vit, patches, grids, weights), vit),
        "keye, video attended frame by frame (as Qwen2.5-VL; not Keye)": (lambda: keye_step(keye, frames, positions), keye),
    }
    seconds = measure(cases, warmup, repeats, clock)
    counts = [(tokens, "tokens")] * 2 + [(n, "patches")] * 2 + [(tokens, "tokens")]
    rows = [(name, count, unit, seconds[name]) for name, (count, unit) in zip(cases, counts)]
    ours, theirs, packed, padded, ours_per_frame = seconds.values()

    print(f"model step: forward + backward, fp32, {torch.get_num_threads()} CPU thread(s), {clock} time, median of "
          f"{repeats} after {warmup} warmup{' (quick)' if args.quick else ''}")
    print(f"batch: one sequence of {tokens} LLM tokens; {mix.describe()}; {n} ViT patches "
          f"(padded: {padded_slots} slots, {padded_slots / n:.2f}x); packed vs padded max diff {difference:.1e}")
    print()
    width = max(len(row[0]) for row in rows)
    print(f"{'case':<{width}}  {'count':>7}  {'unit':<7}  {'ms/step':>9}  {'per second':>11}")
    for case, count, unit, step in rows:
        print(f"{case:<{width}}  {count:>7}  {unit:<7}  {step * 1e3:>9.1f}  {count / step:>11.0f}")
    print()
    print(f"ours/transformers: {theirs / ours:.2f}x  (tokens/s; target >= 1.0x)")
    print(f"packed/padded: {padded / packed:.2f}x  (patches/s; target >= 2.0x)")
    print(f"ours with the same attention work as transformers (video frame by frame)/transformers: "
          f"{theirs / ours_per_frame:.2f}x  (a measurement of the implementation only: Keye attends a whole video)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
