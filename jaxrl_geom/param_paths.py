"""Names of parameters: one '.'-joined string per leaf of a parameter pytree.

SALT's ``scope`` and LongAct's ``targets`` both select parameters by these names
(``"layers.0.self_attn.q_proj.kernel"``), whether the tree is a plain dict or an
``nnx.State``.
"""

from __future__ import annotations

import jax


def path_to_str(path: tuple) -> str:
    """Join a pytree key path with '.': dict keys, attribute names and indices.

    ``{"layers": [{"mlp": {"kernel": x}}]}`` -> ``"layers.0.mlp.kernel"``. A trailing
    ``.value`` attribute (the array inside a Flax NNX ``Variable``) is dropped, so an
    ``nnx.State`` gives the same ``"layers.0.mlp.kernel"``.
    """
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return ".".join(parts)
