"""From prompts to a :class:`~jaxrl_geom.rl.step.RolloutBatch`.

Layout: every row is ``[left-padded prompt (P) | completion (L)]``. Masks come from
prompt lengths and the sampler's stop rule, never from token values (the pad token
may equal EOS). Positions count real tokens only, exactly as the sampler counted them,
so the trainer's forward pass sees the sampler's RoPE positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_geom.rl.step import RolloutBatch


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions ``cumsum(mask) - 1`` (clipped at 0 on the left padding)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def make_rollout_batch(
    tokens: jax.Array,  # int32 [N, P+L]
    prompt_mask: jax.Array,  # bool [N, P]
    completion_mask: jax.Array,  # bool [N, L]
    old_logprobs: jax.Array,  # f32 [N, L]
    advantages: jax.Array,  # f32 [N]
    group_ids: jax.Array,  # int32 [N]
    ref_logprobs: jax.Array | None = None,  # f32 [N, L]
) -> RolloutBatch:
    """Assemble a rollout batch with masks and positions derived from lengths."""
    rows = {
        "tokens": tokens,
        "prompt_mask": prompt_mask,
        "completion_mask": completion_mask,
        "old_logprobs": old_logprobs,
        "advantages": advantages,
        "group_ids": group_ids,
        **({} if ref_logprobs is None else {"ref_logprobs": ref_logprobs}),
    }
    ranks = {"advantages": 1, "group_ids": 1}
    for name, x in rows.items():
        if np.ndim(x) != ranks.get(name, 2):
            raise ValueError(
                f"make_rollout_batch: {name} has shape {np.shape(x)}; expected "
                f"{ranks.get(name, 2)} dimensions ([N] or [N, ...] as in the signature)."
            )
    counts = {name: np.shape(x)[0] for name, x in rows.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"make_rollout_batch: the inputs disagree on the number of rows N: {counts}; "
            "every input needs one row per rollout."
        )
    n, s = tokens.shape
    p, l_comp = prompt_mask.shape[1], completion_mask.shape[1]
    for name in ("old_logprobs", "ref_logprobs"):
        if name in rows and np.shape(rows[name])[1] != l_comp:
            raise ValueError(
                f"make_rollout_batch: {name} has {np.shape(rows[name])[1]} columns but "
                f"completion_mask has {l_comp}; both are [N, L] over the completion tokens."
            )
    if p + l_comp != s:
        raise ValueError(
            f"tokens has {s} columns but prompt_mask ({p}) + completion_mask ({l_comp}) "
            f"give {p + l_comp}; pass the sampler's full token buffer [prompt | completion]."
        )
    attention_mask = jnp.concatenate([prompt_mask, completion_mask], axis=1)
    if ref_logprobs is None:
        ref_logprobs = jnp.zeros(completion_mask.shape, jnp.float32)
    return RolloutBatch(
        tokens=jnp.asarray(tokens, jnp.int32),
        positions=positions_from_mask(attention_mask),
        attention_mask=attention_mask,
        completion_mask=jnp.asarray(completion_mask, bool),
        old_logprobs=jnp.asarray(old_logprobs, jnp.float32),
        ref_logprobs=jnp.asarray(ref_logprobs, jnp.float32),
        advantages=jnp.asarray(advantages, jnp.float32),
        group_ids=jnp.asarray(group_ids, jnp.int32),
    )


def abstract_rollout_batch(num_rollouts: int, seq_len: int, completion_len: int) -> RolloutBatch:
    """A :class:`RolloutBatch` of ``jax.ShapeDtypeStruct`` leaves (nothing allocated), for
    ahead-of-time compiles such as ``grpo_step.lower(state, batch, ...).compile()``:
    tokens ``[N, T]``, completion fields ``[N, L]``, per-rollout fields ``[N]``."""
    n, t, c = num_rollouts, seq_len, completion_len

    def s(shape: tuple[int, ...], dtype: jnp.dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    return RolloutBatch(
        tokens=s((n, t), jnp.int32),
        positions=s((n, t), jnp.int32),
        attention_mask=s((n, t), jnp.bool_),
        completion_mask=s((n, c), jnp.bool_),
        old_logprobs=s((n, c), jnp.float32),
        ref_logprobs=s((n, c), jnp.float32),
        advantages=s((n,), jnp.float32),
        group_ids=s((n,), jnp.int32),
    )


def repeat_prompts(
    prompt_tokens: np.ndarray, prompt_mask: np.ndarray, num_generations: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Repeat each of M prompts G times (contiguous groups) and return group ids [M*G]."""
    if num_generations < 2:
        raise ValueError(
            f"num_generations={num_generations}: group-relative advantages need at least 2 "
            "rollouts per prompt (the group std is undefined for 1)."
        )
    m = prompt_tokens.shape[0]
    tok = np.repeat(prompt_tokens, num_generations, axis=0)  # [M*G, P]
    mask = np.repeat(prompt_mask, num_generations, axis=0)  # [M*G, P]
    group_ids = np.repeat(np.arange(m, dtype=np.int32), num_generations)  # [M*G]
    return tok, mask, group_ids
