"""The first-stage layer count that accounts for the vision encoder, checked by hand."""

from keye.model.pipeline_split import first_stage_layers, vision_cost_in_layers


def test_vision_cost_by_hand():
    # 400M ViT, 4 patches per vision token, half the tokens are vision, 200M per LLM layer → 4 layers.
    assert vision_cost_in_layers(400_000_000, 0, 200_000_000, vision_share=0.5, merge=2) == 4.0


def test_keye_8b_on_four_stages():
    # 36 layers on 4 stages: even is 9 each, and the first stage would also pay ~4 layers of vision.
    # 6 + 4 = 10 and 30 / 3 = 10: balanced.
    assert first_stage_layers(36, 4, 4.0) == 6


def test_no_vision_or_one_stage_keeps_the_even_split():
    assert first_stage_layers(36, 4, 0.0) is None
    assert first_stage_layers(36, 1, 4.0) is None


def test_small_vision_cost_keeps_even_when_nothing_is_better():
    # 4 layers on 2 stages, vision worth 0.2 of a layer: 2+0.2 vs 2 → moving one layer gives 1.2 vs 3: worse.
    assert first_stage_layers(4, 2, 0.2) is None


def _uneven_split_loss(pipeline: int) -> dict:
    import torch

    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel

    ctx = init_parallel(pipeline=pipeline, seed=5)
    sizes = {**Qwen3LanguageModel.SIZES["tiny"], "num_layers": 3, "pipeline_first_stage_layers": 1}
    model = Qwen3LanguageModel(Qwen3LanguageModel.Config(**sizes), BuildContext(ctx, pre_process=ctx.is_first_stage,
                                                                                post_process=ctx.is_last_stage, seed=5))
    layers = [layer.layer_number for layer in model.gpt.decoder.layers]
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12).expand(3, 1, 12)
    if pipeline == 1:
        with torch.no_grad():
            return {"layers": layers, "logits": model(ids, positions, None)}
    # Two stages by hand: stage 0 sends its hidden states, stage 1 finishes.
    import torch.distributed as dist

    with torch.no_grad():
        if ctx.is_first_stage:
            hidden = model(ids, positions, None)  # (L, B, H)
            dist.send(hidden.contiguous(), 1)
            return {"layers": layers}
        hidden = torch.empty(12, 1, sizes["hidden_size"])
        dist.recv(hidden, 0)
        model.set_input_tensor(hidden)
        return {"layers": layers, "logits": model(ids, positions, None)}


def test_first_stage_holds_the_configured_layers_and_results_do_not_change():
    from keye.testing.distributed import run_distributed

    [one] = run_distributed(_uneven_split_loss, 1, 1)
    first, second = run_distributed(_uneven_split_loss, 2, 2)
    assert one["layers"] == [1, 2, 3]
    assert (first["layers"], second["layers"]) == ([1], [2, 3])
    assert (second["logits"] - one["logits"]).abs().max() < 1e-5
