"""GRPO-family reinforcement learning: advantages, losses, the jitted train step."""

from jaxrl_geom.rl.advantages import combine_rewards, group_advantages, group_stats
from jaxrl_geom.rl.dapo import dynamic_sampling_filter, soft_overlong_punishment
from jaxrl_geom.rl.logprobs import token_entropy, token_logprobs
from jaxrl_geom.rl.losses import LossTerms, clip_active, policy_loss, token_weights
from jaxrl_geom.rl.rollouts import (
    abstract_rollout_batch,
    make_rollout_batch,
    positions_from_mask,
    repeat_prompts,
)
from jaxrl_geom.rl.step import (
    GradientEstimator,
    Gradients,
    GrpoConfig,
    RolloutBatch,
    TrainState,
    grpo_step,
    plain_gradients,
    policy_logprobs,
    validate_batch,
)

__all__ = [
    "abstract_rollout_batch",
    "GradientEstimator",
    "Gradients",
    "GrpoConfig",
    "LossTerms",
    "RolloutBatch",
    "TrainState",
    "clip_active",
    "combine_rewards",
    "dynamic_sampling_filter",
    "grpo_step",
    "group_advantages",
    "group_stats",
    "make_rollout_batch",
    "plain_gradients",
    "policy_logprobs",
    "policy_loss",
    "positions_from_mask",
    "repeat_prompts",
    "soft_overlong_punishment",
    "token_entropy",
    "token_logprobs",
    "token_weights",
    "validate_batch",
]
