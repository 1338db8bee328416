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
