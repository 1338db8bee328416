"""The core imports no plugin, and the Hugging Face format is composed from the components' own key maps.

- an AST scan: no module under ``keye/`` imports ``keye_plugins`` (at top level or inside a function);
- `keye.hf` asks the component classes for their key maps: a projector with another naming changes the
  released names (and only its own), round-trips exactly, and a component without a map is a one-line error;
- ``keye-launch convert`` finds the format's components through the registry, so a blocked built-in
  (``KEYE_BLOCK_PLUGINS``) is a one-line error naming it, not a silent import around the block.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keye.errors import KeyeUserError
from test_keye_vl_checkpoint import TINY_CONFIG

CORE = Path(__file__).resolve().parents[2] / "keye"


def _plugin_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found += [f"{path.relative_to(CORE.parent)}:{node.lineno} imports {name}"
                  for name in names if name == "keye_plugins" or name.startswith("keye_plugins.")]
    return found


def test_core_imports_no_plugin():
    offenders = [line for path in sorted(CORE.rglob("*.py")) for line in _plugin_imports(path)]
    assert offenders == [], "\n".join(offenders)


def test_the_scan_sees_nested_imports(tmp_path):
    """The scan itself can fail: an import inside a function is found."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from keye_plugins.projector import patch_merge_mlp\n    import keye_plugins\n")
    global CORE
    saved, CORE = CORE, tmp_path
    try:
        assert len(_plugin_imports(module)) == 2
    finally:
        CORE = saved


class RenamedProjector:
    """A third-party projector whose released weights are named ``proj.*`` instead of ``linear_*``."""

    HF_UNUSED = ("scratch.",)
    _NAMES = {"linear_1": "proj.in", "linear_2": "proj.out", "pre_norm": "norm"}

    @classmethod
    def hf_weight_shapes(cls, config):
        merged = config.in_dim * config.merge**2
        return {"norm.weight": (config.in_dim,), "norm.bias": (config.in_dim,), "proj.in.weight": (merged, merged),
                "proj.in.bias": (merged,), "proj.out.weight": (config.out_dim, merged), "proj.out.bias": (config.out_dim,)}

    @classmethod
    def keye_to_hf(cls, state, config):
        return {cls._NAMES[name.split(".")[0]] + "." + name.split(".")[1]: t for name, t in state.items()}

    @classmethod
    def hf_to_keye(cls, hf, config):
        back = {v: k for k, v in cls._NAMES.items()}
        return {back[name.rsplit(".", 1)[0]] + "." + name.rsplit(".", 1)[1]: t for name, t in hf.items()
                if not name.startswith(cls.HF_UNUSED)}


def test_the_format_takes_each_component_key_map():
    from keye.hf import expected_hf_shapes, hf_configs, hf_to_keye_state, keye_to_hf_state
    from keye.hf.weights import check_hf_names

    configs = hf_configs(TINY_CONFIG)
    builtin = expected_hf_shapes(configs)
    configs.classes["projector"] = RenamedProjector
    shapes = expected_hf_shapes(configs)
    assert {n for n in shapes if n.startswith("mlp_AR.")} == {
        "mlp_AR.norm.weight", "mlp_AR.norm.bias", "mlp_AR.proj.in.weight", "mlp_AR.proj.in.bias",
        "mlp_AR.proj.out.weight", "mlp_AR.proj.out.bias"}
    assert {n: s for n, s in shapes.items() if not n.startswith("mlp_AR.")} == {
        n: s for n, s in builtin.items() if not n.startswith("mlp_AR.")}  # the other parts are untouched

    generator = torch.Generator().manual_seed(0)
    hf = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    hf["mlp_AR.scratch.weight"] = torch.zeros(2)  # declared unused by the projector: skipped, reported
    assert check_hf_names({n: tuple(t.shape) for n, t in hf.items()}, configs, "ckpt") == ["mlp_AR.scratch.weight"]
    state = hf_to_keye_state(hf, configs)
    assert torch.equal(state["projector.linear_1.weight"], hf["mlp_AR.proj.in.weight"])
    assert torch.equal(state["language_model.gpt.output_layer.weight"], hf["lm_head.weight"])
    back = keye_to_hf_state(state, configs)
    assert set(back) == set(shapes) and all(torch.equal(back[n], hf[n]) for n in back)
    one = keye_to_hf_state({"projector.linear_2.bias": state["projector.linear_2.bias"]}, configs)
    assert list(one) == ["mlp_AR.proj.out.bias"]  # tensor by tensor, as the weight stream asks

    class NoMap:
        pass

    configs.classes["projector"] = NoMap
    with pytest.raises(KeyeUserError, match=r"^projector .*NoMap has no Hugging Face key map \(missing hf_weight_shapes"):
        expected_hf_shapes(configs)


def test_convert_finds_the_format_components_through_the_registry(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(TINY_CONFIG))
    env = {**os.environ, "KEYE_BLOCK_PLUGINS": "siglip_navit"}
    result = subprocess.run([sys.executable, "-m", "keye.launch.cli", "convert", "hf-to-megatron", str(src),
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "unknown vision_encoder 'siglip_navit'; known:" in result.stderr
    assert "Traceback" not in result.stderr
