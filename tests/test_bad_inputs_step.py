"""Bad inputs of the step side (advantages, batch, LongAct placement and options): each
is answered by a ValueError naming the option and the fix, before any step runs.

One parametrized case per input; every case builds only what it needs (a 1-layer model
for the TrainState / grpo_step cases; nothing compiles a step: the checks run at trace
time, before XLA).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrl_geom.longact import check_chain, longact, masked_optimizer, select_channels
from jaxrl_geom.models import Decoder, ModelConfig
from jaxrl_geom.rl import (
    GrpoConfig,
    TrainState,
    group_advantages,
    grpo_step,
    make_rollout_batch,
    validate_batch,
)
from jaxrl_geom.rl.advantages import equal_reward_groups

VOCAB, N, P, L = 32, 4, 3, 4


@functools.cache
def model() -> nnx.Module:
    cfg = ModelConfig.tiny(
        VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    return Decoder(cfg, rngs=nnx.Rngs(0))


def params():
    return nnx.state(model(), nnx.Param)


def batch(advantages=(1.0, -1.0, 0.5, -0.5), old_value=-3.0, old_at=None):
    rng = np.random.default_rng(0)
    old = np.full((N, L), -3.0, np.float32)
    if old_at is not None:
        old[old_at] = old_value
    return make_rollout_batch(
        rng.integers(1, VOCAB, (N, P + L)).astype(np.int32),
        np.ones((N, P), bool),
        np.ones((N, L), bool),
        old,
        np.asarray(advantages, np.float32),
        np.array([0, 0, 1, 1], np.int32),
    )


def grpo_step_with(tx, config: GrpoConfig | None = None):
    """A valid state whose optimizer is swapped for ``tx`` (bypassing create's check)."""
    state = TrainState.create(model(), optax.sgd(0.1))
    state = state.replace(tx=optax.with_extra_args_support(tx), opt_state=tx.init(state.params))
    return grpo_step(state, batch(), config or GrpoConfig())


ADAMW = optax.adamw(1e-3, weight_decay=0.1)
FIX = r"Fix: optax\.chain\(.*longact\(\.\.\.\)\).*masked_optimizer"

CASES = {
    "nan_reward": (
        lambda: group_advantages(jnp.array([1.0, 0.0, jnp.nan, 1.0]), group_size=2),
        r"rewards has 1 non-finite value\(s\) \(NaN or inf\) at rows \[2\].*fix the reward",
    ),
    "inf_rewards_batch_scale": (
        lambda: group_advantages(
            jnp.array([1.0, -jnp.inf, 0.0, jnp.inf]), group_size=2, scale="batch"
        ),
        r"at rows \[1, 3\].*combine_rewards",
    ),
    "nan_reward_equal_groups": (
        lambda: equal_reward_groups(jnp.array([jnp.nan, 0.0]), group_size=2),
        r"rows \[0\]",
    ),
    "group_of_one": (
        lambda: group_advantages(jnp.array([1.0, 0.0, 2.0]), jnp.array([0, 0, 1])),
        r"group 1 has a single rollout.*num_generations >= 2",
    ),
    "nan_advantage_in_batch": (
        lambda: validate_batch(batch(advantages=(1.0, np.nan, 0.5, -0.5)), GrpoConfig()),
        r"RolloutBatch\.advantages is NaN or inf in rows \[1\].*group_advantages",
    ),
    "nan_old_logprob_in_batch": (
        lambda: validate_batch(batch(old_value=np.nan, old_at=(3, 2)), GrpoConfig()),
        r"RolloutBatch\.old_logprobs is NaN or inf in rows \[3\].*finite logits",
    ),
    "longact_first_create": (
        lambda: TrainState.create(model(), optax.chain(longact(), ADAMW)),
        r"longact link is link 0 of 2 of the chain at opt_state.*must be the last link.*" + FIX,
    ),
    "longact_before_weight_decay_create": (
        lambda: TrainState.create(
            model(), optax.chain(optax.adam(1e-3), longact(), optax.add_decayed_weights(0.1))
        ),
        r"link 1 of 3.*after the optimizer and its weight decay",
    ),
    "masked_optimizer_not_last_create": (
        lambda: TrainState.create(
            model(),
            optax.chain(masked_optimizer(optax.adam(1e-3), longact()), optax.scale(0.5)),
        ),
        r"link 0 of 2.*" + FIX,
    ),
    "longact_first_grpo_step": (
        lambda: grpo_step_with(optax.chain(longact(), ADAMW), GrpoConfig(capture_activations=True)),
        r"longact link is link 0 of 2.*" + FIX,
    ),
    "longact_without_capture": (
        lambda: grpo_step_with(optax.chain(ADAMW, longact())),
        r"longact\(\) link that needs activation_stats=.*GrpoConfig\(capture_activations=True\)",
    ),
    "check_chain_without_longact": (
        lambda: check_chain(ADAMW, params()),
        r"no longact\(\) link.*Fix: optax\.chain",
    ),
    "masked_optimizer_without_longact": (
        lambda: masked_optimizer(ADAMW, optax.scale(1.0)),
        r"masked_optimizer\(inner, longact_tx\) needs longact_tx = longact\(\.\.\.\)",
    ),
    "keep_ratio_zero": (
        lambda: longact(keep_ratio=0.0),
        r"keep_ratio=0\.0 must be in \(0, 1\].*pass sparsity=",
    ),
    "keep_ratio_above_one": (
        lambda: longact(keep_ratio=30),
        r"keep_ratio=30 must be in \(0, 1\].*KEPT",
    ),
    "keep_ratio_and_sparsity": (
        lambda: longact(keep_ratio=0.3, sparsity=0.7),
        r"Pass keep_ratio \(fraction kept\) OR sparsity \(fraction dropped\)",
    ),
    "sparsity_one": (
        lambda: longact(sparsity=1.0),
        r"sparsity=1\.0 must be in \[0, 1\).*use keep_ratio=",
    ),
    "rope_pair_odd_head_dim": (
        lambda: select_channels(jnp.ones((1, 6)), head_dim=3, granularity="rope_pair"),
        r"granularity='rope_pair' needs an even head_dim.*head_dim=3.*granularity='channel'",
    ),
    "head_scope_without_layout": (
        lambda: select_channels(jnp.ones((1, 8)), scope="head"),
        r"scope='head'.*needs the head layout: pass head_dim=.*num_attention_heads",
    ),
    "head_dim_not_dividing": (
        lambda: select_channels(jnp.ones((1, 8)), head_dim=3, scope="head"),
        r"8 channels are not a whole number of heads of head_dim=3.*num_heads \* head_dim",
    ),
    "unknown_refresh": (
        lambda: longact(refresh="sometimes"),
        r"refresh='sometimes' is not one of \('step', 'ema', 'fixed'\)",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_is_a_clear_error(case):
    make, match = case
    with pytest.raises(ValueError, match=match):
        make()
