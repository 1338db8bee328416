"""Interleaved (virtual) pipeline through the stages: PP=2 x VPP=2 in two real processes runs like one process.

Each rank builds two model chunks (layers 0 and 2 on the first rank, 1 and 3 on the second; the vision side
and the embedding in chunk 0 of the first rank, the head in chunk 1 of the last); Megatron's interleaved
schedule runs them. The weights are drawn per global name, so both layouts start from the same model; the
first stage's weights (written from the chunks) are what the second stage starts from, and the second stage
is resumed from a training checkpoint written from the chunks. After them, in the same runs: an ``eval`` stage
(greedy generation through the chunks: the same answers), a ``preference`` stage (a live reference built as
chunks: the same losses) and an ``rl`` stage (rollouts sampled through the chunks, a β > 0 reference, old
log-probs and updates on fewer packs than the pipeline needs: the same rewards and loss). Full tensors
(Hugging Face weights) go into and come out of the chunks by global layer. A stage kind that does not build
chunks (``contrastive``) is refused at validation, in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from keye.config import load_blueprint
from keye.errors import BlueprintError
from keye.parallel.dist_checkpoint import read_full_tensors
from keye.testing import write_blueprint
from keye.testing.distributed import run_distributed

LAUNCH = [sys.executable, "-m", "keye.launch.cli", "run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
MODEL = {
    "vision_encoder": {"name": "siglip_navit", "size": "tiny"},
    "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
    "language_model": {"name": "qwen3", "size": "tiny", "num_layers": 4},  # one layer per (stage, chunk)
}
DATA = {
    "max_tokens": 256, "pack_buffer": 8, "image_max_tokens": 16, "video_frame_tokens": [4, 16], "video_max_tokens": 64,
    "sources": {"qa": {"name": "synthetic", "tasks": ["color", "count", "video_direction"], "num_samples": 200}},
    "heldout": {"qa": {"name": "synthetic", "tasks": ["color"], "split": "heldout", "num_samples": 8}},
}
ALL = ["vision_encoder", "projector", "language_model"]


def _stage(name: str, train: list[str], steps: int, num_microbatches: int) -> dict:
    return {"name": name, "kind": "lm", "train": train, "steps": steps, "optimizer": {"lr": 3e-3},
            "schedule": {"kind": "cosine", "warmup_steps": 1}, "data": DATA,
            "options": {"eval_batches": 3, "num_microbatches": num_microbatches}}


#: the stages after the two lm stages, each reading the weights of the one before (eval: of ``second``)
LATER = [
    {"name": "answers", "kind": "eval", "data": {"image_max_tokens": 16, "video_frame_tokens": [4, 16], "video_max_tokens": 64},
     "options": {"stage": "second", "synthetic_tasks": ["color", "video_direction"], "synthetic_samples": 4,
                 "mode": "no_think", "max_new_tokens": 6, "batch_size": 4}},
    {"name": "prefer", "kind": "preference", "train": ["language_model"], "steps": 2, "loss": {"name": "mpo"},
     "optimizer": {"lr": 3e-3}, "schedule": {"kind": "constant", "warmup_steps": 0},
     "options": {"reference": "live", "num_microbatches": 2, "eval_batches": 2},
     "data": {**DATA, "max_tokens": 512,
              "sources": {"pairs": {"name": "synthetic", "tasks": ["preference"], "num_samples": 40}},
              "heldout": {"pairs": {"name": "synthetic", "tasks": ["preference"], "split": "heldout", "num_samples": 4}}}},
    {"name": "reinforce", "kind": "rl", "train": ["language_model"], "steps": 1, "loss": {"name": "grpo", "beta": 0.1},
     "optimizer": {"lr": 1e-3}, "schedule": {"kind": "constant", "warmup_steps": 0},
     "options": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8, "eval_prompts": 2,
                 "generator": {"name": "megatron", "kv_cache": "megatron"},  # eval decodes with keye's cache
                 "dynamic_sampling": False, "mask_truncated": False, "save_rollouts": True},
     "data": {**DATA, "max_tokens": 512,
              "sources": {"prompts": {"name": "synthetic", "tasks": ["rl"], "num_samples": 20}},
              "heldout": {"prompts": {"name": "synthetic", "tasks": ["rl"], "split": "heldout", "num_samples": 2}}}},
]


def _blueprint(tmp_path: Path, name: str, parallel: dict) -> Path:
    # 2 then 3 micro-batches a step: one interleaved group of PP, and a count that is not a multiple of PP;
    # the held-out pass has 3 too. A checkpoint after every step (not after the last: it has its weights).
    return write_blueprint(tmp_path / f"{name}.yaml", {
        "run": {"name": name, "output_dir": str(tmp_path / name), "seed": 11, "checkpoint_every": 1},
        "model": MODEL, "parallel": parallel,
        # second: one held-out batch, fewer than the pipeline's 2 (the pass adds a batch that counts for nothing)
        "stages": [_stage("first", ALL, 2, 2), {**_stage("second", ["language_model"], 2, 3),
                                                 "options": {"eval_batches": 1, "num_microbatches": 3}}, *LATER],
    })


def _launch(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*LAUNCH, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One process and PP=2 x VPP=2 (side by side); then the VPP run's second stage is resumed from its
    step-1 checkpoint (its done marker removed, as if killed in step 2), so its step 2, held-out loss and
    weights come from a training state restored into the chunks."""
    tmp_path = tmp_path_factory.mktemp("vpp")
    one = _launch(str(_blueprint(tmp_path, "one", {})))
    try:
        vpp = _blueprint(tmp_path, "vpp", {"pipeline": 2, "virtual_pipeline": 2})
        _wait(_launch(str(vpp), "--nproc", "2"))
        (tmp_path / "vpp" / "second" / "done.json").unlink()
        _wait(_launch(str(vpp), "--nproc", "2", "--resume"))
        _wait(one)
    finally:
        if one.poll() is None:  # the VPP run failed first
            one.kill()
            one.wait()
    return tmp_path


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_losses_and_grad_norms_match_one_process(runs):
    """lm, preference (live reference chunks) and rl steps: the same loss and gradient norm as one process."""
    one = {(r["stage"], r["step"]): r for r in _records(runs / "one")}
    vpp = {(r["stage"], r["step"]): r for r in _records(runs / "vpp")}
    assert sorted(vpp) == sorted(one) == [("first", 1), ("first", 2), ("prefer", 1), ("prefer", 2),
                                          ("reinforce", 1), ("second", 1), ("second", 2)]
    keys = sorted(one)
    assert [vpp[k]["loss"] for k in keys] == pytest.approx([one[k]["loss"] for k in keys], abs=1e-5)
    assert [vpp[k]["grad_norm"] for k in keys] == pytest.approx([one[k]["grad_norm"] for k in keys], rel=1e-4)
    for name in ("reward_accuracy", "margin", "delta"):  # MPO against the live reference, built as chunks
        assert [vpp[("prefer", s)][name] for s in (1, 2)] == pytest.approx([one[("prefer", s)][name] for s in (1, 2)],
                                                                          abs=1e-5), name
    rl_one, rl_vpp = one[("reinforce", 1)], vpp[("reinforce", 1)]
    assert rl_vpp["updates"] == rl_one["updates"] == 1  # rollouts sampled through the chunks trained
    for name in ("reward", "response_tokens", "kl", "ratio", "entropy"):  # same rollouts, old and reference log-probs
        assert rl_vpp[name] == pytest.approx(rl_one[name], abs=1e-5), name


