"""Position encodings are nested component nodes, and swapping any component is one line.

A distribution written here and installed with pip (no deps, no network) provides a third-party position
scheme (``rope_scaled``: RoPE with linearly interpolated positions) and a third-party vision encoder
(``demo_vit``). One real training run in a spawned process shares its cost between assertions: a tiny LM
stage trains with ``model.language_model.position_encoding.name=rope1d`` and then with ``rope_scaled``,
and the built models' rotary angles are checked against a formula written here.
"""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from keye.testing import write_blueprint

ROOT = Path(__file__).resolve().parents[2]
TINY = sorted((ROOT / "blueprints" / "tiny").glob("*.yaml"))

PLUGIN = '''
    """A third party's components: a position scheme and a vision encoder (no keye_plugins import)."""
    from dataclasses import dataclass
    from typing import Optional

    import torch

    from keye import hookimpl
    from keye.config import doc
    from keye.model.protocols import next_position_ids, sequential_position_ids


    class RopeScaled(torch.nn.Module):
        """RoPE on positions divided by ``factor`` (linear position interpolation)."""

        @dataclass
        class Config:
            factor: float = doc("Positions are divided by this.", 4.0)
            theta: float = doc("RoPE base.", 10000.0)
            head_dim: Optional[int] = doc("Set by the model part that selects it.", None)
            spatial_merge_size: int = doc("Patches per token along a side.", 2)

        def __init__(self, config, ctx=None):
            super().__init__()
            self.config = config
            self.spatial_merge_size = config.spatial_merge_size
            d = config.head_dim or 2
            self.register_buffer("inv_freq", config.theta ** (-torch.arange(0, d, 2).float() / d), persistent=False)

        def position_ids(self, input_ids, **vision):
            return sequential_position_ids(input_ids.shape[-1])

        def decode_position_ids(self, position_ids, count):
            return next_position_ids(position_ids, count)

        def rotary_pos_emb(self, position_ids):
            ids = position_ids[0] if position_ids.dim() == 3 else position_ids  # (B, L)
            freqs = (ids.float() / self.config.factor)[..., None] * self.inv_freq  # (B, L, D/2)
            return torch.cat([freqs, freqs], -1).transpose(0, 1)[:, :, None, :]  # (L, B, 1, D)


    class DemoViT(torch.nn.Module):
        @dataclass
        class Config:
            hidden_size: int = doc("Feature width.", 32)

        def __init__(self, config, ctx=None):
            super().__init__()
            self.out_dim = config.hidden_size
            self.proj = torch.nn.Linear(3 * 14 * 14, config.hidden_size)

        def forward(self, patches, grid_thw):
            return self.proj(patches.flatten(1))


    @hookimpl
    def keye_register_position_encodings(register):
        register("rope_scaled", RopeScaled)


    @hookimpl
    def keye_register_vision_encoders(register):
        register("demo_vit", DemoViT)
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """``keye-demo-parts`` installed with pip into a folder, as a user would install a plugin."""
    base = tmp_path_factory.mktemp("demo_parts")
    src = base / "src"
    (src / "keye_demo_parts").mkdir(parents=True)
    (src / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "keye-demo-parts"
        version = "0.2.0"
        dependencies = ["keye"]

        [project.entry-points.keye]
        demo_parts = "keye_demo_parts.plugin"

        [tool.setuptools]
        packages = ["keye_demo_parts"]
    """))
    (src / "keye_demo_parts" / "__init__.py").write_text("")
    (src / "keye_demo_parts" / "plugin.py").write_text(textwrap.dedent(PLUGIN))
    target = base / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(src)],
                   check=True, capture_output=True, text=True)
    return target


@pytest.fixture(scope="module")
def host(site):
    """A strict plugin host that sees the installed distribution (its folder first on sys.path)."""
    from keye.plugins import PluginHost

    sys.path.insert(0, str(site))
    try:
        host = PluginHost(strict=True)
        host.load_entry_points()
        yield host
    finally:
        sys.path.remove(str(site))


# --- swapping is one line --------------------------------------------------------------------------


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.name)
def test_a_third_party_encoder_swaps_in_with_one_override_on_every_tiny_blueprint(host, path):
    from keye.config import load_blueprint

    cfg = load_blueprint(path, ["model.vision_encoder.name=demo_vit"], host.registry)
    assert dict(cfg.model.vision_encoder) == {"name": "demo_vit", "hidden_size": 32}  # siglip's keys dropped


def test_an_extending_blueprint_that_names_another_component_drops_the_old_keys(host, tmp_path):
    from keye.config import load_blueprint

    base = ROOT / "blueprints" / "tiny" / "base.yaml"
    (tmp_path / "base.yaml").write_text(base.read_text())
    top = write_blueprint(tmp_path / "top.yaml", {"extends": ["base.yaml"], "model": {
        "vision_encoder": {"name": "demo_vit", "hidden_size": 32},
        "language_model": {"position_encoding": {"name": "rope_scaled", "factor": 2.0}}}})
    cfg = load_blueprint(top, ["model.language_model.position_encoding.theta=500"], host.registry)
    assert dict(cfg.model.vision_encoder) == {"name": "demo_vit", "hidden_size": 32}
    assert dict(cfg.model.language_model.position_encoding) == {
        "name": "rope_scaled", "factor": 2.0, "theta": 500.0, "head_dim": None, "spatial_merge_size": 2}
    assert cfg.model.language_model.head_dim == 16  # the rest of the qwen3 node (and its size preset) stays


def test_overrides_switch_first_whatever_their_order(host):
    from keye.config import load_blueprint

    path = ROOT / "blueprints" / "tiny" / "pretrain.yaml"
    for overrides in (["model.vision_encoder.hidden_size=32", "model.vision_encoder.name=demo_vit"],
                      ["model.vision_encoder.name=demo_vit", "model.vision_encoder.hidden_size=32"]):
        assert load_blueprint(path, overrides, host.registry).model.vision_encoder.hidden_size == 32
    # the same name again merges key by key: siglip's other keys stay
    same = load_blueprint(path, ["model.vision_encoder.name=siglip_navit", "model.vision_encoder.num_layers=1"],
                          host.registry)
    assert (same.model.vision_encoder.num_layers, same.model.vision_encoder.hidden_size) == (1, 32)
    # a size preset's nested node merges too, unless the node names another scheme
    kept = load_blueprint(path, ["model.language_model.position_encoding.tokens_per_second=1"], host.registry)
    assert list(kept.model.language_model.position_encoding.mrope_section) == [2, 3, 3]


def test_validate_takes_overrides_like_run(site):
    from keye.testing.third_party import launch

    path, rl = (str(ROOT / "blueprints" / "tiny" / name) for name in ("pretrain.yaml", "rl.yaml"))
    checked = launch(site, "validate", path, rl, "model.vision_encoder.name=demo_vit",
                     "model.language_model.position_encoding.name=rope_scaled", timeout=120)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.splitlines() == [f"ok: {path} (8 stages)", f"ok: {rl} (1 stages)"]


# --- a tiny LM stage trains with another scheme ----------------------------------------------------


def _train_with(path: str, site: str, schemes: list[str]) -> dict:
    """Per scheme: a short LM stage (language model only), then the built model's angles and data positions."""
    sys.path.insert(0, site)
    from keye.config import load_blueprint
    from keye.data.pipeline import language_positions
    from keye.model.composition import KeyeVLModel
    from keye.model.protocols import BuildContext
    from keye.plugins import PluginHost
    from keye.train.runner import run_blueprint

    host = PluginHost(strict=True)
    host.load_entry_points()
    results = {}
    for scheme in schemes:
        overrides = [f"model.language_model.position_encoding.name={scheme}", f"run.output_dir={path}_{scheme}"]
        cfg = load_blueprint(path, overrides, host.registry)
        summary = run_blueprint(cfg, host)
        model = KeyeVLModel(cfg.model, host.registry, BuildContext())
        ids = torch.tensor([[0, 1, 2, 5, 9]])  # (B, L)
        angles = model.language_model.gpt.rotary_pos_emb(ids[None].expand(3, 1, 5))  # (L, B, 1, D)
        data = language_positions(cfg.model, host.registry).position_ids(torch.arange(7))  # (3, 7)
        records = [json.loads(line) for line in Path(f"{path}_{scheme}/metrics.jsonl").read_text().splitlines()]
        results[scheme] = {
            "module": type(model.language_model.position_encoding).__module__,
            "angles": angles[:, 0, 0].tolist(),
            "data_positions": data.tolist(),
            "losses": [r["loss"] for r in records],
            "steps": summary["stages"]["lm"]["steps"],
        }
    return results


@pytest.fixture(scope="module")
def trained(site, tmp_path_factory):
    from keye.testing.distributed import run_distributed

    root = tmp_path_factory.mktemp("pe_runs")
    path = write_blueprint(root / "bp.yaml", {
        "run": {"name": "pe", "seed": 3},
        "model": {"vision_encoder": {"name": "siglip_navit", "size": "tiny"},
                  "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
                  "language_model": {"name": "qwen3", "size": "tiny",
                                     "position_encoding": {"name": "mrope_time_aligned", "theta": 10000.0}}},
        "stages": [{"name": "lm", "kind": "lm", "train": ["language_model"], "steps": 3,
                    "options": {"eval_batches": 1},
                    "data": {"max_tokens": 96, "pack_buffer": 8,
                             "sources": {"t": {"name": "synthetic", "tasks": ["ocr"], "num_samples": 30}}}}],
    })
    [result] = run_distributed(_train_with, 1, str(path), str(site), ["rope1d", "rope_scaled"])
    return result


def _rope_angles(ids: list[int], head_dim: int, theta: float, scale: float = 1.0) -> torch.Tensor:
    """Independent RoPE: angle (p, k) = p / scale * theta^(-2k/d), the half repeated (rotate-half layout)."""
    half = [[p / scale * theta ** (-2 * k / head_dim) for k in range(head_dim // 2)] for p in ids]
    return torch.tensor([row + row for row in half], dtype=torch.float64)


@pytest.mark.parametrize("scheme, scale", [("rope1d", 1.0), ("rope_scaled", 4.0)])
def test_a_tiny_lm_stage_trains_with_the_selected_scheme(trained, scheme, scale):
    result = trained[scheme]
    assert result["module"] == {"rope1d": "keye_plugins.position_encoding.rope1d",
                                "rope_scaled": "keye_demo_parts.plugin"}[scheme]
    assert result["steps"] == 3 and all(math.isfinite(loss) for loss in result["losses"]), result["losses"]
    # theta 10000 came from the blueprint's node for mrope; the new scheme starts over from its own defaults
    theta = 1e6 if scheme == "rope1d" else 1e4
    expected = _rope_angles([0, 1, 2, 5, 9], 16, theta, scale)  # qwen3 tiny: head_dim 16
    torch.testing.assert_close(torch.tensor(result["angles"], dtype=torch.float64), expected, rtol=1e-6, atol=1e-6)
    assert result["data_positions"] == [list(range(7))] * 3  # 1D schemes: one position per token, equal rows


def test_the_projector_merge_must_match_the_language_models_scheme(host):
    from keye.config import load_blueprint
    from keye.errors import BlueprintError

    path = ROOT / "blueprints" / "tiny" / "pretrain.yaml"
    with pytest.raises(BlueprintError, match=r"model.projector.merge: 2, but model.language_model.position_encoding"
                                             r".spatial_merge_size is 1"):
        load_blueprint(path, ["model.language_model.position_encoding.spatial_merge_size=1"], host.registry)
