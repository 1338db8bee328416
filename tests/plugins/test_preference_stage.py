"""The ``preference`` stage: one packed forward per pair equals separate forwards of [x, y_c] and [x, y_r];
MPO training of the tiny model raises held-out reward accuracy above 0.5 with a positive margin; a live and
a precomputed reference give the same losses; δ survives a resume; bad pairs are skipped and counted by kind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keye.testing import write_blueprint
from keye.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "blueprints" / "tiny" / "base.yaml"
LAUNCH = [sys.executable, "-m", "keye.launch.cli", "run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS, EVERY = 40, 20
PRECOMPUTED_STEPS = 8  # a constant learning rate: its steps equal the first steps of the live run


# --- one forward per pair ----------------------------------------------------------------------------------


def _separate_vs_shared() -> dict:
    """Log-probs of three synthetic pairs (images and a video) packed as shared-prompt samples, and of the six
    conversations [x, y_c], [x, y_r] packed as ordinary samples, through the tiny model in one process."""
    from keye.config import load_blueprint
    from keye.data.batch import collate_pack
    from keye.data.pipeline import load_tokenizer
    from keye.data.processor import Processor, ProcessorSettings
    from keye.data.sample import ConversationSample
    from keye.data.synthetic import generate
    from keye.data.tokenizer import SpecialTokens
    from keye.model.composition import KeyeVLModel
    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel
    from keye.plugins import PluginHost
    from keye_plugins.stage.preference import pair_logps
    from keye_plugins.video_decoder.decord import DecordVideoDecoder

    parallel = init_parallel(tensor=1, pipeline=1, seed=7)
    host = PluginHost(strict=True)
    host.load_entry_points()
    blueprint = load_blueprint(BASE, [], host.registry)
    tokenizer = load_tokenizer("synthetic")
    special = SpecialTokens.from_tokenizer(tokenizer)
    model = KeyeVLModel(blueprint.model, host.registry, BuildContext(parallel, seed=7),
                        image_token_id=special.image_pad, video_token_id=special.video_pad).eval()
    settings = ProcessorSettings(image_max_tokens=16, video_max_tokens=64, video_max_frame_tokens=16, video_min_frame_tokens=4)
    processor = Processor(tokenizer, settings, DecordVideoDecoder())
    loaded = [generate(index, tasks=["preference"], seed=11) for index in range(3)]
    shared = [processor(item.sample, item.media, preference=True) for item in loaded]
    separate = []
    for item in loaded:
        for reply in (item.sample.chosen, item.sample.rejected):
            conversation = ConversationSample(item.sample.key, [*item.sample.prompt, reply])
            separate.append(processor(conversation, item.media))

    def per_token(batch):
        with torch.no_grad():
            return model(batch.input_ids, batch.position_ids, batch.attention_mask, labels=batch.labels,
                         images=batch.images, videos=batch.videos, loss_mask=batch.loss_mask)  # (1, T)

    packed = collate_pack(shared, seq_len=sum(len(s) for s in shared) + 4)
    chosen, rejected, nll = pair_logps(per_token(packed), packed)
    alone = []
    for sample in separate:
        batch = collate_pack([sample], seq_len=len(sample) + 3)
        alone.append(-per_token(batch)[0][batch.answer_segments[0]])
    patches = lambda batch: sum(int(v.patches.shape[0]) for v in (batch.images, batch.videos) if v is not None)  # noqa: E731
    return {
        "shared": (chosen, rejected, nll),
        "chosen": torch.stack([alone[2 * i].sum() for i in range(3)]),
        "rejected": torch.stack([alone[2 * i + 1].sum() for i in range(3)]),
        "nll": torch.stack([-alone[2 * i].mean() for i in range(3)]),
        "patches_shared": patches(packed),
        "patches_separate": patches(collate_pack(separate, seq_len=sum(len(s) for s in separate))),
        "media": sorted({"video" if packed.videos is not None else "", "image" if packed.images is not None else ""}),
    }


def test_one_packed_forward_equals_separate_forwards():
    result = run_distributed(_separate_vs_shared, 1)[0]
    chosen, rejected, nll = result["shared"]
    assert torch.allclose(chosen, result["chosen"], atol=1e-4, rtol=1e-5)
    assert torch.allclose(rejected, result["rejected"], atol=1e-4, rtol=1e-5)
    assert torch.allclose(nll, result["nll"], atol=1e-5)
    assert not torch.allclose(chosen, rejected)  # the two replies really differ
    assert result["patches_separate"] == 2 * result["patches_shared"]  # the vision of each prompt is encoded once


# --- training through keye-launch -------------------------------------------------------------------------

BAD_PAIRS = [
    {"key": "empty", "chosen": "red", "rejected": ""},
    {"key": "same", "chosen": "two", "rejected": "two"},
    {"key": "good-1", "chosen": "red", "rejected": "blue"},
    {"key": "good-2", "chosen": "two", "rejected": "three"},
]


def _jsonl(folder: Path) -> Path:
    path = folder / "pairs.jsonl"
    lines = []
    for pair in BAD_PAIRS:
        lines.append(json.dumps({
            "kind": "preference", "key": f"jsonl-{pair['key']}",
            "prompt": [{"role": "user", "content": "what colour is the circle?"}],
            "chosen": {"role": "assistant", "content": pair["chosen"]},
            "rejected": {"role": "assistant", "content": pair["rejected"]},
        }))
    path.write_text("\n".join(lines) + "\n")
    return path


def blueprint(folder: Path, name: str, reference: str, steps: int = STEPS, **parallel: int) -> Path:
    return write_blueprint(folder / f"{name}.yaml", {
        "run": {"name": name, "output_dir": str(folder / name), "seed": 3, "checkpoint_every": EVERY},
        "parallel": parallel,
        "model": {
            "vision_encoder": {"name": "siglip_navit", "size": "tiny"},
            "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
            "language_model": {"name": "qwen3", "size": "tiny"},
        },
        "stages": [{
            "name": "mpo", "kind": "preference", "train": ["projector", "language_model"], "steps": steps,
            "optimizer": {"lr": 5e-3}, "schedule": {"kind": "constant"},
            "options": {"reference": reference, "eval_batches": 6, "num_microbatches": 2},
            "data": {
                "max_tokens": 384, "pack_buffer": 8, "image_max_tokens": 16, "video_frame_tokens": [4, 16],
                "video_max_tokens": 64, "max_bad_fraction": 0.5,
                "sources": {"pairs": {"name": "synthetic", "tasks": ["preference"], "num_samples": 96},
                            "jsonl": {"name": "jsonl", "path": str(_jsonl(folder))}},
                "mixer": {"name": "weighted", "weights": {"pairs": 0.85, "jsonl": 0.15}},
                "heldout": {"pairs": {"name": "synthetic", "tasks": ["preference"], "split": "heldout", "num_samples": 24}},
            },
        }],
    })


def launch(*args: str) -> None:
    result = subprocess.run([*LAUNCH, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())["stages"]["mpo"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("preference")
    launch(str(blueprint(folder, "live", "live")))
    launch(str(blueprint(folder, "precomputed", "precomputed", steps=PRECOMPUTED_STEPS)))
    return folder


def test_mpo_raises_heldout_reward_accuracy_with_a_positive_margin(runs):
    result = summary(runs / "live")
    before, after = result["eval_before"], result["eval_after"]
    # at the start the policy is the reference: every reward is 0, no pair is won
    assert before["heldout_reward_accuracy"] == 0.0 and before["heldout_margin"] == 0.0
    assert after["heldout_pairs"] >= 12
    assert after["heldout_reward_accuracy"] > 0.5, after
    assert after["heldout_margin"] > 0, after
    assert after["heldout_chosen_nll"] < before["heldout_chosen_nll"]  # the SFT term
    assert 0.0 <= before["heldout_answer_accuracy"] <= after["heldout_answer_accuracy"] <= 1.0
    lines = metrics(runs / "live")
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    for name in ("loss_sigmoid", "loss_bco_pair", "loss_sft", "reward_accuracy", "margin", "chosen_reward",
                 "rejected_reward", "delta"):
        assert all(name in line for line in lines), name
    first = lines[0]
    assert first["loss_sigmoid"] == pytest.approx(0.6931472, abs=1e-6)  # log 2: rewards are 0 at step 1
    assert first["loss"] == pytest.approx(0.8 * first["loss_sigmoid"] + 0.2 * first["loss_bco_pair"] + first["loss_sft"], rel=1e-5)
    assert result["reference"] == "live" and result["delta"] == lines[-1]["delta"]


def test_live_and_precomputed_reference_give_the_same_loss(runs):
    live, precomputed = metrics(runs / "live")[:PRECOMPUTED_STEPS], metrics(runs / "precomputed")
    assert len(precomputed) == PRECOMPUTED_STEPS
    for name in ("loss", "delta", "margin", "reward_accuracy", "chosen_reward"):
        assert [line[name] for line in precomputed] == pytest.approx([line[name] for line in live], abs=1e-5), name
    # held-out pairs against the precomputed table: the policy at the start is the reference exactly
    assert summary(runs / "precomputed")["eval_before"] == pytest.approx(summary(runs / "live")["eval_before"], abs=1e-6)
    assert summary(runs / "precomputed")["eval_before"]["heldout_margin"] == 0.0
    assert summary(runs / "precomputed")["reference"] == "precomputed"


def test_bad_pairs_are_skipped_and_counted_by_kind(runs):
    skipped = summary(runs / "live")["data"]["skipped_by_kind"]
    assert skipped.get("empty_reply", 0) >= 1 and skipped.get("identical_replies", 0) >= 1, skipped
    assert set(skipped) <= {"empty_reply", "identical_replies"}


def test_pipeline_parallel_trains_like_one_process(runs, tmp_path):
    """PP=2: the live reference runs its own pipeline schedule between steps, the loss and δ live on the
    last stage, and rank 0 (first stage) logs δ only because it is shared after each step. With a constant
    learning rate the first steps equal the one-process run's."""
    launch(str(blueprint(tmp_path, "pp2", "live", steps=4, pipeline=2)), "--nproc", "2")
    expected, got = metrics(runs / "live")[:4], metrics(tmp_path / "pp2")
    for name in ("loss", "delta", "margin", "loss_sft"):
        assert [line[name] for line in got] == pytest.approx([line[name] for line in expected], abs=1e-5), name


