"""Mix-mode GRPO reinforcement learning: the pieces of one step of the ``rl`` stage.

One step (`keye.rl.step.RLStep`): read prompts (`keye.rl.prompts`), render each in a think mode drawn by the
configured ratios and sample G rollouts per prompt with the generator (`keye.rl.rollouts`), score them with the
reward models, normalise the rewards per group, pack prompt + reply rows into training micro-batches with a loss
mask on the reply (`keye.rl.packing`), recompute the old policy's (and the frozen reference's) per-token
log-probs with the training forward (`keye.rl.logps`), then take μ policy updates with the configured loss.
`keye.rl.metrics` sums what a step logs over data-parallel ranks, and draws the stage's reward curve.

The stage itself (options, the step loop, evaluation, summary) is ``plugins/stage/rl.py``.
"""
