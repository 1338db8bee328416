"""The qwen3 language model (Megatron-Core GPTModel) against transformers' Qwen3ForCausalLM.

Same weights (converted with Qwen3LanguageModel.hf_to_keye), same token ids: the logits must agree. M-RoPE with
equal (t, h, w) ids must equal 1D RoPE: text-only Keye is plain Qwen3. Runs in a spawned process because
Megatron's parallel state is per process.
"""

import pytest
import torch

from keye.testing.distributed import run_distributed

TOLERANCE = 1e-5


def _compare_with_transformers() -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel

    ctx = init_parallel(seed=3)
    sizes = dict(Qwen3LanguageModel.SIZES["tiny"])
    results = {}
    hf_config = Qwen3Config(
        vocab_size=sizes["vocab_size"], hidden_size=sizes["hidden_size"], intermediate_size=sizes["ffn_hidden_size"],
        num_hidden_layers=sizes["num_layers"], num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_query_groups"], head_dim=sizes["head_dim"], rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=False,
        max_position_embeddings=4096, attention_bias=False,
    )
    torch.manual_seed(0)
    reference = Qwen3ForCausalLM(hf_config).eval()
    for module in reference.modules():  # non-trivial norm weights, so a swapped norm would show
        if "RMSNorm" in type(module).__name__:
            module.weight.data.uniform_(0.5, 1.5)
    ids = torch.randint(0, sizes["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits  # (B, L, V)

    hf_state = reference.state_dict()
    for embedding in ("rope", "mrope"):
        scheme = {"rope": {"name": "rope1d"}, "mrope": sizes["position_encoding"]}[embedding]
        config = Qwen3LanguageModel.Config(**{**sizes, "position_encoding": scheme})
        model = Qwen3LanguageModel(config, BuildContext(ctx)).eval()
        model.load_state_dict(Qwen3LanguageModel.hf_to_keye(hf_state, config), strict=False)
        positions = torch.arange(24).expand(2, 24)  # (B, L)
        if embedding == "mrope":
            positions = positions.unsqueeze(0).expand(3, 2, 24)  # (3, B, L): text ids equal on all axes
        with torch.no_grad():
            logits = model(ids, positions, attention_mask=None)  # (B, L, V)
        results[embedding] = (logits - expected).abs().max().item()
        back = Qwen3LanguageModel.keye_to_hf({k: v for k, v in model.state_dict().items() if v is not None}, config)
        results[f"{embedding}_round_trip"] = all(torch.equal(back[name], hf_state[name]) for name in back) and set(back) == {
            n for n in hf_state if "rotary" not in n
        }
    return results


def test_qwen3_matches_transformers_and_mrope_reduces_to_rope():
    [result] = run_distributed(_compare_with_transformers, 1)
    assert result["rope"] < TOLERANCE, result
    assert result["mrope"] < TOLERANCE, result
    assert result["rope_round_trip"] and result["mrope_round_trip"]


def _masked_and_full_loss() -> dict:
    """Per-token loss and gradients with and without a loss mask (which skips the last layer's MLP and the
    output layer where it is 0, or the output layer only when layers are recomputed), on a batch of two
    sequences and on one where no position counts."""
    from keye.model.loss_rows import only_loss_rows
    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel

    ctx = init_parallel(seed=5)
    generator = torch.Generator().manual_seed(2)
    vocab = Qwen3LanguageModel.SIZES["tiny"]["vocab_size"]
    ids = torch.randint(0, vocab, (2, 16), generator=generator)
    labels = torch.randint(0, vocab, (2, 16), generator=generator)
    positions = torch.arange(16).expand(2, 16)
    masks = {"some": (torch.rand(2, 16, generator=generator) > 0.6).float(), "none": torch.zeros(2, 16)}
    results = {}
    for recompute in (False, True):
        config = Qwen3LanguageModel.Config(**{**Qwen3LanguageModel.SIZES["tiny"], "position_encoding": {"name": "rope1d"}},
                                           recompute=recompute)
        model = Qwen3LanguageModel(config, BuildContext(ctx))
        with only_loss_rows(model.gpt, masks["some"].bool()) as where:
            pass
        for name, mask in masks.items():
            runs = []
            for loss_mask in (None, mask):
                model.zero_grad(set_to_none=True)
                per_token = model(ids, positions, None, labels=labels, loss_mask=loss_mask)  # (B, L)
                (per_token * mask).sum().backward()
                grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                         for n, p in model.named_parameters()}
                runs.append((per_token.detach(), grads))
            (full, full_grads), (masked, masked_grads) = runs
            results[where, name] = {
                "kept": int(mask.sum()),
                "loss_difference": (full * mask - masked).abs().max().item(),
                "loss_outside_mask": masked[mask == 0].abs().max().item(),
                "grad_difference": max((full_grads[n] - masked_grads[n]).abs().max().item() for n in full_grads),
                "grad_norm": sum(g.norm() ** 2 for g in full_grads.values()).item() ** 0.5,
            }
    return results


@pytest.fixture(scope="module")
def masked_and_full() -> dict:
    [result] = run_distributed(_masked_and_full_loss, 1)
    return result


@pytest.mark.parametrize("where", ["last_layer", "output_layer"])
def test_loss_mask_skips_rows_and_changes_nothing_counted(masked_and_full, where):
    result = masked_and_full
    assert sorted(result) == sorted((w, n) for w in ("last_layer", "output_layer") for n in ("some", "none"))
    some, none = result[where, "some"], result[where, "none"]
    assert 0 < some["kept"] < 32 and some["grad_norm"] > 0
    assert some["loss_difference"] < 1e-6 and some["loss_outside_mask"] == 0
    assert some["grad_difference"] < 1e-6  # the GEMMs block a smaller matrix differently: rounding only
    assert none["kept"] == 0 and none["grad_norm"] == 0  # nothing counts: no gradient either way
    assert none["loss_outside_mask"] == 0 and none["grad_difference"] == 0
