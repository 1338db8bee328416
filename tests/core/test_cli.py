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


def test_validate_checks_the_layout_against_nproc_and_run_checks_it_before_spawning(tmp_path):
    from pathlib import Path

    tiny = str(Path(__file__).resolve().parents[2] / "blueprints" / "tiny" / "pretrain.yaml")
    ok = launch("validate", tiny, "--nproc", "2")
    assert (ok.returncode, ok.stdout.strip()) == (0, f"ok: {tiny} (8 stages)"), ok.stderr
    keye_8b = str(Path(tiny).parents[1] / "keye-vl-8b" / "pretrain.yaml")
    bad = launch("validate", keye_8b, "--nproc", "12")
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("keye-launch: error: ")
    assert bad.stderr.strip().endswith(
        "blueprints/keye-vl-8b/pretrain.yaml: parallel.tensor: tensor 8 x pipeline 4 = 32 does not divide 12 processes")
    assert launch("validate", tiny, "--nproc", "0").returncode == 2
    run = launch("run", tiny, "--nproc", "3", "parallel.tensor=2", f"run.output_dir={tmp_path / 'out'}")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == ("keye-launch: error: override 'parallel.tensor=2': parallel.tensor: "
                                  "tensor 2 x pipeline 1 = 2 does not divide 3 processes")
    assert not (tmp_path / "out").exists()  # refused before any rank started or wrote anything


def test_run_refuses_a_blueprint_without_stages(tmp_path):
    base = write_blueprint(tmp_path / "base.yaml", {"run": {"name": "x", "output_dir": str(tmp_path / "out")}})
    assert launch("validate", str(base)).returncode == 0  # a base for other blueprints validates
    result = launch("run", str(base))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "keye-launch: error: stages: the blueprint has no stages, nothing to run (a base for other blueprints?)")
