"""``megatron``: the built-in generator, decoding in process on the composed model in its training layout.

No weight copy and no second model: it runs the live ``KeyeVLModel`` (the parameters the trainer updates)
with a KV cache. One batch (requests whose samples fit ``max_batch_size``) goes like this:

1. **Prefill, once per prompt, all prompts in one pass.** Prompts are left-padded to the longest; the
   attention mask ``[B, 1, L, L]`` is causal over each row's real tokens, and the padding positions see
   only each other (no fully masked row; nothing real sees padding). Images and videos of every prompt are
   encoded in that one pass (``KeyeVLModel.embed``), never again. Only the last position's logits are
   computed; with left padding it is every row's last prompt token.
2. **Samples share the prefill.** The cache rows of prompt b are repeated ``n_b`` times and so are its last
   logits: the ``n`` samples of a prompt cost one prompt forward.
3. **Decode**, one token per sample per step, against the cache. Positions come from the language model's
   ``position_encoding`` (``decode_position_ids``; prompts without ids: ``position_ids``): with M-RoPE the
   k-th generated token (from 0) of a prompt with ids up to ``P`` sits at ``P + 1 + k`` on all three axes,
   the released ``get_rope_index`` + ``rope_deltas`` rule (slot ``L + k`` plus ``delta = P + 1 - L``).

The cache (``Config.kv_cache``), two kinds, measured:

- ``keye`` (`keye.generate.kv_cache`, the default where the LLM runs keye's SDPA core attention): keys are
  stored after RoPE inside the core attention; a step rotates only its new tokens, the model runs its
  ordinary forward (no inference context), and the prefill's output layer runs on the last positions only
  (qwen3's ``logits_at``).
- ``megatron``: Megatron-Core's ``StaticInferenceContext`` through Megatron's inference path. It works with
  any layer spec (Transformer Engine's on GPU too), but stores keys *before* RoPE and rotates the whole
  cached prefix again at every step, so each step is given the position ids of the whole prefix
  ``[3, S, L + t]`` (Megatron builds its M-RoPE table from the ids passed in).

**Decode steps** with keye's cache run through `keye.generate.lean_decode` by default (``Config.lean_decode``):
the LLM layers' own weights in one lean loop, no module calls, the same math up to fp32 rounding (CPU fp32,
TP=1, each PP stage its own layers; `decode_path` says which path runs and why). Elsewhere, and with
``lean_decode: false``, a step is the model's ordinary forward on the new tokens.

Measured with ``tools/bench/generate.py`` (CPU, 1 thread, the small model: Qwen3 hidden 256 x 4 layers; 8
prompts of 32-85 tokens with an image each x 4 samples x 128 tokens, fastest of 3, a shared 2-core box,
December 2026): ``keye`` 0.78-1.43 s with lean decode steps, 1.51-2.33 s with the model's forward;
``megatron`` 2.9-4.4 s (the re-rotation of the whole prefix, ``cos``/``sin``/``cat`` per layer and step, is
most of its difference); no cache (the padded batch through the full forward every step) 114 s;
transformers' Qwen2.5-VL ``generate`` at the same dimensions 1.82-2.75 s: ``keye`` 1.92-2.46x of it over four
runs, median 2.28x (1.10-1.29x with lean_decode off; the bench's docstring says where a decode step's time
goes). The decode loop does per batch what does not change per step: the positions and padding mask of every
step are made once on the device and sliced. The caches, both decode paths and the no-cache forward give the
same greedy tokens (tests/generate).

Stops: a sampled id in ``stop_token_ids`` (kept as the last id), or a stop string appearing in the decoded
tail of the continuation (the token that completes it is kept), or ``max_new_tokens`` (``length``).
Finished samples stay in the batch until every sample is done (their tokens are discarded).

Parallel layouts: every rank of the model-parallel group calls ``generate`` with the same requests. Under
TP each rank caches its own heads and the logits are gathered (every rank samples the same token from the
same numbers and seed). Under PP each stage caches its own layers; the first stage embeds, each stage sends
its hidden states to the next, and the last stage samples and broadcasts the tokens to all stages
(``torch.distributed`` point-to-point and broadcast over the pipeline group; gloo on CPU).

Interleaved pipeline (``parallel.virtual_pipeline``): ``GeneratorContext.model`` is then the list of this rank's
model chunks (`keye.model.pipeline_split.virtual_stages`), and one forward runs them in the order the layers
run: chunk 0 on every stage, then chunk 1 on every stage, ..., each chunk receiving from the previous rank
(the last rank, for a chunk after the first) and sending to the next (wrapping round to the first). That is
the order Megatron's interleaved schedule gives a single micro-batch; the schedule itself is not used because
it needs at least ``pipeline`` micro-batches of one shape per call, and Megatron's own inference path does not
take virtual stages ("vpp is not used in inference", ``megatron.core.inference.communication_utils``). All
chunks share one cache (its buffers are keyed by global layer number; the offset moves once per forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from keye import hookimpl
from keye.config import doc
from keye.errors import KeyeUserError
from keye.generate.contract import (
    GenerationOutput,
    GenerationRequest,
    GeneratorContext,
    SampleOutput,
    SamplingSettings,
)
from keye.generate.sampling import sample, sample_generator
from keye.model.composition import VisionInputs


@dataclass
class _Batch:
    """Requests decoded together, with their index in the ``generate`` call (for the seeds)."""

    requests: list[GenerationRequest]
    indices: list[int]

    @property
    def samples(self) -> int:
        return sum(r.n for r in self.requests)


class MegatronGenerator:
    """KV-cache decoding on the live ``KeyeVLModel`` (module docstring)."""

    @dataclass
    class Config:
        max_batch_size: int = doc(
            "Samples (prompts x n) decoded together; further requests run in later batches. A request with more "
            "samples than this runs alone.", 32
        )
        pad_token_id: int = doc("Id written into left padding (never attended; any id in the vocabulary).", 0)
        kv_cache: str = doc(
            "auto: keye's own cache where the LLM's attention is keye's SDPA (keys stored after RoPE), else Megatron's "
            "StaticInferenceContext; keye or megatron: that one.", "auto"
        )
        stop_string_window: int = doc(
            "Stop strings are looked for in the decoded last (4 x longest stop string + this) tokens.", 8
        )
        lean_decode: bool = doc(
            "Decode steps with keye's cache through keye.generate.lean_decode (the layers' weights in one lean loop, "
            "CPU fp32 TP=1; elsewhere the model's forward); false: always the model's forward.", True
        )

    def __init__(self, config: Config, ctx: GeneratorContext) -> None:
        if ctx is None or ctx.model is None:
            raise ValueError("megatron generator: GeneratorContext.model is required (the composed KeyeVLModel)")
        self.config = config
        self.chunks = list(ctx.model) if isinstance(ctx.model, (list, tuple)) else [ctx.model]
        self.model = self.chunks[0]  # embeds on the first stage; its position encoding and token ids serve all
        self.tokenizer = ctx.tokenizer
        self.parallel = ctx.parallel

    def sync_weights(self, weights: Iterable[tuple[str, Tensor]] | None = None) -> None:
        """Nothing to do: this generator decodes from the live training parameters."""

    # --- entry point ----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest], settings: SamplingSettings,
                 on_token: Callable[[int, int, int], None] | None = None) -> list[GenerationOutput]:
        """``on_token(request index, sample index, token id)`` is called for each kept token as it is sampled
        (streaming for chat; every rank calls it)."""
        if settings.stop_strings and self.tokenizer is None:
            raise ValueError("megatron generator: stop strings need a tokenizer (GeneratorContext.tokenizer)")
        outputs: list[GenerationOutput] = []
        was_training = self.model.training
        for chunk in self.chunks:
            chunk.eval()  # Megatron's inference path runs only in eval mode (and no dropout)
        try:
            for batch in self._batches(list(requests)):
                samples = self._generate_batch(batch, settings, on_token)
                for request in batch.requests:
                    outputs.append(GenerationOutput(samples[: request.n], request.thinking_mode))
                    samples = samples[request.n:]
        finally:
            for chunk in self.chunks:
                chunk.train(was_training)
        return outputs

    def _batches(self, requests: list[GenerationRequest]) -> list[_Batch]:
        batches: list[_Batch] = []
        for index, request in enumerate(requests):
            if batches and batches[-1].samples + request.n <= self.config.max_batch_size:
                batches[-1].requests.append(request)
                batches[-1].indices.append(index)
            else:
                batches.append(_Batch([request], [index]))
        return batches

    # --- one batch ------------------------------------------------------------------------------------

    def _generate_batch(self, batch: _Batch, settings: SamplingSettings,
                        on_token: Callable[[int, int, int], None] | None = None) -> list[SampleOutput]:
        requests = batch.requests
        lengths = [int(r.prompt_ids.numel()) for r in requests]
        length = max(lengths)
        self._check_window(length, settings.max_new_tokens)
        device = self._device()
        positions = [self._prompt_positions(r) for r in requests]  # each (3, L_b)
        ids, pos, keep = _left_pad([r.prompt_ids for r in requests], positions, length, self.config.pad_token_id)

        # prefill: every prompt once, vision encoded here only; logits of each row's last position
        total = batch.samples
        cache = self._new_cache(total, length + settings.max_new_tokens)
        images = _join([r.images for r in requests])
        videos = _join([r.videos for r in requests])
        logits = self._forward(ids.to(device), pos.to(device), _prefill_mask(keep).to(device), cache,
                               images=images, videos=videos)  # (B, V) on the last stage
        cache.advance(length)

        # the samples of a prompt share its prefill: repeat its cache rows and logits
        rows = torch.tensor([b for b, r in enumerate(requests) for _ in range(r.n)])  # (S,)
        if total != len(requests):
            cache.repeat_rows(rows.to(device))
        if logits is not None:
            logits = logits[rows.to(logits.device)]  # (S, V)
        pos, keep = pos[:, rows], keep[rows]  # (3, S, L), (S, L)
        # Positions and padding mask of every step, made once on the device; step t reads a slice of them. The
        # ids of the generated tokens that are fed back come from the language model's position encoding.
        steps = settings.max_new_tokens - 1
        scheme = self.model.language_model.position_encoding
        decode = torch.stack([scheme.decode_position_ids(p, steps) for p in positions])[rows]  # (S, 3, T - 1)
        pos = torch.cat([pos, decode.transpose(0, 1)], dim=2).to(device)  # (3, S, L + T - 1)
        masked = torch.cat([~keep, torch.zeros(total, steps, dtype=torch.bool)], dim=1).to(device)
        lean = self._lean_decoder(cache, pos[:, :, length:], masked)  # None: the model's forward decodes
        masked = masked[:, None, None, :]  # (S, 1, 1, L + T - 1): True = masked (left padding)
        generators = [sample_generator(settings.seed, index, j, device)
                      for index, r in zip(batch.indices, requests) for j in range(r.n)]
        origin = [(index, j) for index, r in zip(batch.indices, requests) for j in range(r.n)]  # sample → (request, j)

        tokens_out: list[list[int]] = [[] for _ in range(total)]
        logprobs_out: list[list[float]] = [[] for _ in range(total)]
        finish: list[tuple[str, Any] | None] = [None] * total
        for step in range(settings.max_new_tokens):
            tokens, logprobs = self._sample(logits, generators, settings, total)  # (S,), (S,)
            for s, (token, logprob) in enumerate(zip(tokens.tolist(), logprobs.tolist())):
                if finish[s] is None:
                    tokens_out[s].append(token)
                    logprobs_out[s].append(logprob)
                    finish[s] = self._stopped(tokens_out[s], settings)
                    if on_token is not None:
                        on_token(*origin[s], token)
            if all(f is not None for f in finish) or step == settings.max_new_tokens - 1:
                break
            seen = length + step + 1  # the prompt and the tokens fed back so far, this one included
            logits = self._forward(tokens[:, None].to(device), pos[:, :, :seen], masked[..., :seen], cache, lean=lean)
            cache.advance(1)

        return [
            SampleOutput(tokens_out[s], logprobs_out[s], *(finish[s] or ("length", None)))
            for s in range(total)
        ]

    # --- pieces ---------------------------------------------------------------------------------------

    def kv_cache(self) -> str:
        """The cache this generator decodes with: ``keye`` or ``megatron`` (``Config.kv_cache`` resolved)."""
        from keye.generate.kv_cache import supports_kv_cache

        choice = self.config.kv_cache
        if choice not in ("auto", "keye", "megatron"):
            raise KeyeUserError(f"megatron generator: unknown kv_cache {choice!r}; known: auto, keye, megatron")
        supported = all(supports_kv_cache(chunk.language_model) for chunk in self.chunks)
        if choice == "keye" and not supported:
            raise KeyeUserError("megatron generator: kv_cache 'keye' needs the qwen3 local spec with attention 'sdpa'; "
                                "use kv_cache 'megatron'")
        return "megatron" if choice == "megatron" or not supported else "keye"

    def decode_path(self) -> str:
        """How decode steps run here: ``lean`` (keye.generate.lean_decode) or ``model forward: <why>``."""
        from keye.generate.lean_decode import unsupported

        if not self.config.lean_decode:
            return "model forward: lean_decode is off"
        if self.kv_cache() != "keye":
            return "model forward: the megatron cache"
        was_training = self.model.training
        for chunk in self.chunks:
            chunk.eval()
        try:
            why = next(filter(None, (unsupported(chunk.language_model) for chunk in self.chunks)), None)
        finally:
            for chunk in self.chunks:
                chunk.train(was_training)
        return "lean" if why is None else f"model forward: {why}"

    def _lean_decoder(self, cache: Any, positions: Tensor, masked: Tensor) -> list | None:
        """One `LeanDecoder` per chunk for this batch's decode steps (``positions [3, S, T]`` of the fed-back
        tokens, ``masked [S, L + T]``), or None where the model's forward decodes."""
        from keye.generate.lean_decode import LeanDecoder, unsupported

        if not (self.config.lean_decode and isinstance(cache, _KeyeCache)) or positions.shape[-1] == 0:
            return None
        if any(unsupported(chunk.language_model) is not None for chunk in self.chunks):
            return None
        return [LeanDecoder(chunk.language_model, cache.cache, positions, masked) for chunk in self.chunks]

    def _new_cache(self, batch: int, max_length: int) -> "_KeyeCache | _MegatronCache":
        return _KeyeCache(max_length) if self.kv_cache() == "keye" else _MegatronCache(batch, max_length)

    def _forward(self, ids: Tensor, pos: Tensor, mask: Tensor, cache: Any, images: VisionInputs | None = None,
                 videos: VisionInputs | None = None, lean: list | None = None) -> Tensor | None:
        """One forward of this rank's chunks on ``ids [B, s]`` with the prefix's positions ``pos [3, B, offset + s]``
        (in layer order: module docstring); the last stage returns the last position's logits ``[B, V]``.
        ``lean``: a decode step's `LeanDecoder` per chunk."""
        pipeline = _pipeline_group()
        for index, model in enumerate(self.chunks):
            if model.pre_process:
                if cache.offset == 0:
                    decoder_input = model.embed(ids, images, videos)  # (s, B, H), vision scattered in
                else:  # generated ids are plain tokens, whatever they are
                    decoder_input = model.language_model.embed(ids)
            elif lean is not None:
                decoder_input = _recv_prev(pipeline, ids.shape, model)
            else:
                decoder_input = None
                model.set_input_tensor(_recv_prev(pipeline, ids.shape, model))
            if lean is not None:
                output = lean[index].step(decoder_input)
            else:
                output = cache.run(model.language_model, ids, pos, mask, decoder_input)
            if model.post_process:
                return cache.logits(output, ids.shape[0])
            _send_next(pipeline, output)
        return None

    def _sample(self, logits: Tensor | None, generators: list[torch.Generator], settings: SamplingSettings,
                total: int) -> tuple[Tensor, Tensor]:
        """Tokens and log-probs of every sample, the same on every rank (sampled on the last PP stage)."""
        if logits is not None:
            tokens, logprobs = sample(logits, generators, settings.temperature, settings.top_k, settings.top_p,
                                      settings.min_p)
        else:  # filled by the broadcast (on the model's device: NCCL moves GPU tensors only)
            device = self._device()
            tokens = torch.zeros(total, dtype=torch.long, device=device)
            logprobs = torch.zeros(total, dtype=torch.float32, device=device)
        tokens, logprobs = _broadcast_from_last(_pipeline_group(), tokens, logprobs)
        return tokens.cpu(), logprobs.cpu()

    def _stopped(self, ids: list[int], settings: SamplingSettings) -> tuple[str, Any] | None:
        """``("stop", why)`` if the continuation ``ids`` ends here; None to go on."""
        if ids[-1] in settings.stop_token_ids:
            return "stop", ids[-1]
        if settings.stop_strings:
            window = 4 * max(len(s) for s in settings.stop_strings) + self.config.stop_string_window
            tail = self.tokenizer.decode(ids[-window:], skip_special_tokens=False)
            for text in settings.stop_strings:
                if text in tail:
                    return "stop", text
        return None

    def _prompt_positions(self, request: GenerationRequest) -> Tensor:
        """The request's M-RoPE ids ``(3, L)``, computed from its grids as the data pipeline does if not given."""
        if request.position_ids is not None:
            return request.position_ids.long().cpu()
        model = self.model  # the language model's own position encoding (the settings it trains with)
        return model.language_model.position_encoding.position_ids(
            request.prompt_ids, image_token_id=model.image_token_id, video_token_id=model.video_token_id,
            image_grid_thw=request.images.grid_thw if request.images is not None else None,
            video_grid_thw=request.videos.grid_thw if request.videos is not None else None,
            second_per_grid_ts=request.video_seconds,
        )

    def _check_window(self, length: int, max_new_tokens: int) -> None:
        window = getattr(getattr(self.model.language_model, "config", None), "max_position_embeddings", None)
        if window is not None and length + max_new_tokens > window:
            raise KeyeUserError(
                f"megatron generator: prompt of {length} tokens + max_new_tokens {max_new_tokens} exceeds the "
                f"model's window of {window} positions"
            )

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device


