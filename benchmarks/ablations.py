"""Each XLA:CPU design choice of byzjax against the plain alternative, same run.

The library's numerics (`byzjax/_numerics.py`, `byzjax/_sorting.py`) are written the
way they are because the obvious JAX expression is several times slower on XLA:CPU.
This script times both forms of every such choice on the same array, alternating
them so that a busy machine slows both alike, and writes one JSON line per pair.

  python benchmarks/ablations.py --out benchmarks/results/ablations.jsonl
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from byzjax import _native, _sorting
from byzjax import _numerics as nm
from byzjax.aggregators._clipping import clip_factors

if __package__ in (None, ""):
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import alternate, command, emit, hardware  # noqa: E402

from byzjax._allocator import reexec_tuned  # noqa: E402

HIGHEST = jax.lax.Precision.HIGHEST


def _clip_whole(x):
    scale, broken = clip_factors(nm.norms(x), 1.0)
    return jnp.where(broken[:, None], 0.0, x * scale[:, None])


def _clip_rows(x):
    scale, broken = clip_factors(nm.norms(x), 1.0)
    return nm.stack_rows(lambda i: jnp.where(broken[i], 0.0, x[i] * scale[i]), len(x))


def pairs(n: int, f: int):
    """(choice, byzjax form, plain form, what it stands for): functions of (x, v)."""
    k = n // 2

    def shared(mean):
        # x plays the honest rows (an argument: a slice of it would be copied).
        return lambda x, v: jnp.broadcast_to(-mean(x), (f, x.shape[1]))

    choices = [
        (
            "compare-exchange",
            lambda x, v: _sorting.order_statistics(x, [k], True)[0],
            lambda x, v: _sorting.order_statistics(x, [k], False)[0],
            "median network: compare + 2 selects vs jnp.minimum/maximum",
        ),
        (
            "sum over workers",
            lambda x, v: nm.row_mean(x),
            lambda x, v: x.mean(axis=0),
            "row additions fused vs x.mean(axis=0)",
        ),
        (
            "shared attack vector",
            shared(nm.dot_mean),
            shared(nm.row_mean),
            "IPM's (f, d) rows from a dot mean vs from fused row additions",
        ),
        (
            "clipping",
            lambda x, v: nm.row_mean(_clip_rows(x)),
            lambda x, v: nm.row_mean(_clip_whole(x)),
            "clipped rows built row by row vs x * scale[:, None]",
        ),
        (
            "mean after clipping",
            lambda x, v: nm.row_mean(_clip_rows(x)),
            lambda x, v: nm.dot_mean(_clip_rows(x)),
            "row additions fused with the clipped rows vs a dot (rows written first)",
        ),
        (
            "Gram matrix",
            lambda x, v: nm.centered_gram(x, v),
            lambda x, v: jnp.matmul(x - v, (x - v).T, precision=HIGHEST),
            "loop over column blocks of small products vs one (n, d) x (d, n) matmul",
        ),
        (
            "distances to a vector",
            lambda x, v: jnp.einsum("nd,nd->n", x - v, x - v, precision=HIGHEST),
            lambda x, v: jnp.stack([jnp.sum(jnp.square(r - v)) for r in x]),
            "one whole-array reduction vs one reduction per row slice",
        ),
        (
            "weighted sum of rows",
            lambda x, v: nm.weighted_row_sum(v[: len(x)], x, v[: len(x)] > -9),
            lambda x, v: nm.sum_rows(lambda i: v[i] * x[i], len(x)),
            "weighted_row_sum (one matrix-vector product) vs fused row additions",
        ),
    ]
    if n <= _sorting.FULL_NETWORK_MAX_N:
        choices += network_pairs(n, f)
    return choices + (native_pairs(f) if _native.enabled() else [])


def network_pairs(n: int, f: int):
    """The networks that need only sets of ranks (n <= 32)."""

    def trimmed_sum(cuts):
        def fn(x, v):
            middle = _sorting.ranked_rows(x, cuts)[f : n - f]
            return nm.sum_rows(lambda i: middle[i], n - 2 * f)

        return fn

    return [
        (
            "partition network",
            trimmed_sum((f, n - f)),
            trimmed_sum(None),
            "trimmed sum off a network pruned to three sets vs Batcher's full one",
        ),
    ]


def _step_weights(x, v):
    # Weights from an argument (a closed-over array would be constant-folded).
    return jnp.abs(v[: len(x)]) / len(x)


def _step_plain(x, v):
    # The previous form: the moved centre by a product, then a distance pass.
    w = _step_weights(x, v)
    z = v * (1.0 - w.sum()) + jnp.matmul(w, x, precision=HIGHEST)
    return z, _native.row_sq_dists(x, z)


def _mixing(x, v):
    # NNM's 0/1 mixing matrix, from an argument (about 3/4 of its entries ones).
    n = len(x)
    return (v[: n * n].reshape(n, n) > -0.67).astype(jnp.float32)


def native_pairs(f: int):
    """The CPU kernels of byzjax/_native against the forms they replace."""
    return [
        (
            "NNM's product, kernel",
            lambda x, v: _native.mix_rows(x, _mixing(x, v), 1.0 / (len(x) - f)),
            lambda x, v: jnp.matmul(_mixing(x, v) / (len(x) - f), x, precision=HIGHEST),
            "CPU kernel (exact products, streamed output) vs XLA's product",
        ),
        (
            "pairwise distances",
            lambda x, v: _native.pairwise_sq_dists(x),
            lambda x, v: nm.gram_sq_dists(x, nm.robust_center(x, f)),
            "CPU kernel on differences vs blocked Gram matrix around a robust centre",
        ),
        (
            "distances to a vector, kernel",
            lambda x, v: _native.row_sq_dists(x, v),
            lambda x, v: nm.reduce_row_sq_dists(x, v),
            "CPU kernel (v stays in cache) vs XLA's whole-array reduction",
        ),
        (
            "mean of stored rows, kernel",
            lambda x, v: _native.row_rule(x, _native.MEAN),
            lambda x, v: nm.row_mean(x),
            "CPU kernel (long runs per row) vs XLA's fused row additions",
        ),
        (
            "weighted row sum, kernel",
            lambda x, v: _native.step_sq_dists(
                x, jnp.zeros((0,), jnp.float32), _step_weights(x, v), False
            )[0],
            lambda x, v: jnp.matmul(_step_weights(x, v), x, precision=HIGHEST),
            "CPU kernel (rows of weight 0 skipped, one read under vmap)"
            " vs XLA's product",
        ),
        (
            "reweighting step, kernel",
            lambda x, v: _native.step_sq_dists(x, v, _step_weights(x, v)),
            _step_plain,
            "one read (the sum, then the distances from cache) vs product + distances",
        ),
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[25, 100])
    p.add_argument("--d", type=float, default=1e6)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/ablations.jsonl")
    args = p.parse_args(argv)
    hw = {**hardware(), "command": command()}
    d = int(args.d)
    with open(args.out, "a") as out:
        for n in args.n:
            rng = np.random.default_rng(0)
            x = jnp.asarray(rng.normal(size=(n, d)), "float32")
            v = jnp.asarray(rng.normal(size=d), "float32")
            for name, ours, plain, what in pairs(n, n // 4 - 1):
                a, b = alternate([(ours, (x, v)), (plain, (x, v))], args.repeats)
                emit(
                    {
                        **hw,
                        "kind": "ablation",
                        "name": name,
                        "n": n,
                        "d": d,
                        "what": what,
                        "byzjax_s": a,
                        "plain_s": b,
                        "ratio": b / a,
                    },
                    out,
                )
                print(
                    f"{name:22s} n={n}: {a * 1e3:8.1f} ms vs {b * 1e3:8.1f} ms "
                    f"({b / a:.1f}x)",
                    file=sys.stderr,
                    flush=True,
                )


if __name__ == "__main__":
    reexec_tuned()
    main()
