"""Jitted KV-cache sampler: prefill and a ``lax.while_loop`` decode in one program.

For every row ``b`` with left-padded prompt ``x_b`` (``n_b`` real tokens) the sampler
draws

.. math::
    y_{b,t} \\sim \\mathrm{method}\\big(\\ell_\\theta(\\cdot \\mid x_b, y_{b,<t})\\big),
    \\qquad
    \\log \\pi_{b,t} = \\log \\operatorname{softmax}\\big(\\ell_\\theta / \\tau\\big)_{y_{b,t}}

until ``y_{b,t}`` is a stop token (kept, and masked in) or ``max_new_tokens`` tokens
were drawn. The log-probs are those of the temperature-scaled distribution before
any top-k / top-p truncation: the distribution the GRPO trainer recomputes (TRL
convention). Greedy reports temperature 1.

Layout and performance (shared/PERF.md section 1, after gemma ``_sampler_loop.py``
and tunix ``generate/sampler.py``):

* prefill + decode are one ``jax.jit``; the loop runs while
  ``step < max_new_tokens and any(row not done)``, with ``max_new_tokens`` a traced
  scalar and every buffer static;
* prompts are left-padded to the next power of two and the batch is padded, so one
  compilation serves a (prompt bucket, batch bucket, length bucket, method) family;
* the model is split once into a static graphdef and a state passed as a jit
  argument (never a closure constant);
* the KV cache has one write offset shared by the batch (left padding), RoPE
  positions come from the prompt mask (``cumsum(mask) - 1``);
* prefill runs the prompt in chunks (``ModelConfig.prefill_chunk_tokens``) and
  computes logits at the last position only; only the sampled tokens'
  log-probs are stored (never ``[B, L, V]``); one ``device_get`` at the end;
* masks come from lengths and the stop rule, never from token values, so
  ``pad_id`` may equal the EOS token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl_geom.sampling.methods import Greedy, Sample, SamplingMethod
from jaxrl_geom.sharding import (
    BATCH_AXES,
    local_rows,
    process_batch_factor,
    put_global,
    shard_batch,
)

__all__ = ["GenerateOutput", "generate"]

_GREEDY = Greedy()


class GenerateOutput(NamedTuple):
    """Host (NumPy) result of :func:`generate`; ``L = max_new_tokens``.

    Attributes:
      tokens: int32 ``[B, P+L]``, the prompt as given, then the completion.
      prompt_len: ``P``, the number of prompt columns in ``tokens``.
      completion: int32 ``[B, L]``; ``pad_id`` after a row finished.
      completion_mask: bool ``[B, L]``, True for generated tokens up to AND including
        the stop token.
      logprobs: float32 ``[B, L]``, ``log softmax(logits / temperature)`` of each
        sampled token (0 where the mask is False).
      lengths: int32 ``[B]``, number of True entries of ``completion_mask``.
      truncated: bool ``[B]``, the row used all ``L`` tokens without a stop token.
    """

    tokens: np.ndarray
    prompt_len: int
    completion: np.ndarray
    completion_mask: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray


class _LoopState(NamedTuple):
    step: jax.Array  # int32 []   index of the last token written
    cache: Any  # KVCache
    token: jax.Array  # int32 [B] last sampled token
    position: jax.Array  # int32 [B] its RoPE position
    stopped: jax.Array  # bool  [B] emitted a stop token
    lengths: jax.Array  # int32 [B]
    completion: jax.Array  # int32 [B, L]
    logprobs: jax.Array  # f32   [B, L]


def generate(
    model: nnx.Module | tuple[nnx.GraphDef, nnx.State] | tuple[nnx.GraphDef, ...],
    prompt_tokens: Any,
    prompt_mask: Any,
    key: jax.Array | None,
    *,
    max_new_tokens: int,
    method: SamplingMethod = _GREEDY,
    stop_tokens: Sequence[int] = (),
    mesh: Mesh | None = None,
    pad_id: int = 0,
    row_ids: Any | None = None,
) -> GenerateOutput:
    """Sample completions of left-padded prompts with a KV cache, in one jitted program.

    Args:
      model: a :class:`jaxrl_geom.models.Decoder`, or ``(graphdef, *states)`` from
        ``nnx.split(model, ...)`` (cheaper when called repeatedly, e.g. in a training
        loop: the module graph is not walked again).
      prompt_tokens: int ``[B, P]``, left-padded.
      prompt_mask: bool ``[B, P]``, True on real prompt tokens (a suffix of each row).
      key: PRNG key (``jax.random.key`` or ``PRNGKey``); may be None for ``Greedy``.
      max_new_tokens: ``L``, the completion buffer length.
      method: ``Greedy()`` or ``Sample(temperature, top_k, top_p)``.
      stop_tokens: token ids that end a row (included in its completion).
      mesh: optional mesh with axes ``("data", "fsdp", "tensor")``; the batch is
        sharded over ``("data", "fsdp")``, parameters stay as they are placed.
      pad_id: token written after a row finished (may equal a stop token).
      row_ids: optional int ``[B]``, each row's index in the global batch. When given,
        row ``b`` draws its step-``t`` token with ``fold_in(fold_in(key, row_ids[b]), t)``,
        so its sample does not depend on the batch layout (padding, process count);
        default: one key per step for the whole batch. (Rows are then sampled under
        ``vmap``: with ``top_p`` and no ``top_k``, the full-sort fallback of
        :class:`Sample` is computed for every step instead of only when needed.)

    With a mesh spanning several processes, ``prompt_tokens`` are this process's rows
    of the global batch (every process calls ``generate`` with the same number of
    rows) and the result holds the same rows: only addressable shards are read back.

    Returns:
      :class:`GenerateOutput` of NumPy arrays.

    Example::

        out = generate(model, tokens, mask, jax.random.key(0), max_new_tokens=32,
                       method=Sample(temperature=0.7, top_p=0.95), stop_tokens=(eos,))
    """
    graphdef, *states = model if isinstance(model, tuple) else nnx.split(model)
    states = tuple(states)
    config = _config_of(graphdef, states)
    tokens_np, mask_np = _check_prompts(prompt_tokens, prompt_mask, config.vocab_size)
    _check_options(method, max_new_tokens, stop_tokens, pad_id, config.vocab_size)
    longest = int(mask_np.sum(axis=1).max(initial=0))
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the "
            f"model's max_position_embeddings={config.max_position_embeddings}; shorten the "
            "prompts or lower max_new_tokens."
        )
    if key is None:
        if not isinstance(method, Greedy):
            raise ValueError(
                f"generate(key=None) with {method!r}: sampling needs a PRNG key, "
                "pass e.g. jax.random.key(0)."
            )
        key = jax.random.key(0)

    batch, prompt_len = tokens_np.shape
    if mesh is not None and not set(BATCH_AXES) <= set(mesh.axis_names):
        raise ValueError(
            f"mesh has axes {mesh.axis_names}; generate() shards the batch over {BATCH_AXES}. "
            "Build the mesh with jaxrl_geom.sharding.make_mesh."
        )
    shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    shards //= 1 if mesh is None else process_batch_factor(mesh)  # this process's share
    batch_bucket = _round_up(_next_pow2(batch), shards)
    prompt_bucket = _next_pow2(prompt_len)
    length_bucket = _next_pow2(max_new_tokens)

    # Left-pad columns (mask False) and append padding rows holding one valid pad token.
    tok = np.full((batch_bucket, prompt_bucket), pad_id, np.int32)
    msk = np.zeros((batch_bucket, prompt_bucket), bool)
    tok[:batch, prompt_bucket - prompt_len :] = tokens_np
    msk[:batch, prompt_bucket - prompt_len :] = mask_np
    msk[batch:, -1] = True
    row_valid = np.arange(batch_bucket) < batch
    ids = np.full((batch_bucket,), -1, np.int32)
    if row_ids is not None:
        row_ids = np.asarray(jax.device_get(row_ids))
        if row_ids.shape != (batch,) or not np.issubdtype(row_ids.dtype, np.integer):
            raise ValueError(
                f"row_ids has shape {row_ids.shape} and dtype {row_ids.dtype}; pass one integer "
                f"global row index per prompt row, shape ({batch},)."
            )
        ids[:batch] = row_ids

    rows = (tok, msk, row_valid, ids)  # [B, ...] sharded over the batch axes
    scalars = (  # replicated
        key,
        jnp.asarray(max_new_tokens, jnp.int32),
        jnp.asarray(np.asarray(stop_tokens, np.int32).reshape(-1)),
        jnp.asarray(pad_id, jnp.int32),
    )
    if mesh is None:
        rows = tuple(jnp.asarray(a) for a in rows)
    else:
        rows = shard_batch(rows, mesh)
        scalars = put_global(scalars, (NamedSharding(mesh, P()),) * len(scalars))
    result = _generate_jit(
        graphdef,
        states,
        *rows,
        *scalars,
        method=method,
        length_bucket=length_bucket,
        mesh=mesh,
        per_row_keys=row_ids is not None,
    )
    # Addressable shards only: this process's rows (all rows with one process).
    completion, logprobs, lengths, stopped = (local_rows(x) for x in result)

    completion = completion[:batch, :max_new_tokens]
    logprobs = logprobs[:batch, :max_new_tokens]
    lengths = lengths[:batch]
    completion_mask = np.arange(max_new_tokens)[None, :] < lengths[:, None]  # [B, L]
    return GenerateOutput(
        tokens=np.concatenate([tokens_np, completion], axis=1),
        prompt_len=prompt_len,
        completion=completion,
        completion_mask=completion_mask,
        logprobs=logprobs,
        lengths=lengths,
        truncated=~stopped[:batch],
    )


def _generate_impl(
    graphdef: nnx.GraphDef,
    states: tuple[nnx.State, ...],
    prompt_tokens: jax.Array,  # int32 [B, P]
    prompt_mask: jax.Array,  # bool [B, P]
    row_valid: jax.Array,  # bool [B] False on batch-padding rows
    row_ids: jax.Array,  # int32 [B] global row index (per_row_keys)
    key: jax.Array,
    max_new_tokens: jax.Array,  # int32 []
    stop_tokens: jax.Array,  # int32 [n_stop]
    pad_id: jax.Array,  # int32 []
    *,
    method: SamplingMethod,
    length_bucket: int,
    mesh: Mesh | None,
    per_row_keys: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Prefill, then decode until every row stopped or ``max_new_tokens`` were drawn."""
    from jaxrl_geom.models import init_cache  # lazy: models may import sampling helpers

    batch, prompt_len = prompt_tokens.shape
    model = nnx.merge(graphdef, *states)
    constrain = _batch_constraint(mesh)

    def emit(s: _LoopState, logits: jax.Array) -> _LoopState:
        """Sample at step ``s.step`` from ``logits [B, V]`` and write it to the buffers."""
        logits = logits.astype(jnp.float32)
        if per_row_keys:
            keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), s.step))(
                row_ids
            )  # [B]
            token = jax.vmap(lambda lg, k: method.sample(lg[None], k)[0])(logits, keys)  # [B]
        else:
            token = method.sample(logits, jax.random.fold_in(key, s.step))  # [B]
        log_probs = jax.nn.log_softmax(logits / method.temperature, axis=-1)  # [B, V]
        logprob = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]  # [B]
        active = row_valid & ~s.stopped  # [B]
        token = jnp.where(active, token, pad_id)
        logprob = jnp.where(active, logprob, 0.0)
        return s._replace(
            token=token,
            stopped=s.stopped | (active & jnp.isin(token, stop_tokens)),
            lengths=s.lengths + active.astype(jnp.int32),
            completion=lax.dynamic_update_slice(s.completion, token[:, None], (0, s.step)),
            logprobs=lax.dynamic_update_slice(s.logprobs, logprob[:, None], (0, s.step)),
        )

    # Prefill: the (bucketed) prompt in chunks of c tokens, logits at the last position only.
    positions = jnp.maximum(jnp.cumsum(prompt_mask.astype(jnp.int32), axis=-1) - 1, 0)  # [B, P]
    cache = init_cache(model.config, batch, prompt_len + length_bucket, _cache_dtype(model))
    cache = constrain(cache)
    logits, cache = _prefill(model, prompt_tokens, positions, prompt_mask, cache, constrain)
    state0 = _LoopState(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        token=jnp.zeros((batch,), jnp.int32),
        position=jnp.sum(prompt_mask, axis=-1).astype(jnp.int32),  # [B] first new position
        stopped=jnp.zeros((batch,), bool),
        lengths=jnp.zeros((batch,), jnp.int32),
        completion=constrain(jnp.full((batch, length_bucket), pad_id, jnp.int32)),
        logprobs=constrain(jnp.zeros((batch, length_bucket), jnp.float32)),
    )
    state0 = emit(state0, logits[:, -1])

    def cond(s: _LoopState) -> jax.Array:
        return (s.step + 1 < max_new_tokens) & jnp.any(row_valid & ~s.stopped)

    def body(s: _LoopState) -> _LoopState:
        live = (row_valid & ~s.stopped)[:, None]  # [B, 1] finished rows add no valid slot
        logits, cache = model(s.token[:, None], s.position[:, None], live, cache=s.cache)
        s = s._replace(step=s.step + 1, cache=constrain(cache), position=s.position + 1)
        return emit(s, logits[:, -1])

    final = lax.while_loop(cond, body, state0)
    return final.completion, final.logprobs, final.lengths, final.stopped


