"""The packer in the data pipeline: the vision-patch cap per packed sequence, and what it rejects (counted as
over budget). FLOPs balancing across data-parallel ranks needs real processes: tests/data/test_flops_balance.py."""

from types import SimpleNamespace

from keye.config import load_blueprint
from keye.data.pipeline import micro_batches
from keye.testing import write_blueprint


def _ctx(cfg, registry, rank, size):
    parallel = SimpleNamespace(dp_rank=rank, dp_size=size, tp_rank=0, pp_rank=0)
    return SimpleNamespace(blueprint=cfg, stage=cfg.stages[0], index=0, registry=registry, parallel=parallel)


def test_vision_patch_cap_packs_and_rejects(keye_registry, tmp_path):
    def stream(cap):
        path = write_blueprint(tmp_path / f"cap{cap}.yaml", {
            "model": {"language_model": {"name": "qwen3", "size": "tiny"}},
            "stages": [{"name": "s", "kind": "lm", "train": ["language_model"], "steps": 1, "data": {
                "max_tokens": 512, "pack_buffer": 12, "image_max_tokens": 16, "max_vision_patches": cap,
                "max_bad_fraction": 1.0,
                "sources": {"t": {"name": "synthetic", "tasks": ["count"], "num_samples": 12}},
                "mixer": {"name": "weighted", "on_exhausted": "stop"}}}],
        })
        cfg = load_blueprint(path, [], keye_registry)
        s = micro_batches(_ctx(cfg, keye_registry, 0, 1))
        return s, s.take(100)

    capped, batches = stream(80)
    assert all(b.images.patches.shape[0] <= 80 for b in batches)
    assert sum(len(b.keys) for b in batches) == 12 and capped.stats()["skipped"] == 0
    rejecting, batches = stream(8)  # every image has more patches than that
    assert batches == []
    assert rejecting.stats()["skipped_by_kind"] == {"over_budget": 12}
    assert rejecting.stats()["realised_ratios"]["t"]["count"] == 12
