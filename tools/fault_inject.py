"""Fault injection: kill -9 training runs at random moments and check that ``--resume`` ends bit-identical.

    .venv/bin/python tools/fault_inject.py --kills 20 --seed 1            # about 1 minute a kill on 2 cores
    .venv/bin/python tools/fault_inject.py --kills 4 --nproc 2 --keep /tmp/faults

A small blueprint covers every stage kind: a contrastive stage 0, an lm stage with per-module learning
rates (``lr_scale``, several optimiser parameter groups), an anneal from it, and the merge of the two.
For each of ``--nproc`` (1: one process; 2: two data-parallel ranks) it first runs the blueprint
uninterrupted. Then each trial starts the same blueprint in a fresh folder, SIGKILLs the launcher and
every rank (as a lost machine would) at a random moment, resumes it with ``--resume``, and compares
every stage's final weights and every logged loss with the uninterrupted run. Moments:

- ``mid-step``: after a random number of logged steps (real timing: the kill lands wherever the run is);
- ``mid-checkpoint-write``: as soon as a checkpoint's ``.partial`` folder appears (real timing, polled),
  or, for moments too short to hit by polling, at a random checkpoint write through the writer's test
  hook ``KEYE_FAULT_KILL_AT=<shards-written|before-rename>[:N][@TEXT]`` (the run kills itself at the
  N-th write reaching that point, of a folder whose path contains TEXT; see
  `keye.parallel.checkpoint_folder.hook`);
- ``between``: as soon as a random stage has finished (its ``done.json`` appears; the merge, or the next
  stage's start, is what gets killed).

It prints a progress bar, then the tally (kills, moments, identical runs) and exits 1 if any resumed run
differs or fails. ``tests/train/test_fault_injection.py`` runs a short, fixed version in CI: one run
killed four times in a row (each attempt resuming the last), then resumed to the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "keye.launch.cli", "run"]
MOMENTS = ("mid-step", "mid-checkpoint-write", "between")
HOOK_POINTS = ("shards-written", "before-rename")

_LM_DATA = {"max_tokens": 128, "pack_buffer": 4, "image_max_tokens": 16, "video_frame_tokens": [4, 16],
            "video_max_tokens": 64}


def _anneal(name: str, seed: int) -> dict:
    """A stage-3 anneal: from stage 2's weights, per-module rates, a warmup-stable-decay schedule."""
    return {"name": name, "kind": "lm", "init_from": "stage2", "train": ["vision_encoder", "projector", "language_model"],
            "steps": 4, "optimizer": {"lr": 1e-3, "lr_scale": {"vision_encoder": 0.3}},
            "schedule": {"kind": "wsd", "decay_fraction": 0.5, "min_lr_ratio": 0.01},
            "data": {**_LM_DATA, "sources": {"qa": {"name": "synthetic", "tasks": ["image_qa", "video_qa"],
                                                    "num_samples": 200, "seed": seed}}}}


def blueprint(output_dir: Path) -> dict:
    """Every stage kind, tiny: contrastive, lm with lr_scale, an anneal, and the merge of the last two."""
    return {
        "run": {"name": "faults", "output_dir": str(output_dir), "seed": 11, "checkpoint_every": 2},
        "model": {
            "vision_encoder": {"name": "siglip_navit", "size": "tiny"},
            "text_encoder": {"name": "siglip_text", "size": "tiny", "vocab_size": 1024},
            "projector": {"name": "patch_merge_mlp", "in_dim": 32, "out_dim": 64},
            "language_model": {"name": "qwen3", "size": "tiny"},
            "tokenizer": "synthetic",
        },
        "stages": [
            {"name": "stage0", "kind": "contrastive", "train": ["vision_encoder", "text_encoder"], "steps": 6,
             "options": {"batch_size": 8, "eval_pairs": 8}, "loss": {"name": "siglip_sigmoid", "init_bias": -3.0},
             "optimizer": {"lr": 5e-4}, "schedule": {"kind": "cosine", "warmup_steps": 1},
             "data": {"image_max_tokens": 16, "sources": {"pairs": {"name": "synthetic", "tasks": ["pair"], "num_samples": 200}}}},
            {"name": "stage2", "kind": "lm", "train": ["vision_encoder", "projector", "language_model"], "steps": 6,
             "optimizer": {"lr": 3e-3, "lr_scale": {"vision_encoder": 0.3, "projector": 0.5}},
             "schedule": {"kind": "cosine", "warmup_steps": 1}, "options": {"eval_batches": 1},
             "data": {**_LM_DATA, "sources": {
                 "image_qa": {"name": "synthetic", "tasks": ["image_qa"], "num_samples": 200},
                 "video_qa": {"name": "synthetic", "tasks": ["video_qa"], "num_samples": 200}},
                 "mixer": {"name": "weighted", "weights": {"image_qa": 0.7, "video_qa": 0.3}}}},
            _anneal("anneal", 7),
            {"name": "merge", "kind": "merge", "options": {"inputs": ["stage2", "anneal"], "weights": [0.5, 0.5]}},
        ],
    }