def test_resume_restores_delta(runs):
    """The finished live run resumed from its step-20 checkpoint redoes steps 21-40 exactly, δ included (δ
    restarting from 0 would change the BCO-pair term, the loss and the δ column)."""
    run = runs / "live"
    straight = metrics(run)
    (run / "mpo" / "done.json").unlink()  # the stage counts as unfinished: --resume continues it from step 20
    launch(str(runs / "live.yaml"), "--resume")
    resumed = metrics(run)
    assert [line["step"] for line in resumed] == list(range(1, STEPS + 1))
    assert summary(run)["resumed_from_step"] == EVERY
    for name in ("loss", "delta", "margin"):
        assert [line[name] for line in resumed] == pytest.approx([line[name] for line in straight], abs=1e-6), name


def test_precomputed_reference_refuses_a_key_seen_twice():
    """Two sources whose samples share keys (e.g. two synthetic sources with other seeds) cannot share one
    precomputed table: the second sample with a key is refused by name rather than given the first's numbers."""
    from keye.errors import KeyeUserError
    from keye_plugins.stage.preference import Reference

    reference = Reference(torch.nn.Linear(2, 2), 64, None)
    reference.add(["a", "b"], [-1.0, -2.0], [-3.0, -4.0])
    assert reference.table == {"a": (-1.0, -3.0), "b": (-2.0, -4.0)}
    with pytest.raises(KeyeUserError, match="'b' occurs twice"):
        reference.add(["c", "b"], [0.0, 0.0], [0.0, 0.0])


