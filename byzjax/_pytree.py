"""Flattening of per-worker pytrees to the canonical (n, d) array and back.

Rules and attacks only ever see an (n, d) array. A pytree whose leaves share a leading
worker axis n is raveled once at the boundary and the (d,) or (f, d) result is unraveled
once afterwards (the pattern of evosax's ravel helper).
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np


def ravel_workers(tree: chex.ArrayTree) -> tuple[jax.Array, Callable]:
    """Flattens a pytree with a leading worker axis into an (n, d) array.

    Args:
      tree: an array of shape (n, d) or (n, ...), or a pytree of such arrays that all
        share the leading dimension n.

    Returns:
      `(x, unravel)`: `x` has shape (n, d) with d the total number of entries per
      worker and the leaves' common dtype; `unravel(v)` maps a (d,) vector back to the
      pytree structure without the worker axis, and a (k, d) array to the structure with
      a leading axis k.

    Raises:
      ValueError: when leaves disagree on n or a leaf has no worker axis.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not leaves:
        raise ValueError("expected at least one array with a leading worker axis")
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    if any(leaf.ndim == 0 for leaf in leaves):
        raise ValueError("every leaf needs a leading worker axis; got a scalar leaf")
    ns = {leaf.shape[0] for leaf in leaves}
    if len(ns) != 1:
        raise ValueError(f"leaves disagree on the worker axis n: {sorted(ns)}")
    (n,) = ns
    if jax.tree_util.treedef_is_leaf(treedef) and leaves[0].ndim == 2:
        return leaves[0], _unravel_single(leaves[0].shape[1:], leaves[0].dtype)
    shapes = [leaf.shape[1:] for leaf in leaves]
    dtypes = [leaf.dtype for leaf in leaves]
    sizes = [int(np.prod(s)) for s in shapes]
    dtype = jnp.result_type(*dtypes)
    x = jnp.concatenate([leaf.reshape(n, -1).astype(dtype) for leaf in leaves], 1)
    splits = np.cumsum(sizes)[:-1].tolist()

    def unravel(v: jax.Array):
        lead = v.shape[:-1]
        parts = jnp.split(v, splits, axis=-1)
        out = [
            p.reshape(lead + s).astype(t)
            for p, s, t in zip(parts, shapes, dtypes, strict=True)
        ]
        return jax.tree_util.tree_unflatten(treedef, out)

    return x, unravel


def _unravel_single(shape, dtype):
    def unravel(v: jax.Array):
        return v.reshape(v.shape[:-1] + tuple(shape)).astype(dtype)

    return unravel
