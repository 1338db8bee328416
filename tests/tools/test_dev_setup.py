"""The README's setup (`tools/dev`) gets the CPU build of torch, even where pip would pick a CUDA build.

On Linux x86_64 PyPI's plain ``torch==2.13.0`` wheel is a CUDA build. ``tools/dev`` asks for the CPU build
by its local version label, so pip either finds a CPU wheel or fails; it never settles on a CUDA one. The
resolution is checked with pip itself, in isolation (no pip.conf, no find-links of this machine), against
a wheel folder that holds a stand-in for PyPI's CUDA wheel, with and without a CPU wheel beside it.
"""

import json
import os
import platform
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def torch_spec() -> str:
    out = subprocess.run([str(ROOT / "tools" / "dev"), "torch-spec"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def fake_wheel(folder: Path, version: str) -> None:
    """A minimal installable wheel named torch (metadata only: pip resolves it without touching PyPI)."""
    dist_info = f"torch-{version}.dist-info"
    with zipfile.ZipFile(folder / f"torch-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        wheel.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist_info}/RECORD", "")


def resolve(spec: str, wheels: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip.conf points at its own wheel store
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-index", "--find-links", str(wheels),
         "--ignore-installed", "--report", "-", spec],
        capture_output=True, text=True, env=env, timeout=120,
    )


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                    reason="elsewhere PyPI's plain torch wheel is the CPU build and tools/dev asks for it")
def test_linux_x86_64_asks_for_the_cpu_build_by_its_label(tmp_path):
    spec = torch_spec()
    assert spec == "torch==2.13.0+cpu"

    fake_wheel(tmp_path, "2.13.0")  # what PyPI offers: a CUDA build without a label
    refused = resolve(spec, tmp_path)
    assert refused.returncode != 0, "pip settled on the unlabelled (CUDA) wheel"

    fake_wheel(tmp_path, "2.13.0+cpu")
    chosen = resolve(spec, tmp_path)
    assert chosen.returncode == 0, chosen.stderr
    installs = json.loads(chosen.stdout)["install"]
    assert [item["metadata"]["version"] for item in installs] == ["2.13.0+cpu"]


def test_the_venv_torch_is_a_cpu_build():
    assert torch.version.cuda is None, f"torch {torch.__version__} was built with CUDA {torch.version.cuda}"