def test_generation_through_chunks_answers_as_one_process(runs):
    """The megatron generator through both chunks of each rank: the rl stage's sampled rollouts (Megatron's static
    inference context, decode steps through the model's forward; temperature 1: a wrong layer order would draw
    other tokens) and the eval stage's greedy answers (keye's KV cache, lean decode steps) are those of one
    process, and so is the rl stage's held-out reward."""
    rollouts = {run: [json.loads(line) for line in (runs / run / "reinforce" / "rollouts.jsonl").read_text().splitlines()]
                for run in ("one", "vpp")}
    assert len(rollouts["vpp"]) == 4 and all(len(r["token_ids"]) == 8 for r in rollouts["one"])
    assert [r["token_ids"] for r in rollouts["vpp"]] == [r["token_ids"] for r in rollouts["one"]]
    rows = {run: [json.loads(line) for line in (runs / run / "answers" / "results.jsonl").read_text().splitlines()]
            for run in ("one", "vpp")}
    assert len(rows["vpp"]) == 4 and all(r["response"] for r in rows["one"])
    assert [(r["prompt"], r["response"], r["score"]) for r in rows["vpp"]] == \
        [(r["prompt"], r["response"], r["score"]) for r in rows["one"]]
    one, vpp = (json.loads((runs / run / "summary.json").read_text())["stages"] for run in ("one", "vpp"))
    assert vpp["answers"]["score"] == one["answers"]["score"]
    for when in ("eval_before", "eval_after"):
        assert vpp["reinforce"][when]["heldout_reward"] == pytest.approx(one["reinforce"][when]["heldout_reward"])
        assert vpp["reinforce"][when]["heldout_response_tokens"] == one["reinforce"][when]["heldout_response_tokens"]


