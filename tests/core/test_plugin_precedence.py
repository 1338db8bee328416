"""Plugin precedence: installed third-party distributions cannot displace, hide or kill keye's built-ins.

Each test installs throwaway distributions (``keye.testing.third_party``) and runs ``keye-launch`` in a
fresh process, so entry points are found and ordered by ``importlib.metadata`` exactly as after a pip install.
"""

import json
import signal
import subprocess
import time
from pathlib import Path

from keye.testing import write_blueprint
from keye.testing.third_party import LAUNCH, launch, launch_env, write_distribution

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "blueprints" / "tiny" / "pretrain.yaml")

# Registers a vision encoder under the built-in's name. Its entry point, `aaa_navit`, sorts before the
# built-in `siglip_navit`: loading in name order alone would let it register first.
FOREIGN_NAVIT = '''
    from dataclasses import dataclass

    from keye import hookimpl
    from keye.testing.stubs import Stub


    class ForeignNavit(Stub):
        @dataclass
        class Config:
            size: str = "tiny"


    @hookimpl
    def keye_register_vision_encoders(register):
        register("siglip_navit", ForeignNavit)
'''

# An entry point *named* `lm`, like the built-in lm stage's, registering a stage of its own.
LM_TOOLS = '''
    from dataclasses import dataclass

    from keye import hookimpl
    from keye.testing.stubs import Stub


    class LmToolsEval(Stub):
        @dataclass
        class Config:
            pass


    @hookimpl
    def keye_register_stages(register):
        register("lm_tools_eval", LmToolsEval)
'''


def _records(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return {(r["distribution"], r["name"]): r for r in json.loads(result.stdout)}


def _foreign_navit_site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    write_distribution(site, "keye-aaa-navit", "6.6.6", {"aaa_navit": "keye_aaa_navit.plugin"},
                       {"keye_aaa_navit/__init__.py": "", "keye_aaa_navit/plugin.py": FOREIGN_NAVIT})
    return site


def test_a_foreign_registration_of_a_builtin_name_fails_naming_both_and_the_builtin_is_used(tmp_path):
    site = _foreign_navit_site(tmp_path)
    result = launch(site, "plugins", "--json")
    records = _records(result)
    builtin, foreign = records[("keye", "siglip_navit")], records[("keye-aaa-navit", "aaa_navit")]
    assert builtin["status"] == "loaded" and builtin["components"] == {"vision_encoder": ["siglip_navit"]}
    assert foreign["status"] == "failed" and foreign["components"] == {}
    assert "vision_encoder 'siglip_navit' is registered twice" in foreign["error"]
    assert "keye 0.1.0 (plugin siglip_navit)" in foreign["error"]
    assert "keye-aaa-navit 6.6.6 (plugin aaa_navit)" in foreign["error"]
    assert "KEYE_OVERRIDE=vision_encoder:siglip_navit=keye-aaa-navit" in foreign["error"]  # how to mean it
    assert result.stderr.count("keye plugin 'aaa_navit' from keye-aaa-navit 6.6.6 failed to load") == 1
    # What `run` would build: the built-in class.
    shown = launch(site, "print-config", TINY)
    assert shown.returncode == 0, shown.stderr
    assert "# vision_encoder registered by keye 0.1.0 (plugin siglip_navit)" in shown.stdout


def test_an_override_the_user_asks_for_replaces_the_builtin(tmp_path):
    site = _foreign_navit_site(tmp_path)
    asked = {"KEYE_OVERRIDE": "vision_encoder:siglip_navit=keye-aaa-navit"}
    records = _records(launch(site, "plugins", "--json", **asked))
    builtin, foreign = records[("keye", "siglip_navit")], records[("keye-aaa-navit", "aaa_navit")]
    assert foreign["status"] == "loaded" and foreign["components"] == {"vision_encoder": ["siglip_navit"]}
    assert builtin["status"] == "loaded"
    assert builtin["overridden"] == {"vision_encoder": {"siglip_navit": "keye-aaa-navit 6.6.6 (plugin aaa_navit)"}}
    shown = launch(site, "print-config", TINY, **asked)
    assert "# vision_encoder registered by keye-aaa-navit 6.6.6 (plugin aaa_navit)" in shown.stdout
    typo = launch(site, "plugins", KEYE_OVERRIDE="vision_encoder:siglip_navit=keye-aa-navit")
    assert typo.returncode == 0, typo.stderr
    assert ("KEYE_OVERRIDE: keye-aa-navit registered no vision_encoder 'siglip_navit'; "
            "using keye 0.1.0 (plugin siglip_navit)") in typo.stderr


def test_a_bad_override_setting_is_one_line_exit_2(tmp_path):
    result = launch(None, "plugins", KEYE_OVERRIDE="siglip_navit=keye-aaa-navit")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "keye-launch: error: KEYE_OVERRIDE: 'siglip_navit=keye-aaa-navit' is not KIND:NAME=DISTRIBUTION"
        " (e.g. vision_encoder:siglip_navit=keye-eva-vit)"
    ]


