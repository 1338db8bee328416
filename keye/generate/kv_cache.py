"""keye's own KV cache for decoding: keys stored *after* RoPE, one buffer pair per attention layer.

Why not only Megatron-Core's ``StaticInferenceContext``: it stores keys before RoPE and rotates the whole
cached prefix again at every step (and with M-RoPE needs the position ids of the whole prefix each step to
build the table). On ``tools/bench/generate.py`` (the small model, 8 prompts x 4 samples x 128 tokens, one CPU
thread) that costs 3.0-3.2 s against 1.4-1.7 s with this cache. Storing rotated keys, as Hugging Face and vLLM do,
makes a step's RoPE work that of its new tokens only, with the rotary tables computed once per step for all
layers (``keye.model.sdpa_attention.rotary_tables``).

The cache lives in keye's core attention (``SDPAAttention``): while `attached`, each of its ``forward``
calls hands this call's rotated keys and values to `KVCache.extend`, which writes them after the cached
ones and returns the whole prefix to attend to. The model runs its ordinary (training) forward otherwise:
no inference context, the same modules and parameters. Models whose attention is not ``SDPAAttention``
(Transformer Engine's layer spec, ``attention: megatron``) cannot use it: `supports_kv_cache` says so and
the ``megatron`` generator falls back to Megatron's static context.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor


class KVCache:
    """Per-layer key/value buffers ``[B, groups, max_length, head_dim]``, filled up to ``length`` positions.

    ``extend`` is called by every layer during one forward with that forward's new positions; the caller
    moves ``length`` on with `advance` after the forward (all layers of a forward share one offset).

    Why batch-major buffers: the attention reads the cached prefix as ``[B, g, L, d]`` (SDPA's layout); a
    slice of these buffers is that, with each (row, group)'s ``L x d`` keys contiguous, and CPU flash
    attention reads it about 1.4x faster than the strided view of a sequence-major buffer (same results,
    bit for bit; ``tools/bench/generate.py``).
    """

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.length = 0
        self._layers: dict[int, tuple[Tensor, Tensor]] = {}

    def extend(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``key``/``value`` ``[s, B, g, d]`` at positions ``length .. length + s``; the cached prefix with
        them, as ``[length + s, B, g, d]`` views."""
        end = self.length + key.shape[0]
        if end > self.max_length:
            raise ValueError(f"KVCache: {end} positions exceed the {self.max_length} it was made for")
        if layer not in self._layers:
            s, batch, groups, dim = key.shape
            self._layers[layer] = (key.new_empty((batch, groups, self.max_length, dim)),
                                   value.new_empty((batch, groups, self.max_length, value.shape[-1])))
        keys, values = self._layers[layer]
        keys[:, :, self.length:end] = key.permute(1, 2, 0, 3)
        values[:, :, self.length:end] = value.permute(1, 2, 0, 3)
        return keys[:, :, :end].permute(2, 0, 1, 3), values[:, :, :end].permute(2, 0, 1, 3)  # (length + s, B, g, d)

    def append(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """One decode step's ``key``/``value`` ``[B, g, d]`` stored at position ``length`` of a layer that
        `extend` has filled (the prefill); the cached prefix with them, batch-major ``[B, g, length + 1, d]``
        (`keye.generate.lean_decode` attends in that layout, so nothing is permuted)."""
        if self.length >= self.max_length:
            raise ValueError(f"KVCache: {self.length + 1} positions exceed the {self.max_length} it was made for")
        keys, values = self._layers[layer]
        keys[:, :, self.length] = key
        values[:, :, self.length] = value
        return keys[:, :, :self.length + 1], values[:, :, :self.length + 1]

    def advance(self, positions: int) -> None:
        self.length += positions

    def repeat_rows(self, rows: Tensor) -> None:
        """Batch row ``i`` becomes old row ``rows[i]`` (the samples of a prompt share its cached prefill)."""
        self._layers = {layer: (k[rows], v[rows]) for layer, (k, v) in self._layers.items()}


def core_attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The core attention modules of ``model``'s attention layers, in order."""
    from megatron.core.transformer.attention import Attention

    return [m.core_attention for m in model.modules() if isinstance(m, Attention)]


def supports_kv_cache(model: torch.nn.Module) -> bool:
    """Whether every attention layer of ``model`` (this process's part) can use a `KVCache`."""
    from keye.model.sdpa_attention import SDPAAttention

    cores = core_attentions(model)
    return all(isinstance(c, SDPAAttention) and not c._megatron_only for c in cores)


@contextlib.contextmanager
def attached(model: torch.nn.Module, cache: KVCache, cores: list[torch.nn.Module] | None = None) -> Iterator[None]:
    """Within the block, every forward of ``model`` reads and extends ``cache``. ``cores``: `core_attentions`
    of ``model``, if the caller kept them (walking the modules costs about 0.3 ms, once per decode step)."""
    cores = core_attentions(model) if cores is None else cores
    for core in cores:
        core.kv_cache = cache
    try:
        yield
    finally:
        for core in cores:
            core.kv_cache = None