def test_heldout_loss_matches_one_process(runs):
    one, vpp = (json.loads((runs / run / "summary.json").read_text())["stages"] for run in ("one", "vpp"))
    for stage in ("first", "second"):
        for when in ("eval_before", "eval_after"):
            assert vpp[stage][when]["heldout_loss"] == pytest.approx(one[stage][when]["heldout_loss"], abs=1e-5)
    for name in ("heldout_margin", "heldout_chosen_nll", "heldout_reward_accuracy", "heldout_answer_accuracy"):
        assert vpp["prefer"]["eval_after"][name] == pytest.approx(one["prefer"]["eval_after"][name], abs=1e-5), name
    assert vpp["second"]["initialised_from"].endswith("first/weights")
    assert vpp["second"]["resumed_from_step"] == 1 and one["second"]["resumed_from_step"] == 0


def test_weights_written_from_chunks_are_the_whole_model(runs):
    """Every global layer is in the checkpoint once, equal to the one-process weights."""
    one, vpp = read_full_tensors(runs / "one" / "second" / "weights"), read_full_tensors(runs / "vpp" / "second" / "weights")
    assert sorted(vpp) == sorted(one)
    for name in one:
        assert vpp[name].shape == one[name].shape, name
        torch.testing.assert_close(vpp[name], one[name], rtol=0, atol=1e-4, msg=name)


class _OneModelStage:
    """A third-party stage kind that builds one model per rank (no ``supports_virtual_pipeline``)."""

    @dataclass
    class Config:
        pass

    def __init__(self, config: Config, ctx: object) -> None:
        self.config, self.ctx = config, ctx

    def run(self) -> dict:
        return {}


@pytest.mark.parametrize("kind, reason", [
    ("one_model", "parallel.virtual_pipeline: the 'one_model' stage kind does not support an interleaved pipeline"),
    ("contrastive", "stages.1.options: the contrastive stage needs parallel.pipeline=1, got 2"),  # its own reason
])
def test_a_stage_kind_without_chunks_is_one_line_at_validate(keye_registry, tmp_path, kind, reason):
    from keye.registry import Provenance

    keye_registry.register("stage", "one_model", _OneModelStage, Provenance("keye-test-vpp", "0.1", "here"))
    path = write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "x", "output_dir": str(tmp_path / "run"), "seed": 0},
        "model": {**MODEL, "text_encoder": {"name": "siglip_text", "size": "tiny"}},
        "parallel": {"pipeline": 2, "virtual_pipeline": 2},
        "stages": [_stage("first", ALL, 1, 2), {"name": "later", "kind": kind, "steps": 0, "train": [], "data": DATA}],
    })
    with pytest.raises(BlueprintError) as info:
        load_blueprint(path, [], keye_registry)
    message = str(info.value)
    assert "\n" not in message and reason in message


def test_too_few_microbatches_for_the_interleaved_schedule_is_one_line(keye_registry, tmp_path):
    path = write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "x", "output_dir": str(tmp_path / "run"), "seed": 0}, "model": MODEL,
        "parallel": {"pipeline": 2, "virtual_pipeline": 2}, "stages": [_stage("first", ALL, 1, 1)],
    })
    with pytest.raises(BlueprintError, match=r"stages\.0\.options\.num_microbatches: 1, but an interleaved pipeline"):
        load_blueprint(path, [], keye_registry)


