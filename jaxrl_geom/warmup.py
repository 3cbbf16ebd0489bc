"""Supervised warm-up on task demonstrations (before GRPO).

A tiny model trained from scratch never samples a correct answer, so GRPO would see
only all-zero groups. A short supervised phase on demonstrations gives it a start:

.. math::
    \\mathcal{L}_{SFT} = -\\frac{1}{\\sum_{i,t} m_{it}} \\sum_{i,t} m_{it}
        \\log \\pi_\\theta(o_{it} \\mid q_i, o_{i,<t})

over completion tokens only (the prompt is context, not target).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrl_geom.rl import logprobs as lp
from jaxrl_geom.rl.rollouts import make_rollout_batch
from jaxrl_geom.rl.step import RolloutBatch, TrainState, completion_logits


def demonstration_batch(
    prompt_tokens: np.ndarray,  # int32 [N, P] left-padded
    prompt_mask: np.ndarray,  # bool [N, P]
    completions: list[list[int]],  # token ids of each demonstration, EOS included
    completion_len: int,
    pad_id: int,
) -> RolloutBatch:
    """Lay out demonstrations like rollouts: ``[prompt | completion right-padded]``."""
    n = prompt_tokens.shape[0]
    comp = np.full((n, completion_len), pad_id, np.int32)
    cmask = np.zeros((n, completion_len), bool)
    for i, ids in enumerate(completions):
        if len(ids) > completion_len:
            raise ValueError(
                f"Demonstration {i} has {len(ids)} tokens but completion_len is "
                f"{completion_len}; raise max_new_tokens or shorten the task answers."
            )
        comp[i, : len(ids)] = ids
        cmask[i, : len(ids)] = True
    zeros = np.zeros((n,), np.float32)
    return make_rollout_batch(
        tokens=np.concatenate([prompt_tokens, comp], axis=1),
        prompt_mask=prompt_mask,
        completion_mask=cmask,
        old_logprobs=np.zeros((n, completion_len), np.float32),
        advantages=zeros,
        group_ids=np.arange(n, dtype=np.int32),
    )


@functools.partial(jax.jit, donate_argnums=(0,))
def sft_step(state: TrainState, batch: RolloutBatch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One supervised step: token-mean cross-entropy on completion tokens."""
    mask = batch.completion_mask.astype(jnp.float32)
    targets = batch.tokens[:, -mask.shape[1] :]

    def loss_fn(params):
        policy = nnx.merge(state.graphdef, params, state.rest)
        logp = lp.token_logprobs(completion_logits(policy, batch), targets, 1.0)  # [N, L]
        return -jnp.sum(logp * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
    return new_state, {"sft/loss": loss, "sft/grad_norm": optax.tree.norm(grads)}