def test_an_entry_point_named_like_a_builtin_one_hides_nothing(tmp_path):
    site = tmp_path / "site"
    write_distribution(site, "keye-lm-tools", "0.2", {"lm": "keye_lm_tools.plugin"},
                       {"keye_lm_tools/__init__.py": "", "keye_lm_tools/plugin.py": LM_TOOLS})
    records = _records(launch(site, "plugins", "--json"))
    assert records[("keye", "lm")]["components"] == {"stage": ["lm"]}
    assert records[("keye-lm-tools", "lm")]["components"] == {"stage": ["lm_tools_eval"]}
    assert records[("keye", "lm")]["status"] == records[("keye-lm-tools", "lm")]["status"] == "loaded"
    text = launch(site, "plugins")
    assert "lm  keye 0.1.0  [loaded]" in text.stdout and "lm  keye-lm-tools 0.2  [loaded]" in text.stdout
    validated = launch(site, "validate", TINY)  # its stages are kind lm, contrastive and merge
    assert (validated.returncode, validated.stdout.strip()) == (0, f"ok: {TINY} (8 stages)"), validated.stderr


def _one_step_blueprint(tmp_path: Path) -> Path:
    data = {"max_tokens": 128, "image_max_tokens": 16, "video_frame_tokens": [4, 16], "video_max_tokens": 64,
            "sources": {"qa": {"name": "synthetic", "tasks": ["color"], "num_samples": 16}}}
    return write_blueprint(tmp_path / "bp.yaml", {
        "run": {"name": "t", "output_dir": str(tmp_path / "run"), "seed": 1},
        "model": {"vision_encoder": {"name": "siglip_navit", "size": "tiny"},
                  "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
                  "language_model": {"name": "qwen3", "size": "tiny"}},
        "stages": [{"name": "s", "kind": "lm", "train": ["projector"], "steps": 1, "optimizer": {"lr": 1e-3},
                    "schedule": {"kind": "constant"}, "data": data}],
    })


def test_system_exit_or_keyboard_interrupt_raised_by_a_plugin_is_contained(tmp_path):
    site = tmp_path / "site"
    write_distribution(site, "keye-exits", "1.0", {"exits": "keye_exits"}, {"keye_exits.py": "raise SystemExit(3)\n"})
    write_distribution(site, "keye-interrupts", "1.0", {"interrupts": "keye_interrupts"},
                       {"keye_interrupts.py": "raise KeyboardInterrupt('at import')\n"})
    result = launch(site, "plugins", "--json")
    records = _records(result)
    assert (records[("keye-exits", "exits")]["status"], records[("keye-exits", "exits")]["error"]) == ("failed", "SystemExit: 3")
    interrupts = records[("keye-interrupts", "interrupts")]
    assert (interrupts["status"], interrupts["error"]) == ("failed", "KeyboardInterrupt: at import")
    assert result.stderr.count("keye plugin 'exits' from keye-exits 1.0 failed to load") == 1
    assert all(r["status"] == "loaded" for (dist, _), r in records.items() if dist == "keye")
    path = _one_step_blueprint(tmp_path)
    validated = launch(site, "validate", str(path))
    assert (validated.returncode, validated.stdout.strip()) == (0, f"ok: {path} (1 stages)"), validated.stderr
    ran = launch(site, "run", str(path))
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "run" / "s" / "done.json").exists()


def test_a_real_ctrl_c_while_plugins_load_still_stops_the_program(tmp_path):
    site, marker = tmp_path / "site", tmp_path / "importing"
    write_distribution(site, "keye-slow", "1.0", {"slow": "keye_slow"}, {"keye_slow.py": f"""
        import pathlib, time
        pathlib.Path({str(marker)!r}).touch()
        time.sleep(60)
    """})
    process = subprocess.Popen([*LAUNCH, "plugins"], env=launch_env(site), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180  # the built-in plugins load first: torch and Megatron, slow on a busy machine
    while not marker.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), ("the slow plugin never started importing", process.poll(),
                             process.communicate(timeout=30)[1][-3000:] if process.poll() is not None else "")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGINT, stderr  # Python's exit for an unhandled KeyboardInterrupt
    assert "KeyboardInterrupt" in stderr and "failed to load" not in stderr
    assert stdout == ""
