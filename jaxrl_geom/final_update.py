"""Optimizer links that must transform the FINAL update, found in any optimizer state.

A link like LongAct masks the update after the optimizer and its weight decay; placed
in front of the optimizer it would only mask the gradient, and Adam momentum and
weight decay would still move the "frozen" entries. The train step has to check where
such a link sits, pass the extra arguments it needs and log its diagnostics, without
importing it (seams are one-way: ``rl`` never imports ``longact``). So the link's state
class declares itself, and this neutral module reads the declaration:

.. code-block:: python

    class LongActState(NamedTuple):
        ...  # pytree fields
        final_update_link = "longact"  # marker: name in messages and metric prefixes
        required_extra_args = ("activation_stats",)  # update(..., activation_stats=)
        placement_fix = "optax.chain(..., optax.adamw(lr), longact(...)) or ..."

        def step_metrics(self) -> dict[str, jax.Array]: ...  # scalar diagnostics

Placement rule (:func:`check_placement`), from the structure of the optimizer state
only (works on abstract and traced states): on the way from the root to the link's
state, every ``optax.chain`` tuple (and ``named_chain`` dict, in insertion order) must
be entered through its LAST link; NamedTuple wrappers (``masked_optimizer``,
``inject_hyperparams``, ``MultiSteps``, ``apply_if_finite``) are entered freely. Strict:
any link after it, even a stateless one, is rejected.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, ClassVar, Protocol

import jax

#: Class attribute that marks a final-update link state (its value: the link's name).
MARKER = "final_update_link"


class FinalUpdateLink(Protocol):
    """What a final-update link's state class declares (see the module docstring)."""

    final_update_link: ClassVar[str]
    required_extra_args: ClassVar[tuple[str, ...]]
    placement_fix: ClassVar[str]

    def step_metrics(self) -> dict[str, jax.Array]: ...


def is_final_update_link(x: Any) -> bool:
    """True for the state of a final-update link (its class carries :data:`MARKER`)."""
    return isinstance(getattr(type(x), MARKER, None), str)


def final_update_links(opt_state: Any) -> list[tuple[tuple[Any, ...], FinalUpdateLink]]:
    """``[(path, state)]`` of every final-update link state in ``opt_state``, tree order.

    Static under ``jit`` (structure only); ``path`` is a JAX key path.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_final_update_link)
    return [(path, x) for path, x in flat if is_final_update_link(x)]


def check_placement(opt_state: Any) -> None:
    """Raise a ValueError unless every final-update link transforms the final update.

    See the module docstring for the rule. ``opt_state`` may be concrete, abstract
    (``jax.eval_shape(tx.init, params)``) or traced.
    """
    for path, state in final_update_links(opt_state):
        where = _first_non_last_link(opt_state, path)
        if where is None:
            continue
        index, count, at = where
        name = type(state).final_update_link
        raise ValueError(
            f"The optimizer's {name} link is link {index} of {count} of the chain at "
            f"opt_state{at}, so it does not see the final update: {name} must be the last "
            f"link, after the optimizer and its weight decay. Fix: {type(state).placement_fix}"
        )


def check_extra_args(opt_state: Any, provided: Collection[str], hints: Mapping[str, str]) -> None:
    """Raise a ValueError when a final-update link needs an extra argument of ``update``
    that the caller does not pass; ``hints[arg]`` says how to provide it."""
    for _, state in final_update_links(opt_state):
        for arg in type(state).required_extra_args:
            if arg not in provided:
                name = type(state).final_update_link
                hint = hints.get(arg, f"pass {arg}= to tx.update")
                raise ValueError(f"The optimizer has a {name}() link that needs {arg}=: {hint}.")


def link_metrics(opt_state: Any) -> dict[str, jax.Array]:
    """``{"<name>/<metric>": scalar}`` from every link's ``step_metrics()``.

    A second link of the same name is reported under ``<name>1/``, a third ``<name>2/``.
    """
    out: dict[str, jax.Array] = {}
    seen: dict[str, int] = {}
    for _, state in final_update_links(opt_state):
        name = type(state).final_update_link
        i = seen.get(name, 0)
        seen[name] = i + 1
        prefix = name if i == 0 else f"{name}{i}"
        for key, value in state.step_metrics().items():
            out[f"{prefix}/{key}"] = value
    return out


def _first_non_last_link(root: Any, path: tuple[Any, ...]) -> tuple[int, int, str] | None:
    """``(index, count, where)`` of the first chain on ``path`` not entered by its last link."""
    node, walked = root, ""
    for entry in path:
        if isinstance(entry, jax.tree_util.SequenceKey) and type(node) in (tuple, list):
            if entry.idx != len(node) - 1:
                return entry.idx, len(node), walked
            node = node[entry.idx]
        elif isinstance(entry, jax.tree_util.DictKey) and isinstance(node, Mapping):
            keys = list(node)
            if entry.key != keys[-1]:
                return keys.index(entry.key), len(keys), walked
            node = node[entry.key]
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            node = getattr(node, entry.name)
        else:  # another pytree node kind: enter it like a wrapper
            node = _child(node, entry)
        walked += jax.tree_util.keystr((entry,))
    return None


def _child(node: Any, entry: Any) -> Any:
    children = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
    for path, child in children:
        if path and path[0] == entry:
            return child
    raise ValueError(f"cannot follow {entry} in {type(node).__name__}")