def _prefill(model, tokens, positions, mask, cache, constrain):
    """Run the prompt through the model in chunks of ``c`` tokens, writing the cache.

    ``c = gcd(P, model.config.prefill_chunk_tokens)`` (prompt buckets are powers of
    two). Each chunk attends to the cache so far, so the largest activations are
    ``[B, c, F]`` and attention is ``O(c S)`` (blockwise: ``O(c block)``); only the
    last position's hidden state reaches the LM head: ``[B, 1, V]`` logits.
    """
    b, p = tokens.shape
    c = math.gcd(p, int(getattr(model.config, "prefill_chunk_tokens", p)))

    def chunks(x: jax.Array) -> jax.Array:  # [B, P] -> [P/c, B, c]
        return jnp.swapaxes(x.reshape(b, p // c, c), 0, 1)

    def one_chunk(cache, xs):
        h, cache = model.hidden(*xs, cache=cache)  # [B, c, D]
        return constrain(cache), h[:, -1]

    if c == p:
        h, cache = model.hidden(tokens, positions, mask, cache=cache)
        last = h[:, -1]
    else:
        cache, lasts = lax.scan(one_chunk, cache, (chunks(tokens), chunks(positions), chunks(mask)))
        last = lasts[-1]
    return model.head(last[:, None]), cache  # [B, 1, V]: left padding, the last column is real


_generate_jit = jax.jit(
    _generate_impl,
    static_argnames=("graphdef", "method", "length_bucket", "mesh", "per_row_keys"),
)


def _batch_constraint(mesh: Mesh | None):
    """``tree -> tree`` pinning the batch axis of every array to the batch axes: the
    leading one, except for a scanned model's stacked KV cache ``[L, B, S, K, hd]``."""
    if mesh is None:
        return lambda tree: tree

    def pin(x: jax.Array, axis: int = 0) -> jax.Array:
        if x.ndim <= axis:
            return x
        spec = [P.UNCONSTRAINED] * x.ndim
        spec[axis] = BATCH_AXES
        return lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))

    def constrain(tree):
        if hasattr(tree, "k") and hasattr(tree, "valid") and not isinstance(tree.k, tuple):
            return tree._replace(  # stacked cache: batch is axis 1
                k=pin(tree.k, 1), v=pin(tree.v, 1), valid=pin(tree.valid)
            )
        return jax.tree.map(pin, tree)

    return constrain


