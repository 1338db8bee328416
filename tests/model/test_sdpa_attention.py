"""``SDPAAttention`` (keye.model.sdpa_attention) against Megatron's local ``DotProductAttention``.

Both modules get the same random q/k/v ``[L, b, heads, head_dim]`` and mask; outputs and the gradients of
q, k and v must agree within 1e-5 (fp32). Cases: causal without a mask, a packed causal mask with a
padding block (what ``collate_pack`` builds), the ViT's bidirectional block-diagonal mask, masks that
are not block-diagonal (the fallbacks), GQA, a different block layout per batch item, ``thd``
``PackedSeqParams``, and dropout (training only). Then whole towers (qwen3, siglip_navit) built with
``attention: sdpa`` and ``attention: megatron`` on packed inputs, in one process and with TP=2 (SDPA sees
per-rank heads).
Megatron's parallel state is per process, so everything runs in spawned ranks.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from keye.testing.distributed import run_distributed

TOLERANCE = 1e-5
HEAD_DIM = 16


# --- the modules alone ------------------------------------------------------------------------------


def _modules(heads: int, groups: int, mask_type: Any) -> tuple[Any, Any]:
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from keye.model.sdpa_attention import SDPAAttention

    config = TransformerConfig(
        num_layers=1, hidden_size=heads * HEAD_DIM, num_attention_heads=heads, num_query_groups=groups,
        kv_channels=HEAD_DIM, attention_dropout=0.0, masked_softmax_fusion=False, use_cpu_initialization=True,
    )
    return (DotProductAttention(config, 1, mask_type, "self"), SDPAAttention(config, 1, mask_type, "self"))


def _compare(module_a: Any, module_b: Any, length: int, batch: int, heads: int, groups: int,
             mask: torch.Tensor | None, packed: Any = None) -> float:
    """Max |a - b| over the output and the q/k/v gradients. ``packed``: thd params for ``module_b`` only."""
    generator = torch.Generator().manual_seed(length * 31 + heads)
    q = torch.randn(length, batch, heads, HEAD_DIM, generator=generator)
    k, v = (torch.randn(length, batch, groups, HEAD_DIM, generator=generator) for _ in range(2))
    upstream = torch.randn(length, batch, heads * HEAD_DIM, generator=generator)
    results = []
    for module, use_packed in ((module_a, False), (module_b, packed is not None)):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        if use_packed:  # thd: no batch dimension in, [t, np * hn] out
            out = module(*(x[:, 0] for x in inputs), None, packed_seq_params=packed)[:, None]
        else:
            out = module(*inputs, mask)
        (out * upstream).sum().backward()
        results.append([out.detach(), *(x.grad for x in inputs)])
    return max((a - b).abs().max().item() for a, b in zip(*results))


def _module_cases() -> dict[str, Any]:
    from megatron.core.transformer.enums import AttnMaskType

    from keye.data.packing import block_attention_mask
    from keye.model.packing_masks import block_diagonal_mask, packed_seq_params
    from keye.model.sdpa_attention import block_structure
    from keye.parallel import init_parallel

    init_parallel(tensor=1, seed=7)
    causal, no_mask = AttnMaskType.causal, AttnMaskType.no_mask
    out: dict[str, Any] = {}

    # blocks read from masks, by hand
    packed_causal = ~block_attention_mask([0, 3, 5], 8, causal=True)  # samples 3 + 2, padding 3
    out["blocks_causal"] = block_structure(packed_causal)
    out["blocks_vit"] = block_structure(block_diagonal_mask([2, 1, 3])[0, 0])
    causal_then_full = torch.block_diag(torch.ones(2, 2).triu(1), torch.zeros(3, 3)).bool()
    out["blocks_mixed"] = block_structure(block_diagonal_mask([2, 3])[0, 0] | causal_then_full)
    leaky = packed_causal.clone()
    leaky[6, 1] = False  # a padding token sees a sample token
    out["blocks_leaky"] = block_structure(leaky)
    holed = packed_causal.clone()
    holed[2, 0] = True  # one masked entry inside a causal block
    out["blocks_holed"] = block_structure(holed)

    # (i) causal, no mask
    out["causal_no_mask"] = _compare(*_modules(4, 4, causal), 37, 2, 4, 4, None)
    out["bidirectional_no_mask"] = _compare(*_modules(4, 4, no_mask), 37, 2, 4, 4, None)
    # (ii) packed causal blocks + padding block (collate_pack's mask)
    llm_mask = (~block_attention_mask([0, 10, 25, 31], 40, causal=True)).view(1, 1, 40, 40)
    out["causal_blocks"] = _compare(*_modules(4, 4, causal), 40, 1, 4, 4, llm_mask)
    # (iii) the ViT's bidirectional blocks
    vit_mask = block_diagonal_mask([7, 12, 1, 5])
    out["vit_blocks"] = _compare(*_modules(4, 4, no_mask), 25, 1, 4, 4, vit_mask)
    # (iv) not block-diagonal: key padding per item (padded rows still see the valid keys), a random
    # mask, and one with a fully masked row (Megatron's -10000 row: uniform over every key)
    lengths = torch.tensor([20, 13])
    keys_valid = torch.arange(20)[None, :] < lengths[:, None]  # (b, L)
    key_padding = ~keys_valid[:, None, None, :].expand(2, 1, 20, 20)
    out["key_padding"] = _compare(*_modules(4, 4, no_mask), 20, 2, 4, 4, key_padding)
    random_mask = torch.rand(1, 1, 23, 23, generator=torch.Generator().manual_seed(3)) < 0.5
    random_mask[..., 0] = False  # every row sees key 0
    out["random_mask"] = _compare(*_modules(4, 4, no_mask), 23, 2, 4, 4, random_mask)
    dead_row = random_mask.clone()
    dead_row[0, 0, 5] = True
    out["fully_masked_row"] = _compare(*_modules(4, 4, no_mask), 23, 2, 4, 4, dead_row)
    # (v) GQA: 4 query heads over 2 key/value groups, on causal blocks and without a mask
    out["gqa_blocks"] = _compare(*_modules(4, 2, causal), 40, 1, 4, 2, llm_mask)
    out["gqa_no_mask"] = _compare(*_modules(4, 2, causal), 33, 2, 4, 2, None)
    # a different block layout per batch item
    two = torch.cat([llm_mask, (~block_attention_mask([0, 40], 40, causal=True)).view(1, 1, 40, 40)])
    out["per_item_blocks"] = _compare(*_modules(4, 2, causal), 40, 2, 4, 2, two)
    # thd PackedSeqParams (no mask) against Megatron on the equivalent mask
    out["thd_vit"] = _compare(*_modules(4, 4, no_mask), 25, 1, 4, 4, vit_mask,
                              packed=packed_seq_params([7, 12, 1, 5]))
    thd_causal = packed_seq_params([10, 15, 6, 9])
    out["thd_causal"] = _compare(*_modules(4, 2, causal), 40, 1, 4, 2, llm_mask, packed=thd_causal)
    # dropout: drawn in training only (eval equals the no-dropout result)
    _, plain = _modules(4, 4, causal)
    dropping = type(plain)(plain.config, 1, causal, "self", attention_dropout=0.5)
    q = torch.randn(16, 1, 4, HEAD_DIM)
    reference = plain(q, q, q, None)
    out["dropout_eval"] = (dropping.eval()(q, q, q, None) - reference).abs().max().item()
    out["dropout_train"] = (dropping.train()(q, q, q, None) - reference).abs().max().item()
    return out


@pytest.fixture(scope="module")
def module_results() -> dict[str, Any]:
    [result] = run_distributed(_module_cases, 1)
    return result


def test_blocks_are_read_from_the_mask(module_results: dict[str, Any]) -> None:
    assert module_results["blocks_causal"] == [(0, 3, True), (3, 5, True), (5, 8, True)]
    assert module_results["blocks_vit"] == [(0, 2, False), (2, 3, False), (3, 6, False)]
    assert module_results["blocks_mixed"] == [(0, 2, True), (2, 5, False)]
    assert module_results["blocks_leaky"] is None
    assert module_results["blocks_holed"] is None


def test_dropout_only_in_training(module_results: dict[str, Any]) -> None:
    assert module_results["dropout_eval"] < TOLERANCE
    assert module_results["dropout_train"] > 0.1


@pytest.mark.parametrize("case", [
    "causal_no_mask", "bidirectional_no_mask", "causal_blocks", "vit_blocks", "key_padding", "random_mask",
    "fully_masked_row", "gqa_blocks", "gqa_no_mask", "per_item_blocks", "thd_vit", "thd_causal",
])
def test_matches_megatron_dot_product_attention(module_results: dict[str, Any], case: str) -> None:
    assert module_results[case] < TOLERANCE, (case, module_results[case])


# --- whole towers: attention sdpa vs megatron -------------------------------------------------------


def _towers(tensor: int) -> dict[str, Any]:
    """Max |sdpa - megatron| of qwen3 (per-token loss and grads) and siglip_navit (features and grads)."""
    from keye.data.packing import block_attention_mask
    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel
    from keye_plugins.vision_encoder.siglip_navit import SiglipNaViT

    ctx = init_parallel(tensor=tensor, seed=5)
    generator = torch.Generator().manual_seed(11)
    length = 48
    ids = torch.randint(0, 1024, (1, length), generator=generator)
    cu = [0, 17, 30, 41]  # three samples, then a padding block of 7
    mask = (~block_attention_mask(cu, length, causal=True)).view(1, 1, length, length)
    pos = torch.cat([torch.arange(e - s) for s, e in zip(cu, cu[1:] + [length])]).expand(3, 1, length)
    grids = torch.tensor([[1, 4, 4], [1, 2, 6], [2, 2, 3]])
    patches = torch.randn(int(grids.prod(-1).sum()), 3, 14, 14, generator=generator)

    out: dict[str, Any] = {"core_attention": []}
    runs: dict[str, list[dict[str, torch.Tensor]]] = {"qwen3": [], "siglip_navit": []}
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for attention in ("sdpa", "megatron"):  # the same weights (copied), only the core attention differs
        llm = Qwen3LanguageModel(Qwen3LanguageModel.Config(**Qwen3LanguageModel.SIZES["tiny"], attention=attention),
                                 BuildContext(ctx, seed=5))
        vit = SiglipNaViT(SiglipNaViT.Config(**SiglipNaViT.SIZES["tiny"], attention=attention), BuildContext(ctx))
        for name, module in (("qwen3", llm), ("siglip_navit", vit)):
            weights.setdefault(name, {k: t.clone() for k, t in module.state_dict().items() if t is not None})
            module.load_state_dict(weights[name], strict=False)
        out["core_attention"] += [type(m.decoder.layers[0].self_attention.core_attention).__name__
                                  for m in (llm.gpt, vit)]
        loss = llm(ids, pos, mask, labels=ids.roll(-1, 1))  # (1, L)
        loss.sum().backward()
        runs["qwen3"].append({"loss": loss.detach(), **{n: p.grad for n, p in llm.named_parameters()}})
        features = vit(patches, grids)  # (N, D)
        (features * torch.linspace(-1, 1, features.numel()).view_as(features)).sum().backward()
        runs["siglip_navit"].append({"features": features.detach(), **{n: p.grad for n, p in vit.named_parameters()}})
    for name, (sdpa, megatron) in runs.items():
        out[name] = max((sdpa[key] - megatron[key]).abs().max().item() for key in sdpa)
    return out


@pytest.mark.parametrize("tensor", [1, 2])
def test_towers_match_with_either_attention(tensor: int) -> None:
    for rank, result in enumerate(run_distributed(_towers, tensor, tensor)):
        assert result["core_attention"] == ["SDPAAttention"] * 2 + ["DotProductAttention"] * 2, result
        assert max(result["qwen3"], result["siglip_navit"]) < TOLERANCE, (tensor, rank, result)