STAGES = [stage["name"] for stage in blueprint(Path("."))["stages"]]
#: Checkpoint folders one run publishes, in order: stage0 at steps 2 and 4, its weights; stage2 the same;
#: the anneal at step 2, its weights; the merge's weights.
CHECKPOINT_WRITES = 9
STEPS = 6 + 6 + 4


@dataclass
class Plan:
    """One kill: when (``moment``) and the detail that picks the instant."""

    moment: str
    nproc: int
    after_steps: int = 0  # mid-step: kill once this many steps were logged
    hook: str | None = None  # mid-checkpoint-write by the writer's hook: "point[:N][@TEXT]"
    after_stage: str | None = None  # between: kill once this stage is done

    def describe(self) -> str:
        detail = self.hook or (f"after stage {self.after_stage}" if self.after_stage else
                               f"after {self.after_steps} steps" if self.moment == "mid-step" else "polled .partial")
        return f"{self.moment} ({detail}, nproc {self.nproc})"


def random_plan(rng: random.Random, nprocs: list[int]) -> Plan:
    moment, nproc = rng.choice(MOMENTS), rng.choice(nprocs)
    if moment == "mid-step":
        return Plan(moment, nproc, after_steps=rng.randint(1, STEPS - 1))
    if moment == "between":
        return Plan(moment, nproc, after_stage=rng.choice(STAGES[:-1]))
    if rng.random() < 0.5:
        return Plan(moment, nproc, hook=f"{rng.choice(HOOK_POINTS)}:{rng.randint(1, CHECKPOINT_WRITES + 3)}")
    return Plan(moment, nproc)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("KEYE_FAULT_KILL_AT", None)
    return {**env, **(extra or {})}


def _command(bp: Path, nproc: int, *extra: str) -> list[str]:
    return [*LAUNCH, str(bp), *(["--nproc", str(nproc)] if nproc > 1 else []), *extra]


