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
# `weighted_update(grads[n, d], s[n], keep[n], state, params)`: see `Aggregator`.
WeightedUpdate = Callable[
    [jax.Array, jax.Array, jax.Array, State, Params], tuple[jax.Array, State]
]
# `copies_update(honest[h, d], copies, params) -> evaluate | None`, `evaluate(u[d])
# -> aggregate[d]`: see `Aggregator`.
CopiesUpdate = Callable[
    [jax.Array, int, Params], Callable[[jax.Array], jax.Array] | None
]
# `row_scales(grads[n, d], state, params) -> ((s[n], keep[n]), state)`: see
# `PreAggregator`.
RowScales = Callable[
    [jax.Array, State, Params], tuple[tuple[jax.Array, jax.Array], State]
]


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
      weighted_update: for a rule linear in its rows (the mean), the rule over
        the rows y_i = s_i x_i (keep_i), 0 (not keep_i) without computing them: a
        pre-aggregator that scales rows (`PreAggregator.row_scales`) then costs
        one weighted sum of x (`chain`). None: the rule has no such form.
      copies_update: for a stateless rule, its aggregate of `copies` rows that
        all hold one vector u followed by the rows of `honest`, as a function of
        u, with the work on `honest` done once: what the rule-aware attacks
        (`alie_opt`, `ipm_opt`) evaluate for every candidate u of their
        searches. The same values as `computed_update` on those rows (zeros'
        signs aside); it returns None for shapes it has no such form for. None
        (or None returned): the attacks stack the rows and run
        `computed_update`.
    """

    init: Callable[[jax.Array], State]
    update: Update
    default_params: Params = ()
    fused_update: Update | None = None
    stored: bool = False
    weighted_update: WeightedUpdate | None = None
    copies_update: CopiesUpdate | None = None

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
      written_update: `wide_update` with the rows written out as one array, in
        a form of its own, for a `stored` rule (`chain`); None: `chain` writes
        `wide_update`'s rows out (`write_rows`).
      row_scales: for a pre-aggregator that scales each row (n' = n), its rows as
        factors of its input: y_i = s_i x_i where keep_i, else the zero row; s and
        keep float32 and bool (n,). `chain` hands them to a rule's
        `weighted_update` (clipping then the mean at (100, 1e6): the rows'
        norms and one weighted sum, 38 against 100 ms for the clipped rows'
        sum on the 2-core Xeon of family 6 model 167). None: no such form.
    """

    init: Callable[[jax.Array], State]
    update: Update
    default_params: Params = ()
    n_out: Callable[[int], int] = lambda n: n
    wide_update: Update | None = None
    one_array: bool = False
    row_scales: RowScales | None = None
    written_update: Update | None = None


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
    weighted_fn: Callable[[jax.Array, jax.Array, jax.Array, Params], jax.Array]
    | None = None,
    copies_fn: CopiesUpdate | None = None,
) -> Aggregator:
    """Wraps `fn(grads[n, d], params) -> aggregate[d]` as a stateless Aggregator.

    The rule computes in float32 at least (bfloat16 inputs are promoted before `fn`
    sees them, unless `promote=False`: then `fn` gets the input as it is and
    promotes it itself, for a kernel that reads bfloat16) and returns the input
    dtype. `fused_fn`, the same rule for computed rows, becomes `fused_update`;
    `weighted_fn(grads, s, keep, params)` (grads as they are) `weighted_update`;
    `copies_fn(honest, copies, params)` (honest as it is) `copies_update`, its
    aggregates in the input dtype. `stored`: see `Aggregator`.
    """

    def wrap(fn):
        def update(grads, state, params):
            chex.assert_rank(grads, 2)
            x = grads.astype(compute_dtype(grads.dtype)) if promote else grads
            out = fn(x, params)
            return out.astype(grads.dtype), state

        return update

    def weighted(grads, s, keep, state, params):
        chex.assert_rank(grads, 2)
        return weighted_fn(grads, s, keep, params).astype(grads.dtype), state

    def copies(honest, n_copies, params):
        chex.assert_rank(honest, 2)
        evaluate = copies_fn(honest, n_copies, params)
        if evaluate is None:
            return None
        return lambda u: evaluate(u).astype(honest.dtype)

    fused = None if fused_fn is None else wrap(fused_fn)
    weighted = None if weighted_fn is None else weighted
    copies = None if copies_fn is None else copies
    return Aggregator(
        _no_state, wrap(fn), default_params, fused, stored, weighted, copies
    )


def stateless_pre(
    fn: Callable[[jax.Array, Params], jax.Array],
    default_params: Params = (),
    n_out: Callable[[int], int] = lambda n: n,
    one_array: bool = False,
    scales_fn: Callable[[jax.Array, Params], tuple[jax.Array, jax.Array]] | None = None,
) -> PreAggregator:
    """Wraps `fn(grads[n, d], params) -> mixed[n', d]` as a stateless PreAggregator;
    `scales_fn(grads, params) -> (s, keep)`, where given, as its `row_scales`.

    `fn` gets the input as it is and returns its rows in `compute_dtype`: it reads
    a bfloat16 input's rows through the promoting helpers (`promoted_rows`, the
    CPU kernels), not through a float32 copy.
    """

    def wide(grads, state, params):
        chex.assert_rank(grads, 2)
        return fn(grads, params), state

    def scales(grads, state, params):
        chex.assert_rank(grads, 2)
        return scales_fn(grads, params), state

    scales = None if scales_fn is None else scales
    return PreAggregator(
        _no_state, narrowed(wide), default_params, n_out, wide, one_array, scales
    )


def narrowed(wide: Update) -> Update:
    """A pre-aggregator's `update` from its `wide_update`: rows in the input dtype."""

    def update(grads, state, params):
        out, state = wide(grads, state, params)
        return out.astype(grads.dtype), state

    return update
