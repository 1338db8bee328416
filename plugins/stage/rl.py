"""``rl``: mix-mode GRPO reinforcement learning on rollouts of the model being trained (spec §3.4, II.2).

Each step (`keye.rl.step.RLStep`) samples ``prompts_per_step`` prompts from the stage's data (``rl_prompt``
samples, or conversations with ``meta.answer``), renders each in a think mode drawn by ``mode_mix``, draws
``group_size`` (G) rollouts per prompt with the ``generator`` (in process, on the live training weights, in the
run's TP/PP layout), scores them with the ``rewards`` models added by weight, normalises the rewards per group,
recomputes the old policy's log-probs with the training forward (no grad), and takes ``updates`` (μ) optimiser
steps on the batch with the stage's ``loss`` (``grpo``: clip ε low/high, three aggregations; or ``gspo``). A KL
term to the frozen starting model (k1/k3, β = the loss's ``beta``) needs a reference: with β > 0 a second copy
of the starting weights runs forward-only each step (the preference stage's live `Reference`); with β = 0 none
is built. Optional DAPO dynamic sampling (groups whose rewards are all equal are dropped) and overlong masking
(replies cut by ``max_new_tokens`` carry no loss); both are counted.

Options (``stages[i].options``):

- ``prompts_per_step`` (per data-parallel rank), ``group_size`` (G ≥ 2), ``updates`` (μ);
- ``mode_mix``: think mode → weight (think, no_think, auto, agentic); empty keeps each prompt's own mode;
- ``rewards``: ``{<reward_model name>: {weight: w, <its settings>}}`` (`keye.rl.rewards`); a prompt scored by
  models it names (``reward_names``) only;
- ``generator``: the generator component node (default ``{name: megatron}``); ``temperature``, ``top_p``,
  ``top_k``, ``max_new_tokens`` of the rollouts; ``data.max_tokens`` must hold prompt + ``max_new_tokens``
  (a longer prompt is skipped and counted);
- ``dynamic_sampling``, ``mask_truncated`` (both on by default);
- ``save_rollouts``: append every rollout (ids, text, reward, advantage, trained or not) to the stage folder's
  ``rollouts.jsonl`` (data-parallel rank 0's rollouts; a fresh or overwritten stage starts the file anew);
- ``eval_prompts``: held-out prompts (``data.heldout``, per data-parallel rank) answered before and after
  training, greedily or (``eval_samples`` N) N replies each sampled as the rollouts are; ``max_bad_steps``.

The loss is the stage's ``loss`` node (default ``{name: grpo}``); it must be a policy loss (an ``advantages``
method), ``plugins/loss/grpo.py``.

Metrics per step (``metrics.jsonl``; `keye.rl.metrics`): the loss, ``reward`` and each reward component
(``reward/<model>``, ``reward/<model>/<part>``), ``reward_by_mode/<mode>``, ``think_ratio``, ``response_tokens``,
``kl`` (with a reference), ``clip_fraction``, ``entropy``, ``ratio``, ``rollout_time_s``, ``update_time_s``,
``updates`` (0: nothing to learn from on any rank), and counts: ``rollouts``, ``truncated``, ``groups``,
``groups_all_equal``, ``trained_rollouts``, ``vision_token_in_reply`` (a reply holding an image/video pad id
has no features to embed: scored, never trained on), ``skipped/<reason>`` (prompts that could not be rendered
or were not prompts), ``count/<model>/<event>`` (what a reward model handled by rule, e.g. a missing
reference). ``rollout_time_s`` covers rendering, generation and scoring; ``update_time_s`` packing, the
log-prob passes and the μ updates.

Resume: the prompt stream's position and step count are saved with ``run.checkpoint_every``, and rollout
seeds depend on (run seed, step, data-parallel rank) only, so a resumed stage redoes its steps exactly.
The summary has the held-out mean reward (overall, per component and per mode, think ratio, reply length)
before and after, and the stage folder a ``report.md`` with the reward curve (``reward_curve.png``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

import torch.distributed as dist

from keye import hookimpl
from keye.config import component, doc
from keye.errors import KeyeUserError
from keye.model.composition import build_component
from keye.model.protocols import DTYPES, BuildContext
from keye.train.freezing import apply_freezing
from keye.train.loop import stage_summary, train_steps
from keye_plugins.stage.lm import LMStage
from keye_plugins.stage.preference import Reference


def rewards_of(config: Any) -> dict:
    """The stage's reward models: its ``rewards``, or answer_match (1.0) + format (0.5) when it names none. The
    default lives here, not in the Config: OmegaConf merges a user's mapping *into* a mapping default, so a
    blueprint's ``{answer_match: …}`` would silently keep ``format`` too."""
    return dict(config.rewards) or {"answer_match": {"weight": 1.0}, "format": {"weight": 0.5}}