# --- batch assembly --------------------------------------------------------------------------------------


def _left_pad(prompts: list[Tensor], positions: list[Tensor], length: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Ids ``[B, L]``, M-RoPE ids ``[3, B, L]`` (padding: 1, as the released code) and the real-token mask
    ``[B, L]``, every prompt ending at slot ``L - 1``."""
    from keye_plugins.position_encoding.mrope_time_aligned import PAD_POSITION

    batch = len(prompts)
    ids = torch.full((batch, length), pad_id, dtype=torch.long)
    pos = torch.full((3, batch, length), PAD_POSITION, dtype=torch.long)
    keep = torch.zeros(batch, length, dtype=torch.bool)
    for b, (prompt, p) in enumerate(zip(prompts, positions)):
        start = length - prompt.numel()
        ids[b, start:] = prompt
        pos[:, b, start:] = p
        keep[b, start:] = True
    return ids, pos, keep


def _prefill_mask(keep: Tensor) -> Tensor:
    """``[B, 1, L, L]`` bool, True = masked: causal over real tokens, padding hidden from them, and the padding
    positions attending to each other (no fully masked row; their outputs are never used). Each row is then
    two diagonal blocks, padding and prompt, which keye's SDPA attention runs as two calls."""
    length = keep.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()  # (L, L): True where visible
    real = keep[:, None, :, None] & keep[:, None, None, :]  # (B, 1, L, L)
    pads = ~keep[:, None, :, None] & ~keep[:, None, None, :]
    return ~((causal & real) | pads)


def _join(parts: list[VisionInputs | None]) -> VisionInputs | None:
    """The vision inputs of several prompts as one pack, in batch reading order."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return VisionInputs(torch.cat([p.patches for p in parts]), torch.cat([p.grid_thw.reshape(-1, 3) for p in parts]))


# --- pipeline parallel -------------------------------------------------------------------------------------


class _KeyeCache:
    """`keye.generate.kv_cache.KVCache`: keys after RoPE; a forward gets its new positions only."""

    def __init__(self, max_length: int) -> None:
        from keye.generate.kv_cache import KVCache

        self.cache = KVCache(max_length)
        self.cores: dict[int, list[Any]] = {}  # each chunk's core attentions, found at its first forward

    @property
    def offset(self) -> int:
        return self.cache.length

    def run(self, lm: Any, ids: Tensor, pos: Tensor, mask: Tensor, decoder_input: Tensor | None) -> Tensor:
        from keye.generate.kv_cache import attached, core_attentions

        if id(lm) not in self.cores:
            self.cores[id(lm)] = core_attentions(lm)
        last = None
        if self.offset == 0:  # prefill: the output layer runs at each row's last position only
            last = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
            last[:, -1] = True
        with attached(lm, self.cache, self.cores[id(lm)]):
            return lm(ids, pos[:, :, self.offset:], mask, decoder_input=decoder_input, logits_at=last)

    @staticmethod
    def logits(output: Tensor, batch: int) -> Tensor:
        """``(1, B, V/TP)`` (prefill) or ``(B, 1, V/TP)`` (decode) → ``(B, V)``, gathered over TP."""
        from megatron.core import parallel_state as mpu
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        logits = output.reshape(batch, -1)
        if mpu.model_parallel_is_initialized() and mpu.get_tensor_model_parallel_world_size() > 1:
            logits = gather_from_tensor_model_parallel_region(logits)
        return logits

    def advance(self, positions: int) -> None:
        self.cache.advance(positions)

    def repeat_rows(self, rows: Tensor) -> None:
        self.cache.repeat_rows(rows)


class _MegatronCache:
    """Megatron-Core's ``StaticInferenceContext``: keys before RoPE, so a forward gets the whole prefix's ids."""

    def __init__(self, batch: int, max_length: int) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        self.context = StaticInferenceContext(max_batch_size=batch, max_sequence_length=max_length)

    @property
    def offset(self) -> int:
        return self.context.sequence_len_offset

    def run(self, lm: Any, ids: Tensor, pos: Tensor, mask: Tensor, decoder_input: Tensor | None) -> Tensor:
        return lm(ids, pos, mask, decoder_input=decoder_input, inference_context=self.context)

    @staticmethod
    def logits(output: Tensor, batch: int) -> Tensor:
        return output[:, -1]  # (B, V): only the last position is materialised, gathered over TP

    def advance(self, positions: int) -> None:
        self.context.sequence_len_offset += positions
        self.context.enable_decode_mode()

    def repeat_rows(self, rows: Tensor) -> None:
        self.context.swap_key_value_dict(rows)


def _pipeline_group() -> Any:
    """The pipeline group when PP > 1, else None."""
    from megatron.core import parallel_state as mpu

    if not mpu.model_parallel_is_initialized() or mpu.get_pipeline_model_parallel_world_size() == 1:
        return None
    return mpu.get_pipeline_model_parallel_group()


def _recv_prev(group: Any, ids_shape: torch.Size, model: Any) -> Tensor:
    """The hidden states ``[s, B, H]`` of the previous stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    batch, seq = ids_shape
    config = model.config
    buffer = torch.empty(seq, batch, config.hidden_size, dtype=config.params_dtype, device=_device_of(model))
    dist.recv(buffer, src=mpu.get_pipeline_model_parallel_prev_rank(), group=group)
    return buffer


def _send_next(group: Any, hidden: Tensor) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    dist.send(hidden.contiguous(), dst=mpu.get_pipeline_model_parallel_next_rank(), group=group)


def _broadcast_from_last(group: Any, tokens: Tensor, logprobs: Tensor) -> tuple[Tensor, Tensor]:
    if group is None:
        return tokens, logprobs
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    last = mpu.get_pipeline_model_parallel_last_rank()
    dist.broadcast(tokens, src=last, group=group)
    dist.broadcast(logprobs, src=last, group=group)
    return tokens, logprobs


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


@hookimpl
def keye_register_generators(register) -> None:
    register("megatron", MegatronGenerator)
