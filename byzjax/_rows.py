"""The rows of a gradient array in the dtype a rule computes in.

A bfloat16 input is promoted to float32 row by row, inside the consumer's fused
loop, never as a whole-array copy (twice the input's bytes). XLA:CPU needs help
for that: its slice sinker merges the n conversions `x[i].astype(float32)` into
one conversion of the whole array, and its fusion pass then refuses to fuse that
conversion into a consumer that reads it through more than 15 slices (the code
would be duplicated too often), so it writes it out. Measured with jax 0.10.2: a
sum of k converted rows of a (25, 1e6) bfloat16 array needed no temporary up to
k = 15 and 100 MB from k = 16; the median of the 25 rows took 42 ms with the copy
and 5 ms without (glibc's default malloc; 12.2 and 6.9 ms with the tunables of
`byzjax._allocator`). So the rows are converted in groups of at most 15, each group
sliced from its own `lax.optimization_barrier` of x (an alias of the same buffer,
not a copy), which the sinker cannot merge.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Most slices of one converted operand that XLA:CPU still fuses (see above).
_GROUP = 15


def compute_dtype(dtype) -> jnp.dtype:
    """Dtype in which a rule computes: float32 at least (bfloat16 sums lose digits)."""
    return jnp.promote_types(dtype, jnp.float32)


def promoted_rows(x: jax.Array) -> list[jax.Array]:
    """[x[0], ..., x[n - 1]] in `compute_dtype`, converted inside their consumers."""
    return promoted_take(x, lambda group, i: group[i], x.shape[0])


def promoted_take(x: jax.Array, take, count: int) -> list[jax.Array]:
    """[take(x, j) for j < count] in `compute_dtype`, for row reads `take` (static or
    dynamic slices), converted inside their consumers."""
    dtype = compute_dtype(x.dtype)
    if x.dtype == dtype:
        return [take(x, j) for j in range(count)]
    rows, group = [], x
    for start in range(0, count, _GROUP):
        # Chained: barriers of x itself are identical and CSE merges them. The
        # first group too, or its conversion merges with another consumer's
        # conversion of x (a norm's reduction) into one shared, written-out one.
        group = lax.optimization_barrier(group)
        rows += [
            take(group, j).astype(dtype)
            for j in range(start, min(count, start + _GROUP))
        ]
    return rows