class RLStage(LMStage):
    #: report.md's headline (`keye.train.report`): held-out mean reward overall, per component and per mode
    headline_keys = ("heldout_reward", "heldout_reward/*", "heldout_reward_by_mode/*", "heldout_think_ratio")

    @dataclass
    class Config:
        prompts_per_step: int = doc("Prompts per step on each data-parallel rank.", 8)
        group_size: int = doc("G: rollouts per prompt; their rewards are normalised within the group (>= 2).", 4)
        updates: int = doc("μ: optimiser steps on each step's rollouts (the old policy is the one that sampled).", 1)
        mode_mix: Dict[str, float] = doc(
            "Think modes of the prompts by weight (think, no_think, auto, agentic), drawn per prompt; empty: "
            "each prompt's own mode.", default_factory=dict)
        rewards: Dict[str, Any] = doc(
            "Reward models by registry name, each {weight: w, <its settings>}; the total is the weighted sum. "
            "Empty: answer_match (1.0) and format (0.5).", default_factory=dict)
        generator: Dict[str, Any] = component("generator", "The generator that samples the rollouts.",
                                              {"name": "megatron"})
        temperature: float = doc("Sampling temperature of the rollouts (> 0).", 1.0)
        top_p: float = doc("Nucleus filter of the rollouts (1: off).", 1.0)
        top_k: int = doc("Top-k filter of the rollouts (0: off).", 0)
        max_new_tokens: int = doc("Tokens per rollout at most; a reply that reaches it is truncated.", 64)
        dynamic_sampling: bool = doc("Drop groups whose rewards are all equal (DAPO): no signal, only dilution.", True)
        mask_truncated: bool = doc("Replies cut by max_new_tokens carry no loss (DAPO's overlong masking).", True)
        save_rollouts: bool = doc("Append every rollout (ids, text, reward, advantage) to rollouts.jsonl in the "
                                  "stage folder (data-parallel rank 0's).", False)
        eval_prompts: int = doc("Held-out prompts answered before and after training (0: no evaluation).", 32)
        eval_samples: int = doc(
            "Replies per held-out prompt: 0, one greedy reply; N, N replies sampled as the rollouts are (fixed seed), "
            "whose mean is the expected reward RL raises (greedy replies may already be as good as it gets).", 0)
        max_bad_steps: int = doc("Stop after this many consecutive steps with a non-finite loss/grad.", 5)

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        """Counts, a sampling temperature, a known mode mix and reward models, a policy loss, room for replies."""
        from keye.data.synthetic import check_mode_mix
        from keye.plugins import get_registry
        from keye.rl.rewards import reward_configs

        check.count(config, "prompts_per_step", "updates", "max_new_tokens")
        check.count(config, "group_size", minimum=2)
        check.count(config, "top_k", "eval_prompts", "eval_samples", "max_bad_steps", minimum=0)
        check.number(config, "temperature", above=0.0)
        check.number(config, "top_p", above=0.0, high=1.0)
        try:
            check_mode_mix(dict(config.mode_mix))
        except (ValueError, TypeError) as exc:
            check.fail("mode_mix", str(exc))
        registry = get_registry()
        try:
            reward_configs(rewards_of(config), registry)
        except KeyeUserError as exc:
            key, _, message = str(exc).partition(": ")
            check.fail(key, message)
        stage, index = check.stage, check.stage_index
        if check.blueprint.model.language_model is None:
            check.fail("", "the rl stage needs model.language_model")
        if stage.steps > 0 and not stage.data.sources:
            check.fail("", f"{stage.steps} steps but no prompts (stages.{index}.data.sources is empty)")
        loss = (stage.loss or {}).get("name", "grpo")
        if loss in registry.names("loss") and not hasattr(registry.cls("loss", loss), "advantages"):
            check.fail("", f"stages.{index}.loss: '{loss}' is not a policy loss (grpo, gspo)")
        if config.max_new_tokens >= stage.data.max_tokens:
            check.fail("max_new_tokens", f"{config.max_new_tokens} leaves no room for the prompt in "
                                         f"stages.{index}.data.max_tokens ({stage.data.max_tokens})")

    #: the policy, its frozen reference and the generator's model are one chunk per virtual pipeline stage
    supports_virtual_pipeline = True

    def run(self) -> dict[str, Any]:
        from keye.config import build_component_config
        from keye.data.pipeline import build_processor
        from keye.generate.contract import GeneratorContext, SamplingSettings
        from keye.rl.prompts import PromptStream
        from keye.rl.report import write_stage_report
        from keye.rl.rewards import build_rewards
        from keye.rl.step import RLEngine, RLParts, RLSettings, RLStep
        from keye.train.stage_weights import load_stage_weights, save_stage_weights

        ctx, stage, config = self.ctx, self.ctx.stage, self.config
        dtype, precision = DTYPES[ctx.blueprint.precision.dtype], ctx.blueprint.precision
        seq_len = stage.data.max_tokens
        model = self.build_chunks()  # one per virtual pipeline stage (one without an interleaved pipeline)
        initialised_from = load_stage_weights(model, ctx)
        loss = build_component("loss", stage.loss or {"name": "grpo"}, ctx.registry, BuildContext(ctx.parallel, dtype))
        if not hasattr(loss, "advantages"):
            raise KeyeUserError(f"stages.{ctx.index}.loss: '{stage.loss['name']}' is not a policy loss (grpo, gspo)")
        reference = None
        if float(getattr(loss.config, "beta", 0.0)) > 0:  # the KL term needs the starting point; β = 0 builds none
            frozen = self.build_chunks()
            for copy, chunk in zip(frozen, model):
                copy.load_state_dict(chunk.state_dict())
            reference = Reference(frozen, seq_len, precision).chunks
        trainable = apply_freezing(model, stage.train)
        engine = RLEngine(model, stage, dtype, max_bad_steps=config.max_bad_steps, precision=precision)
        processor = build_processor(ctx)
        cls, generator_config = build_component_config("generator", config.generator, ctx.registry)
        policy = model[0] if len(model) == 1 else model  # a generator gets a list of chunks only under VPP
        generator = cls(generator_config, GeneratorContext(model=policy, tokenizer=processor.tokenizer,
                                                           parallel=ctx.parallel))
        try:
            rewards = build_rewards(rewards_of(config), ctx.registry, ctx)
        except KeyeUserError as exc:
            raise KeyeUserError(f"stages.{ctx.index}.options.{exc}") from None
        sampling = SamplingSettings(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                    top_k=config.top_k, top_p=config.top_p,
                                    stop_token_ids=(processor.special.eos, processor.special.pad))
        settings = RLSettings(config.prompts_per_step, config.group_size, config.updates, sampling, seq_len,
                              seed=ctx.blueprint.run.seed, mode_mix=dict(config.mode_mix),
                              dynamic_sampling=config.dynamic_sampling, mask_truncated=config.mask_truncated,
                              max_vision_patches=stage.data.max_vision_patches,
                              rollouts_file=Path(ctx.output_dir) / "rollouts.jsonl" if config.save_rollouts else None)
        engine.rl = RLStep(settings, RLParts(generator, rewards, loss, processor, model, reference, precision))
        stream = PromptStream(ctx)

        before = self._evaluate(engine.rl)
        last, resumed_from = train_steps(ctx, model, engine, stream, None, num_microbatches=1, seq_length=seq_len,
                                         micro_batch_size=1, fields=lambda result, seconds: result.extras)
        after = self._evaluate(engine.rl)
        save_stage_weights(model, ctx)
        data = {"skipped_prompts": dict(stream.skipped), "bad_inputs": stream.bad_inputs()}
        summary = stage_summary(ctx, engine, last, resumed_from=resumed_from, initialised_from=initialised_from,
                                trainable=trainable, before=before, after=after, data=data)
        summary["reference"] = "live" if reference is not None else "none (beta 0)"
        if "heldout_reward" in before and "heldout_reward" in after:
            summary["heldout_reward_gain"] = after["heldout_reward"] - before["heldout_reward"]
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_stage_report(Path(ctx.output_dir), stage.name, ctx.metrics.path, summary)
        summary["plots"] = ["reward_curve.png"]  # shown in the run's report.md too (`keye.train.report`)
        return summary

    def _evaluate(self, step: Any) -> dict[str, Any]:
        from keye.rl.prompts import PromptStream

        if not self.ctx.stage.data.heldout or self.config.eval_prompts == 0:
            return {}
        return step.evaluate(PromptStream(self.ctx, split="heldout").take(self.config.eval_prompts),
                             samples=self.config.eval_samples)


@hookimpl
def keye_register_stages(register):
    register("rl", RLStage)
