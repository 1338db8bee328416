"""keye-launch as a user meets it: a separate process, exit codes, one-line errors."""

import subprocess
import sys

from keye.testing import write_blueprint

LAUNCH = [sys.executable, "-m", "keye.launch.cli"]


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *args], capture_output=True, text=True, timeout=120)


def test_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path):
    bad = write_blueprint(tmp_path / "bad.yaml", {"run": {"nmae": "typo"}})
    for args in (("validate", str(bad)), ("print-config", str(bad)), ("run", str(bad)), ("validate", "missing.yaml")):
        result = launch(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("keye-launch: error: "), lines
    assert "bad.yaml: run.nmae: Key 'nmae' not in 'RunConfig'" in launch("validate", str(bad)).stderr


def test_validate_reports_each_blueprint(tmp_path):
    good = write_blueprint(tmp_path / "good.yaml", {"run": {"name": "fine"}})
    bad = write_blueprint(tmp_path / "bad.yaml", {"parallel": {"tensor": "two"}})
    result = launch("validate", str(good), str(bad))
    assert result.returncode == 2
    assert result.stdout.strip() == f"ok: {good} (0 stages)"
    assert "bad.yaml: parallel.tensor: Value 'two' of type 'str' could not be converted to Integer" in result.stderr


def test_run_rejects_an_unknown_stage(tmp_path):
    path = write_blueprint(tmp_path / "bp.yaml", {"run": {"name": "x"}})
    result = launch("run", str(path), "--stage", "stage9")
    assert result.returncode == 2
    assert "no stage named 'stage9'; stages: (none)" in result.stderr


def test_print_config_overrides_and_usage_errors(tmp_path):
    path = write_blueprint(tmp_path / "bp.yaml", {"run": {"name": "x"}})
    result = launch("print-config", str(path), "run.seed=99")
    assert result.returncode == 0
    assert "  # Seed for weights, data order and dropout.\n  seed: 99\n" in result.stdout
    assert launch("frobnicate").returncode == 2
    assert launch("run", str(path), "--nproc", "0").returncode == 2
