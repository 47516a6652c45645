"""Sorting-network rules over n <= 32 rows as generated CPU loops.

XLA fuses a sorting network over the rows into one loop that LLVM compiles well
(the median of 25 rows: 202 min/max, 80 spills and 74 reloads per 8 columns,
about 116 cycles from cache), but that loop reads 25 row streams with no
prefetch: taken out of XLA's object file and run alone on this project's
2-core machine, 185 cycles per 8 columns from memory against 116 from cache,
and 164 with a prefetch of every row 512 bytes ahead (docs/performance.md).
The same network written as straight-line AVX2 code, one SSA value per wire
version, compiles with GCC to the same loop; with the prefetches it read
(25, 1e6) in 2.74-2.83 ms against XLA's 3.9-4.1.

A loop is generated per rule, n and its parameters (`median_source`,
`trimmed_mean_source`, `window_mean_source`): the same compare-exchanges
(each wire's in the same order) and the same arithmetic after them as the XLA
forms in `byzjax._numerics`, so both give the same bits. It is compiled on first use
(about 0.6 s), cached next to the kernels' library, and registered with it by
an id that the `network` custom call carries.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import heapq
import subprocess

import jax
import jax.numpy as jnp
import numpy as np

from byzjax._native import _build_shared, _require, warn_unbuilt
from byzjax._sorting import (
    batcher_pairs,
    middle_ranks,
    partition_pairs,
    window_cuts,
)

# Prefetch distance: each row 512 bytes ahead (from XLA's loop, alone, at
# (25, 1e6): 256 bytes 183, 512 and 1,024 bytes 164, 2,048 bytes 174 cycles per
# 8 columns).
_PREFETCH_BYTES = 512
# GCC's scheduler before register allocation, aware of register pressure: the
# median's loop 117 against 121 cycles per 8 columns from cache.
_FLAGS = ("-O3", "-march=native", "-fschedule-insns", "-fsched-pressure")

_LOAD = {
    # NaN -> +Inf in one instruction: min(x, +Inf) is x for x < +Inf, else its
    # second operand.
    jnp.float32: "_mm256_min_ps(_mm256_loadu_ps((const float*)rows[{i}] + k), inf)",
    jnp.bfloat16: (
        "_mm256_min_ps(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32("
        "_mm_loadu_si128((const __m128i*)((const uint16_t*)rows[{i}] + k))), 16)), inf)"
    ),
}


def _low_wires_first(pairs):
    """`pairs` (a, b, ...) reordered as a network may run them (each after the
    earlier ones on its wires), the ready pair with the lowest upper wire b
    first: the low wires' sub-networks finish before the high rows are loaded,
    so fewer values are live at once. GCC then spilled less (with each row
    loaded at its first use): the window's loop at n = 25 kept 110 register
    moves and spills per 8 columns instead of 171, and took 169 instead of 184
    cycles from cache, 184 instead of 205 from memory on two cores (the median
    116 / 145 against 122 / 163)."""
    last, waiting, users = {}, [], [[] for _ in pairs]
    for i, (a, b, *_) in enumerate(pairs):
        before = {last[w] for w in (a, b) if w in last}
        waiting.append(len(before))
        for j in before:
            users[j].append(i)
        last[a] = last[b] = i
    ready = [(p[1], i) for i, p in enumerate(pairs) if not waiting[i]]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(pairs[i])
        for j in users[i]:
            waiting[j] -= 1
            if not waiting[j]:
                heapq.heappush(ready, (pairs[j][1], j))
    return order


class _Loop:
    """Straight-line AVX2 code over 8 columns: one C++ variable per value."""

    def __init__(self, n: int, dtype):
        self.lines: list[str] = []
        self.count = 0
        self.n, self.dtype = n, dtype

    def value(self, expr: str) -> str:
        name = f"v{self.count}"
        self.count += 1
        self.lines.append(f"const __m256 {name} = {expr};")
        return name

    def row(self, i: int) -> str:
        """Row i's 8 values, NaN as +Inf, and a prefetch of the row ahead."""
        itemsize = jnp.dtype(self.dtype).itemsize
        self.lines.append(
            f"_mm_prefetch((const char*)rows[{i}] + k * {itemsize} + "
            f"{_PREFETCH_BYTES}, _MM_HINT_T0);"
        )
        return self.value(_LOAD[self.dtype].format(i=i))

    def network(self, pairs, needed) -> list[str | None]:
        """The wires after `pairs`, computing only what feeds the `needed` wires
        (the compare-exchanges XLA keeps after dead-code elimination); each row
        is loaded where its first compare-exchange needs it."""
        live, kept = set(needed), []
        for a, b in reversed(pairs):
            if a in live or b in live:
                kept.append((a, b, a in live, b in live))
                live.update((a, b))
        w: list[str | None] = [None] * self.n
        for a, b, lo, hi in _low_wires_first(kept[::-1]):
            wa, wb = w[a] or self.row(a), w[b] or self.row(b)
            # XLA's select form: lo = b < a ? b : a, hi = b < a ? a : b, i.e.
            # min(b, a) and max(a, b) in AVX's operand order (NaN-free here).
            w[a] = self.value(f"_mm256_min_ps({wb}, {wa})") if lo else wa
            w[b] = self.value(f"_mm256_max_ps({wa}, {wb})") if hi else wb
        return [w[i] or self.row(i) if i in needed else w[i] for i in range(self.n)]

    def sum_tree(self, terms: list[str]) -> str:
        """`byzjax._numerics.sum_rows`' pairwise order."""
        while len(terms) > 1:
            paired = [
                self.value(f"_mm256_add_ps({a}, {b})")
                for a, b in zip(terms[0::2], terms[1::2], strict=False)
            ]
            terms = paired + terms[len(paired) * 2 :]
        return terms[0]

    def mean(self, total: str, count: int) -> str:
        """total / count as XLA:CPU computes it: times the float32 reciprocal."""
        inverse = float(np.float32(1.0 / count)).hex()
        return self.value(f"_mm256_mul_ps({total}, _mm256_set1_ps({inverse}f))")

    def median(self, r: list[str]) -> str:
        ranks = middle_ranks(len(r))
        if len(ranks) == 1:
            return r[ranks[0]]
        pair = self.value(f"_mm256_add_ps({r[ranks[0]]}, {r[ranks[1]]})")
        return self.value(f"_mm256_mul_ps(_mm256_set1_ps(0.5f), {pair})")

    def source(self, out: str) -> str:
        body = "\n    ".join(self.lines)
        return f"""#include <immintrin.h>
#include <cstdint>
extern "C" void byzjax_network(const void* const* rows, float* out, int64_t lo,
                               int64_t hi) {{
  const __m256 inf = _mm256_set1_ps(__builtin_inff());
  for (int64_t k = lo; k < hi; k += 8) {{
    {body}
    _mm256_storeu_ps(out + k, {out});
  }}
}}
"""