def _join_tables() -> dict:
    from keye.parallel import init_parallel
    from keye_plugins.stage.preference import Reference

    parallel = init_parallel(tensor=1, pipeline=1, seed=1)  # 2 processes: data parallel 2
    reference = Reference(torch.nn.Linear(2, 2), 64, None)
    if parallel.dp_rank == 0:
        reference.add(["a", "b"], [-1.0, -2.0], [-3.0, -4.0])  # rank 1 read nothing in its pass
    reference.precompute([])
    return reference.table


def test_precomputed_tables_are_joined_over_data_parallel_ranks():
    """With ``balance: flops`` a training pack may hold samples another rank scored: every rank gets all."""
    for table in run_distributed(_join_tables, 2):
        assert table == {"a": (-1.0, -3.0), "b": (-2.0, -4.0)}


def test_check_config_names_the_reference_mode(keye_registry, blueprint_file):
    from keye.config import load_blueprint
    from keye.errors import KeyeUserError

    stage = {"name": "s", "kind": "preference", "options": {"reference": "cached"}}
    path = blueprint_file({"model": {"language_model": {"name": "qwen3", "size": "tiny"}}, "stages": [stage]}, "bad.yaml")
    with pytest.raises(KeyeUserError, match=r"stages\.0\.options\.reference: 'cached' is not one of live, precomputed"):
        load_blueprint(path, [], keye_registry)
