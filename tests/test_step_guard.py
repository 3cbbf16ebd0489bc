"""grpo_step never lets NaN/inf reach the parameters (issue 13, item 3).

A poisoned batch mid-run (a NaN or inf advantage, a NaN old log-prob in a completion
slot) under ``clip_by_global_norm`` + AdamW: the step is a no-op on the parameters and
the optimizer state, bit for bit; ``step`` and ``skipped_steps`` count it; the next clean
batch gives exactly the update it would have given without the poisoned step in between.
Reference: the same run without the poisoned batch. One compiled step serves all cases.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tolerances import assert_trees_bits_equal, bits

from jaxrl_geom.models import Decoder, ModelConfig
from jaxrl_geom.rl import GrpoConfig, TrainState, grpo_step, make_rollout_batch, validate_batch

VOCAB, N, P, L = 32, 4, 3, 4
TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
CONFIG = GrpoConfig()


@functools.cache
def model() -> nnx.Module:
    cfg = ModelConfig.tiny(
        VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    return Decoder(cfg, rngs=nnx.Rngs(0))


def batch(seed: int, poison: dict | None = None):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (N, P + L)).astype(np.int32)
    completion_mask = np.arange(L)[None] < np.array([4, 2, 3, 1])[:, None]
    old = rng.normal(-3.0, 0.2, (N, L)).astype(np.float32)
    adv = np.array([1.0, -1.0, 0.5, -0.5], np.float32)
    for (name, index), value in (poison or {}).items():
        {"advantages": adv, "old_logprobs": old}[name][index] = value
    return make_rollout_batch(
        tokens, np.ones((N, P), bool), completion_mask, old, adv, np.array([0, 0, 1, 1], np.int32)
    )


def copy(state: TrainState) -> TrainState:
    return jax.tree.map(jnp.copy, state)  # grpo_step donates its input


@functools.cache
def clean_run():
    """state after clean batch 0, and after clean batches 0 then 2 (no poison)."""
    s1, m1 = grpo_step(TrainState.create(model(), TX), batch(0), CONFIG)
    s3, m3 = grpo_step(copy(s1), batch(2), CONFIG)
    return s1, s3, (m1, m3)


POISONS = {
    "nan_advantage": {("advantages", 1): np.nan},
    "inf_advantage": {("advantages", 3): np.inf},
    "nan_old_logprob": {("old_logprobs", (2, 1)): np.nan},  # inside the completion (len 3)
}


@pytest.mark.parametrize("poison", POISONS.values(), ids=POISONS.keys())
def test_poisoned_batch_mid_run_is_skipped_and_training_continues(poison):
    s1, s3_clean, (m1, m3) = clean_run()
    assert float(m1["skipped"]) == 0.0 and float(m3["skipped"]) == 0.0

    s2, m2 = grpo_step(copy(s1), batch(1, poison), CONFIG)
    assert float(m2["skipped"]) == 1.0
    assert not np.isfinite(float(m2["loss"]))  # the offending values stay visible
    assert_trees_bits_equal(s2.params, s1.params, "params after the skipped step")
    assert_trees_bits_equal(s2.opt_state, s1.opt_state, "opt_state after the skipped step")
    assert int(s2.step) == 2 and int(s2.skipped_steps) == 1

    s3, m3_after = grpo_step(s2, batch(2), CONFIG)  # the next clean batch: a normal step
    assert float(m3_after["skipped"]) == 0.0
    assert int(s3.step) == 3 and int(s3.skipped_steps) == 1
    assert_trees_bits_equal(s3.params, s3_clean.params, "params vs the run without poison")
    assert_trees_bits_equal(s3.opt_state, s3_clean.opt_state, "opt_state vs no poison")
    moved = [
        not np.array_equal(bits(a), bits(b))
        for a, b in zip(jax.tree.leaves(s3.params), jax.tree.leaves(s1.params), strict=True)
    ]
    assert all(moved)


def test_nan_in_a_padded_completion_slot_is_not_a_skip():
    # Row 3 has completion length 1: slots 1.. are padding and never read.
    s1, _, _ = clean_run()
    poisoned = batch(1, {("old_logprobs", (3, 2)): np.nan})
    validate_batch(poisoned, CONFIG)  # eager check reads completion slots only
    s2, m2 = grpo_step(copy(s1), poisoned, CONFIG)
    assert float(m2["skipped"]) == 0.0 and int(s2.skipped_steps) == 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(s2.params))


def test_rl_models_sampling_never_import_salt_or_longact():
    """The seam is one-way: grpo_step reads LongAct through jaxrl_geom.final_update."""
    import subprocess
    import sys

    code = (
        "import sys, jaxrl_geom.rl, jaxrl_geom.models, jaxrl_geom.sampling\n"
        "seam = ('jaxrl_geom.salt', 'jaxrl_geom.longact')\n"
        "bad = [m for m in sys.modules if m.startswith(seam)]\n"
        "assert not bad, bad\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )
