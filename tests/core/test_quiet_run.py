"""Quiet runs: a tiny run through ``keye-launch`` prints none of the known, harmless warnings, while a new
warning (or a known text from another place) still shows: the filters in `keye.quiet` are exact."""

import re
import subprocess
import sys

from keye.testing import write_blueprint
from keye.testing.third_party import launch, launch_env, write_distribution

DATA = {"image_max_tokens": 16, "video_frame_tokens": [4, 16], "video_max_tokens": 64}

# Warnings only this test's plugin makes, at `keye_configure`: each is close to a filtered one but not it.
# (Texts in variables, so the source lines Python echoes under a warning do not match `WARNING` below.)
NOISY = '''
    import logging
    import warnings

    from keye import hookimpl

    NEW = "keye_noisy: a brand-new deprecation"
    SHARDED = "Please use DTensor instead and we are deprecating ShardedTensor."
    MLP = "Unknown MLP type: <class 'megatron.core.transformer.spec_utils.ModuleSpec'>. Using default kwargs."
    ODD_MLP = "Unknown MLP type: <class 'keye_noisy.OddMLP'>. Using default kwargs."
    FUTURE = FutureWarning


    @hookimpl
    def keye_configure(blueprint):
        warnings.warn(NEW, FUTURE)
        warnings.warn(SHARDED, FUTURE)  # the known text, from a module the filter does not name
        megatron = logging.getLogger("megatron.core.transformer.transformer_layer")
        megatron.warning(ODD_MLP)  # the known logger, another text
        megatron.warning(MLP)  # Megatron's text for an MLP it does not know: keye's layers never cause it, so it shows
        logging.getLogger("keye_noisy").warning(MLP)  # the known text, from another logger
'''

#: A line that is (the head of) a warning.
WARNING = re.compile(r"Warning|Unknown MLP|deprecat|requires_grad")


def _blueprint(tmp_path):
    """Contrastive then lm, two steps each: the second stage loads the first's checkpoint."""
    return write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "quiet", "output_dir": str(tmp_path / "run"), "seed": 1},
        "model": {"vision_encoder": {"name": "siglip_navit", "size": "tiny"},
                  "text_encoder": {"name": "siglip_text", "size": "tiny", "vocab_size": 1024},
                  "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
                  "language_model": {"name": "qwen3", "size": "tiny"}},
        "stages": [
            {"name": "vit", "kind": "contrastive", "train": ["vision_encoder", "text_encoder"], "steps": 2,
             "options": {"batch_size": 4, "eval_pairs": 4}, "optimizer": {"lr": 1e-3}, "schedule": {"kind": "constant"},
             "data": {"image_max_tokens": 16,
                      "sources": {"pairs": {"name": "synthetic", "tasks": ["pair"], "num_samples": 16}},
                      "heldout": {"pairs": {"name": "synthetic", "tasks": ["pair"], "split": "heldout", "num_samples": 4}}}},
            {"name": "lm", "kind": "lm", "train": ["projector"], "steps": 2, "optimizer": {"lr": 3e-3},
             "schedule": {"kind": "constant"}, "options": {"eval_batches": 1},
             "data": {**DATA, "max_tokens": 128,
                      "sources": {"qa": {"name": "synthetic", "tasks": ["color"], "num_samples": 16}},
                      "heldout": {"qa": {"name": "synthetic", "tasks": ["color"], "split": "heldout", "num_samples": 2}}}},
        ],
    })


def _warnings(stderr: str) -> list[str]:
    """The lines of stderr that are warnings (tqdm's progress bars redraw with carriage returns: last draw)."""
    lines = (line.rsplit("\r", 1)[-1] for line in stderr.splitlines())
    return [line for line in lines if WARNING.search(line)]


def test_a_tiny_run_prints_no_known_noise_but_new_warnings_still_show(tmp_path):
    site = tmp_path / "site"
    write_distribution(site, "keye-noisy", "0.1", {"noisy": "keye_noisy"}, {"keye_noisy.py": NOISY})
    result = launch(site, "run", str(_blueprint(tmp_path)), PYTHONWARNINGS="")  # "": as if unset
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "lm" / "done.json").exists()  # the lm stage loaded the contrastive stage's weights
    warned = _warnings(result.stderr)
    # Exactly the plugin's five, each shown: no per-layer "Unknown MLP type" lines from Megatron, no
    # requires_grad scalar warning, no checkpoint FutureWarnings from torch or Megatron.
    assert len(warned) == 5, "\n".join(warned)
    assert re.search(r"keye_noisy\.py:\d+: FutureWarning: keye_noisy: a brand-new deprecation$", warned[0])
    assert re.search(r"keye_noisy\.py:\d+: FutureWarning: Please use DTensor instead and we are deprecating ShardedTensor\.$",
                     warned[1])
    assert warned[2:] == [
        "Unknown MLP type: <class 'keye_noisy.OddMLP'>. Using default kwargs.",
        "Unknown MLP type: <class 'megatron.core.transformer.spec_utils.ModuleSpec'>. Using default kwargs.",
        "Unknown MLP type: <class 'megatron.core.transformer.spec_utils.ModuleSpec'>. Using default kwargs.",
    ]


def test_a_data_parallel_run_prints_no_warning(tmp_path):
    """Two ranks add Megatron's gradient-buffer collectives and its distributed optimizer's shard views."""
    path = write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "quiet-dp", "output_dir": str(tmp_path / "run"), "seed": 1},
        "model": {"vision_encoder": {"name": "siglip_navit", "size": "tiny"},
                  "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
                  "language_model": {"name": "qwen3", "size": "tiny"}},
        "stages": [{"name": "lm", "kind": "lm", "train": ["projector", "language_model"], "steps": 2,
                    "optimizer": {"lr": 3e-3}, "schedule": {"kind": "constant"}, "options": {"eval_batches": 0},
                    "data": {**DATA, "max_tokens": 128,
                             "sources": {"qa": {"name": "synthetic", "tasks": ["color"], "num_samples": 16}}}}],
    })
    result = launch(None, "run", str(path), "--nproc", "2", PYTHONWARNINGS="")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "lm" / "done.json").exists()
    assert _warnings(result.stderr) == []


# Two warnings as torch's checkpoint planner makes them (warn_explicit names the module), then one with the
# same text from elsewhere; prints what reached the user.
PROBE = """
import warnings
from keye.quiet import install
install()
with warnings.catch_warnings(record=True) as caught:
    for module in ("torch.distributed.checkpoint.default_planner", "torch.distributed.checkpoint.planner_helpers",
                   "torch.distributed.checkpoint.other"):
        warnings.warn_explicit("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning,
                               "x.py", 1, module=module)
print(len(caught))
"""


def test_filters_match_module_and_step_aside_when_the_user_sets_warning_options():
    quiet = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                           env=launch_env(PYTHONWARNINGS=""), check=True)
    assert quiet.stdout.strip() == "1"  # only the one from a module the filter does not name
    own = subprocess.run([sys.executable, "-W", "default", "-c", PROBE], capture_output=True, text=True,
                         env=launch_env(), check=True)
    assert own.stdout.strip() == "3"
