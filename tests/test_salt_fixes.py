"""Tests for the review fixes of issue 11 and SALT's zero-advantage rule.

References: explicit per-sample gradients in NumPy float64 (``phi_i = X_i^T D_i``,
scatter-adds for a table), the reweighting of the sub-problem without the excluded
rows, and compiled memory statistics for the ghost budget.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_geom.models import Decoder, ModelConfig
from jaxrl_geom.models.layers import Linear
from jaxrl_geom.salt import gram_of_loss, reweight
from jaxrl_geom.salt.blocks import (
    _lookup_gram,
    _sketch_gram,
    _TapSpec,
    _tied_block,
    tied_cross_gram,
)
from jaxrl_geom.salt.ghost import DenseTap, EmbeddingTap, attach_gram_taps
from jaxrl_geom.salt.gram import dense_ghost_gram, embedding_ghost_gram
from jaxrl_geom.salt.table import (
    embedding_unique_gram,
    lookup_cost,
    tied_costs,
    tied_tiled_gram,
)

RNG = np.random.default_rng(0)


def rel_err(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.linalg.norm(x - y) / np.linalg.norm(y)


def table_features(tokens, d_lookup, vocab, h=None, d_logits=None):
    """phi_i [V, D] of a lookup (scatter-add of D at the ids), plus D^logits^T h if tied."""
    n, _, dim = d_lookup.shape
    phi = np.zeros((n, vocab, dim))
    for i in range(n):
        for t, tok in enumerate(tokens[i]):
            if 0 <= tok < vocab:
                phi[i, tok] += d_lookup[i, t]
        if h is not None:
            phi[i] += d_logits[i].T @ h[i]
    return phi.reshape(n, -1)


def test_ghost_blocks_respect_the_budget_when_one_column_does_not_fit():
    """N T^2 = 4 * 64^2 > budget: key positions are blocked too (the old floor of one
    column held [N, 1, T, T] whatever the budget)."""
    n, t, d_in, d_out, budget = 4, 64, 8, 8, 1024
    x = jnp.asarray(RNG.normal(size=(n, t, d_in)), jnp.float32)
    d = jnp.asarray(RNG.normal(size=(n, t, d_out)), jnp.float32)
    tokens = jnp.asarray(RNG.integers(0, 5, (n, t)))
    phi = np.einsum("itd,ite->ide", np.asarray(x, np.float64), np.asarray(d, np.float64))
    want = phi.reshape(n, -1) @ phi.reshape(n, -1).T
    dense = jax.jit(lambda x, d: dense_ghost_gram(x, d, block_elements=budget))
    lookup = jax.jit(lambda k, d: embedding_ghost_gram(k, d, 5, block_elements=budget))
    assert rel_err(dense(x, d), want) < 1e-5
    feats = table_features(np.asarray(tokens), np.asarray(d, np.float64), 5)
    assert rel_err(lookup(tokens, d), feats @ feats.T) < 1e-5
    h, d_logits = x, jnp.asarray(RNG.normal(size=(n, t, 5)), jnp.float32)
    cross = jax.jit(lambda *a: tied_cross_gram(*a, block_elements=budget))
    cross_args = (tokens, d, h, d_logits)
    assert rel_err(cross(*cross_args), tied_cross_gram(*cross_args)) < 1e-5
    one_column = n * t * t * 4  # bytes of [N, 1, T, T] float32
    for fn, args in ((dense, (x, d)), (lookup, (tokens, d)), (cross, cross_args)):
        temp = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
        assert temp < one_column, temp


def test_unique_token_and_whole_table_forms_are_exact_and_visible_to_auto():
    n, t, s, dim, vocab = 5, 7, 6, 4, 11
    tokens = RNG.integers(-1, vocab + 1, (n, t))  # some ids out of range: no contribution
    d_lookup, h = RNG.normal(size=(n, t, dim)), RNG.normal(size=(n, s, dim))
    d_logits = RNG.normal(size=(n, s, vocab))
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    lookup = table_features(tokens, d_lookup, vocab)
    got = embedding_unique_gram(jnp.asarray(tokens), f32(d_lookup), vocab)
    assert rel_err(got, lookup @ lookup.T) < 1e-5
    tied = table_features(tokens, d_lookup, vocab, h, d_logits)
    got = tied_tiled_gram(jnp.asarray(tokens), f32(d_lookup), f32(h), f32(d_logits), vocab)
    assert rel_err(got, tied @ tied.T) < 1e-5
    # Real widths (N = 32, T = S = 384, D = 1024, V = 151,936): the costs auto compares.
    cost = lookup_cost(32, 384, 1024, 151_936)
    assert cost["unique"] < cost["ghost"] / 10  # U <= N T = 12,288 unique ids << T^2 pairs
    costs = tied_costs(32, 384, 384, 1024, 151_936, head=0)
    assert costs["split"] > 2 * 32**2 * 384**2 * 1024  # the cross terms are counted


def tied_model():
    config = ModelConfig.tiny(64, hidden_size=32, num_hidden_layers=1, tie_word_embeddings=True)
    return Decoder(config, rngs=nnx.Rngs(0))


def row_losses(model, tokens, positions, mask, cot):
    logits, _ = model(tokens, positions, mask)
    return jnp.sum(cot * jax.nn.log_softmax(logits), axis=(1, 2))


def small_batch(n=8, t=6, vocab=64):
    tokens = jnp.asarray(RNG.integers(0, vocab, (n, t)))
    positions = jnp.broadcast_to(jnp.arange(t), (n, t))
    cot = jnp.asarray(RNG.normal(size=(n, t, vocab)), jnp.float32)
    return tokens, positions, jnp.ones((n, t), bool), cot


def test_tied_table_under_sketch_gives_a_psd_gram():
    """The whole table gradient is sketched. The old mix (exact lookup and cross terms,
    sketched head) is indefinite when the head dominates: kappa could fall to a false 0."""
    n, t, s, dim, vocab, k = 8, 6, 6, 16, 32, 1
    rng = np.random.default_rng(0)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    tokens = jnp.asarray(rng.integers(0, vocab, (n, t)))
    dy, h = f32(rng.normal(size=(n, t, dim))), f32(rng.normal(size=(n, s, dim)))
    d_logits = f32(10.0 * rng.normal(size=(n, s, vocab)))  # the head dominates
    r_in, r_out = f32(rng.normal(size=(dim, k))), f32(rng.normal(size=(vocab, k)))
    spec = _TapSpec("e", True, False, "sketch", vocab_size=vocab, tied=True)
    cross = tied_cross_gram(tokens, dy, h, d_logits)
    mixed = _lookup_gram(tokens, dy, spec) + _sketch_gram(h, d_logits, r_in, r_out)
    mixed = np.linalg.eigvalsh(np.asarray(mixed + cross + cross.T, np.float64))
    assert mixed.min() < -1e-5 * np.abs(mixed).sum()  # the failure mode is real here
    gram = _tied_block(spec, (r_in, r_out), tokens, dy, h, d_logits)
    lam = np.linalg.eigvalsh(np.asarray(gram, np.float64))
    assert lam.min() >= -1e-6 * lam.sum(), lam


def test_a_layer_called_twice_raises():
    class Twice(nnx.Module):
        def __init__(self):
            self.lin = Linear(4, 4, axes=(None, None), rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.lin(self.lin(x))

    x = jnp.ones((3, 2, 4))
    with pytest.raises(ValueError, match="called twice"):
        gram_of_loss(lambda m, x: jnp.sum(m(x) ** 2, axis=(1, 2)), Twice(), x, num_rows=3)


def test_sketch_projections_change_with_the_step():
    def projections(step):
        model = tied_model()
        attach_gram_taps(model, 4, backend="sketch", sketch_dim=3, seed=7, step=step)
        taps = [m.gram_tap for _, m in nnx.iter_modules(model) if hasattr(m, "gram_tap")]
        return [np.asarray(t.r_in[...]) for t in taps if isinstance(t, DenseTap | EmbeddingTap)]

    a, b, again = projections(0), projections(1), projections(0)
    assert all(np.array_equal(x, y) for x, y in zip(a, again, strict=True))
    assert not any(np.allclose(x, y) for x, y in zip(a, b, strict=True))


def test_zero_advantage_rows_are_excluded_or_included():
    """ "exclude": the rows with a_i = 0 keep a'_i = 0 and the others get exactly the
    reweighting of the sub-problem without them; "include" moves mass onto them."""
    n = 8
    phi = RNG.normal(size=(n, 5)) + 2.0 * RNG.normal(size=(1, 5))  # a shared direction
    gram = jnp.asarray(phi @ phi.T, jnp.float32)
    a = RNG.normal(size=n).astype(np.float32)
    a[[2, 5]] = 0.0
    ids = np.repeat(np.arange(2), 4).astype(np.int32)
    kw = dict(gamma_max=2.0, rank=1, recenter=True)
    new, diag = reweight(gram, a, ids, **kw)
    keep = a != 0
    sub, _ = reweight(gram[keep][:, keep], a[keep], ids[keep], **kw)
    assert np.all(np.asarray(new)[~keep] == 0.0) and float(diag.zero_adv_mass) == 0.0
    np.testing.assert_allclose(np.asarray(new)[keep], sub, rtol=1e-5, atol=1e-6)
    new_in, diag_in = reweight(gram, a, ids, zero_advantage="include", **kw)
    moved = np.abs(np.asarray(new_in)[~keep]).sum() / np.abs(np.asarray(new_in)).sum()
    assert moved > 1e-3
    np.testing.assert_allclose(float(diag_in.zero_adv_mass), moved, rtol=1e-5)
    # gamma_max = 0 without re-centering stays the identity, bit for bit.
    same, _ = reweight(gram, a, ids, gamma_max=0.0)
    np.testing.assert_array_equal(np.asarray(same).view(np.uint32), a.view(np.uint32))


@pytest.mark.parametrize("backend", ["auto", "tiled", "ghost"])
def test_tied_table_backends_agree(backend):
    """Split (lookup + head + cross) and whole-table tiled forms give the same Gram."""
    model, batch = tied_model(), small_batch()
    kw = dict(num_rows=8, scope="embed_tokens")
    ref = jax.jit(lambda b: gram_of_loss(row_losses, model, *b, backend="ghost", **kw))(batch)
    got = jax.jit(lambda b: gram_of_loss(row_losses, model, *b, backend=backend, **kw))(batch)
    assert rel_err(got, ref) < 1e-5


def test_the_seam_is_one_way():
    """rl never imports salt (not even lazily), and salt uses only public rl names."""
    import ast
    import pathlib
    import subprocess
    import sys

    code = "import sys, jaxrl_geom.rl; print(any('jaxrl_geom.salt' in m for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    root = pathlib.Path(__file__).parent.parent / "jaxrl_geom"

    def imports(path):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                yield node.module or "", [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                yield from ((a.name, []) for a in node.names)

    for path in (root / "rl").glob("*.py"):
        assert not any(m.startswith("jaxrl_geom.salt") for m, _ in imports(path)), path
    for path in (root / "salt").glob("*.py"):
        for module, names in imports(path):
            if module.startswith("jaxrl_geom.rl"):
                assert not [n for n in names if n.startswith("_")], (path, names)
