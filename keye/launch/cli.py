"""``keye-launch``: run, check and inspect blueprints; list plugins.

    keye-launch run BLUEPRINT [KEY=VALUE ...] [--stage NAME] [--nproc N] [--resume | --overwrite]
    keye-launch validate BLUEPRINT [BLUEPRINT ...] [KEY=VALUE ...] [--nproc N]
    keye-launch print-config BLUEPRINT [KEY=VALUE ...]
    keye-launch plugins [--json] [--kind KIND]
    keye-launch export BLUEPRINT STAGE DST [KEY=VALUE ...]
    keye-launch convert {hf-to-megatron,megatron-to-hf} SRC DST [--tensor T] [--pipeline P]
    keye-launch eval SOURCE [STAGE] BENCHMARK... [--mode M] [--max-samples N] [--out DIR]
    keye-launch chat SOURCE [STAGE] [--image PATH]... [--video PATH]... [--mode M] [PROMPT]

A user error (bad blueprint, unknown component, bad override) prints one line and exits 2 (once per run:
with ``--nproc N`` the launcher prints what its ranks report, see `keye.launch.spawn`). ``run`` refuses an
output directory that a live run holds, or that an earlier run filled unless ``--resume`` or ``--overwrite``
says what to do with it (`keye.train.output_dir`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from keye.errors import KeyeUserError
from keye.quiet import install as filter_known_warnings

EXIT_USER_ERROR = 2


def _host():
    from keye.plugins import get_host

    return get_host()


def cmd_run(args: argparse.Namespace) -> int:
    from keye.config import check_runnable, launch_world_size, load_blueprint
    from keye.launch.spawn import spawn_local, spawned_by_keye, under_launcher
    from keye.train.output_dir import claim_output_dir

    host = _host()
    cfg = load_blueprint(args.blueprint, args.overrides, host.registry, nproc=launch_world_size(args.nproc))
    if args.stage is not None and args.stage not in [stage.name for stage in cfg.stages]:
        known = ", ".join(stage.name for stage in cfg.stages) or "(none)"
        raise KeyeUserError(f"{args.blueprint}: no stage named '{args.stage}'; stages: {known}")
    check_runnable(cfg, args.stage)  # a stage to run, init_from folders that exist: before any process starts
    from keye.parallel.fp8 import check_fp8_available

    check_fp8_available(cfg.precision)  # before any process starts
    lock = None  # held until this process ends; our own ranks run under their launcher's lock
    if not spawned_by_keye():
        stages = [args.stage] if args.stage else [stage.name for stage in cfg.stages]
        lock = claim_output_dir(Path(cfg.run.output_dir), stages, whole_run=args.stage is None, resume=args.resume,
                                overwrite=args.overwrite, leader=os.environ.get("RANK", "0") == "0")
    if args.nproc > 1 and not under_launcher():
        argv = ["run", args.blueprint, *args.overrides]
        if args.stage:
            argv += ["--stage", args.stage]
        if args.resume:
            argv.append("--resume")
        return spawn_local(args.nproc, argv, pass_fds=[lock.fileno()])  # the lock lasts as long as the last rank
    from keye.parallel.state import destroy_parallel
    from keye.train.runner import run_blueprint

    run_blueprint(cfg, host, only_stage=args.stage, resume=args.resume)
    # A clean teardown: a process group left to the interpreter's exit can abort it (gloo's threads: "terminate
    # called without an active exception", exit 134), after a run that succeeded.
    destroy_parallel()
    return 0


def is_override(arg: str) -> bool:
    """``KEY=VALUE`` rather than a blueprint path: has a ``=`` and names no existing file."""
    return "=" in arg and not arg.startswith("-") and not Path(arg).exists()


def cmd_validate(args: argparse.Namespace) -> int:
    """Everything ``run`` checks before it builds anything (schema, components, ranges, references between
    stages; with ``--nproc`` the parallel layout too), one line per failing blueprint. Data and weights
    folders are not looked at (a blueprint is often checked away from its cluster); ``run`` looks at them.
    ``KEY=VALUE`` overrides, as ``run`` takes them, apply to every blueprint named."""
    from keye.config import load_blueprint
    from keye.config.semantics import budget_warnings

    if args.layout_nproc is not None and args.layout_nproc < 1:
        raise KeyeUserError("--nproc must be at least 1")
    overrides = [arg for arg in (*args.blueprints, *args.overrides) if is_override(arg)]
    paths = [arg for arg in args.blueprints if not is_override(arg)]
    if not paths:
        raise KeyeUserError("validate: no blueprint given (only overrides: " + " ".join(overrides) + ")")
    host = _host()
    failures = 0
    for path in paths:
        try:
            cfg = load_blueprint(path, overrides, host.registry, nproc=args.layout_nproc)
        except KeyeUserError as exc:
            print(f"keye-launch: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        print(f"ok: {path} ({len(cfg.stages)} stages)")
        for line in budget_warnings(cfg):  # printed, not an error: the blueprint runs, as written
            print(f"warning: {path}: {line}")
    return EXIT_USER_ERROR if failures else 0


def cmd_print_config(args: argparse.Namespace) -> int:
    from keye.config import load_blueprint, render_blueprint

    host = _host()
    cfg = load_blueprint(args.blueprint, args.overrides, host.registry)
    sys.stdout.write(render_blueprint(cfg, host.registry))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    """Every plugin (components, lifecycle hooks, or both; failed and blocked ones too), or with ``--kind``
    only the plugins that register components of that kind, and only those components."""
    from keye.registry import KINDS

    host = _host()
    records = [record.to_dict() for record in host.records.values()]
    if args.kind is not None:
        if args.kind not in KINDS:
            raise KeyeUserError(f"plugins --kind: unknown kind '{args.kind}'; known: {', '.join(KINDS)}")
        records = [{**record, "components": {args.kind: record["components"][args.kind]}}
                   for record in records if args.kind in record["components"]]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    for record in records:
        print(f"{record['name']}  {record['distribution']} {record['version']}  [{record['status']}]")
        if record["error"]:
            print(f"    error: {record['error']}")
        for kind, names in record["components"].items():
            print(f"    {kind}: {', '.join(names)}")
        lifecycle = [hook for hook in record["hooks"] if not hook.startswith("keye_register_")]
        if lifecycle and args.kind is None:
            print(f"    hooks: {', '.join(lifecycle)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from keye.launch.export import export_stage

    out = export_stage(args.blueprint, args.stage, args.dst, args.overrides)
    print(f"exported stage '{args.stage}' to {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from keye.launch.convert import run_convert

    return run_convert(args.direction, args.src, args.dst, args.tensor, args.pipeline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keye-launch", description="Run and inspect keye blueprints.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a blueprint (all stages, or one with --stage)")
    run.add_argument("blueprint")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. stages.0.steps=5")
    run.add_argument("--stage", help="run only this stage (by name)")
    run.add_argument("--nproc", type=int, default=1, help="local processes to start (torch.distributed)")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the last checkpoint in run.output_dir")
    again.add_argument("--overwrite", action="store_true",
                       help="start over: remove the outputs an earlier run left in run.output_dir first")
    run.set_defaults(func=cmd_run)

    validate = commands.add_parser("validate", help="check blueprints against the schema and the registry")
    validate.add_argument("blueprints", nargs="+", metavar="BLUEPRINT",
                          help="blueprints to check, then KEY=VALUE overrides applied to each (as run takes them)")
    validate.set_defaults(overrides=[])
    validate.add_argument("--nproc", type=int, default=None, dest="layout_nproc", metavar="N",
                          help="also check the parallel layout against this many processes (as run --nproc N would)")
    validate.set_defaults(func=cmd_validate)

    show = commands.add_parser("print-config", help="print the fully resolved blueprint with field docs")
    show.add_argument("blueprint")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    show.set_defaults(func=cmd_print_config)

    plugins = commands.add_parser("plugins", help="list plugins: distribution, version, status, components")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.add_argument("--kind", metavar="KIND", help="only plugins that register components of this kind")
    plugins.set_defaults(func=cmd_plugins)

    export = commands.add_parser("export", help="write a finished stage's weights in the released Keye-VL HF format")
    export.add_argument("blueprint")
    export.add_argument("stage", help="stage name (its weights are read from run.output_dir/<stage>)")
    export.add_argument("dst", help="destination directory")
    export.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    export.set_defaults(func=cmd_export)

    convert = commands.add_parser("convert", help="convert released Hugging Face Keye-VL checkpoints to/from Megatron-Core")
    convert.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    convert.add_argument("src", help="source directory")
    convert.add_argument("dst", help="destination directory (new or empty)")
    convert.add_argument("--tensor", type=int, default=1, help="tensor-parallel size to convert with")
    convert.add_argument("--pipeline", type=int, default=1, help="pipeline-parallel size to convert with")
    convert.set_defaults(func=cmd_convert)

    from keye.launch import chat, evaluate

    evaluate.add_parser(commands)  # keye.launch.evaluate
    chat.add_parser(commands)  # keye.launch.chat
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    filter_known_warnings()  # exact, harmless ones only (keye.quiet)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also come after options (`run bp.yaml --stage s2 stages.1.steps=5`).
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "nproc", 1) < 1:
        print("keye-launch: error: --nproc must be at least 1", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        return args.func(args)
    except KeyeUserError as exc:
        from keye.launch.spawn import report_user_error

        report_user_error(f"keye-launch: error: {exc}")  # once per run, not once per rank
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
