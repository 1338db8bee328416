"""Semantic validation: what a run would refuse after building, refused by ``validate`` before anything is built.

Each case edits the shipped tiny blueprint (an override, or a copy of the file) in a way that validated
before and could not run, and checks the one line that now names the key path and the file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from keye.config import check_runnable, load_blueprint
from keye.config.semantics import FP8_BACKENDS, SCHEDULE_KINDS
from keye.errors import BlueprintError

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "blueprints" / "tiny" / "pretrain.yaml"
TINY_LABEL = "blueprints/tiny/pretrain.yaml"


def _error(registry, overrides=(), path=TINY, **kwargs) -> str:
    with pytest.raises(BlueprintError) as info:
        load_blueprint(path, list(overrides), registry, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def tiny_copy(tmp_path):
    """A function editing a copy of the tiny blueprint (a dict in place) and returning its path."""

    def write(edit) -> Path:
        folder = tmp_path / "tiny"
        shutil.copytree(TINY.parent, folder, dirs_exist_ok=True)
        tree = yaml.safe_load(TINY.read_text())
        edit(tree)
        path = folder / "edited.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        return path

    return write


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stages.0.steps=-1"], "stages.0.steps: must be an integer from 0 to 2147483647, got -1"),
        (["model.text_encoder.size=[[1]]"], "model.text_encoder.size: unknown size '[[1]]' for text_encoder"),  # fuzz find
        (["stages.5.options.weights=[{},1]"], "stages.5.options.weights.0: must be a finite number >= 0, got {}"),  # fuzz
        (["stages.0.data.sources.pairs.tasks=[{}]"], "stages.0.data.sources.pairs.tasks: expected task names, got [{}]"),
        (["stages.0.steps=10000000000000"], "stages.0.steps: must be an integer from 0 to 2147483647"),
        (["stages.0.options.batch_size=0"], "stages.0.options.batch_size: must be an integer from 1"),
        (["stages.1.data.max_tokens=-5"], "stages.1.data.max_tokens: must be an integer from 1"),
        (["stages.0.optimizer.lr=.inf"], "stages.0.optimizer.lr: must be a finite number >= 0, got inf"),
        (["stages.0.optimizer.lr=.nan"], "stages.0.optimizer.lr: must be a finite number >= 0, got nan"),
        (["stages.0.schedule.kind=cosine_restarts"],
         "stages.0.schedule.kind: 'cosine_restarts' is not one of constant, cosine, wsd, linear"),
        (["stages.1.data.video_frame_tokens=[16,4]"], "stages.1.data.video_frame_tokens.1: must be an integer from 16"),
        (["precision.fp8.amax_history=0"], "precision.fp8.amax_history: must be an integer from 1"),
        (["parallel.virtual_pipeline=2"], "parallel.virtual_pipeline: needs parallel.pipeline >= 2, got 1"),
        (["stages.6.steps=5"], f"{TINY_LABEL}: stages.6.train: 5 steps but no module trains"),
        # references between stages
        (["stages.3.init_from=nowhere"],
         "stages.3.init_from: 'nowhere' is neither an earlier stage (stage0_vit, stage1_align, stage2_multitask) nor a folder"),
        (["stages.3.init_from=stage3_merge"], "stages.3.init_from: stage 'stage3_merge' comes later"),
        (["stages.3.init_from=stage3_anneal_image"], "stages.3.init_from: a stage cannot start from its own weights"),
        (["stages.2.optimizer.lr_scale.vison_encoder=0.3"],
         "stages.2.optimizer.lr_scale.vison_encoder: unknown module 'vison_encoder'; known: vision_encoder, projector"),
        (["stages.1.optimizer.lr_scale.vision_encoder=0.1"],
         "stages.1.optimizer.lr_scale.vision_encoder: 'vision_encoder' does not train in this stage (stages.1.train)"),
        # component checks (check_config)
        (["model.language_model.num_attention_heads=3"],
         "blueprints/tiny/base.yaml: model.language_model.num_query_groups: 2 does not divide num_attention_heads (3)"),
        (["model.vision_encoder.num_heads=16"], "model.vision_encoder.num_heads: head_dim = hidden_size / num_heads = 2 "
                                                 "must divide by 4 for rope2d_vision"),
        (["stages.7.train=[projector]"], "an eval stage trains nothing; leave stages.7.steps and stages.7.train unset"),
        (["stages.7.options.stage=merged"], "stages.7.options.stage: no earlier stage named 'merged'; earlier stages: "
                                            "stage0_vit, stage1_align"),
        (["parallel.tensor=3"], "blueprints/tiny/base.yaml: model.vision_encoder.num_heads: 2 is not divisible by parallel.tensor (3)"),
        (["parallel.pipeline=2", "model.language_model.num_layers=3"],
         "model.language_model.num_layers: 3 layers do not split evenly over parallel.pipeline (2)"),
        (["parallel.pipeline=2"], f"{TINY_LABEL}: stages.0.options: the contrastive stage needs parallel.pipeline=1, got 2"),
        (["stages.0.options.caption_length=64"],
         "stages.0.options.caption_length: 64 tokens, but model.text_encoder.max_position_embeddings is 16"),
        (["model.projector.out_dim=32"], "model.projector.out_dim: 32, but model.language_model.hidden_size is 64"),
        (["stages.2.data.mixer.weights.imgae_qa=0.5"],
         "stages.2.data.mixer: data mixer 'weighted': weight for unknown source 'imgae_qa'; sources: image_qa, reasoning, video_qa"),
        (["stages.2.data.mixer.weights.image_qa=-1"], "stages.2.data.mixer: data mixer 'weighted': weight of 'image_qa' is negative"),
        (["stages.5.options.inputs=[stage3_anneal_image,nope]"], "stages.5.options.inputs.1: no stage named 'nope'"),
        (["stages.5.options.inputs=[stage3_anneal_image,stage3_eval]"],
         "stages.5.options.inputs.1: stage 'stage3_eval' does not come before this merge"),
        (["stages.5.options.inputs=[stage3_anneal_image,stage3_anneal_image]"],
         "stages.5.options.inputs.1: stage 'stage3_anneal_image' is listed twice"),
        (["stages.3.steps=0"], f"{TINY_LABEL}: stages.5.options.inputs.0: stage 'stage3_anneal_image' trains no steps"),
        (["stages.5.options.weights=[0.5,.nan]"], "stages.5.options.weights.1: must be a finite number >= 0, got nan"),
        (["stages.5.options.weights=[1.0]"], "stages.5.options.weights: 1 weights for 2 inputs"),
        (["stages.0.data.sources.pairs.num_samples=-3"], "stages.0.data.sources.pairs.num_samples: must be an integer from 0"),
        (["stages.0.data.sources.pairs.tasks=[nope]"], "stages.0.data.sources.pairs.tasks: unknown synthetic task 'nope'"),
        (["stages.0.data.sources.pairs.split=test"], "stages.0.data.sources.pairs.split: 'test' is not one of train, heldout"),
        (["stages.0.data.sources.pairs.max_bad_fraction=2"],
         "stages.0.data.sources.pairs.max_bad_fraction: must be a finite number >= 0 and <= 1, got 2.0"),
        (["stages.1.loss={name: next_token, label_smoothing: 0.1}"],
         "stages.1.loss.label_smoothing: not supported (Megatron's vocab-parallel cross entropy); must be 0"),
    ],
)
def test_blueprints_that_cannot_run_fail_validation_in_one_line(keye_registry, overrides, message):
    assert message in _error(keye_registry, overrides)


def test_a_mixer_source_without_a_weight_and_a_stage_without_data(keye_registry, tiny_copy):
    def no_weight(bp):
        del bp["stages"][2]["data"]["mixer"]["weights"]["reasoning"]

    path = tiny_copy(no_weight)
    assert _error(keye_registry, path=path).endswith(
        "edited.yaml: stages.2.data.mixer: data mixer 'weighted': source 'reasoning' has no weight")

    def no_sources(bp):
        bp["stages"][0]["data"]["sources"] = {}

    assert "stages.0.options: 800 steps but no data (stages.0.data.sources is empty)" in _error(
        keye_registry, path=tiny_copy(no_sources))


def test_layout_against_nproc(keye_registry):
    load_blueprint(TINY, ["parallel.tensor=2"], keye_registry, nproc=2)
    load_blueprint(TINY, ["parallel.data=3"], keye_registry, nproc=3)
    assert _error(keye_registry, ["parallel.tensor=2"], nproc=3) == (
        "override 'parallel.tensor=2': parallel.tensor: tensor 2 x pipeline 1 = 2 does not divide 3 processes")
    assert _error(keye_registry, ["parallel.data=3"], nproc=2) == (
        "override 'parallel.data=3': parallel.data: 3, but 2 processes / (tensor 1 x pipeline 1) = 2 data-parallel ranks")
    keye_8b = ROOT / "blueprints" / "keye-vl-8b" / "pretrain.yaml"
    load_blueprint(keye_8b, [], keye_registry, nproc=128)
    assert "parallel.tensor: tensor 8 x pipeline 4 = 32 does not divide 12 processes" in _error(
        keye_registry, path=keye_8b, nproc=12)


def test_run_needs_stages_and_existing_init_from_folders(keye_registry, tmp_path):
    base = load_blueprint(ROOT / "blueprints" / "tiny" / "base.yaml", [], keye_registry)  # a base validates...
    with pytest.raises(BlueprintError, match="stages: the blueprint has no stages, nothing to run"):
        check_runnable(base)  # ...but runs nothing
    cfg = load_blueprint(TINY, [f"stages.1.init_from={tmp_path}/missing"], keye_registry)
    with pytest.raises(BlueprintError, match=f"stages.1.init_from: no weights at {tmp_path}/missing/weights"):
        check_runnable(cfg)
    check_runnable(cfg, only_stage="stage2_multitask")  # that stage does not read it
    (tmp_path / "missing" / "weights").mkdir(parents=True)
    (tmp_path / "missing" / "weights" / "metadata.json").write_text("{}")  # what a published checkpoint has
    check_runnable(cfg)


def test_only_plain_interpolation_and_oc_env_resolve(keye_registry, tiny_copy, tmp_path, monkeypatch):
    marker = tmp_path / "resolver-ran"
    OmegaConf.register_resolver("keye_test_exec", lambda: marker.touch() or "x")
    try:
        path = tiny_copy(lambda bp: bp["run"].update(name="${keye_test_exec:}"))
        assert _error(keye_registry, path=path).endswith(
            "edited.yaml: run.name: resolver 'keye_test_exec' is not allowed in a blueprint; "
            "use plain ${a.b} interpolation or oc.env")
        assert "resolver 'oc.decode' is not allowed" in _error(keye_registry, ["run.name=${oc.decode:'1'}"])
        # OmegaConf turns an escaped call, or one read from the environment, into a live one once resolved
        assert "run.name: resolver 'keye_test_exec' is not allowed" in _error(
            keye_registry, [r"run.name=\${keye_test_exec:}"])
        monkeypatch.setenv("KEYE_TEST_RUN", "${keye_test_exec:}")
        assert _error(keye_registry, ["run.name=${oc.env:KEYE_TEST_RUN}"]).startswith(
            "override 'run.name=${oc.env:KEYE_TEST_RUN}': run.name: resolver 'keye_test_exec' is not allowed")
    finally:
        OmegaConf.clear_resolver("keye_test_exec")
    assert not marker.exists()
    monkeypatch.setenv("KEYE_TEST_RUN", "from-env")
    cfg = load_blueprint(TINY, ["run.name=${oc.env:KEYE_TEST_RUN}", "run.output_dir=runs/${run.name}"], keye_registry)
    assert (cfg.run.name, cfg.run.output_dir) == ("from-env", "runs/from-env")


def test_shared_lists_stay_equal_to_the_run_time_ones():
    """The validator keeps its own copies of these names so that validate never imports Megatron."""
    from keye.model.sdpa_attention import ATTENTION_IMPLS
    from keye.parallel.fp8 import BACKENDS
    from keye.train.optim import SCHEDULES

    assert set(SCHEDULE_KINDS) == set(SCHEDULES)
    assert set(FP8_BACKENDS) == set(BACKENDS)
    assert set(ATTENTION_IMPLS) == {"sdpa", "megatron"}  # qwen3 and the SigLIP towers' check_config
