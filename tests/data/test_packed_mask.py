"""A packed micro-batch carries its attention as a `PackedMask`, not as a dense ``(1, 1, T, T)`` mask.

* ``dense()`` is exactly the mask ``collate_pack`` used to build (``block_attention_mask`` with each tree block
  written over its sample: the independent formulation), and ``thd()`` has the cu_seqlens the language model
  used to read back from that mask (``causal_block_lengths``); a tree block has no ``thd`` form.
* At the 8B blueprints' 32768 tokens the micro-batch holds kilobytes, not the dense mask's GiB.
* The tiny Qwen3's per-token loss and gradients are bit for bit those of the dense mask it used to get, on
  each path the mask takes: ``thd`` (sdpa), the dense mask for Megatron's own attention, the preference tree.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from keye.data.batch import TokenSample, collate_pack
from keye.data.packing import block_attention_mask
from keye.data.preference import tree_attention
from keye.testing.distributed import run_distributed


def _sample(key: str, length: int, seed: int, attention: torch.Tensor | None = None) -> TokenSample:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (length,), generator=generator)
    return TokenSample(key=key, input_ids=ids, labels=ids.roll(-1), position_ids=torch.arange(length).expand(3, length),
                       attention=attention)


def _rows() -> dict[str, tuple[list[TokenSample], int]]:
    """Rows (samples, T): text samples with padding; a preference pair's tree beside a conversation; a row
    exactly full; a sample whose given attention is plain causal (it keeps the row's thd form). An empty
    sample is no block, also where the next one has its own pattern at the same start."""
    return {
        "text": ([_sample("a", 9, 1), _sample("empty", 0, 5), _sample("b", 14, 2), _sample("c", 5, 3)], 40),
        "tree": ([_sample("a", 9, 1), _sample("empty", 0, 5), _sample("pair", 6 + 4 + 5, 4, tree_attention(6, 4, 5))],
                 32),
        "full": ([_sample("a", 9, 1), _sample("b", 7, 2)], 16),
        "causal_given": ([_sample("a", 9, 1, torch.ones(9, 9, dtype=torch.bool).tril()), _sample("b", 3, 2)], 16),
    }


def _old_dense(samples: list[TokenSample], seq_len: int) -> torch.Tensor:
    """The mask ``collate_pack`` built until now: ``(1, 1, T, T)`` bool, True = masked."""
    cu = torch.tensor([0, *torch.tensor([len(s) for s in samples]).cumsum(0).tolist()])
    keep = block_attention_mask(cu, seq_len, causal=True)
    for start, sample in zip(cu.tolist(), samples):
        if sample.attention is not None:
            keep[start:start + len(sample), start:start + len(sample)] = sample.attention
    return (~keep).view(1, 1, seq_len, seq_len)


@pytest.mark.parametrize("row", ["text", "tree", "full", "causal_given"])
def test_packed_mask_stands_for_the_dense_mask(row: str) -> None:
    from keye.model.packing_masks import causal_block_lengths

    samples, seq_len = _rows()[row]
    mask = collate_pack(samples, seq_len).attention_mask
    old = _old_dense(samples, seq_len)
    assert torch.equal(mask.dense(), old) and mask.shape == old.shape
    lengths = causal_block_lengths(old)
    assert mask.causal_lengths() == lengths
    if lengths is None:
        assert row == "tree" and mask.thd() is None and list(mask.blocks) == [9]
    else:
        params = mask.thd()
        assert params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
        assert params.cu_seqlens_q.tolist() == torch.tensor([0, *lengths]).cumsum(0).tolist()
        assert params.max_seqlen_q == max(lengths) and not mask.blocks


def test_a_32k_row_holds_no_dense_mask() -> None:
    seq_len, n = 32768, 4000
    samples = [_sample(f"s{i}", n, i) for i in range(8)]
    batch = collate_pack(samples, seq_len)
    held = [getattr(batch, f.name) for f in dataclasses.fields(batch)] + [batch.attention_mask.cu_seqlens]
    held_bytes = sum(t.numel() * t.element_size() for t in held if isinstance(t, torch.Tensor))
    assert held_bytes < 2 * 2**20, held_bytes  # ids, labels, loss mask, positions: ~1.4 MiB; the dense mask was 1 GiB
    assert batch.attention_mask.length == seq_len
    assert batch.attention_mask.causal_lengths() == [n] * 8 + [seq_len - 8 * n]


# --- the tiny Qwen3, packed mask vs the dense one (one spawned process: Megatron's parallel state) ----------


def _losses() -> dict[str, bool]:
    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel

    ctx = init_parallel(seed=3)
    weights = None
    same: dict[str, bool] = {}
    for attention in ("sdpa", "megatron"):  # the same weights; the mask reaches attention as thd or dense
        llm = Qwen3LanguageModel(Qwen3LanguageModel.Config(**Qwen3LanguageModel.SIZES["tiny"], attention=attention),
                                 BuildContext(ctx, seed=3))
        weights = weights or {k: t.clone() for k, t in llm.state_dict().items() if t is not None}
        llm.load_state_dict(weights, strict=False)
        for row in ("text", "tree"):
            samples, seq_len = _rows()[row]
            batch = collate_pack(samples, seq_len)
            runs = []
            for mask in (batch.attention_mask, _old_dense(samples, seq_len)):
                llm.zero_grad(set_to_none=True)
                loss = llm(batch.input_ids, batch.position_ids, mask, labels=batch.labels)  # (1, T)
                loss.sum().backward()
                runs.append([loss.detach()] + [p.grad.clone() for p in llm.parameters() if p.grad is not None])
            same[f"{attention}/{row}"] = len(runs[0]) == len(runs[1]) and all(
                torch.equal(a, b) for a, b in zip(*runs))
    return same


def test_tiny_qwen3_loss_and_grads_unchanged_bit_for_bit() -> None:
    (same,) = run_distributed(_losses, 1)
    assert same == {"sdpa/text": True, "sdpa/tree": True, "megatron/text": True, "megatron/tree": True}, same
