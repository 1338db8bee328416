"""``rejection_sampling``: N replies per prompt from the current model, scored, written as MPO pairs and SFT data.

The policy is an earlier stage of the run (``options.stage``, default the stage before), loaded into this
run's layout as the ``eval`` stage loads one. The prompts are the stage's ``data.sources`` (RL prompts, or
conversations with ``meta.answer``), read in order, at most ``options.num_prompts``. Each prompt is sampled
``n`` times in one think mode drawn by ``options.modes``' weights and scored by ``options.rewards``: reward
models by label, each node ``{name: <reward_model>, weight: w, ...its Config}`` (``name`` defaults to the
label), combined by `keye.rewards.contract.WeightedRewards`: rule rewards and the ``mllm_judge`` alike. Every
configured reward scores every reply (the prompts' own ``reward_names`` are for the RL stage's mix).
`keye.data.rejection` picks the pairs (best against worst, at least ``margin`` apart) and SFT targets (the
best, at least ``sft_min_score``).

Rank 0 writes, in this stage's folder, ``pairs.jsonl`` (preference samples, for a ``preference`` stage) and/or
``sft.jsonl`` (conversations, for an ``lm`` stage), each with its media beside it, as the ``jsonl`` source reads
them, and ``rejection_summary.json``. The summary (also the stage's result in the run summary) has the mean
reward overall, per mode and per reward component, the mean best reward per prompt, the mean reward of the
pairs' chosen and rejected replies (``pair_rewards``), the counts of what the rewards handled by rule (a missing
reference, an unparsable judgement, a cut-off reply) and why prompts gave no pair.

It trains nothing, but it publishes the weights it sampled from as its own (``save_weights``), so the stage
after it starts from the model that produced the data without an ``init_from``, and in a ``repeat`` group
(`keye.config.repeat`) each round's MPO starts from the last round's model with no reference at all. Every
rank generates every prompt (generation is collective over the model-parallel group); data-parallel ranks
repeat the work, as in ``cot_build``.

With ``outputs: []`` it only measures: the rewards of the model's samples on its prompts (e.g. held-out ones,
with a fixed seed, to compare two stages). A round that finds no pair writes an empty ``pairs.jsonl``, and the
``preference`` stage reading it stops with one line saying its source is empty (its ``no_pair`` counts say why).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch.distributed as dist

from keye import hookimpl
from keye.config import doc

OUTPUTS = ("pairs", "sft")


def reward_nodes(rewards: dict) -> dict[str, tuple[dict, float]]:
    """Label → (reward_model node without its weight, weight)."""
    nodes = {}
    for label, node in rewards.items():
        body = {key: value for key, value in dict(node or {}).items() if key != "weight"}
        body.setdefault("name", label)
        nodes[label] = (body, (node or {}).get("weight", 1.0))
    return nodes


class RejectionSamplingStage:
    #: report.md's headline (`keye.train.report`): pairs written, their chosen / rejected reward, the mean reward
    #: (per mode and component) and what the judge could not parse
    headline_keys = ("pairs", "pair_rewards.*", "mean_reward", "mean_best_reward", "reward_by_mode.*",
                     "components.*", "counts.*/unparsable")

    @dataclass
    class Config:
        stage: str = doc("The earlier stage to sample from (empty: the stage before).", "")
        n: int = doc("Replies sampled per prompt.", 8)
        modes: Dict[str, float] = doc("Think modes by weight, e.g. {think: 1, no_think: 1}; each prompt is sampled "
                                      "in one mode drawn by them (required: a dict default would merge).",
                                      default_factory=dict)
        temperature: float = doc("Sampling temperature.", 1.0)
        seed: Optional[int] = doc("Seed of the samples and of the modes drawn (null: run.seed + the stage's index, "
                                  "so each round of a repeat group draws afresh).", None)
        num_prompts: int = doc("Prompts read from the data sources at most.", 256)
        max_new_tokens: int = doc("Tokens per reply at most.", 128)
        batch_size: int = doc("Prompts generated together (each with n replies).", 8)
        rewards: Dict[str, Any] = doc(
            "Reward models by label: {name: <reward_model>, weight: w, ...}; name defaults to the label "
            "(required, e.g. {answer_match: {weight: 1.0}, format: {weight: 0.5}}).", default_factory=dict)
        margin: float = doc("A pair needs best − worst reward of at least this much.", 0.5)
        outputs: List[str] = doc("What to write: pairs (pairs.jsonl) and/or sft (sft.jsonl); empty: measure only "
                                 "(the rewards of the model's samples, in the summary).",
                                 default_factory=lambda: ["pairs"])
        sft_min_score: float = doc("The best reply becomes an SFT target when it scores at least this.", 1.0)
        save_weights: bool = doc("Publish the sampled model's weights as this stage's, so the next stage starts "
                                 "from it without init_from.", True)

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        from keye.config.validate import short
        from keye.eval.model import MODES

        index = check.stage_index
        check.trains_nothing("rejection sampling")
        check.earlier_stage(config)
        if not config.stage and index == 0:
            check.fail("stage", "the first stage has no stage before it to sample from; name one")
        check.count(config, "n", minimum=2)
        check.count(config, "num_prompts", "max_new_tokens", "batch_size")
        if not config.modes:
            check.fail("modes", f"give at least one think mode ({', '.join(MODES)}) with a weight")
        for mode, weight in config.modes.items():
            if mode not in MODES:
                check.fail(f"modes.{mode}", f"unknown mode; known: {', '.join(MODES)}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0 or math.isinf(weight):
                check.fail(f"modes.{mode}", f"must be a finite weight >= 0, got {short(weight)}")
        if not sum(config.modes.values()) > 0:
            check.fail("modes", "the weights add up to 0")
        if not config.temperature > 0:
            check.fail("temperature", f"must be > 0 to sample n different replies, got {config.temperature!r}")
        check.number(config, "margin", above=0.0)
        check.number(config, "sft_min_score")
        if any(o not in OUTPUTS for o in config.outputs):
            check.fail("outputs", f"expected some of {', '.join(OUTPUTS)}, got {list(config.outputs)!r}")
        if not config.rewards:
            check.fail("rewards", "no reward models: give at least one, e.g. {answer_match: {weight: 1.0}}")
        cls._check_rewards(config, check)
        if not check.stage.data.sources:
            check.fail("", f"no prompts: stages.{index}.data.sources is empty")

    @staticmethod
    def _check_rewards(config: Config, check: Any) -> None:
        """Each reward node against its component's Config (and its own check_config), named by its key."""
        from keye.config.semantics import ConfigCheck
        from keye.config.validate import build_component_config, short, validate_component
        from keye.plugins import get_registry

        registry = get_registry()
        for label, node in config.rewards.items():
            if node is not None and not isinstance(node, dict):
                check.fail(f"rewards.{label}", f"expected a reward_model node {{name: ..., weight: ...}}, got {short(node)}")
            body, weight = reward_nodes({label: node})[label]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                check.fail(f"rewards.{label}.weight", f"must be a finite number, got {short(weight)}")
            path = check.key(f"rewards.{label}")
            validated = validate_component("reward_model", body, path, registry, check._origin)
            component, reward_config = build_component_config("reward_model", validated, registry)
            if hasattr(component, "check_config"):
                component.check_config(reward_config, ConfigCheck(check.blueprint, path, check._origin, check.stage_index))

    #: the sampled model is built as one chunk per virtual pipeline stage (`keye.eval.model.stage_model`)
    supports_virtual_pipeline = True

    def __init__(self, config: Config, ctx: Any) -> None:
        self.config = config
        self.ctx = ctx

    def policy(self) -> tuple[Any, Any, Path]:
        from keye.data.pipeline import build_processor
        from keye.eval.model import EvalModel, make_generator, stage_model

        ctx, config = self.ctx, self.config
        source = Path(ctx.blueprint.run.output_dir) / config.stage if config.stage else Path(ctx.previous_output)
        model = stage_model(ctx.blueprint, source, ctx.registry, ctx.parallel)
        processor = build_processor(ctx)
        generator = make_generator(model, processor.tokenizer, ctx.parallel)
        return EvalModel(generator, processor, max_new_tokens=config.max_new_tokens), model, source

    def rewards(self) -> Any:
        from keye.config.validate import build_component_config
        from keye.rewards.contract import WeightedRewards

        models, weights = {}, {}
        for label, (body, weight) in reward_nodes(self.config.rewards).items():
            cls, reward_config = build_component_config("reward_model", body, self.ctx.registry)
            models[label], weights[label] = cls(reward_config, self.ctx), float(weight)
        return WeightedRewards(models, weights)

    def prompts(self, stats: Any):
        from keye.data.pipeline import build_sources
        from keye.data.rejection import prompt_of

        left = self.config.num_prompts
        for label, source in build_sources(self.ctx, "sources", read_all=True).items():
            for loaded in source:
                if left == 0:
                    return
                question = prompt_of(loaded)
                if isinstance(question, str):
                    stats.skipped[question] += 1
                    continue
                question.key = f"{label}/{question.key}"  # unique over the sources: pair keys must be
                left -= 1
                yield question

    def run(self) -> dict[str, Any]:
        from keye.data.cot import write_jsonl
        from keye.data.rejection import (RejectionStats, pair_record, pick_pair, pick_sft, sample_and_score,
                                         sft_record)
        from keye.train.stage_weights import save_stage_weights

        ctx, config = self.ctx, self.config
        seed = ctx.blueprint.run.seed + ctx.index if config.seed is None else config.seed
        model, network, source = self.policy()
        step = _steps_of(source)
        origin = {"model": f"stage {source.name}", "step": step, "seed": seed, "n": config.n,
                  "temperature": config.temperature}
        stats = RejectionStats()
        groups = list(sample_and_score(model, self.prompts(stats), self.rewards(), n=config.n, modes=config.modes,
                                       temperature=config.temperature, seed=seed, batch_size=config.batch_size,
                                       stats=stats))
        prefix = f"rs/{ctx.stage.name}"
        pairs, sft, chosen, rejected = [], [], [], []
        for group in groups:
            picked = pick_pair(group.scores, group.replies, config.margin)
            if isinstance(picked, str):
                stats.no_pair[picked] += 1
            else:
                pairs.append(pair_record(group, *picked, origin, prefix))
                chosen.append(group.scores[picked[0]])
                rejected.append(group.scores[picked[1]])
            best = pick_sft(group.scores, group.replies, config.sft_min_score)
            if best is not None:
                sft.append(sft_record(group, best, origin, prefix))
        stats.pairs, stats.sft = len(pairs), len(sft)
        writer = not dist.is_initialized() or dist.get_rank() == 0
        if writer:
            Path(ctx.output_dir).mkdir(parents=True, exist_ok=True)
        written = {}
        for name, items in (("pairs", pairs), ("sft", sft)):
            if name in config.outputs:
                path = Path(ctx.output_dir) / f"{name}.jsonl"
                if writer:
                    write_jsonl(items, path, media_dir=f"{name}_media")
                written[name] = str(path)
        summary = {"policy": origin["model"], "policy_step": step, "seed": seed, "outputs": written, **stats.summary()}
        if chosen:  # the mean reward of the pairs' best and worst replies: how far apart what MPO learns from is
            summary["pair_rewards"] = {"chosen": sum(chosen) / len(chosen), "rejected": sum(rejected) / len(rejected)}
        if writer:
            (Path(ctx.output_dir) / "rejection_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if config.save_weights:
            save_stage_weights(network, ctx)
        if dist.is_initialized():
            dist.barrier()
        return summary


def _steps_of(stage_dir: Path) -> int | None:
    """The training steps of a finished stage (its done.json), for provenance."""
    try:
        return int(json.loads((stage_dir / "done.json").read_text()).get("steps"))
    except (OSError, ValueError, TypeError):
        return None


@hookimpl
def keye_register_stages(register):
    register("rejection_sampling", RejectionSamplingStage)
