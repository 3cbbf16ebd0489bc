"""Parameter-holding building blocks: ``Linear``, ``Embedding``, ``RMSNorm``; RoPE; SwiGLU.

``Linear``, ``Embedding`` and ``RMSNorm`` are the only modules that own parameters
(SALT's Gram taps wrap exactly these), and each ``__call__`` is one short code path.
Each has a ``gram_tap`` attribute, ``None`` by default (no cost). SALT's scalable path
(:mod:`jaxrl_geom.salt.ghost`) sets it on a throw-away copy of the model: the tap is
called as ``tap(output, input)`` (``tap.attend(logits, h)`` for the tied head) and
returns ``output`` unchanged in value and gradient; its backward rule turns the
layer's input and output cotangent into the per-sample Gram block.
Kernels are stored ``[in, out]``. Every parameter carries its *logical* axis names
as ``out_sharding`` metadata (e.g. ``("embed", "mlp")``); :mod:`jaxrl_geom.sharding`
maps them to mesh axes in one place. ``eager_sharding=False`` keeps construction
mesh-free: placement happens when the state is sharded.

Numerics follow Hugging Face: RMSNorm normalises in float32 and casts back before
the scale; RoPE uses the ``rotate_half`` convention (pairs ``(j, j + hd/2)``) with
float32 angles cast to the activation dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_geom.models.config import ModelConfig, RopeScaling

Axes = tuple[str | None, ...]


def _param(value: jax.Array, axes: Axes) -> nnx.Param:
    """A parameter annotated with logical axis names (placed later, never eagerly)."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Linear(nnx.Module):
    """``y = x W (+ b)`` with ``W [in, out]``.

    Args:
      in_features, out_features: kernel shape ``[in, out]``.
      axes: logical names of the two kernel axes (the bias takes the second).
      use_bias: add a bias ``[out]``.
      dtype: compute dtype; ``out_dtype`` the result dtype (default ``dtype``; the LM
        head asks for float32 so logits never round through bfloat16).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: Axes,
        use_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        out_dtype: jnp.dtype | None = None,
        kernel_init: nnx.Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        kernel_init = nnx.initializers.lecun_normal() if kernel_init is None else kernel_init
        self.kernel = _param(
            kernel_init(rngs.params(), (in_features, out_features), param_dtype), axes
        )
        self.bias = _param(jnp.zeros((out_features,), param_dtype), axes[1:]) if use_bias else None
        self.dtype = dtype
        self.out_dtype = dtype if out_dtype is None else out_dtype
        self.gram_tap = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.einsum(
            "BTI,IO->BTO",
            x,
            self.kernel[...].astype(self.dtype),
            preferred_element_type=self.out_dtype,
        )  # [B, T, O]
        if self.bias is not None:
            y = y + self.bias[...].astype(self.out_dtype)
        if self.gram_tap is not None:  # SALT Gram tap: identity on y
            y = self.gram_tap(y, x)
        return y


class Embedding(nnx.Module):
    """Token embedding table ``E [V, D]``; ``attend`` is the tied LM head ``h E^T``."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
        self.embedding = _param(
            init(rngs.params(), (num_embeddings, features), param_dtype), ("vocab", "embed")
        )
        self.dtype = dtype
        self.gram_tap = nnx.data(None)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        y = jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)  # [B, T, D]
        if self.gram_tap is not None:  # SALT Gram tap: identity on y
            y = self.gram_tap(y, tokens)
        return y

    def attend(self, h: jax.Array) -> jax.Array:
        """Tied output projection: float32 logits ``[B, T, V]``."""
        h = h.astype(self.dtype)
        logits = jnp.einsum(
            "BTD,VD->BTV",
            h,
            self.embedding[...].astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        if self.gram_tap is not None:  # SALT Gram tap: identity on logits
            logits = self.gram_tap.attend(logits, h)
        return logits


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, arXiv:1910.07467).

    .. math::
        y = g \\odot \\frac{x}{\\sqrt{\\tfrac{1}{d}\\sum_j x_j^2 + \\epsilon}}

    The normalisation runs in float32 and is cast to the compute dtype before the
    scale ``g`` multiplies, exactly as HF ``LlamaRMSNorm``.
    """

    def __init__(
        self,
        features: int,
        *,
        eps: float,
        axes: Axes = (None,),
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.scale = _param(jnp.ones((features,), param_dtype), axes)
        self.eps = eps
        self.dtype = dtype
        self.gram_tap = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        x_hat = (x32 * inv_rms).astype(self.dtype)
        y = self.scale[...].astype(self.dtype) * x_hat
        if self.gram_tap is not None:  # SALT Gram tap: identity on y
            y = self.gram_tap(y, x_hat)
        return y


class MLP(nnx.Module):
    """SwiGLU feed-forward (Shazeer, arXiv:2002.05202): ``down(silu(gate x) * up x)``.

    Per token, so it runs over the sequence in chunks of ``chunk`` positions
    (``ModelConfig.mlp_chunk_tokens``) under ``lax.scan``; with ``ModelConfig.remat``
    each chunk is under ``jax.checkpoint``, so forward and backward hold one chunk's
    ``[B, chunk, F]`` tensors, not ``[B, T, F]`` (docs/MEMORY.md; without remat the
    backward keeps every chunk's, as unchunked, and nothing is recomputed). The batch
    axis (sharded over data/fsdp) and ``F`` (tensor) are untouched. Calls with at most ``chunk``
    positions, or with a SALT Gram tap set (its per-sample Gram needs the whole
    sequence in one call), run unchunked.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(dtype=config.compute_dtype, param_dtype=config.params_dtype, rngs=rngs)
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), **kw)
        self.chunk = config.mlp_chunk_tokens
        self.remat = config.remat

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
        t = x.shape[1]
        tapped = any(p.gram_tap is not None for p in (self.gate_proj, self.up_proj, self.down_proj))
        if self.chunk is None or t <= self.chunk or tapped:
            return self.swiglu(x)
        c, n = self.chunk, t // self.chunk
        graphdef, state = nnx.split(self)

        def one_chunk(state, xc):  # [B, c, D]
            return nnx.merge(graphdef, state).swiglu(xc)

        if self.remat:  # the backward recomputes one chunk at a time
            one_chunk = jax.checkpoint(one_chunk)

        xs = jnp.moveaxis(x[:, : n * c].reshape(x.shape[0], n, c, x.shape[2]), 1, 0)
        _, ys = jax.lax.scan(lambda _, xc: (None, one_chunk(state, xc)), None, xs)
        y = jnp.moveaxis(ys, 0, 1).reshape(x.shape[0], n * c, -1)  # [B, n c, D]
        if n * c < t:  # the last t - n c positions
            y = jnp.concatenate([y, one_chunk(state, x[:, n * c :])], axis=1)
        return y

    def swiglu(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D], unchunked
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


