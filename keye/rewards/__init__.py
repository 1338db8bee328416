"""Rewards for RL and rejection sampling: the ``reward_model`` contract and the weighted combiner
(`keye.rewards.contract`). The built-in rule rewards are plugins under ``plugins/reward_model/``."""
