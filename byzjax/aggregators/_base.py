"""The shapes every aggregation rule and pre-aggregator takes (optax style).

A builder such as `krum(f=3)` checks its static arguments and returns a NamedTuple of
pure functions. `init(grads)` makes the state from an example (n, d) array (an empty
tuple for stateless rules); `update(grads, state, params)` returns the aggregate and the
new state. `params` is a pytree of the rule's sweepable hyperparameters (floats such as
a clipping radius), so one compiled program can `jax.vmap` over them; static counts
(n, f, m, iterations) are fixed when the rule is built or traced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax

from byzjax._numerics import compute_dtype

State = Any
Params = Any
Update = Callable[[jax.Array, State, Params], tuple[jax.Array, State]]


class Aggregator(NamedTuple):
    """A robust aggregation rule: (n, d) -> (d,).

    Attributes:
      init: `init(grads[n, d]) -> state`.
      update: `update(grads[n, d], state, params) -> (aggregate[d], state)`.
      default_params: the sweepable hyperparameters the builder was given.
      fused_update: `update` for rows computed in the same program (a
        pre-aggregator's output, see `chain`), for a rule whose fastest form on
        stored rows is a CPU kernel: a kernel reads memory, so the rows would be
        written out first, where an XLA form fuses with their computation. None:
        `update` serves both.
      stored: whether `computed_update` reads its rows from memory, several
        times (the CPU kernels): `chain` then writes computed rows out once
        (`write_rows`) rather than leave XLA to write each row and then copy them
        all into one array.
    """

    init: Callable[[jax.Array], State]
    update: Update
    default_params: Params = ()
    fused_update: Update | None = None
    stored: bool = False

    @property
    def computed_update(self) -> Update:
        """The update for rows computed in the same program: `fused_update` where
        the rule has one, else `update`."""
        return self.fused_update or self.update


class PreAggregator(NamedTuple):
    """A pre-aggregator: (n, d) -> (n', d), applied before a rule.

    Attributes:
      init: `init(grads[n, d]) -> state`.
      update: `update(grads[n, d], state, params) -> (mixed[n', d], state)`, the
        rows in the input dtype.
      default_params: the sweepable hyperparameters the builder was given.
      n_out: `n_out(n) -> n'`, the number of rows handed to the next stage.
      wide_update: `update` with the rows left in `compute_dtype` (float32 for a
        bfloat16 input), for the next stage in the same program (`chain`):
        rounding them to bfloat16 and widening them again made XLA:CPU write
        them out, twice (200 MB for clipping at (25, 1e6)). None: `update`.
      one_array: whether its rows come out as one array (a matrix product), so
        that `chain` has no need to write them out for a `stored` rule (a copy
        of NNM's product took NNM + Krum from 67 to 111 ms at (25, 1e6)).
    """

    init: Callable[[jax.Array], State]
    update: Update
    default_params: Params = ()
    n_out: Callable[[int], int] = lambda n: n
    wide_update: Update | None = None
    one_array: bool = False


def _no_state(grads: jax.Array) -> tuple:
    del grads
    return ()


def stateless(
    fn: Callable[[jax.Array, Params], jax.Array],
    default_params: Params = (),
    *,
    promote: bool = True,
    fused_fn: Callable[[jax.Array, Params], jax.Array] | None = None,
    stored: bool = False,
) -> Aggregator:
    """Wraps `fn(grads[n, d], params) -> aggregate[d]` as a stateless Aggregator.

    The rule computes in float32 at least (bfloat16 inputs are promoted before `fn`
    sees them, unless `promote=False`: then `fn` gets the input as it is and
    promotes it itself, for a kernel that reads bfloat16) and returns the input
    dtype. `fused_fn`, the same rule for computed rows, becomes `fused_update`.
    `stored`: see `Aggregator`.
    """

    def wrap(fn):
        def update(grads, state, params):
            chex.assert_rank(grads, 2)
            x = grads.astype(compute_dtype(grads.dtype)) if promote else grads
            out = fn(x, params)
            return out.astype(grads.dtype), state

        return update

    fused = None if fused_fn is None else wrap(fused_fn)
    return Aggregator(_no_state, wrap(fn), default_params, fused, stored)


def stateless_pre(
    fn: Callable[[jax.Array, Params], jax.Array],
    default_params: Params = (),
    n_out: Callable[[int], int] = lambda n: n,
    one_array: bool = False,
) -> PreAggregator:
    """Wraps `fn(grads[n, d], params) -> mixed[n', d]` as a stateless PreAggregator.

    `fn` gets the input as it is and returns its rows in `compute_dtype`: it reads
    a bfloat16 input's rows through the promoting helpers (`promoted_rows`, the
    CPU kernels), not through a float32 copy.
    """

    def wide(grads, state, params):
        chex.assert_rank(grads, 2)
        return fn(grads, params), state

    return PreAggregator(
        _no_state, narrowed(wide), default_params, n_out, wide, one_array
    )


def narrowed(wide: Update) -> Update:
    """A pre-aggregator's `update` from its `wide_update`: rows in the input dtype."""

    def update(grads, state, params):
        out, state = wide(grads, state, params)
        return out.astype(grads.dtype), state

    return update