def _cache_dtype(model: nnx.Module) -> jnp.dtype:
    return jnp.dtype(getattr(model.config, "dtype", "float32"))


def _config_of(graphdef: nnx.GraphDef, states: tuple[nnx.State, ...]):
    """The model's ``ModelConfig`` without touching device data."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), states)
    abstract = nnx.merge(graphdef, *shapes)
    config = getattr(abstract, "config", None)
    if config is None:
        raise ValueError(
            "generate() needs a jaxrl_geom.models.Decoder (a module with a `.config`); "
            f"got {type(abstract).__name__}."
        )
    return config


def _check_prompts(tokens: Any, mask: Any, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.asarray(jax.device_get(tokens))
    mask = np.asarray(jax.device_get(mask))
    if tokens.ndim != 2 or mask.shape != tokens.shape:
        raise ValueError(
            f"prompt_tokens {tokens.shape} and prompt_mask {mask.shape} must both be [B, P]; "
            "batch single prompts with [None] and left-pad them to a common length."
        )
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"prompt_tokens has dtype {tokens.dtype}; pass integer token ids.")
    if mask.dtype != bool:
        raise ValueError(f"prompt_mask has dtype {mask.dtype}; pass a bool mask (True = real).")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"Empty prompt batch {tokens.shape}; pass at least one token per row.")
    if not mask[:, -1].all() or (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError(
            "prompt_mask must be left-padded: padding first, then the real tokens up to the "
            "last column, and at least one real token per row. Left-pad the prompts "
            "(e.g. tokenizer padding_side='left')."
        )
    real = tokens[mask]
    if real.size and (real.min() < 0 or real.max() >= vocab_size):
        raise ValueError(
            f"prompt_tokens has ids in [{real.min()}, {real.max()}] outside the vocabulary "
            f"[0, {vocab_size}); check the tokenizer matches the model."
        )
    return tokens.astype(np.int32), mask


def _check_options(
    method: Any, max_new_tokens: Any, stop_tokens: Sequence[int], pad_id: Any, vocab_size: int
) -> None:
    if not isinstance(method, Greedy | Sample):
        raise ValueError(f"method={method!r}: pass Greedy() or Sample(temperature, top_k, top_p).")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a Python int >= 1.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    for name, ids in (("stop_tokens", list(stop_tokens)), ("pad_id", [pad_id])):
        for i in ids:
            is_id = isinstance(i, int | np.integer) and not isinstance(i, bool)
            if not is_id or not 0 <= i < vocab_size:
                raise ValueError(
                    f"{name} contains {i!r}, not a token id in [0, {vocab_size}); "
                    "pass ids from the model's tokenizer (e.g. tokenizer.eos_token_id)."
                )


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