def _full_tensors_through_chunks() -> list:
    """PP=2 x VPP=2, tiny 4-layer LLM: every full tensor loaded into this rank's chunks and gathered back;
    which global layer each chunk holds, and whether its weights are that layer's."""
    import torch.distributed as dist
    from keye_plugins.language_model.qwen3 import Qwen3LanguageModel

    from keye.hf.weights import gather_full_state, load_hf_into
    from keye.model.pipeline_split import virtual_stages
    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel

    ctx = init_parallel(pipeline=2, virtual_pipeline=2, seed=3)
    config = Qwen3LanguageModel.Config(**{**Qwen3LanguageModel.SIZES["tiny"], "num_layers": 4})
    chunks = [Qwen3LanguageModel(config, BuildContext(ctx, torch.float32, pre, post, vp_stage=vp, seed=3))
              for vp, pre, post in virtual_stages(ctx)]
    shapes = gather_full_state(chunks)
    wanted = [None]
    if ctx.rank == 0:  # the first pipeline stage has the whole model's names
        generator = torch.Generator().manual_seed(0)
        wanted[0] = {name: torch.randn(t.shape, generator=generator) for name, t in sorted(shapes.items())}
    dist.broadcast_object_list(wanted, src=0)
    wanted = wanted[0]
    load_hf_into(chunks, wanted)
    back = gather_full_state(chunks)
    placed = []
    for chunk in chunks:
        layer = chunk.gpt.decoder.layers[0]
        name = f"gpt.decoder.layers.{layer.layer_number - 1}.mlp.linear_fc1.weight"
        placed.append((layer.layer_number - 1, torch.equal(layer.mlp.linear_fc1.weight, wanted[name])))
    same = back is not None and sorted(back) == sorted(wanted) and all(torch.equal(back[n], wanted[n]) for n in wanted)
    return [same, placed, chunks[0].gpt.pre_process, chunks[-1].gpt.post_process]


def test_full_tensors_load_into_and_gather_from_chunks():
    first, second = run_distributed(_full_tensors_through_chunks, 2)
    assert first[0] is True  # the first pipeline stage gathered every tensor back, unchanged
    # layers run stage 0 chunk 0, stage 1 chunk 0, stage 0 chunk 1, stage 1 chunk 1
    assert first[1] == [(0, True), (2, True)] and second[1] == [(1, True), (3, True)]
    assert first[2:] == [True, False] and second[2:] == [False, True]  # embedding / head only at the ends


def test_stage_kinds_that_build_chunks_validate_with_a_virtual_pipeline(keye_registry, tmp_path):
    """The stage kinds that declare it (they build chunks; merge builds no model) pass validation."""
    generated = {"data": DATA, "options": {"stage": "a", "max_new_tokens": 4}}
    path = write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "x", "output_dir": str(tmp_path / "run"), "seed": 0}, "model": MODEL,
        "parallel": {"pipeline": 2, "virtual_pipeline": 2},
        "stages": [_stage("a", ALL, 1, 2), _stage("second", ALL, 1, 2),
                   {"name": "merged", "kind": "merge", "options": {"inputs": ["a", "second"]}}, *LATER,
                   {"name": "cot", "kind": "cot_build", **generated},
                   {"name": "rs", "kind": "rejection_sampling", "data": DATA,
                    "options": {**generated["options"], "n": 2, "modes": {"no_think": 1.0},
                                "rewards": {"answer_match": {"weight": 1.0}}}}],
    })
    cfg = load_blueprint(path, [], keye_registry)
    assert cfg.parallel.virtual_pipeline == 2
    assert [s.kind for s in cfg.stages] == ["lm", "lm", "merge", "eval", "preference", "rl", "cot_build",
                                            "rejection_sampling"]


def test_too_few_preference_microbatches_for_the_interleaved_schedule_is_one_line(keye_registry, tmp_path):
    path = write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "x", "output_dir": str(tmp_path / "run"), "seed": 0}, "model": MODEL,
        "parallel": {"pipeline": 2, "virtual_pipeline": 2},
        "stages": [_stage("first", ALL, 1, 2), {**LATER[1], "options": {"num_microbatches": 1}}],
    })
    with pytest.raises(BlueprintError, match=r"stages\.1\.options\.num_microbatches: 1, but an interleaved pipeline"):
        load_blueprint(path, [], keye_registry)
