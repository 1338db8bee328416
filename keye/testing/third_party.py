"""Throwaway third-party distributions, and ``keye-launch`` run in a fresh process that sees them.

A plugin's effect on keye depends on how it is *installed* (its distribution name, its entry points, the
order ``importlib.metadata`` finds them), so tests of plugin loading need real distributions, not objects
handed to ``PluginHost.add_plugin``. ``write_distribution`` lays one out in a folder the way pip would
(the modules, and ``<name>-<version>.dist-info`` with ``METADATA`` and ``entry_points.txt``), in
milliseconds and without pip; ``launch`` runs ``python -m keye.launch.cli`` with that folder first on
``PYTHONPATH``, so ``importlib.metadata`` finds the distribution exactly as it finds an installed one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

LAUNCH = [sys.executable, "-m", "keye.launch.cli"]


def write_distribution(
    site: str | Path, name: str, version: str, entry_points: dict[str, str], modules: dict[str, str]
) -> Path:
    """Install distribution ``name`` into folder ``site`` by hand; returns its ``.dist-info`` folder.

    ``entry_points`` maps entry-point names (group ``keye``) to module paths, e.g. ``{"eva": "keye_eva.plugin"}``;
    ``modules`` maps file paths relative to ``site`` to their source (dedented), e.g.
    ``{"keye_eva/__init__.py": "", "keye_eva/plugin.py": CODE}``.
    """
    site = Path(site)
    for relative, code in modules.items():
        path = site / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(code))
    info = site / f"{re.sub(r'[-.]+', '_', name)}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[keye]\n{lines}")
    return info


def launch_env(site: str | Path | None = None, **env: str) -> dict[str, str]:
    """This process's environment without ``KEYE_*`` switches, ``site`` first on PYTHONPATH, then ``env``."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KEYE_")}
    environment.setdefault("OMP_NUM_THREADS", "1")
    if site is not None:
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), environment.get("PYTHONPATH")]))
    environment.update(env)
    return environment


def launch(site: str | Path | None, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``keye-launch ARGS`` in a fresh process that sees the distributions in ``site``; output captured."""
    return subprocess.run(
        [*LAUNCH, *args], capture_output=True, text=True, env=launch_env(site, **env), timeout=timeout
    )
