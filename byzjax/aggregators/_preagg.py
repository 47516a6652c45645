"""Pre-aggregators: NNM, bucketing, static clipping and ARC (SPEC 1.10-1.12).

A pre-aggregator maps the n received vectors to n' vectors handed to a robust rule
built for the same f (`byzjax.aggregators.chain`).

References:
  Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan. "Fixing by Mixing: A Recipe
  for Optimal Byzantine ML under Heterogeneity", AISTATS 2023, arXiv:2302.01772.
  Karimireddy, He, Jaggi. "Byzantine-Robust Learning on Heterogeneous Datasets via
  Bucketing", ICLR 2022, arXiv:2006.09365.
  Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan. "The Vital Role of Gradient
  Clipping in Byzantine-Resilient Distributed Learning", arXiv:2405.14432.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from byzjax import _native
from byzjax._checks import require, static_int
from byzjax._native import networks
from byzjax._numerics import (
    HIGHEST,
    compute_dtype,
    kernel_rows,
    lazy_cond,
    norms,
    pairwise_sq_dists,
    promote,
    robust_center,
    smallest_k,
    stack_rows,
    sum_rows,
    taken_rows,
    write_rows,
)
from byzjax.aggregators._base import PreAggregator, narrowed, stateless_pre
from byzjax.aggregators._clipping import _required_tau, clip_factors, clip_rows


def nnm(f: int = 0) -> PreAggregator:
    """Nearest-neighbour mixing: every row becomes the mean of its n - f neighbours.

    y_i = (1/(n - f)) sum_{j in N_i} x_j, N_i the n - f nearest rows of x_i
    including x_i itself, ordered by (D_ij, j) (SPEC T0). Computed as ONE dense
    product W X with W_ij = 1 for j in N_i: O(n^2 d) flops and O(n^2 + nd) memory,
    never the (n, n - f, d) gather that makes ByzFL's NNM need 279 GiB at 100 x 1e7.

    Because 0 * Inf = NaN, non-finite entries are zeroed before the product: with at
    most f broken rows an honest row never selects one (its n - f honest neighbours
    are at finite distance), so its mix is exact; only the broken rows' own mixes
    see the zeroed entries.

    Args:
      f: number of Byzantine workers tolerated.

    Returns:
      A stateless PreAggregator, n' = n.

    Raises:
      ValueError: when traced with n < 2f + 1 (f < n/2).

    References:
      Allouah et al., AISTATS 2023, arXiv:2302.01772.
    """
    f = static_int(f, "nnm", "f")

    def fn(x, params):
        n = x.shape[0]
        require(n >= 2 * f + 1, "nnm", "n >= 2f + 1", n=n, f=f)
        dist = pairwise_sq_dists(x, center=robust_center(x, f))
        _, near = smallest_k(dist, n - f)
        weight = 1.0 / (n - f)
        if kernel_rows(x) and networks.native_width() == 16:
            # The CPU kernel (`_native.mix_rows`): W holds ones and the weight is
            # applied to each sum as it is stored (exact products); the rows at a
            # non-finite distance are read with their non-finite entries as zeros,
            # in the same pass, where the conditional form below writes zeros
            # first (6.9 | 23 ms at (25 | 100, 1e6) float32). NNM took 11.2 |
            # 137-145 ms against 20.3-21.0 | 167-171 by XLA's product
            # (docs/performance.md, session 32; on the Zen 4, bfloat16 rows
            # summed two a lane, `_native.bf16_pairs`, 175 against 206-220 ms at
            # (100, 1e6), session 33). With its AVX2 form NNM ran at
            # 0.75-0.82x the speed of XLA's AVX-512 product at (100, 1e6):
            # unmeasured against XLA on an AVX2 CPU, so there NNM keeps XLA's.
            ones = jnp.zeros((n, n), jnp.float32)
            ones = ones.at[jnp.arange(n)[:, None], near].set(1.0)
            broken = ~jnp.all(jnp.isfinite(dist), axis=1)
            return _native.mix_rows(x, ones, weight, broken)
        # The weights 1/(n - f) go into W: dividing the product would be one more
        # (n, d) pass. For bfloat16 W holds ones, exact in bfloat16, and the
        # product of bfloat16 operands accumulates in float32 with no float32
        # copy of x (at (25, 1e6): 55 against 87 ms and 100 MB); the weight is
        # applied to its output.
        dtype = compute_dtype(x.dtype)
        narrow = x.dtype != dtype
        mixing = jnp.zeros((n, n), x.dtype if narrow else dtype)
        mixing = mixing.at[jnp.arange(n)[:, None], near].set(1.0 if narrow else weight)

        def product(x, mixing):
            out = jnp.matmul(mixing, x, precision=HIGHEST, preferred_element_type=dtype)
            return out * weight if narrow else out

        # The cleaned copy of x is made only when a distance is not finite, which
        # every row with a non-finite entry causes (a 100 MB copy at (25, 1e6)).
        return lazy_cond(
            jnp.all(jnp.isfinite(dist)),
            product,
            lambda x, mixing: product(jnp.where(jnp.isfinite(x), x, 0.0), mixing),
            x,
            mixing,
        )

    return stateless_pre(fn, one_array=True)


def bucketing(
    f: int = 0, *, s: int = 2, seed: int = 0, shuffle: bool = True
) -> PreAggregator:
    """Bucketing: the means of ceil(n/s) buckets of a fresh random permutation.

    y_t = mean(x_{pi(ts)}, ..., x_{pi(min(ts + s, n) - 1)}), t < ceil(n/s); the last
    bucket is divided by its real size (SPEC D10, Karimireddy's code and ByzFL). The
    next rule is built for ceil(n/s) inputs and the same f (each Byzantine worker
    spoils at most one bucket).

    The PRNG key is the state (like optax `add_noise`): `init` makes it from `seed`,
    and every update splits it, `key, sub = jax.random.split(state)`, and draws
    `pi = jax.random.permutation(sub, n)`. A bucket holding a non-finite row is
    passed on as it is, for the robust rule to discard.

    Args:
      f: number of Byzantine workers tolerated (the next rule uses it).
      s: bucket size >= 1, static.
      seed: seed of the initial PRNG key.
      shuffle: False keeps the identity permutation (for tests and parity runs).

    Returns:
      A stateful PreAggregator with n' = ceil(n/s).

    References:
      Karimireddy, He, Jaggi, ICLR 2022, arXiv:2006.09365.
    """
    static_int(f, "bucketing", "f")
    s = static_int(s, "bucketing", "s", minimum=1)
    seed = static_int(seed, "bucketing", "seed")

    def n_out(n):
        return -(-n // s)

    def init(grads):
        del grads
        return jax.random.PRNGKey(seed)

    def permutation(grads, state):
        order = jnp.arange(grads.shape[0])
        if shuffle:
            state, sub = jax.random.split(state)
            order = jax.random.permutation(sub, grads.shape[0])
        return order, state

    def wide(grads, state, params):
        chex.assert_rank(grads, 2)
        n = grads.shape[0]
        order, state = permutation(grads, state)

        # Rows read in place: no permuted (n, d) copy of x, and the next rule
        # fuses the bucket means. One take for all buckets (`taken_rows`): one
        # take per bucket made XLA convert a bfloat16 x whole (100 MB).
        rows = taken_rows(grads, order)

        def bucket(t):
            members = rows[t * s : min(t * s + s, n)]
            return sum_rows(lambda i: members[i], len(members)) / len(members)

        return stack_rows(bucket, n_out(n)), state

    def written(grads, state, params):
        # For a rule that reads its rows from memory: on the CPU kernels the
        # bucket means in one pass over x, written as one array
        # (`_native.mix_rows`, sparse: a non-finite row spoils its bucket alone),
        # where XLA's loop over the buckets' rows wrote them and `write_rows`
        # copied them: bucketing then Krum at (25 | 100, 1e6) float32 took 7.3 |
        # 37.4 ms against 11.5 | 64.8 on the Xeon of model 167, 6.8-8.2 | 33-36
        # against 9.2-11.0 | 48-49 on the Zen 4 (docs/performance.md, sessions
        # 32 and 33).
        if not kernel_rows(grads):
            out, state = wide(grads, state, params)
            return write_rows(out), state
        chex.assert_rank(grads, 2)
        n = grads.shape[0]
        order, state = permutation(grads, state)
        # Ones in the full buckets and s / size in a smaller last one, the sums
        # times 1/s: for s = 2 the bits of the sum halved.
        bucket = np.arange(n) // s
        sizes = np.minimum(s, n - s * np.arange(n_out(n)))
        weights = jnp.asarray(s / sizes[bucket], jnp.float32)
        mixing = jnp.zeros((n_out(n), n), jnp.float32).at[bucket, order].set(weights)
        return _native.mix_rows(grads, mixing, 1.0 / s, sparse=True), state

    return PreAggregator(init, narrowed(wide), (), n_out, wide, written_update=written)


def clipping(f: int = 0, *, tau: float | None = None) -> PreAggregator:
    """Static clipping: y_i = x_i * min(1, tau/||x_i||).

    A row whose norm is not finite becomes zero (see `clip_rows`).

    Args:
      f: accepted for a uniform signature; unused.
      tau: clipping radius, required, sweepable: `params["tau"]`.

    Returns:
      A stateless PreAggregator, n' = n.

    Raises:
      ValueError: missing or non-positive tau.

    References:
      Allouah et al., arXiv:2405.14432 (static clipping, the baseline of ARC).
    """
    static_int(f, "clipping", "f")
    tau = _required_tau("clipping", tau)

    def radius(x, params):
        r = norms(x)
        return r, jnp.asarray(params["tau"], r.dtype)

    return _scaling_pre(radius, {"tau": tau})


def arc_count(n: int, f: int) -> int:
    """k = floor(2 (f/n) (n - f)), the number of rows ARC clips (SPEC D11)."""
    return (2 * f * (n - f)) // n


def arc(f: int = 0) -> PreAggregator:
    """Adaptive robust clipping: clip the k largest rows to the (k+1)-th largest norm.

    k = floor(2 (f/n) (n - f)) (SPEC D11, ByzFL's `int()`); workers are ordered by
    norm, descending, ties to the lower index (SPEC T0, `lax.top_k`); c is the
    (k+1)-th largest norm; y_i = x_i * min(1, c/||x_i||) for the k largest, the other
    rows unchanged. k >= f whenever n >= 2f, so at most f broken rows (norm +Inf) are
    always among the clipped ones, and they become zero (see `clip_rows`).

    Args:
      f: number of Byzantine workers tolerated.

    Returns:
      A stateless PreAggregator, n' = n; the identity when k = 0.

    Raises:
      ValueError: when traced with n < 2f + 1 (f < n/2).

    References:
      Allouah et al., arXiv:2405.14432.
    """
    f = static_int(f, "arc", "f")

    def radius(x, params):
        n = x.shape[0]
        require(n >= 2 * f + 1, "arc", "n >= 2f + 1", n=n, f=f)
        k = arc_count(n, f)
        if k == 0:
            return None
        r = norms(x)
        largest, order = lax.top_k(r, k + 1)
        return r, jnp.full(n, jnp.inf, r.dtype).at[order[:k]].set(largest[k])

    return _scaling_pre(radius)


def _scaling_pre(radius, default_params=()) -> PreAggregator:
    """The pre-aggregator clipping each row x_i to its radius_i, where
    `radius(x, params) -> (norms, radii)`, or None for the identity; its
    `row_scales` are the clip factors."""

    def fn(x, params):
        got = radius(x, params)
        return promote(x) if got is None else clip_rows(x, got[1], got[0])

    def scales_fn(x, params):
        got = radius(x, params)
        if got is None:
            return jnp.ones(x.shape[0], jnp.float32), jnp.ones(x.shape[0], bool)
        scale, broken = clip_factors(*got)
        return scale, ~broken

    return stateless_pre(fn, default_params, scales_fn=scales_fn)


PRE = {"nnm": nnm, "bucketing": bucketing, "clipping": clipping, "arc": arc}