def _write_blueprint(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bp.yaml"
    path.write_text(yaml.safe_dump(blueprint(folder / "run"), sort_keys=False))
    return path


def _run(bp: Path, nproc: int, *extra: str) -> None:
    done = subprocess.run(_command(bp, nproc, *extra), env=_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(_command(bp, nproc, *extra))} exited {done.returncode}: {done.stderr[-2000:]}")


def _steps_logged(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def _partial_exists(run: Path) -> bool:
    return any(run.glob("*/checkpoints/.*.partial")) or any(run.glob("*/.weights.partial"))


def _process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it (Linux /proc), so a kill reaches ranks that run in
    process groups of their own."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_everything(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and all its ranks at once, as a lost machine would, and wait until they are gone."""
    tree = _process_tree(process.pid)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in tree[1:]) and time.monotonic() < deadline:
        time.sleep(0.01)


def _reached(plan: Plan, run: Path) -> bool:
    if plan.moment == "mid-step":
        return _steps_logged(run) >= plan.after_steps
    if plan.moment == "between":
        return (run / plan.after_stage / "done.json").exists()
    return _partial_exists(run)


def kill(plan: Plan, bp: Path, folder: Path, resume: bool) -> str:
    """Start (or resume) the blueprint and kill it as ``plan`` says; returns the moment the kill landed
    in, or "finished" when the run ended first."""
    run = folder / "run"
    fired = folder / "hook_fired"
    fired.unlink(missing_ok=True)
    env = _env({"KEYE_FAULT_KILL_AT": plan.hook, "KEYE_FAULT_FIRED": str(fired)} if plan.hook else None)
    process = subprocess.Popen(_command(bp, plan.nproc, *(["--resume"] if resume else [])), env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    landed = "finished"
    try:
        while process.poll() is None:
            if fired.exists() if plan.hook else _reached(plan, run):
                landed = plan.moment  # the hook killed rank 0, or the moment came: kill the whole group
                break
            time.sleep(0.002)
        landed = plan.moment if fired.exists() else landed
    finally:
        kill_everything(process)
    if landed == "finished" and process.returncode != 0:
        raise RuntimeError(f"{plan.describe()}: the run failed before it was killed (exit {process.returncode})")
    return "finished" if (run / STAGES[-1] / "done.json").exists() else landed


def kill_and_resume(plans: list[Plan], folder: Path) -> list[str]:
    """Kill one run once per plan (each attempt resuming the last), then resume it to the end; the
    moments the kills landed in."""
    bp = _write_blueprint(folder)
    landed = [kill(plan, bp, folder, resume=index > 0) for index, plan in enumerate(plans)]
    _run(bp, plans[0].nproc, "--resume")
    return landed


def _losses(run: Path) -> list[tuple[str, int, float]]:
    lines = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    return [(line["stage"], line["step"], line["loss"]) for line in lines]


def differences(expected: Path, got: Path) -> list[str]:
    """What differs between two finished runs: each stage's weights, bit for bit, and the logged losses."""
    from keye.parallel.dist_checkpoint import read_full_tensors

    found = []
    for stage in STAGES:
        a, b = read_full_tensors(expected / stage / "weights"), read_full_tensors(got / stage / "weights")
        if a.keys() != b.keys():
            found.append(f"{stage}: different tensors")
        found += [f"{stage}: {name}" for name in a if name in b and not torch.equal(a[name], b[name])][:3]
    if _losses(expected) != _losses(got):
        found.append("metrics.jsonl: losses differ")
    return found


def run_suite(trials: list[list[Plan]], work: Path, progress: bool = True) -> dict:
    """Run each trial (a run killed once per plan, then resumed) against an uninterrupted run with the
    same number of processes; the tally."""
    references: dict[int, Path] = {}
    tally = {"kills": 0, "moments": Counter(), "ranks": Counter(), "identical": 0, "runs": len(trials), "failures": []}
    for index, plans in enumerate(tqdm(trials, desc="fault injection", unit="run", disable=not progress)):
        nproc = plans[0].nproc
        tally["ranks"][nproc] += 1
        if nproc not in references:
            bp = _write_blueprint(work / f"reference_nproc{nproc}")
            _run(bp, nproc)
            references[nproc] = bp.parent / "run"
        folder = work / f"trial_{index:03d}"
        try:
            landed = kill_and_resume(plans, folder)
            found = differences(references[nproc], folder / "run")
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            landed, found = ["error"], [str(exc).splitlines()[0][:300]]
        tally["kills"] += sum(moment in MOMENTS for moment in landed)
        tally["moments"].update(landed)
        if found:
            what = ", ".join(plan.describe() for plan in plans)
            tally["failures"].append(f"run {index} ({what}): {'; '.join(found)}")
        else:
            tally["identical"] += 1
            shutil.rmtree(folder, ignore_errors=True)
    tally["moments"], tally["ranks"] = dict(tally["moments"]), dict(tally["ranks"])
    return tally


def report(tally: dict) -> str:
    moments = ", ".join(f"{name} {count}" for name, count in sorted(tally["moments"].items()))
    ranks = ", ".join(f"{count} with {nproc} rank{'s' if nproc > 1 else ''}" for nproc, count in sorted(tally["ranks"].items()))
    lines = [f"kills: {tally['kills']} ({moments}); runs: {tally['runs']} ({ranks}); identical to the uninterrupted "
             f"run after resume: {tally['identical']} of {tally['runs']}"]
    return "\n".join(lines + [f"DIFFERS {failure}" for failure in tally["failures"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="how many runs to kill (once each) and resume")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random moments")
    parser.add_argument("--nproc", default="1,2", help="process counts to draw from (1: one process, 2: two DP ranks)")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    trials = [[random_plan(rng, [int(n) for n in args.nproc.split(",")])] for _ in range(args.kills)]
    work = args.keep or Path(tempfile.mkdtemp(prefix="keye-faults-"))
    try:
        tally = run_suite(trials, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(report(tally))
    return 0 if tally["identical"] == tally["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
