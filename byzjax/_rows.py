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


def promoted_rows(
    x: jax.Array, count: int | None = None, tie: tuple[jax.Array, ...] = ()
) -> list[jax.Array]:
    """[x[0], ..., x[count - 1]] (every row by default) in `compute_dtype`,
    converted inside their consumers. Pass `count` rather than a slice of x: the
    groups' barriers would write a bfloat16 slice out. `tie`: arrays the
    conversions are `tied` to (in a loop, its carry: else the converted rows are
    hoisted out of it, and written out)."""
    count = x.shape[0] if count is None else count
    return promoted_take(x, lambda group, i: group[i], count, tie)


def tied(x: jax.Array, *others: jax.Array) -> jax.Array:
    """x behind one barrier with `others` (an alias of x, not a copy), for work on
    the whole of x that XLA would otherwise write out as a whole-array temporary:
    in a loop whose counter or carry is among `others`, it cannot be hoisted out
    of the loop (the promotion of x in `promoted_blocks`: 406 MB of temporaries
    at (100, 1e6) bfloat16); and a promotion of x tied to its consumer's other
    operands is not merged by CSE with another consumer's promotion of x into
    one shared conversion, which XLA:CPU writes out rather than fuse into both."""
    x, _ = lax.optimization_barrier((x, others))
    return x


def promoted_tied(x: jax.Array, *others: jax.Array) -> jax.Array:
    """x in `compute_dtype` for one fused consumer, `tied` to its other operands
    where x needs promoting (x itself where not, so that a computed x still fuses
    into the consumer)."""
    dtype = compute_dtype(x.dtype)
    return x if x.dtype == dtype else tied(x, *others).astype(dtype)


def promoted_take(
    x: jax.Array, take, count: int, tie: tuple[jax.Array, ...] = ()
) -> list[jax.Array]:
    """[take(x, j) for j < count] in `compute_dtype`, for row reads `take` (static or
    dynamic slices), converted inside their consumers (`tie`: as in
    `promoted_rows`)."""
    dtype = compute_dtype(x.dtype)
    if x.dtype == dtype:
        return [take(x, j) for j in range(count)]
    rows, group = [], x
    for start in range(0, count, _GROUP):
        # Chained: barriers of x itself are identical and CSE merges them. The
        # first group too, or its conversion merges with another consumer's
        # conversion of x (a norm's reduction) into one shared, written-out one.
        group = tied(group, *tie)
        rows += [
            take(group, j).astype(dtype)
            for j in range(start, min(count, start + _GROUP))
        ]
    return rows


# Columns per block of `promoted_blocks` on the CPU: at (100, 1e6) 4,096 and
# 16,384 took the same time, with 1.6 and 6.6 MB of temporaries.
_BLOCK = 4096

# An accelerator's column blocks: an eighth of d, at least 2**16 columns.
_DEVICE_BLOCKS, _DEVICE_BLOCK_MIN = 8, 1 << 16


def column_block(d: int, cpu_block: int, backend: str) -> int:
    """Columns per block of a loop over the column blocks of x, for work that
    would otherwise write a whole-array temporary: `cpu_block` on the CPU; on an
    accelerator an eighth of d (at least `_DEVICE_BLOCK_MIN`), since each step of
    the loop is a launch or more there, and a block is still at most an eighth of
    a float32 x."""
    if backend == "cpu":
        return cpu_block
    return max(-(-d // _DEVICE_BLOCKS), _DEVICE_BLOCK_MIN)


def promoted_blocks(fn, x: jax.Array, block: int | None = None) -> jax.Array:
    """fn(column block of x in `compute_dtype`) -> (width,), one block at a time
    (fn(x) itself where x is in `compute_dtype` already).

    For a rule whose promoted rows feed a chain of networks that XLA:CPU cannot
    compile fused (minutes), so that it needs a float32 copy: a copy of each block
    of columns in turn (`column_block`; `block` overrides it) instead of the whole
    array. On the CPU the loop body runs on one thread, against two for fused
    loops; mean-around-median of (100, 1e6) bfloat16 took 342 against 290-298
    ms, with 1.6 MB of temporaries against 400.
    """
    n, d = x.shape
    dtype = compute_dtype(x.dtype)
    if block is None:
        block = column_block(d, _BLOCK, jax.default_backend())
    if x.dtype == dtype or d <= block:
        return fn(x.astype(dtype))

    def body(j, out):
        # The last block overlaps the one before it, so every block has the
        # same width.
        start = jnp.minimum(j * block, d - block)
        xb = lax.dynamic_slice_in_dim(tied(x, j), start, block, axis=1)
        return lax.dynamic_update_slice_in_dim(out, fn(xb.astype(dtype)), start, axis=0)

    return lax.fori_loop(0, -(-d // block), body, jnp.zeros(d, dtype))


def sum_rows(row, n: int) -> jax.Array:
    """row(0) + ... + row(n - 1) as a pairwise tree (rounding error O(log n)).

    The counterpart of `_numerics.stack_rows` for sums: every term is written on
    one row, so XLA fuses the n terms into one elementwise loop.
    """
    rows = [row(i) for i in range(n)]
    while len(rows) > 1:
        paired = [a + b for a, b in zip(rows[0::2], rows[1::2], strict=False)]
        if len(rows) % 2:
            paired.append(rows[-1])
        rows = paired
    return rows[0]
