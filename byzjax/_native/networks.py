"""Sorting-network rules over the rows as generated CPU loops (n <= 32; the
median, trimmed mean and mean around the median up to 128 rows, `NETWORK_MAX_N`).

Above 32 rows, at (100, 1e6) float32: on the 2-core Xeon with AVX-512 the
median took 27-30 ms against XLA's 71 (the floor 18-20); on the 2-core AMD Zen 3
with AVX2 66 against 128 ms (the floor 18.6), mean around the median 109 against
335 ms; on the 2-core AMD Zen 4 with AVX-512, on order keys (`keyed_exchanges`),
21 against 56 ms (the floor 15-16). A selection, so its bits are XLA's whatever
the order of its sums. The trimmed mean's loop sums a partition network's
middle ranks there, where XLA's form clips the rows (`trimmed_mean_source`):
the same trimmed mean, rounded otherwise.

XLA fuses a sorting network over the rows into one loop that LLVM compiles well
(the median of 25 rows: 202 min/max, 80 spills and 74 reloads per 8 columns,
about 116 cycles from cache), but that loop reads 25 row streams with no
prefetch: taken out of XLA's object file and run alone on this project's
2-core machine, 185 cycles per 8 columns from memory against 116 from cache,
and 164 with a prefetch of every row 512 bytes ahead (docs/performance.md).
The same network written as straight-line AVX2 code, one SSA value per wire
version, compiles with GCC to the same loop; with the prefetches it read
(25, 1e6) in 2.74-2.83 ms against XLA's 3.9-4.1 (AMD Zen 3). Where the CPU
has AVX-512 the loops take 16 columns a step in 32 registers (`native_width`):
on the 2-core Xeon (family 6 model 207) at (25, 1e6), alternated with the read
floor (`ones @ x`, 3.5 ms), the median took 2.4 against 3.4 ms with 8 columns a
step, the trimmed mean 2.4 against 3.8 and the window 2.8 against 5.1.
bfloat16's median (and with AVX2 its trimmed mean and mean around the median)
takes two columns in each lane of those loops, on 16-bit keys (`_PairLoop`).

A loop is generated per rule, n and its parameters (`median_source`,
`trimmed_mean_source`, `window_mean_source`, `mean_around_median_source`): the
same compare-exchanges (each wire's in the same order) and the same arithmetic
after them as the XLA forms in `byzjax._numerics`, so both give the same bits. It
is compiled on first use (about 0.6 s at n = 25, 3.3 s for mean around the median
of 100 rows), cached next to the kernels' library, and registered with it by an
id that the `network` custom call carries.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import heapq
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np

from byzjax._native import _build_shared, _require, cpu_info, warn_unbuilt
from byzjax._sorting import (
    FULL_NETWORK_MAX_N,
    SELECT_MAX_N,
    batcher_pairs,
    middle_ranks,
    partition_pairs,
    window_cuts,
    window_ends,
)

# Prefetch distance up to 32 rows: each row 512 bytes ahead (from XLA's loop,
# alone, at (25, 1e6): 256 bytes 183, 512 and 1,024 bytes 164, 2,048 bytes 174
# cycles per 8 columns).
_PREFETCH_BYTES = 512
# Above 32 rows the loop reads too many streams at once for that (the median of
# 100 rows: 100 row streams, 200 on two cores). Read that way, even a plain sum
# of the rows took 30-34 ms at (100, 2^20) float32 against 20 ms row after row,
# and the median's loop 45-55 ms. So the loop runs over column blocks of
# `_BLOCK_BYTES` per row; while it works on one block, it prefetches the next
# one into L2, row by row, a share of its lines per step (`_Loop._share`). The
# memory then sees a few sequential streams at a time: the plain sum took 21.5
# ms, the median's loop 28-34 ms (2 KB blocks no better, 4 KB worse; the
# prefetch two blocks ahead no better). Each row is also prefetched into L1 one
# step ahead: from L2 its loads stalled the loop (about 1,600 against 1,050
# cycles per 16 columns from L1), and 512 bytes ahead is more than L1 holds for
# 100 rows. `/tmp` programs on the 2-core Xeon (family 6 model 207), two threads.
# The step's prefetches into L2 go one beside each row's first load, spread
# through the step (session 30, the 2-core Xeon of model 167). Issued in a burst
# at the step's start, they held the network up: in L2 the median of 100 rows
# took 325 ns per 16 columns on one core, with the burst's reads of (100, 1e6)
# 667, a plain sum with the same reads 458 (`/tmp` programs). Spread, alternated
# in one process at (100, 1e6): float32's median, trimmed mean and window 0.81-0.82
# the time, bfloat16's median 0.75, its trimmed mean and window 0.92-0.93; the
# median of (128, 1e6) 0.83, of (33, 1e6) 0.93, of (100, 1e5) 0.84.
_BLOCK_BYTES = 1024
_BLOCK_LINES = _BLOCK_BYTES // 64  # cache lines of a row in a block
# On AMD Zen 4 above 32 rows the loops run without blocks (`streamed_loops`):
# each row is prefetched into L2 `_STREAM_BYTES` ahead of the step and into L1
# one step ahead, both where the row is first loaded, so the prefetches are
# spread through the step; the blocks' came in a burst of about 100 lines at the
# start of each step. In `benchmarks/loop_forms.py` (alternated, four runs of
# 15-21 rounds), streamed against blocked at (100, 1e6): float32 median 0.89-0.94,
# trimmed mean 0.92-0.95, mean around the median 0.96-0.97; bfloat16 0.86-1.01
# (once 1.09). (`/tmp` programs with a thread per half: 512 and 2,048 bytes ahead
# no better.)
_STREAM_BYTES = 1024
# Compiler flags by columns a step, for loops up to 32 rows. For AVX2, GCC's
# scheduler before register allocation, aware of register pressure: the median's
# loop at n = 25 117 against 121 cycles per 8 columns from cache (AMD Zen 3). It
# spills more above 32 rows (the blocked loops take `_BLOCKED_FLAGS`): the median
# of 100 rows took 61-64 against 51 ms with AVX-512 at (100, 1e6) on the 2-core
# Xeon (881 spills per 16 columns against 127), and with AVX2 on the 2-core AMD
# Zen 3 142 against 66 ms, mean around the median 163 against 109 (no difference
# at n = 25, which reads at the floor either way).
_FLAGS = {
    8: ("-O3", "-march=native", "-fschedule-insns", "-fsched-pressure"),
    16: ("-O3", "-march=native"),
    32: ("-O3", "-march=native"),
}
_BLOCKED_FLAGS = ("-O3", "-march=native")

# Row i's `width` values from column {k} of rows[i] as float32: a bfloat16
# widened by a shift of its bits.
_LOAD = {
    (jnp.float32, 8): "_mm256_loadu_ps((const float*)rows[{i}] + {k})",
    (jnp.bfloat16, 8): (
        "_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32("
        "_mm_loadu_si128((const __m128i*)((const uint16_t*)rows[{i}] + {k}))), 16))"
    ),
    (jnp.float32, 16): "_mm512_loadu_ps((const float*)rows[{i}] + {k})",
    (jnp.bfloat16, 16): (
        "_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32("
        "_mm256_loadu_si256((const __m256i*)((const uint16_t*)rows[{i}] + {k}))), 16))"
    ),
}
WIDTHS = (8, 16)

# What every loop includes, compiled once per compiler, flags and CPU into a
# precompiled header (`_build_shared`): GCC parsed <immintrin.h> in about 1.0 of
# the 1.1-1.3 s a loop took to build on the 2-core AMD VM, 0.25 s with the
# header precompiled (the same machine code). The suite builds about 125 loops.
_HEADER_NAME = "byzjax_network.h"
_HEADER = "#include <immintrin.h>\n#include <cstdint>\n"


@functools.cache
def native_width() -> int:
    """Columns per step of the loops on this CPU: 16 (AVX-512's 32 registers of
    16 lanes) where it has AVX-512F and DQ, else 8 (AVX2's 16 of 8): see the module's
    docstring for the times."""
    # `-mno-avx512f` in the kernels' extra flags builds the AVX2 forms everywhere.
    avx2_only = "-mno-avx512f" in os.environ.get("BYZJAX_NATIVE_FLAGS", "")
    # DQ for the range instruction of `_Loop.exchange` (every AVX-512 CPU but the
    # Xeon Phi has it).
    has_avx512 = {"avx512f", "avx512dq"} <= set(cpu_info().get("flags", "").split())
    return 16 if has_avx512 and not avx2_only else 8


@functools.cache
def pair_loops(dtype, rule: str, n: int) -> bool:
    """Whether the loops of `rule` ("median", "trimmed_mean", "window" or
    "mean_around_median") over n `dtype` rows take two columns in each 32-bit lane
    of the float loops, on 16-bit order keys (`_PairLoop`): bfloat16, 16 columns a
    step with AVX2's 16-bit min and max (the median, the trimmed mean and the
    general mean around the median measured faster on the Zen 3), 32 with
    AVX-512BW's where the loops take AVX-512.

    With AVX-512BW, alternated against the 16-column loops (session 23, Zen 4,
    `benchmarks/loop_forms.py`, (25 | 100, 1e5 | 1e6)): the median 0.60-0.80x
    the time (the Xeon: 0.81-0.88x); the trimmed mean 0.61-0.86x, but 1.15-1.26x
    below 33 rows where most steps hold a -0 (redone by float exchanges, before
    `zero_sum_rewire`), so on AMD (the Xeon, whose 16-bit min and max run at
    half its float rate, has not run it). Session 29, alternated in one process:
    the window of the mean around the median 0.66-0.77x at (25 | 32 | 40 | 100 |
    128, 1e6), 0.75-0.99x with ALIE's equal rows or small integers, 1.29-1.32x
    at 25 and 32 rows with a third of the columns +0 and -0 at random; its
    general form (2k < n, Bulyan's coordinate stage), without the check of its
    median's sign it never needed, 0.74-0.88x at (15, k = 5 | 25, 12 | 52, 4;
    1e6) on Gaussian rows, signed zeros and small integers (0.81-1.02x and
    1.10-1.76x with signed zeros while it checked). So every rule on AMD.

    The Xeon of model 167 (session 30, alternated in one process, with the
    blocks' prefetches spread through the step): the general form 0.91-0.93x
    at (15, k = 5 | 40, 10 | 52, 4; 1e6); above 32 rows the trimmed mean
    0.79-0.83x at (100 | 128, 1e6), 0.93x at 33 rows, the window 0.89x at 100,
    0.94-0.96x at 33 and 40; up to 32 rows, where they check their zeros, the
    trimmed mean 0.93-0.98x and the window 0.93-0.96x on Gaussian rows, but
    1.07-1.32x with signed zeros (`loop_forms.py`). So there the median and the
    general form at every n, the others above 32 rows.
    """
    if dtype != jnp.bfloat16:
        return False
    if native_width() == 8:
        return True
    if "avx512bw" not in cpu_info().get("flags", "").split():
        return False
    # The loops that never check their zeros: these two rules', and every loop
    # above 32 rows (min/max networks, whose zeros the keys order alike).
    unchecked = rule in ("median", "mean_around_median") or n > FULL_NETWORK_MAX_N
    return unchecked or _amd()


@functools.cache
def _amd() -> bool:
    """Whether this is an AMD CPU: there the loops run on order keys
    (`keyed_exchanges`), and with AVX-512 (Zen 4) run over column blocks up to 32
    rows (`_blocked`) and prefetch each row into L2 above (`streamed_loops`)."""
    return cpu_info().get("vendor_id") == "AuthenticAMD"


def keyed_exchanges(n: int, width: int, rule: str = "") -> bool:
    """Whether the loops of `rule` ("median", "window", ...) over n rows, `width`
    columns a step, compare-exchange on order keys (`_Loop.network`) on this
    CPU: on AMD's,
    which run twice as many integer min or max a cycle as float ones (12
    independent chains, `/tmp` programs: Zen 4 6.4e9 16-lane against 3.2e9 a
    second on one core, Zen 3 12.8e9 8-lane against 6.4e9).

    Zen 4 (AVX-512): the median of 100 rows from L2 took 1,591 against
    1,800-1,950 cycles per 16 columns; at (100, 1e6) float32, alternated, the
    median 21.9 against 24.9 ms, the trimmed mean 26.0 against 30.4, mean around
    the median 35.5 against 37.7; bfloat16 (where the keys replace the range
    instruction) the median 21.2 against 41.3 ms. At 25 rows the median gained a
    little (3.15 against 3.61 ms at (25, 1e6) bfloat16, 3.6-4.0 against 3.8-4.0
    float32), the trimmed mean nothing, and the window mean lost while its
    check covered every wire. Now one compare of its mean and the column's
    least value (`zero_sum_rewire`), alternated in one process (session 29):
    at (32, 1e5 | 1e6) 0.89 the time, at (25, 1e5 | 1e6) 0.87-1.04 on Gaussian
    rows (1.02-1.10 in `loop_forms.py`'s run), 0.86-0.90 with ALIE's rows,
    0.78-0.97 with all-+0 columns, 1.04-1.54 with +0 and -0 at random in a
    third of the columns: a little faster, so keys for the window too. Zen 3
    (AVX2, spill-bound above 32 rows), float32
    alternated with `ones @ x` (14.3 ms): at (100, 1e6) the median 31.0 against
    33.3 ms, the trimmed mean 36.1 against 40.2, mean around the median 48.5
    against 52.9; at (25, 1e6) the median 3.61 against 4.21 ms, the trimmed mean
    no difference beyond noise."""
    return (rule in ("median", "window") or n > FULL_NETWORK_MAX_N) and _amd()


def streamed_loops(n: int, width: int) -> bool:
    """Whether the loops over n rows, `width` columns a step, prefetch each row
    into L2 as they go (`_STREAM_BYTES`), with no column blocks, on this CPU: on
    AMD with AVX-512 (Zen 4) above 32 rows. Up to 32 rows the blocks stay: in
    `benchmarks/loop_forms.py`'s runs (three, 15-21 rounds) the streamed loops
    of 25 rows took 0.95-1.08 of the blocked ones' time, against 0.86-0.96 at
    100 rows."""
    return n > FULL_NETWORK_MAX_N and width == 16 and _amd()


def _blocked(n: int, width: int) -> bool:
    """Whether a loop that does not stream (`streamed_loops`) runs over column
    blocks (`_BLOCK_BYTES`): above 32 rows, and on AMD Zen 4 at every n: at
    (25, 1e6) float32, alternated in three processes, the median took 3.8-4.0 ms
    against 4.6-5.3 prefetching each row 512 bytes ahead, the trimmed mean 3.7-4.1
    against 4.5-5.0, the window 4.5 against 4.9 (`ones @ x` 4.2-4.7 ms)."""
    return n > FULL_NETWORK_MAX_N or (width == 16 and _amd())


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
    """Straight-line AVX2 (width 8) or AVX-512 (width 16) code over `width`
    columns: one C++ variable per value."""

    NEGATIVE_ZERO = "(int)0x80000000"  # a lane's bits for -0 (`zero_sum_rewire`)

    def __init__(
        self,
        n: int,
        dtype,
        width: int,
        keyed: bool = False,
        streamed: bool | None = None,
    ):
        if width not in WIDTHS:
            raise ValueError(f"network loops: width {width} not in {WIDTHS}")
        self.lines: list[str] = []
        self.count = 0
        self.n, self.dtype, self.width = n, dtype, width
        self.keyed = keyed  # compare-exchanges on order keys: see `network`
        self.helpers: list[str] = []  # functions the loop calls (`cold`)
        self.prefix = {8: "_mm256", 16: "_mm512"}[width]
        self.vector = {8: "__m256", 16: "__m512"}[width]
        # This CPU's `streamed_loops` unless given; if not, `_blocked`'s.
        self.streamed = streamed_loops(n, width) if streamed is None else streamed
        self.blocked = not self.streamed and _blocked(n, width)
        # The step's first column, the values' names, +Inf's and row {i}'s load
        # from column {k}: the float loops over the halves of a `_PairLoop`'s
        # step have their own names, +Inf and loads (`_half`).
        self.column, self.tag, self.inf = "k", "v", "inf"
        self.load_form = _LOAD[dtype, width]
        self.sites = 0  # rows loaded so far in the step (`row`)

    def value(self, expr: str, kind: str | None = None) -> str:
        name = f"{self.tag}{self.count}"
        self.count += 1
        self.lines.append(f"const {kind or self.vector} {name} = {expr};")
        return name

    def op(self, name: str, *args: str) -> str:
        """The intrinsic `name` (`min_ps`, ...) at this width, as a new value."""
        return self.value(f"{self.prefix}_{name}({', '.join(args)})")

    def row(self, i: int) -> str:
        """Row i's values, NaN as +Inf, and prefetches of the row ahead."""
        itemsize = jnp.dtype(self.dtype).itemsize
        near = self.blocked or self.streamed
        ahead = self.width * itemsize if near else _PREFETCH_BYTES
        if self.streamed:
            self.lines.append(
                f"_mm_prefetch((const char*)rows[{i}] + k * {itemsize} + "
                f"{_STREAM_BYTES}, _MM_HINT_T1);"
            )
        if self.blocked and self.sites < self._share():
            self.lines.append(self._next_block_line(self.sites))
        self.sites += 1
        self.lines.append(
            f"_mm_prefetch((const char*)rows[{i}] + k * {itemsize} + "
            f"{ahead}, _MM_HINT_T0);"
        )
        return self.load(i)

    def _block_steps(self) -> int:
        """The steps over a column block (`_BLOCK_BYTES` of each row)."""
        return _BLOCK_BYTES // (jnp.dtype(self.dtype).itemsize * self.width)

    def _share(self) -> int:
        """The lines of the next column block a step prefetches into L2: its n
        rows' lines over the block's steps."""
        return -(-self.n * _BLOCK_LINES // self._block_steps())

    def _next_block_line(self, j: int) -> str:
        """The prefetch of the step's j-th line of the next block (`_share`), the
        block's lines taken row by row; the last step's spare ones (where the
        share was rounded up) repeat its last line."""
        line = f"g + {j}"
        if self._share() * self._block_steps() > self.n * _BLOCK_LINES:
            line = f"({line} < kLines * kRows ? {line} : kLines * kRows - 1)"
        address = (
            f"(const char*)rows[({line}) / kLines] + next + 64 * (({line}) % kLines)"
        )
        return f"_mm_prefetch({address}, _MM_HINT_T1);"

    def load(self, i: int) -> str:
        """Row i's values, NaN as +Inf (read again: from L1 after `row`)."""
        return self.finite_or_inf(self.raw(i))

    def raw(self, i: int) -> str:
        """Row i's values as they are."""
        return self.value(self.load_form.format(i=i, k=self.column))

    def finite_or_inf(self, a: str) -> str:
        """a with NaN as +Inf, in one instruction: min(x, +Inf) is x for x < +Inf,
        else its second operand."""
        return self.op("min_ps", a, self.inf)

    # Comparisons: AVX2 gives a vector of all-ones lanes, AVX-512 a mask register.
    def compare(self, a: str, b: str, predicate: str) -> str:
        if self.width == 8:
            return self.op("cmp_ps", a, b, predicate)
        return self.value(f"_mm512_cmp_ps_mask({a}, {b}, {predicate})", "__mmask16")

    def select(self, mask: str, a: str, b: str) -> str:
        """b where `mask`, else a."""
        if self.width == 8:
            return self.op("blendv_ps", a, b, mask)
        return self.op("mask_blend_ps", mask, a, b)

    def masked(self, mask: str, a: str) -> str:
        """a where `mask`, else +0."""
        if self.width == 8:
            return self.op("and_ps", mask, a)
        return self.op("maskz_mov_ps", mask, a)

    def masked_add(self, total: str, mask: str, a: str) -> str:
        """total + a where `mask`, else total as it is: with AVX-512 one masked add,
        where a -0 total stays -0 (total + `masked` would make it +0)."""
        if self.width == 8:
            return self.op("add_ps", total, self.masked(mask, a))
        return self.op("mask_add_ps", total, mask, total, a)

    def all_of(self, mask: str) -> str:
        """Whether `mask` holds in every lane, as a C++ condition."""
        if self.width == 8:
            return f"_mm256_movemask_ps({mask}) == 0xFF"
        return f"{mask} == 0xFFFF"

    def any_of(self, mask: str) -> str:
        """Whether `mask` holds in some lane, as a C++ condition."""
        if self.width == 8:
            return f"_mm256_movemask_ps({mask}) != 0"
        return f"{mask} != 0"

    def zero_sum_rewire(self, mean: str, by_selects, least: str | None = None) -> str:
        """A mean of ranks off a network on order keys, or `by_selects()`'s (the
        same mean off XLA's selects) where it is a zero in a column that holds a
        -0. The keys put -0 below +0 where the selects keep equal
        zeros in their wires' order; every wire holds the same value either way,
        and a float sum is -0 only where every term is, so the two means differ
        only where they are zeros. One compare a step, where a check of every
        rank summed took one a rank. The trimmed mean of 25 and 32
        rows on column pairs, alternated in one process: 0.87-1.06 the time on
        Gaussian rows, 0.75-0.82 on small integers (-0 in a tenth of the
        entries, so most steps with a zero rank were redone). `least`: the
        column's least value, where the caller has it."""
        zero = self.compare(mean, f"{self.prefix}_setzero_ps()", "_CMP_EQ_OQ")
        if least is not None:
            # A column without a -0 has no value below +0 in key order, so its
            # least is +0 or above (all +0, as in a weight's gradient for an
            # input that is always 0): no check there.
            zero = self.both(zero, self.signed(least))

        def remade():
            # Where the column holds no -0, the keys' mean stands. (The median
            # of (100, 1e6) with half its columns +0 took 32.4 ms when every
            # zero rank was remade, against 27.5 by float exchanges alone; with
            # this test 33.3 against 38.2, in a slower stretch.)
            negative = None
            for i in range(self.n):
                bits = self.raw(i)
                found = self.compare_bits(bits, self.NEGATIVE_ZERO)
                negative = found if negative is None else self.either(negative, found)
            remake = self.any_of(self.both(negative, "mask"))
            self.lines.append(f"if (!({remake})) return false;")
            return [by_selects()]

        (mean,) = self.cold(zero, [mean], remade)
        return mean

    def cold(
        self, mask: str, values: list[str], make, given: list[str] = ()
    ) -> list[str]:
        """`values`, or `make(*given)`'s where `mask` marks a column of the step
        (as "mask" in `make`'s lines, which may `return false;` to keep
        `values`): made in a function of its own, called only then, the
        `given` values passed in memory. In the loop's body, GCC's register
        allocation of the common path suffered from the rare one (the median of
        100 rows on order keys, from L2 on AMD Zen 4: 1,774 cycles per 16
        columns against 1,581 without the rare path)."""
        saved, self.lines = self.lines, []
        made = make(*[f"out[{j}]" for j in range(len(given))])
        body, self.lines = self.lines, saved
        helper = f"byzjax_rare{len(self.helpers)}"
        outs = [f"out[{j}] = {v};" for j, v in enumerate(made)]
        self.helpers.append(
            f'__attribute__((noinline, cold, optimize("O1"))) static bool {helper}(\n'
            f"    const void* const* rows, int64_t k, {self._mask_type()} mask,\n"
            f"    {self.vector}* out) {{\n  "
            + "\n  ".join([self._inf(), *body, *outs, "return true;"])
            + "\n}\n"
        )
        names = []
        for v in values:
            names.append(f"{self.tag}{self.count}")
            self.count += 1
            self.lines.append(f"{self.vector} {names[-1]} = {v};")
        self.lines.append(f"if (__builtin_expect({self.any_of(mask)}, 0)) {{")
        self.lines.append(f"{self.vector} made[{max(len(names), len(given))}];")
        self.lines += [f"made[{j}] = {v};" for j, v in enumerate(given)]
        self.lines.append(f"if ({helper}(rows, k, {mask}, made)) {{")
        self.lines += [f"{name} = made[{j}];" for j, name in enumerate(names)]
        self.lines.append("}")
        self.lines.append("}")
        return names

    def signed(self, a: str) -> str:
        """The lanes of a whose sign bit is set (-0 among them), as `compare`
        gives them."""
        p, si = self.prefix, f"si{self.width * 32}"
        if self.width == 8:
            return self.value(
                f"_mm256_castsi256_ps(_mm256_srai_epi32({p}_castps_{si}({a}), 31))"
            )
        return self.value(f"_mm512_movepi32_mask({p}_castps_{si}({a}))", "__mmask16")

    def compare_bits(self, a: str, bits: str) -> str:
        """The lanes of a whose 32 bits are `bits`, as `compare` gives them."""
        p, si = self.prefix, f"si{self.width * 32}"
        pair = f"{p}_castps_{si}({a}), {p}_set1_epi32({bits})"
        if self.width == 8:
            return self.value(f"_mm256_castsi256_ps(_mm256_cmpeq_epi32({pair}))")
        return self.value(f"_mm512_cmpeq_epi32_mask({pair})", "__mmask16")

    def _mask_type(self) -> str:
        return "__mmask16" if self.width == 16 else self.vector

    def _inf(self) -> str:
        return f"const {self.vector} {self.inf} = {self._float_inf()};"

    def _float_inf(self) -> str:
        return f"{self.prefix}_set1_ps(__builtin_inff())"

    def in_floats(self, make, wires: list[str]):
        """`make(loop, wires)`: the arithmetic after a network, on float32 wires
        (a `_PairLoop` does it on each half of its step)."""
        return make(self, wires)

    def branch(self, condition: str, then, otherwise) -> str:
        """`then()` where `condition` holds, else `otherwise()`: each emits its
        lines in its own block and returns its value."""
        result = f"{self.tag}{self.count}"
        self.count += 1
        self.lines.append(f"{self.vector} {result};")
        for head, make in ((f"if ({condition}) {{", then), ("} else {", otherwise)):
            self.lines.append(head)
            self.lines.append(f"{result} = {make()};")
        self.lines.append("}")
        return result

    def both(self, m1: str, m2: str) -> str:
        if self.width == 8:
            return self.op("and_ps", m1, m2)
        return self.value(f"_kand_mask16({m1}, {m2})", "__mmask16")

    def either(self, m1: str, m2: str) -> str:
        if self.width == 8:
            return self.op("or_ps", m1, m2)
        return self.value(f"_kor_mask16({m1}, {m2})", "__mmask16")

    def magnitude(self, a: str) -> str:
        """|a| (the sign bit cleared)."""
        if self.width == 8:
            return self.op("andnot_ps", "_mm256_set1_ps(-0.0f)", a)
        return self.op("abs_ps", a)

    # Magnitudes (sign bits clear) order as their bits do as int32, a NaN's above
    # +Inf's: their min, max and comparisons run on integer instructions, the
    # same bits as the float ones give. On AMD's cores those run at twice the
    # float rate (`keyed_exchanges`); the mean around the median of 100 rows
    # spends about 45 % of its step on float instructions.
    def magnitude_bound(self, end: str, a: str, b: str) -> str:
        """min or max (`end`) of magnitudes a and b (NaN-free)."""
        return self.exchange(a, b, end, ordered=False, keyed=True)

    def deviation(self, a: str) -> str:
        """|a|, NaN as +Inf: `finite_or_inf(magnitude(a))`."""
        return self.magnitude_bound("min", self.magnitude(a), self.inf)

    def within(self, a: str, b: str) -> str:
        """Where magnitude a <= b (b NaN-free): never where a is NaN."""
        return self._magnitudes("cmple", a, b, "_CMP_LE_OQ")

    def below(self, a: str, b: str) -> str:
        """Where magnitude a < b (b NaN-free): never where a is NaN."""
        return self._magnitudes("cmplt", a, b, "_CMP_LT_OQ")

    def level(self, a: str, b: str) -> str:
        """Where magnitude a == b (b NaN-free)."""
        return self._magnitudes("cmpeq", a, b, "_CMP_EQ_OQ")

    def _magnitudes(self, name: str, a: str, b: str, predicate: str) -> str:
        if self.width == 8:  # AVX2 has no such integer comparison
            return self.compare(a, b, predicate)
        ints = f"_mm512_castps_si512({a}), _mm512_castps_si512({b})"
        return self.value(f"_mm512_{name}_epi32_mask({ints})", "__mmask16")

    # Per-lane counts: int32 lanes with AVX-512 (at the integer rate), exact
    # float32 lanes with AVX2, whose integer compares give no mask.
    def counter(self, start: int) -> str:
        if self.width == 8:
            return self.value(f"_mm256_set1_ps({start}.0f)")
        return self.value(f"_mm512_set1_epi32({start})", "__m512i")

    def tally(self, counter: str, mask: str, step: int) -> str:
        """counter + step where `mask`."""
        if self.width == 8:
            return self.op(
                "add_ps", counter, self.masked(mask, f"_mm256_set1_ps({step}.0f)")
            )
        step = f"_mm512_set1_epi32({step})"
        return self.value(
            f"_mm512_mask_add_epi32({counter}, {mask}, {counter}, {step})", "__m512i"
        )

    def fewer(self, a: str, b: str) -> str:
        """Where counter a < counter b."""
        if self.width == 8:
            return self.compare(a, b, "_CMP_LT_OQ")
        return self.value(f"_mm512_cmplt_epi32_mask({a}, {b})", "__mmask16")

    def network(
        self, pairs, needed, wire=None, ordered=False, keyed=False
    ) -> list[str | None]:
        """The wires after `pairs`, computing only what feeds the `needed` wires
        (the compare-exchanges XLA keeps after dead-code elimination); each input
        wire i, `wire(i)` (row i by default), is made where its first
        compare-exchange needs it. `ordered`: XLA's min/max compare-exchanges
        (`byzjax._sorting._network`'s select=False) instead of its selects.
        `keyed`: on the values' order keys (`order_key`) by integer min and max,
        which order zeros as XLA's min/max do: AVX2 has no float min/max of that
        order, and AMD's cores run twice as many integer min/max a cycle as float
        ones (`keyed_exchanges`)."""
        load = wire or self.row
        keyed = keyed or (ordered and self.width == 8)

        def wire(i):
            return self.order_key(load(i)) if keyed else load(i)

        live, kept = set(needed), []
        for a, b in reversed(pairs):
            if a in live or b in live:
                kept.append((a, b, a in live, b in live))
                live.update((a, b))
        w: list[str | None] = [None] * self.n
        for a, b, lo, hi in _low_wires_first(kept[::-1]):
            wa, wb = w[a] or wire(a), w[b] or wire(b)
            w[a] = self.exchange(wa, wb, "min", ordered, keyed) if lo else wa
            w[b] = self.exchange(wa, wb, "max", ordered, keyed) if hi else wb
        out = [w[i] or wire(i) if i in needed else w[i] for i in range(self.n)]
        return [self.order_key(v) if keyed and v else v for v in out]

    def order_key(self, a: str) -> str:
        """float32 values as int32 (in float32 registers) of the same order, -0
        below +0 (NaN-free): the sign bit kept, the other bits flipped where it is
        set. Its own inverse. With AVX-512, bits ^ (sign & 0x7fffffff) in one
        ternary-logic instruction after the shift (truth table 0x78), not a
        second shift and a xor: 2 instructions a row, not 3, where the median of
        100 rows takes 1,700 min and max a step."""
        p, si = self.prefix, f"si{self.width * 32}"
        bits = f"{p}_castps_{si}({a})"
        sign = f"{p}_srai_epi32({bits}, 31)"
        if self.width == 16:
            magnitude = f"{p}_set1_epi32(0x7fffffff)"
            key = f"{p}_ternarylogic_epi32({bits}, {sign}, {magnitude}, 0x78)"
        else:
            key = f"{p}_xor_{si}({bits}, {p}_srli_epi32({sign}, 1))"
        return self.value(f"{p}_cast{si}_ps({key})")

    def exchange(self, a: str, b: str, end: str, ordered: bool, keyed: bool) -> str:
        """The `end` ("min" or "max") of a compare-exchange of wires a < b,
        NaN-free. XLA's select form, lo = b < a ? b : a and hi = b < a ? a : b,
        is AVX's min(b, a) and max(a, b), whose equal zeros keep the operand
        order. XLA's min and max order -0 below +0, as AVX-512's range
        instruction does (imm8 bits 1:0 pick min or max, 3:2 the sign from the
        comparison), and the integer min and max on order keys (`keyed`)."""
        if keyed:  # on order keys (`network`)
            p, si = self.prefix, f"si{self.width * 32}"
            ints = f"{p}_castps_{si}({a}), {p}_castps_{si}({b})"
            return self.value(f"{p}_cast{si}_ps({p}_{end}_epi32({ints}))")
        if not ordered:
            return self.op(f"{end}_ps", *((b, a) if end == "min" else (a, b)))
        return self.op("range_ps", a, b, {"min": "0x04", "max": "0x05"}[end])

    def sum_tree(self, terms: list[str]) -> str:
        """`byzjax._rows.sum_rows`' pairwise order."""
        while len(terms) > 1:
            paired = [
                self.op("add_ps", a, b)
                for a, b in zip(terms[0::2], terms[1::2], strict=False)
            ]
            terms = paired + terms[len(paired) * 2 :]
        return terms[0]

    def mean(self, total: str, count: int) -> str:
        """total / count as XLA:CPU computes it: times the float32 reciprocal."""
        inverse = float(np.float32(1.0 / count)).hex()
        return self.op("mul_ps", total, f"{self.prefix}_set1_ps({inverse}f)")

    def median(self, r: list[str]):
        def middle(f, ranks):
            if len(ranks) == 1:
                return ranks[0]
            pair = f.op("add_ps", *ranks)
            return f.op("mul_ps", f"{f.prefix}_set1_ps(0.5f)", pair)

        return self.in_floats(middle, [r[i] for i in middle_ranks(len(r))])

    def stores(self, out: str) -> list[str]:
        """The lines that store the step's result `out` (float32)."""
        return [f"{self.prefix}_storeu_ps(out + k, {out});"]

    def source(self, out) -> str:
        indent = "\n" + " " * (6 if self.blocked else 4)
        spare = range(self.sites, self._share() if self.blocked else 0)
        prefetches = [self._next_block_line(j) for j in spare]
        step = indent.join([*self.lines, *prefetches, *self.stores(out)])
        itemsize = jnp.dtype(self.dtype).itemsize
        if not self.blocked:
            loop = f"""for (int64_t k = lo; k < hi; k += kWidth) {{
    {step}
  }}"""
        else:
            loop = f"""constexpr int64_t kBlock = {_BLOCK_BYTES // itemsize};  // cols
  // Cache lines per row in a block, and the rows.
  constexpr uint64_t kLines = {_BLOCK_LINES}, kRows = {self.n};
  for (int64_t k0 = lo; k0 < hi; k0 += kBlock) {{
    const int64_t end = k0 + kBlock < hi ? k0 + kBlock : hi;
    // The next block's offset in a row, and the first of the step's lines of
    // it (`_share` a step, row by row).
    const int64_t next = (k0 + kBlock) * {itemsize};
    uint64_t g = 0;
    for (int64_t k = k0; k < end; k += kWidth, g += {self._share()}) {{
      {step}
    }}
  }}"""
        helpers = "".join(self.helpers)
        return f"""#include "{_HEADER_NAME}"
constexpr int64_t kWidth = {self.width};  // columns a step
{helpers}extern "C" void byzjax_network(const void* const* rows, float* out,
                               int64_t lo, int64_t hi) {{
  {self._inf()}
  {loop}
}}
"""


class _PairLoop(_Loop):
    """bfloat16 rows on 16-bit order keys (`pair_loops`), two columns in each
    32-bit lane of the float loops of `half` columns a step (8: AVX2, 16:
    AVX-512BW), so half their instructions per column; what follows the network
    on the step's even and odd columns widened to float32 (`_widened`). Keys put
    -0 below +0 (XLA's min/max networks, above `SELECT_MAX_N`); for its selects
    below, the steps with a zero result in a column that holds a -0 run again by
    the float loop's exchanges on each half (`zero_sum_rewire`).

    On the 2-core Xeon (family 6 model 167), alternated with the 16-column
    loop: the median of (25, 1e6) 1.45-1.49 against 1.69-1.71 ms (the read of
    its bytes 1.65-1.85), of (100, 1e6) 14.6 against 14.9-15.2 ms. In cache on
    one core, 20.5 against 23.6 ns a column at n = 100: nearly the same
    instructions a step for twice the columns, yet the 16-bit min and max run
    at about half the range instruction's rate there. On the 2-core AMD Zen 3
    (AVX2), whose 16-bit min and max run at the 32-bit ones' rate, alternated
    with the 8-column loop on int32 keys and a float32 `ones @ x` of the same
    bytes: the median of (25, 1e6) 3.50 against 5.55 ms (the read 2.81), of
    (100, 1e6) 19.0 against 29.1 ms (6.2), of (25, 1e5) 0.26 against 0.46 ms,
    of (100, 1e5) 2.8 against 5.0 ms (0.9)."""

    def __init__(self, n: int, half: int, streamed: bool | None = None):
        super().__init__(n, jnp.bfloat16, half, keyed=True, streamed=streamed)
        self.half, self.width = half, 2 * half
        self.bits = 32 * half  # of a register
        self.vector, self.floats = f"__m{self.bits}i", f"__m{self.bits}"
        self.mask = "__mmask32" if half == 16 else self.vector

    def _set(self, bits: str) -> str:
        return f"{self.prefix}_set1_epi16({bits})"

    def raw(self, i: int) -> str:
        return self.value(self._load_form().format(i=i, k=self.column))

    def finite_or_inf(self, a: str) -> str:
        # NaN where the bits without the sign exceed +Inf's.
        if self.half == 16:
            nan = self.value(
                f"_mm512_cmpgt_epu16_mask(_mm512_slli_epi16({a}, 1), "
                "_mm512_set1_epi16((short)0xFF00))",
                self.mask,
            )
            return self.value(f"_mm512_mask_mov_epi16({a}, {nan}, inf)")
        magnitude = f"_mm256_and_si256({a}, {self._set('0x7FFF')})"
        nan = self.value(f"_mm256_cmpgt_epi16({magnitude}, {self._set('0x7F80')})")
        return self.value(f"_mm256_blendv_epi8({a}, inf, {nan})")

    def order_key(self, a: str) -> str:
        """`_Loop.order_key` on 16-bit lanes (its ternary logic is bitwise)."""
        p = self.prefix
        sign = f"{p}_srai_epi16({a}, 15)"
        if self.half == 16:
            magnitude = self._set("0x7fff")
            return self.value(f"{p}_ternarylogic_epi32({a}, {sign}, {magnitude}, 0x78)")
        return self.value(f"{p}_xor_si{self.bits}({a}, {p}_srli_epi16({sign}, 1))")

    def exchange(self, a: str, b: str, end: str, ordered: bool, keyed: bool) -> str:
        return self.value(f"{self.prefix}_{end}_epi16({a}, {b})")

    def _inf(self) -> str:
        # +Inf's bits for the network, and the float one for `in_floats`.
        return (
            f"const {self.vector} inf = {self._set('(short)0x7F80')};\n"
            f"  const {self.floats} finf = {self._float_inf()};"
        )

    def in_floats(self, make, wires: list[str]) -> tuple[str, str]:
        """`make` on a float loop over each half of the step, which loads its rows'
        values from its half, and on the wires' values there."""
        halves = zip(*(self.widen(w) for w in wires), strict=True)
        return tuple(make(self._half(part), list(v)) for part, v in enumerate(halves))

    def _half(self, part: int) -> _Loop:
        """A float loop over half `part` of the step, its lines in this loop's (its
        values named apart from every other's)."""
        f = _Loop(self.n, jnp.bfloat16, self.half)
        f.lines, f.helpers, f.inf = self.lines, self.helpers, "finf"
        f.load_form = self._widened(part, self._load_form())
        f.tag = f"f{self.count}_{part}_"
        self.count += 1
        return f

    def _load_form(self) -> str:
        ptr = "(const uint16_t*)rows[{i}] + {k}"
        if self.half == 16:
            return f"_mm512_loadu_si512({ptr})"
        return f"_mm256_loadu_si256((const __m256i*)({ptr}))"

    def _widened(self, part: int, a: str) -> str:
        """Half `part` of the step's bfloat16 values a as float32: the even
        columns (0) or the odd ones (1), each the high half of its 32-bit lane.
        One shift or one and a wire, where widening the low and high 16 columns
        took a cross-lane extension and a shift each, and an extract."""
        p = self.prefix
        if part == 0:
            bits = f"{p}_slli_epi32({a}, 16)"
        else:
            bits = f"{p}_and_si{self.bits}({a}, {p}_set1_epi32((int)0xFFFF0000))"
        return f"{p}_castsi{self.bits}_ps({bits})"

    def widen(self, a: str) -> tuple[str, str]:
        """The step's bfloat16 values a as two float32 halves (`_widened`)."""
        return tuple(self.value(self._widened(part, a), self.floats) for part in (0, 1))

    def stores(self, out) -> list[str]:
        # The halves' columns interleaved again: AVX-512 by two permutes of both,
        # AVX2 by unpacks (within each 128-bit lane: columns 0-3 with 8-11, 4-7
        # with 12-15), their lanes then swapped.
        even, odd = out
        if self.half == 16:
            picks = [
                ", ".join(str(8 * h + c // 2 + 16 * (c % 2)) for c in range(16))
                for h in (0, 1)
            ]
            return [
                f"_mm512_storeu_ps(out + k + {16 * h}, _mm512_permutex2var_ps("
                f"{even}, _mm512_setr_epi32({pick}), {odd}));"
                for h, pick in enumerate(picks)
            ]
        low = f"_mm256_unpacklo_ps({even}, {odd})"
        high = f"_mm256_unpackhi_ps({even}, {odd})"
        return [
            f"_mm256_storeu_ps(out + k + {8 * h}, "
            f"_mm256_permute2f128_ps({low}, {high}, {lanes}));"
            for h, lanes in enumerate(("0x20", "0x31"))
        ]


def _new_loop(
    n: int,
    dtype,
    width: int | None,
    keyed: bool | None,
    rule: str,
    streamed: bool | None,
) -> _Loop:
    """A loop of `width` columns a step, this CPU's `native_width()` unless given;
    on order keys where `keyed`, this CPU's `keyed_exchanges` unless given;
    `streamed` as `_Loop` takes it."""
    width = width or native_width()
    keyed = keyed_exchanges(n, width, rule) if keyed is None else keyed
    return _Loop(n, dtype, width, keyed, streamed)


def _pair_or_new_loop(
    n: int,
    dtype,
    rule: str,
    width: int | None = None,
    keyed: bool | None = None,
    paired: bool | None = None,
    streamed: bool | None = None,
) -> _Loop:
    """A loop for `rule` on bfloat16 column pairs (`_PairLoop`, the float loops'
    `width` each half) where `paired`, this CPU's `pair_loops` unless given; else
    `_new_loop`'s. The source functions' `form` is these keywords."""
    if pair_loops(dtype, rule, n) if paired is None else paired:
        return _PairLoop(n, width or native_width(), streamed)
    return _new_loop(n, dtype, width, keyed, rule, streamed)


def median_source(n: int, dtype, **form) -> str:
    """`byzjax._numerics.coordinate_median` (n <= `NETWORK_MAX_N`); `form`: the
    loop's `width`, `keyed`, `paired` and `streamed` (`_pair_or_new_loop`), this
    CPU's where not given."""
    loop = _pair_or_new_loop(n, dtype, "median", **form)
    ranks = middle_ranks(n)

    def median(f, values):
        wires: list[str | None] = [None] * n
        for i, v in zip(ranks, values, strict=True):
            wires[i] = v
        return f.median(wires)

    return _settled_source(loop, batcher_pairs(n), ranks, _ordered(n, dtype), median)


def _ordered(n: int, dtype) -> bool:
    """Whether XLA's network over these rows compares by min/max (`byzjax._sorting
    .order_statistics`: bfloat16 rows above `SELECT_MAX_N`)."""
    return n > SELECT_MAX_N and dtype != jnp.float32


def trimmed_mean_source(n: int, b: int, dtype, **form) -> str:
    """`byzjax._numerics._middle_mean` (b >= 1): the middle set off the
    partition network, summed as a tree; by min/max above 32 rows, as
    `ranked_rows` has it there. The rule's own form above 32 rows clips every
    row to the ranks b and n - b - 1 (which the rule-aware attacks' candidates
    take apart: `trimmed_mean_with_copies`); the loop sums the middle ranks
    instead, the same trimmed mean rounded otherwise, in cache at (100, b = 24)
    311 against 350 ns per 16 columns in float32, 283 against 435 in bfloat16.
    `form` as `median_source` takes it."""
    loop = _pair_or_new_loop(n, dtype, "trimmed_mean", **form)

    def trimmed(f, middle):
        return f.mean(f.sum_tree(middle), n - 2 * b)

    pairs = partition_pairs(n, (b, n - b))
    return _settled_source(
        loop, pairs, range(b, n - b), n > FULL_NETWORK_MAX_N, trimmed
    )


def _settled_source(loop: _Loop, pairs, needed, ordered: bool, make) -> str:
    """The source of `loop` over `pairs` for the `needed` ranks (on order keys
    where the loop takes them: `keyed_exchanges`, `_PairLoop`), then `make(f,
    values)`, a mean of those ranks, on each float loop f (`in_floats`), the
    values in `needed`'s order. Where the keys order zeros otherwise than XLA's
    network does (not `ordered`: its selects), a step whose mean is a zero in a
    column holding a -0 runs again by selects (`zero_sum_rewire`, filtered by
    rank 0 where it is needed)."""
    needed = list(needed)
    r = loop.network(pairs, needed, ordered=ordered, keyed=loop.keyed)

    def made(f, values, signed):
        mean = make(f, values)
        if not signed:
            return mean

        def by_selects():
            w = f.network(pairs, needed, wire=f.load)
            return made(f, [w[i] for i in needed], False)

        least = values[needed.index(0)] if 0 in needed else None
        return f.zero_sum_rewire(mean, by_selects, least=least)

    signed = loop.keyed and not ordered
    return loop.source(
        loop.in_floats(lambda f, v: made(f, v, signed), [r[i] for i in needed])
    )


def _mean_in_order(loop: _Loop, terms: list[str], k: int) -> str:
    """The terms summed in worker order, over k."""
    # XLA drops the + 0 its form starts from: -0 terms alone sum to -0.
    total = terms[0]
    for term in terms[1:]:
        total = loop.op("add_ps", total, term)
    return loop.mean(total, k)


def _mean_in_worker_order(loop: _Loop, k: int, deviation, delta: str) -> str:
    """The mean of the k rows closest to the median by SPEC T0, delta the k-th
    smallest deviation (NaN-free), `deviation(i)` row i's (NaN as +Inf): the rows
    closer than delta, then those at delta in worker order while room is left,
    summed in worker order (`byzjax._numerics._mean_within`'s bits)."""
    # room = k - #closer; a row at delta is taken while fewer than room rows at
    # delta came before it. Counting those rows, not the room left, keeps the
    # count's chain one add a row: a room decremented by the ties it admits
    # chained a compare, a mask and a subtraction from row to row (ALIE's f
    # equal rows tie in most steps).
    room = loop.counter(k)
    for i in range(loop.n):
        room = loop.tally(room, loop.below(deviation(i), delta), -1)
    taken, before = [], loop.counter(0)
    for i in range(loop.n):
        dev = deviation(i)
        at = loop.level(dev, delta)
        tie = loop.both(at, loop.fewer(before, room))
        closer = loop.below(dev, delta)
        taken.append(loop.masked(loop.either(closer, tie), loop.raw(i)))
        before = loop.tally(before, at, 1)
    return _mean_in_order(loop, taken, k)


def mean_around_median_source(n: int, k: int, dtype, **form) -> str:
    """`byzjax._numerics.coordinate_mean_around(x, coordinate_median(x), k)`
    (n <= `NETWORK_MAX_N`; bfloat16 rows widened as XLA's forms widen them):
    the median m and the k-th smallest deviation delta = |x_i - m| (NaN as +Inf)
    off one network, then the rows within delta summed in worker order, ties
    (SPEC T0) while room is left (counts on int32 lanes; AVX2: float32). Where
    the (k+1)-th deviation exceeds delta in all the step's columns (no tie across
    it, the usual case), exactly k are within delta and all are taken: the same
    sum without the counts.

    delta is the least of the larger ends of the windows of k consecutive ranks
    (`_sorting.window_ends`), so only the ranks at the windows' ends and the
    median's are needed: at (100, k = 76) 1,030 compare-exchanges instead of
    the 898 of the median plus 890 of a second network over the deviations.
    `form` as `median_source` takes it."""
    network = _pair_or_new_loop(n, dtype, "mean_around_median", **form)
    ends = window_ends(n, k)
    # No sign of a zero wire shows in the result, so the wires may come off order
    # keys without `zero_sum_rewire`: the deviations |w - m| of the ends and of
    # the rows are +0 for any zero w and m, |m| or |w| where one is not zero,
    # and the sums are of the rows as loaded.
    needed = sorted({*ends, *middle_ranks(n)})
    r = network.network(batcher_pairs(n), needed, keyed=network.keyed)

    def around(loop, values):
        wire: list[str | None] = [None] * n
        for j, v in zip(needed, values, strict=True):
            wire[j] = v
        m = loop.median(wire)

        def distance(v):
            return loop.magnitude(loop.op("sub_ps", v, m))

        def deviation_of(v):
            return loop.deviation(loop.op("sub_ps", v, m))

        def deviation(i):
            return deviation_of(loop.raw(i))

        sorted_deviation = {j: deviation_of(wire[j]) for j in ends}

        def smallest(rank):
            """The (rank + 1)-th smallest deviation, off the windows of rank + 1."""
            least = None
            for a in range(n - rank):
                pair = sorted_deviation[a], sorted_deviation[a + rank]
                end = loop.magnitude_bound("max", *pair)
                least = (
                    end if least is None else loop.magnitude_bound("min", least, end)
                )
            return least

        delta = smallest(k - 1)
        zero = f"{loop.prefix}_setzero_ps()"

        def within_delta():
            return _mean_in_order(
                loop,
                [
                    loop.masked(loop.within(deviation(i), delta), loop.raw(i))
                    for i in range(n)
                ],
                k,
            )

        if k == n:
            return within_delta()

        def in_worker_order():
            return _mean_in_worker_order(loop, k, deviation, delta)

        def within_finite_delta():
            # delta < the (k+1)-th deviation, so finite in every column: a NaN
            # deviation compares false as the +Inf it stands for does, and the masked
            # adds skip the rows out of delta where XLA adds their +0. The totals
            # differ only where a total is zero (-0 kept here, +0 there), so steps
            # with a zero total take XLA's form instead.
            total = None
            for i in range(n):
                within = loop.within(distance(loop.raw(i)), delta)
                if total is None:
                    total = loop.masked(within, loop.raw(i))
                else:
                    total = loop.masked_add(total, within, loop.raw(i))
            nonzero = loop.all_of(loop.compare(total, zero, "_CMP_NEQ_UQ"))
            return loop.branch(nonzero, lambda: loop.mean(total, k), within_delta)

        untied = loop.all_of(loop.compare(smallest(k), delta, "_CMP_GT_OQ"))
        return loop.branch(untied, within_finite_delta, in_worker_order)

    return network.source(network.in_floats(around, [r[j] for j in needed]))


def window_mean_source(
    n: int,
    k: int,
    dtype=jnp.float32,
    width: int | None = None,
    keyed: bool | None = None,
    paired: bool | None = None,
    streamed: bool | None = None,
) -> str:
    """`byzjax._numerics._window_mean` (n <= `NETWORK_MAX_N`, 2k >= n; bfloat16
    rows widened as they load) with the columns it leaves NaN settled as
    `_fix_columns` settles them: where
    a value outside the window is exactly as far from the median as one inside
    (SPEC T0 picks by worker index) or the median is not finite, the
    worker-order form's bits, made in a function that only the steps holding
    such a column call (`_Loop.cold`). The network by min/max above 32 rows, as
    `ranked_rows` has it; `width`, `keyed`, `paired` and `streamed` as
    `_pair_or_new_loop` takes them (on AMD: float32 on order keys,
    `keyed_exchanges`, and bfloat16 on column pairs, `pair_loops`; where keys
    put zeros otherwise than XLA's selects, below 33 rows, `_settled_source`
    settles the signs of zero means).

    Above 32 rows, and for bfloat16 rows, it replaces the general loop
    (`mean_around_median_source`), which has the bits of XLA's form there (the
    general one; the window's sums round otherwise): alternated in one process,
    float32 at (100, 1e6) 20.8-23.9 against 22.6-27.1 ms on Gaussian rows,
    20.1-23.8 against 30.2-37.1 with ALIE's 24 equal rows (equal values tie at
    no cost here); bfloat16 20.9 against 26.2 ms (ALIE 25.1 against 28.7), at
    (25, 1e6) 3.67 against 4.32 (3.91 against 5.34), before its column pairs."""
    loop = _pair_or_new_loop(n, dtype, "window", width, keyed, paired, streamed)

    def window_mean(f, r):
        m = f.median(r)
        zero = f"{f.prefix}_setzero_ps()"
        ends, ties = [], f.value(zero)
        for i in range(n - k):
            up = f.op("sub_ps", r[i + k], m)
            down = f.op("sub_ps", m, r[i])
            ends.append(f.select(f.compare(up, down, "_CMP_LT_OQ"), r[i], r[i + k]))
            tie = f.compare(up, down, "_CMP_EQ_OQ")
            ties = f.op("add_ps", ties, f.masked(tie, up))
        window = [*r[n - k : k], *ends]
        mean = f.mean(f.sum_tree(window), k)
        unsure = f.either(
            f.compare(ties, zero, "_CMP_GT_OQ"),
            f.compare(f.magnitude(m), f.inf, "_CMP_NLT_UQ"),
        )

        def settled(mean, m, *window):
            # delta, the k-th smallest deviation, is the window's largest one;
            # with a non-finite median every deviation is +Inf, so delta is too,
            # as in the general form.
            def deviation_of(v):
                return f.deviation(f.op("sub_ps", v, m))

            delta = functools.reduce(
                lambda a, b: f.magnitude_bound("max", a, b), map(deviation_of, window)
            )
            rows = _mean_in_worker_order(f, k, lambda i: deviation_of(f.raw(i)), delta)
            return [f.select("mask", mean, rows)]

        (mean,) = f.cold(unsure, [mean], settled, [mean, m, *window])
        return mean

    pairs = partition_pairs(n, window_cuts(n, k))
    return _settled_source(loop, pairs, range(n), n > FULL_NETWORK_MAX_N, window_mean)


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
    # The width picks the flags and goes to the kernel, which pads the tail to it.
    width = int(re.search(r"kWidth = (\d+);", source).group(1))
    flags = _BLOCKED_FLAGS if "kBlock" in source else _FLAGS[width]
    path = _build_shared(source, "network", flags, (_HEADER_NAME, _HEADER))
    loop = ctypes.cdll.LoadLibrary(str(path))
    ident = int(hashlib.sha256(source.encode()).hexdigest()[:15], 16)
    address = ctypes.cast(loop.byzjax_network, ctypes.c_void_p).value
    lib.ByzjaxRegisterNetwork(
        ctypes.c_int64(ident), ctypes.c_void_p(address), ctypes.c_int64(width)
    )
    _LOADED[ident] = loop  # the library stays loaded while its id may be called
    return ident


_LOADED: dict[int, ctypes.CDLL] = {}


def network_rule(x: jax.Array, source: str, idx: jax.Array | None = None) -> jax.Array:
    """The generated loop `source` over the rows of a (..., n, d) float32 or
    bfloat16 array, or with `idx` (..., m) int32 over the rows x[idx] (read where
    they lie, indices clamped into [0, n)): (..., d) float32."""
    if idx is None:
        idx = jnp.zeros(x.shape[:-2] + (0,), jnp.int32)
    target = {jnp.float32: "byzjax_network", jnp.bfloat16: "byzjax_network_bf16"}
    out = jax.ShapeDtypeStruct(x.shape[:-2] + x.shape[-1:], jnp.float32)
    call = jax.ffi.ffi_call(target[x.dtype.type], out, vmap_method="broadcast_all")
    return call(x, idx.astype(jnp.int32), id=np.int64(_register(source)))