# --------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies ``[hd/2]`` (float32, host constant), HF-exact.

    .. math:: \\omega_j = \\theta^{-2j/d}, \\quad j = 0, \\dots, d/2 - 1

    ``linear`` divides by ``factor``; ``llama3`` divides long wavelengths by
    ``factor`` and interpolates the middle band (Llama 3.1 report, arXiv:2407.21783).
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / np.power(np.float32(theta), exponents)).astype(np.float32)
    if scaling is None:
        return inv_freq
    factor = np.float32(scaling.factor)
    if scaling.rope_type == "linear":
        return (inv_freq / factor).astype(np.float32)
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate ``x [B, T, N, hd]`` by angle ``p_bt * omega_j`` on pairs ``(j, j + hd/2)``.

    .. math::
        \\mathrm{rope}(x) = x \\cos\\phi + \\mathrm{rotate\\_half}(x) \\sin\\phi,
        \\quad \\mathrm{rotate\\_half}(x) = [-x_{hd/2:}, x_{:hd/2}]

    (Su et al., RoFormer, arXiv:2104.09864; HF ``apply_rotary_pos_emb``.)
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, hd/2]
    cos = jnp.cos(angles).astype(x.dtype)[:, :, None, :]  # [B, T, 1, hd/2]
    sin = jnp.sin(angles).astype(x.dtype)[:, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)  # [B, T, N, hd/2] each
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [B, T, N, hd]