def median_source(n: int, dtype) -> str:
    """`byzjax._numerics.coordinate_median` (n <= 32)."""
    loop = _Loop(n, dtype)
    return loop.source(loop.median(loop.network(batcher_pairs(n), middle_ranks(n))))


def trimmed_mean_source(n: int, b: int, dtype) -> str:
    """`byzjax._numerics.coordinate_trimmed_mean` (n <= 32, b >= 1): the middle
    set off the partition network, summed as a tree."""
    loop = _Loop(n, dtype)
    middle = range(b, n - b)
    r = loop.network(partition_pairs(n, (b, n - b)), middle)
    return loop.source(loop.mean(loop.sum_tree([r[i] for i in middle]), n - 2 * b))


def window_mean_source(n: int, k: int) -> str:
    """`byzjax._numerics._window_mean` (float32, n <= 32, 2k >= n): NaN where a
    tie or a non-finite median leaves the window to the worker-order form."""
    loop = _Loop(n, jnp.float32)
    r = loop.network(partition_pairs(n, window_cuts(n, k)), range(n))
    m = loop.median(r)
    ends, ties = [], loop.value("_mm256_setzero_ps()")
    for i in range(n - k):
        up = loop.value(f"_mm256_sub_ps({r[i + k]}, {m})")
        down = loop.value(f"_mm256_sub_ps({m}, {r[i]})")
        closer = loop.value(f"_mm256_cmp_ps({up}, {down}, _CMP_LT_OQ)")
        ends.append(loop.value(f"_mm256_blendv_ps({r[i]}, {r[i + k]}, {closer})"))
        tie = loop.value(f"_mm256_cmp_ps({up}, {down}, _CMP_EQ_OQ)")
        ties = loop.value(f"_mm256_add_ps({ties}, _mm256_and_ps({tie}, {up}))")
    total = loop.sum_tree([*r[n - k : k], *ends])
    mean = loop.mean(total, k)
    magnitude = loop.value(f"_mm256_andnot_ps(_mm256_set1_ps(-0.0f), {m})")
    unsure = loop.value(
        f"_mm256_or_ps(_mm256_cmp_ps({ties}, _mm256_setzero_ps(), _CMP_GT_OQ), "
        f"_mm256_cmp_ps({magnitude}, inf, _CMP_NLT_UQ))"
    )
    return loop.source(
        loop.value(
            f'_mm256_blendv_ps({mean}, _mm256_set1_ps(__builtin_nanf("")), {unsure})'
        )
    )


@functools.cache
def supported() -> bool:
    """Whether the loops build here (AVX2 intrinsics: x86-64 compilers for a CPU
    that has it); if not, with a warning once, the rules keep their XLA loops."""
    try:
        _register(median_source(3, jnp.float32))
    except (OSError, subprocess.CalledProcessError, RuntimeError) as err:
        warn_unbuilt(
            "the sorting-network loops could not be built; the median, trimmed "
            "mean and mean around the median use XLA's.",
            err,
        )
        return False
    return True


@functools.cache
def _register(source: str) -> int:
    """Compiles `source` (cached on disk), registers its loop; returns its id."""
    lib = _require()
    path = _build_shared(source, "network", _FLAGS)
    loop = ctypes.cdll.LoadLibrary(str(path))
    ident = int(hashlib.sha256(source.encode()).hexdigest()[:15], 16)
    address = ctypes.cast(loop.byzjax_network, ctypes.c_void_p).value
    lib.ByzjaxRegisterNetwork(ctypes.c_int64(ident), ctypes.c_void_p(address))
    _LOADED[ident] = loop  # the library stays loaded while its id may be called
    return ident


_LOADED: dict[int, ctypes.CDLL] = {}


def network_rule(x: jax.Array, source: str) -> jax.Array:
    """The generated loop `source` over the rows of a (..., n, d) float32 or
    bfloat16 array: (..., d) float32."""
    target = {jnp.float32: "byzjax_network", jnp.bfloat16: "byzjax_network_bf16"}
    out = jax.ShapeDtypeStruct(x.shape[:-2] + x.shape[-1:], jnp.float32)
    call = jax.ffi.ffi_call(target[x.dtype.type], out, vmap_method="broadcast_all")
    return call(x, id=np.int64(_register(source)))
