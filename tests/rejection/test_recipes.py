"""The whole-recipe blueprints validate, with the alignment rounds expanded and wired round by round.
(Running the tiny recipe takes minutes; its measured numbers are in its header, not in a test.)"""

from __future__ import annotations

from pathlib import Path

from keye.config import load_blueprint

BLUEPRINTS = Path(__file__).resolve().parents[2] / "blueprints"


def test_tiny_recipe_has_every_stage_of_keye_vl(keye_registry):
    cfg = load_blueprint(BLUEPRINTS / "tiny" / "recipe.yaml", [], keye_registry)
    kinds = [(stage.name, stage.kind) for stage in cfg.stages]
    assert kinds == [
        ("stage0_vit", "contrastive"), ("stage1_align", "lm"), ("stage2_multitask", "lm"),
        ("stage3_anneal_image", "lm"), ("stage3_anneal_video", "lm"), ("stage3_merge", "merge"), ("stage3_eval", "lm"),
        ("sft", "lm"), ("cot", "cot_build"), ("cold_start", "lm"), ("mpo", "preference"), ("rl", "rl"),
        ("rs_r1", "rejection_sampling"), ("mpo_r1", "preference"), ("rs_r2", "rejection_sampling"),
        ("mpo_r2", "preference"), ("eval_rl", "eval"), ("final_eval", "eval"),
        ("reward_rl", "rejection_sampling"), ("reward_final", "rejection_sampling"),
    ]
    by_name = {stage.name: stage for stage in cfg.stages}
    assert by_name["sft"].init_from == "stage3_merge"
    for k in (1, 2):  # each round samples the stage before it and its MPO reads that round's pairs
        assert by_name[f"rs_r{k}"].options.stage == "" and by_name[f"mpo_r{k}"].init_from is None
        assert by_name[f"mpo_r{k}"].data.sources.pairs.path == f"runs/tiny-recipe/rs_r{k}/pairs.jsonl"
        assert by_name[f"rs_r{k}"].options.rewards.judge.stage == "rl"
    assert by_name["final_eval"].options.stage == "mpo_r2" and by_name["eval_rl"].options.stage == "rl"
    measures = (by_name["reward_rl"].options, by_name["reward_final"].options)  # the same measure of two models
    assert [m.stage for m in measures] == ["rl", "mpo_r2"] and measures[0].seed == measures[1].seed
    assert all(m.outputs == [] and not m.save_weights for m in measures)


def test_cluster_recipe_validates_for_its_layout(keye_registry):
    cfg = load_blueprint(BLUEPRINTS / "keye-vl-8b" / "recipe.yaml", [], keye_registry, nproc=128)
    names = [stage.name for stage in cfg.stages]
    assert names[-6:] == ["rl", "rs_r1", "mpo_r1", "rs_r2", "mpo_r2", "final_eval"]
    assert (cfg.parallel.tensor, cfg.parallel.pipeline) == (8, 4)
