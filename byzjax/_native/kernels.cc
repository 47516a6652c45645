// CPU kernels for the reductions XLA:CPU runs far from the hardware's speed
// (measured with jax 0.10.2 on a 2-core AMD EPYC, see docs/performance.md):
//
//   pairwise_sq_dists: D_ij = sum_k (x_ik - x_jk)^2 over an (n, d) array. XLA's
//     YNNPACK GEMM runs the skinny Gram matrix behind it at 5-7 GFLOP/s, and a loop
//     of small products runs on one core. Here the differences are taken directly
//     (no Gram, so no cancellation and no centre), in column blocks, register
//     tiles of 3 x 3 rows, the upper triangle only, and the columns split over
//     threads.
//   row_sq_dists: r_i = sum_k (x_ik - v_k)^2. XLA:CPU streams v once per row (the
//     reduction took 4-5 reads of x at n = 100); here a column block of v stays in
//     L2 while every row passes.
//   row_sq_norms: r_i = sum_k x_ik^2, the same loop without v. XLA's reduction
//     took 2.1-2.6 reads of x (einsum or sum of squares, at (25 | 100, 1e6)).
//
//   step_sq_dists: z' = z (1 - sum w) + sum_i w_i x_i, then r_i = ||x_i - z'||^2,
//     in one read of x (a block of rows summed from memory, then measured from
//     cache): a geometric-median or centered-clipping step, where XLA reads x
//     twice.
//   gram: G_ij = sum_k (x_ik - c_k)(x_jk - c_k) and the rows' squared norms, in
//     one read, for the geometric median's Gram route (its T steps on G): the
//     pairwise kernel's blocks and tiles, products summed in float32 over runs of
//     512 columns and then in float64, a bound its caller checks.
//   row_rule: the mean and the sign majority of a float32 or bfloat16 (n, d)
//     array: XLA:CPU loops over 16-bit elements with scalar code, and its fused
//     loop over 100 rows reads 100 interleaved streams.
//   row_moments: the column means and the sums of squared deviations from
//     them (ALIE's mu and sigma) in one read: XLA's product and fused
//     deviation loop took 5 reads of x at (76, 1e6).
//   mix_rows: out = s (w x) for an (m, n) w, NNM's product (with its broken
//     rows cleaned as they are read) and, sparse, bucketing's means, in one
//     read of x, the output streamed to memory.
//   network: a sorting-network rule over the rows (median, trimmed mean, mean
//     around the median for n <= 32), 8 columns at a time. The loop itself is
//     generated per network and rule by byzjax/_native/networks.py, compiled on
//     first use and registered here by id; this part splits the columns over
//     threads and pads the tail.
//
// The two distance kernels accumulate float32 lanes over one column block (at
// most 8,192 and 32,768 columns) and the blocks in float64. Leading batch
// dimensions (from jax.vmap) are looped over.
// The distance kernels' x may be bfloat16 (all else float32): its rows are
// widened by a shift as they are loaded, so no float32 copy of x exists.
// Non-finite input flows through IEEE arithmetic: a NaN or Inf row gives NaN or
// Inf sums, which the Python side maps to +Inf.
// Where the CPU has AVX-512 (the library is built with -march=native), the Gram
// and pairwise kernels take 16 columns a step in larger register tiles
// (`gram_tile16`, `tile16`; docs/performance.md, session 11); elsewhere AVX2.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <vector>

#ifdef __linux__
#include <sched.h>
#endif

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

// Built as two objects at once (`_build_shared`'s parts, BYZJAX_PART 0 and 1):
// the Gram and row-distance handlers, then the others, 20.6 and 20.9 s to
// compile on the 2-core Xeon against 31-35 s for the whole (the Gram's tiles
// alone took 15). Without BYZJAX_PART, all of them.
#ifdef BYZJAX_PART
#define BYZJAX_IN_PART(p) (BYZJAX_PART == (p))
#else
#define BYZJAX_IN_PART(p) 1
#endif

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

inline v8 load_bf16(const uint16_t* p) {
#if defined(__AVX2__)
  // One load-and-widen instruction; GCC splits the generic form below in two.
  __m128i h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<v8>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
  u16x8 h;
  std::memcpy(&h, p, sizeof(h));
  u32x8 w = __builtin_convertvector(h, u32x8) << 16;
  v8 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
#endif
}

// Eight elements of a row as float32: a bfloat16 (its raw bits) becomes a float32
// by a shift of its bits.
inline v8 load_row(const uint16_t* p) { return load_bf16(p); }
inline v8 load_row(const float* p) { return load8(p); }

// The even (half 0) or odd (half 1) columns of 16 bfloat16 at p as float32: the
// low halves of their 32-bit lanes shifted up, or the high halves masked (a
// distance sums over every column, in any order).
inline v8 bf16_half8(const uint16_t* p, int half) {
  u32x8 w;
  std::memcpy(&w, p, sizeof(w));
  w = half == 0 ? w << 16 : w & 0xFFFF0000u;
  v8 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

// One element, for the column tails.
inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {
  const uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline double hsum(v8 v) {
  double s = 0.0;
  for (int l = 0; l < 8; ++l) s += v[l];
  return s;
}

// Columns per block of the pairwise kernel: about 1 MB of rows. Blocks that fit L2
// (128 KB) were 1.2-1.3x slower at n = 100, 2 and 4 MB no faster; the cause was not
// found (a cheaper horizontal sum per block changed nothing). A whole number of
// the tiles' steps: with AVX-512 the 2,616 columns of n = 100 left every tile 8
// columns in scalar code.
#if defined(__AVX512F__)
constexpr int64_t kBlockStep = 16;
#else
constexpr int64_t kBlockStep = 8;
#endif
int64_t block_columns(int64_t n) {
  int64_t b = (262144 / std::max<int64_t>(n, 1)) / kBlockStep * kBlockStep;
  return std::clamp<int64_t>(b, 64, 8192);
}

// Threads for `work` element-operations: one per 1M, at most the CPUs this
// process may run on. One per 4M before: on the 2-core AMD Zen 3, alternated
// call by call in one process (201-301 rounds, the order switched each round),
// where the count changes: at (25, 1e5) sign majority 0.25 against 0.35-0.36 ms,
// centered clipping 0.47-0.48 against 0.52-0.54; at (10, 2e5) 0.31 against 0.51
// and 0.43 against 0.55 (the median, two threads either way: the same).
int thread_count(double work) {
  int hw = std::max(1u, std::thread::hardware_concurrency());
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) hw = std::max(1, CPU_COUNT(&set));
#endif
  return static_cast<int>(std::clamp<double>(work / 1.0e6, 1.0, hw));
}

// Runs body(t, lo, hi) over [0, d) split into `threads` column ranges (multiples
// of 8 columns, the last takes the tail): on the caller and on threads - 1 tasks
// of XLA's intra-op thread pool, so no thread is created per call and the pool's
// threads work instead of idling beside new ones (alternated with a thread per
// range in three pairs of processes at (25, 1e6), the times were the same:
// Krum 6.92-7.09 ms on threads, 6.97-7.06 on the pool). The caller claims
// ranges too and waits only for ranges another thread has claimed, so a pool
// busy elsewhere cannot deadlock it (jax 0.10.2 ran four independent calls of
// one program one after another, and a caller that only waited did not hang
// there; XLA may run independent thunks at once). A task that starts after the
// caller returned finds no range left.
template <typename Body>
void split_columns(ffi::ThreadPool& pool, int64_t d, int threads, Body body) {
  struct Split {
    std::atomic<int> next{0};
    std::mutex mutex;
    std::condition_variable done;
    int finished = 0;
  };
  const auto split = std::make_shared<Split>();
  const int64_t per = (d / threads + 7) / 8 * 8;
  auto work = [split, &body, d, per, threads] {
    for (int t; (t = split->next.fetch_add(1)) < threads;) {
      const int64_t lo = std::min(d, t * per);
      body(t, lo, t == threads - 1 ? d : std::min(d, (t + 1) * per));
      std::lock_guard<std::mutex> lock(split->mutex);
      if (++split->finished == threads) split->done.notify_one();
    }
  };
  for (int t = 1; t < threads; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(split->mutex);
  split->done.wait(lock, [&] { return split->finished == threads; });
}

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
// The 3 x 3 tile's vector loop over `bytes` bytes of each row, written out: GCC's
// version of the same loop spends 31 instructions per step (two register copies,
// a second index), this one 26; alternated six times at (100, 1e6) on two cores
// the pairwise distances took 117-168 ms (median 125) against 113-146 (median
// 141). The sums are the same operations in the same order, bit for bit.
inline void tile33_asm(const float* a0, const float* a1, const float* a2,
                       const float* b0, const float* b1, const float* b2,
                       int64_t bytes, v8 (*s)[3]) {
  // s_m accumulates row a_(m % 3) against row b_(m / 3): s[m % 3][m / 3].
  v8 s0 = s[0][0], s1 = s[1][0], s2 = s[2][0], s3 = s[0][1], s4 = s[1][1],
     s5 = s[2][1], s6 = s[0][2], s7 = s[1][2], s8 = s[2][2];
  int64_t k = 0;
  asm volatile(
      "1:\n\t"
      "vmovups (%[a0],%[k]), %%ymm9\n\t"
      "vmovups (%[a1],%[k]), %%ymm10\n\t"
      "vmovups (%[a2],%[k]), %%ymm11\n\t"
      "vmovups (%[b0],%[k]), %%ymm12\n\t"
      "vsubps %%ymm12, %%ymm9, %%ymm13\n\t"
      "vfmadd231ps %%ymm13, %%ymm13, %[s0]\n\t"
      "vsubps %%ymm12, %%ymm10, %%ymm14\n\t"
      "vfmadd231ps %%ymm14, %%ymm14, %[s1]\n\t"
      "vsubps %%ymm12, %%ymm11, %%ymm15\n\t"
      "vfmadd231ps %%ymm15, %%ymm15, %[s2]\n\t"
      "vmovups (%[b1],%[k]), %%ymm12\n\t"
      "vsubps %%ymm12, %%ymm9, %%ymm13\n\t"
      "vfmadd231ps %%ymm13, %%ymm13, %[s3]\n\t"
      "vsubps %%ymm12, %%ymm10, %%ymm14\n\t"
      "vfmadd231ps %%ymm14, %%ymm14, %[s4]\n\t"
      "vsubps %%ymm12, %%ymm11, %%ymm15\n\t"
      "vfmadd231ps %%ymm15, %%ymm15, %[s5]\n\t"
      "vmovups (%[b2],%[k]), %%ymm12\n\t"
      "vsubps %%ymm12, %%ymm9, %%ymm13\n\t"
      "vfmadd231ps %%ymm13, %%ymm13, %[s6]\n\t"
      "vsubps %%ymm12, %%ymm10, %%ymm14\n\t"
      "vfmadd231ps %%ymm14, %%ymm14, %[s7]\n\t"
      "vsubps %%ymm12, %%ymm11, %%ymm15\n\t"
      "vfmadd231ps %%ymm15, %%ymm15, %[s8]\n\t"
      "addq $32, %[k]\n\t"
      "cmpq %[n], %[k]\n\t"
      "jl 1b\n\t"
      : [k] "+r"(k), [s0] "+x"(s0), [s1] "+x"(s1), [s2] "+x"(s2), [s3] "+x"(s3),
        [s4] "+x"(s4), [s5] "+x"(s5), [s6] "+x"(s6), [s7] "+x"(s7), [s8] "+x"(s8)
      : [a0] "r"(a0), [a1] "r"(a1), [a2] "r"(a2), [b0] "r"(b0), [b1] "r"(b1),
        [b2] "r"(b2), [n] "r"(bytes)
      : "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc",
        "memory");
  s[0][0] = s0, s[1][0] = s1, s[2][0] = s2, s[0][1] = s3, s[1][1] = s4;
  s[2][1] = s5, s[0][2] = s6, s[1][2] = s7, s[2][2] = s8;
}
#endif

// acc[i][j] += sum over columns [lo, hi) of (x_i - x_j)^2 for the R x C tile of
// rows i0.. and j0..: R rows in registers, the C rows streamed.
template <typename T, int R, int C>
void tile(const T* x, int64_t d, int64_t n, int64_t i0, int64_t j0,
          int64_t lo, int64_t hi, double* acc) {
  v8 s[R][C] = {};
  int64_t k = lo;
#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float> && R == 3 && C == 3) {  // bfloat16: below
    const int64_t len = (hi - lo) / 8 * 8;
    if (len > 0) {
      tile33_asm(x + i0 * d + lo, x + (i0 + 1) * d + lo, x + (i0 + 2) * d + lo,
                 x + j0 * d + lo, x + (j0 + 1) * d + lo, x + (j0 + 2) * d + lo,
                 len * 4, s);
    }
    k = lo + len;
  }
#endif
  if constexpr (std::is_same_v<T, uint16_t>) {
    // bfloat16: 16 columns a load, as their even then odd columns (`tile16`).
    for (; k + 16 <= hi; k += 16) {
      for (int half = 0; half < 2; ++half) {
        v8 a[R];
        for (int r = 0; r < R; ++r) a[r] = bf16_half8(x + (i0 + r) * d + k, half);
        for (int c = 0; c < C; ++c) {
          v8 b = bf16_half8(x + (j0 + c) * d + k, half);
#if defined(__x86_64__)
          asm("" : "+x"(b));
#endif
          for (int r = 0; r < R; ++r) {
            v8 t = a[r] - b;
            s[r][c] += t * t;
          }
        }
      }
    }
  }
  for (; k + 8 <= hi; k += 8) {
    v8 a[R];
    for (int r = 0; r < R; ++r) a[r] = load_row(x + (i0 + r) * d + k);
    for (int c = 0; c < C; ++c) {
      v8 b = load_row(x + (j0 + c) * d + k);
      // Keeps b in a register: GCC otherwise folds its load into every
      // subtraction, loading it R times (the loop was load-bound).
#if defined(__x86_64__)
      asm("" : "+x"(b));
#endif
      for (int r = 0; r < R; ++r) {
        v8 t = a[r] - b;
        s[r][c] += t * t;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      double tail = 0.0;
      for (int64_t j = k; j < hi; ++j) {
        double t = static_cast<double>(to_float(x[(i0 + r) * d + j])) -
                   to_float(x[(j0 + c) * d + j]);
        tail += t * t;
      }
      acc[(i0 + r) * n + j0 + c] += hsum(s[r][c]) + tail;
    }
  }
}

#if defined(__AVX512F__)
// Sixteen elements of a row as float32 (AVX-512, where the CPU has it: the library
// is built with -march=native).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The even (half 0) or odd (half 1) columns of 32 bfloat16 at p as float32: the
// low halves of their 32-bit lanes shifted up, or the high halves masked.
inline __m512 bf16_half16(const uint16_t* p, int half) {
  const __m512i b = _mm512_loadu_si512(p);
  return _mm512_castsi512_ps(half == 0 ? _mm512_slli_epi32(b, 16)
                                       : _mm512_and_si512(b, _mm512_set1_epi32(
                                                                 static_cast<int>(0xFFFF0000u))));
}

// The 16 float32 lanes of v summed pairwise into 8 float64 lanes.
inline __m512d widened(__m512 v) {
  return _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)),
                       _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)));
}

// How far ahead the AVX-512 tiles prefetch each streamed row into L1: 128 columns
// (512 bytes of float32).
// The tiles read their rows from L2 (a block is about 1 MB); the pairwise and
// Gram kernels took 5-10 % less with it (alternated in one program: (100, 1e6)
// 118-129 against 126-139 ms and 113-133 against 120-137 ms, (25, 1e6) 8.6-9.0
// against 9.6-10.2 ms and 9.6-10.6 against 10.5-11.3 ms; prefetching the held
// rows too was no faster).
constexpr int64_t kAhead = 128;

// The AVX-512 form of `tile`, 16 columns a step: twice the lanes of each
// subtraction and multiply-add, and 32 registers for a 5 x 4 tile (20
// accumulators, 5 held rows, one streamed, one difference). The lanes are
// widened to float64 before their sum.
template <typename T, int R, int C>
void tile16(const T* x, int64_t d, int64_t n, int64_t i0, int64_t j0, int64_t lo,
            int64_t hi, double* acc) {
  __m512 s[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) s[r][c] = _mm512_setzero_ps();
  int64_t k = lo;
  if constexpr (std::is_same_v<T, uint16_t>) {
    // bfloat16: 32 columns a load, as their even and odd columns in turn (a
    // shift, a mask; the order of the columns is free in a sum), where widening
    // 16 at a time took two more instructions a load (session 33).
    for (; k + 32 <= hi; k += 32) {
      for (int half = 0; half < 2; ++half) {
        __m512 a[R];
        for (int r = 0; r < R; ++r) a[r] = bf16_half16(x + (i0 + r) * d + k, half);
        for (int c = 0; c < C; ++c) {
          const __m512 b = bf16_half16(x + (j0 + c) * d + k, half);
          if (half == 0) {
            _mm_prefetch(reinterpret_cast<const char*>(x + (j0 + c) * d + k + kAhead),
                         _MM_HINT_T0);
          }
          for (int r = 0; r < R; ++r) {
            const __m512 t = _mm512_sub_ps(a[r], b);
            s[r][c] = _mm512_fmadd_ps(t, t, s[r][c]);
          }
        }
      }
    }
  }
  for (; k + 16 <= hi; k += 16) {
    __m512 a[R];
    for (int r = 0; r < R; ++r) a[r] = load16(x + (i0 + r) * d + k);
    for (int c = 0; c < C; ++c) {
      const __m512 b = load16(x + (j0 + c) * d + k);
      _mm_prefetch(reinterpret_cast<const char*>(x + (j0 + c) * d + k + kAhead),
                   _MM_HINT_T0);
      for (int r = 0; r < R; ++r) {
        const __m512 t = _mm512_sub_ps(a[r], b);
        s[r][c] = _mm512_fmadd_ps(t, t, s[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      double total = _mm512_reduce_add_pd(widened(s[r][c]));
      for (int64_t j = k; j < hi; ++j) {
        double t = static_cast<double>(to_float(x[(i0 + r) * d + j])) -
                   to_float(x[(j0 + c) * d + j]);
        total += t * t;
      }
      acc[(i0 + r) * n + j0 + c] += total;
    }
  }
}
// 5 x 4 against 4 x 4 and the AVX2 3 x 3 tile, alternated by process on the
// 2-core Xeon (pairwise distances): at (25, 1e6) 8.1-8.9, 8.6-8.7 and 10.4-13.9
// ms, at (100, 1e6) 110-119, 117-178 and 134 ms.
constexpr int kDistRows = 5, kDistCols = 4;
#define BYZJAX_DISTANCE_TILE tile16
#else
#define BYZJAX_DISTANCE_TILE tile
#endif

// Register tile: 3 rows held, 3 streamed (9 accumulators + 3 + 1 + 1 temporary of
// AVX2's 16 registers). 3 x 4, 2 x 4, 2 x 5 and 4 x 2 were as fast or slower at
// n = 25 and 100. A Gram form (FMAs only) ran at the same speed, so the FP ports
// are not the limit: with the rows in L1 the loop issues ~5 instructions per
// cycle (of Zen 3's 6), and on the data it runs at ~50-60 % of that.
constexpr int kRows = 3, kCols = 3;
#if !defined(__AVX512F__)
constexpr int kDistRows = kRows, kDistCols = kCols;
#endif

// Runs kernel.run<R', C'>(i0, j0, lo, hi) for a tile of rows x cols rows (at most
// R x C): the tiles at the edges of the triangle are smaller.
template <int R, int C, typename Kernel>
void run_tile(const Kernel& kernel, int rows, int cols, int64_t i0, int64_t j0,
              int64_t lo, int64_t hi) {
  if constexpr (R > 1) {
    if (rows < R) return run_tile<R - 1, C>(kernel, rows, cols, i0, j0, lo, hi);
  }
  if constexpr (C > 1) {
    if (cols < C) return run_tile<R, C - 1>(kernel, rows, cols, i0, j0, lo, hi);
  }
  kernel.template run<R, C>(i0, j0, lo, hi);
}

template <typename T>
struct DistanceTiles {
  const T* x;
  int64_t d, n;
  double* acc;
  template <int R, int C>
  void run(int64_t i0, int64_t j0, int64_t lo, int64_t hi) const {
    BYZJAX_DISTANCE_TILE<T, R, C>(x, d, n, i0, j0, lo, hi, acc);
  }
};

// Upper triangle (i < j) of D for one (n, d) matrix, columns [lo, hi), into acc.
template <typename T>
void pairwise_range(const T* x, int64_t n, int64_t d, int64_t lo, int64_t hi,
                    double* acc) {
  const int64_t block = block_columns(n);
  for (int64_t k0 = lo; k0 < hi; k0 += block) {
    const int64_t k1 = std::min(hi, k0 + block);
    for (int64_t i0 = 0; i0 < n - 1; i0 += kDistRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kDistRows, n - 1 - i0));
      // Columns from i0 + 1 cover every j > i of the tile's rows; the pairs with
      // j <= i land on or below the diagonal and are never read.
      for (int64_t j0 = i0 + 1; j0 < n; j0 += kDistCols) {
        const int cols = static_cast<int>(std::min<int64_t>(kDistCols, n - j0));
        run_tile<kDistRows, kDistCols>(DistanceTiles<T>{x, d, n, acc}, rows, cols, i0, j0,
                               k0, k1);
      }
    }
  }
}

// The shape of a kernel's (..., n, d) x, its leading dimensions folded into
// `batch` (from jax.vmap); `ok` is false when x has fewer than two dimensions.
struct Shape {
  int64_t n = 0, d = 0, batch = 0;
  bool ok = false;
};

template <ffi::DataType DT>
Shape shape_of(const ffi::Buffer<DT>& x) {
  auto dims = x.dimensions();
  if (dims.size() < 2) return {};
  const int64_t n = dims[dims.size() - 2], d = dims[dims.size() - 1];
  return {n, d, n * d == 0 ? 0 : static_cast<int64_t>(x.element_count()) / (n * d),
          true};
}

template <ffi::DataType DT>
ffi::Error PairwiseSqDistsImpl(ffi::ThreadPool pool, ffi::Buffer<DT> x,
                               ffi::ResultBuffer<ffi::F32> out) {
  const Shape shape = shape_of(x);
  if (!shape.ok) {
    return ffi::Error::InvalidArgument("pairwise_sq_dists: x must be (..., n, d)");
  }
  const int64_t n = shape.n, d = shape.d, batch = shape.batch;
  using T = ffi::NativeType<DT>;
  const T* xs = x.typed_data();
  float* os = out->typed_data();
  const int threads = thread_count(0.5 * n * n * static_cast<double>(d));
  std::vector<std::vector<double>> acc(threads, std::vector<double>(n * n));
  for (int64_t b = 0; b < batch; ++b) {
    const T* xb = xs + b * n * d;
    for (auto& a : acc) std::fill(a.begin(), a.end(), 0.0);
    split_columns(pool, d, threads, [&](int t, int64_t lo, int64_t hi) {
      pairwise_range(xb, n, d, lo, hi, acc[t].data());
    });
    float* ob = os + b * n * n;
    for (int64_t i = 0; i < n; ++i) {
      ob[i * n + i] = 0.0f;
      for (int64_t j = i + 1; j < n; ++j) {
        double s = 0.0;
        for (auto& a : acc) s += a[i * n + j];
        ob[i * n + j] = ob[j * n + i] = static_cast<float>(s);
      }
    }
  }
  return ffi::Error::Success();
}

// The Gram matrix of the rows centred on a vector c, and the rows' squared norms,
// in one read of x:
//   G_ij = sum_k (x_ik - c_k)(x_jk - c_k),   q_i = sum_k x_ik^2.
// Without c (an empty operand), G is the plain Gram matrix and q its diagonal.
// Products are summed in float32 lanes over runs of kGramRun columns (64 products
// a lane: 512 columns of AVX2's 8 lanes, 1,024 of AVX-512's 16), then in
// float64, so that the error of an entry is at most about (64 + 3) float32
// roundings of sum_k |(x_ik - c_k)(x_jk - c_k)|: the geometric median's Gram
// route (byzjax/aggregators/_geometric.py) bounds its error with that. (With
// AVX-512, 1,024 columns instead of 512 halve the widening of the 25
// accumulators; alternated in one program at (100, 1e6): 123-128 against
// 129-133 ms.)
#if defined(__AVX512F__)
constexpr int64_t kGramRun = 1024;
#else
constexpr int64_t kGramRun = 512;
#endif

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
// The 3 x 3 Gram tile's vector loop over `bytes` bytes of each row, c subtracted
// when given: the six rows and c loaded once a step, the nine multiply-adds from
// registers. GCC's loop folded the held rows' loads into the multiply-adds (12
// loads a step, load-bound: 8.4 ms at (25, 1e6)), and pinning them in registers
// made it spill its accumulators.
template <bool Centred>
inline void gram33_asm(const float* a0, const float* a1, const float* a2,
                       const float* b0, const float* b1, const float* b2,
                       const float* c, int64_t bytes, v8 (*s)[3]) {
  v8 s0 = s[0][0], s1 = s[1][0], s2 = s[2][0], s3 = s[0][1], s4 = s[1][1],
     s5 = s[2][1], s6 = s[0][2], s7 = s[1][2], s8 = s[2][2];
  int64_t k = 0;
#define BYZJAX_GRAM_COLUMN(b, t0, t1, t2)          \
  "vmovups (%[" b "],%[k]), %%ymm12\n\t"           \
  CENTRE("%%ymm12")                                \
  "vfmadd231ps %%ymm12, %%ymm9, %[" t0 "]\n\t"     \
  "vfmadd231ps %%ymm12, %%ymm10, %[" t1 "]\n\t"    \
  "vfmadd231ps %%ymm12, %%ymm11, %[" t2 "]\n\t"
#define BYZJAX_GRAM_LOOP                                                     \
  asm volatile(                                                              \
      "1:\n\t"                                                               \
      LOAD_CENTRE                                                            \
      "vmovups (%[a0],%[k]), %%ymm9\n\t" CENTRE("%%ymm9")                    \
      "vmovups (%[a1],%[k]), %%ymm10\n\t" CENTRE("%%ymm10")                  \
      "vmovups (%[a2],%[k]), %%ymm11\n\t" CENTRE("%%ymm11")                  \
      BYZJAX_GRAM_COLUMN("b0", "s0", "s1", "s2")                             \
      BYZJAX_GRAM_COLUMN("b1", "s3", "s4", "s5")                             \
      BYZJAX_GRAM_COLUMN("b2", "s6", "s7", "s8")                             \
      "addq $32, %[k]\n\t"                                                   \
      "cmpq %[n], %[k]\n\t"                                                  \
      "jl 1b\n\t"                                                            \
      : [k] "+r"(k), [s0] "+x"(s0), [s1] "+x"(s1), [s2] "+x"(s2),            \
        [s3] "+x"(s3), [s4] "+x"(s4), [s5] "+x"(s5), [s6] "+x"(s6),          \
        [s7] "+x"(s7), [s8] "+x"(s8)                                         \
      : [a0] "r"(a0), [a1] "r"(a1), [a2] "r"(a2), [b0] "r"(b0), [b1] "r"(b1), \
        [b2] "r"(b2), [c] "r"(c), [n] "r"(bytes)                             \
      : "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "cc", "memory")
  if constexpr (Centred) {
#define LOAD_CENTRE "vmovups (%[c],%[k]), %%ymm13\n\t"
#define CENTRE(r) "vsubps %%ymm13, " r ", " r "\n\t"
    BYZJAX_GRAM_LOOP;
#undef LOAD_CENTRE
#undef CENTRE
  } else {
#define LOAD_CENTRE
#define CENTRE(r)
    BYZJAX_GRAM_LOOP;
#undef LOAD_CENTRE
#undef CENTRE
  }
#undef BYZJAX_GRAM_LOOP
#undef BYZJAX_GRAM_COLUMN
  s[0][0] = s0, s[1][0] = s1, s[2][0] = s2, s[0][1] = s3, s[1][1] = s4;
  s[2][1] = s5, s[0][2] = s6, s[1][2] = s7, s[2][2] = s8;
}
#endif

typedef double v4d __attribute__((vector_size(32)));

// acc[(i0 + r) * stride + j0 + j] += sum over columns [lo, hi) of
// (x_(i0+r) - c)(x_(j0+j) - c) for the R x C tile (c = 0 unless Centred).
template <typename T, int R, int C, bool Centred>
void gram_tile(const T* x, const float* c, int64_t d, int64_t stride, int64_t i0,
               int64_t j0, int64_t lo, int64_t hi, double* acc) {
  v4d wide[R][C][2] = {};
  const int64_t end = lo + (hi - lo) / 8 * 8;
  for (int64_t r0 = lo; r0 < end; r0 += kGramRun) {
    const int64_t r1 = std::min(end, r0 + kGramRun);
    v8 s[R][C] = {};
    int64_t k = r0;
#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
    if constexpr (std::is_same_v<T, float> && R == 3 && C == 3) {  // bfloat16: below
      gram33_asm<Centred>(x + i0 * d + r0, x + (i0 + 1) * d + r0,
                          x + (i0 + 2) * d + r0, x + j0 * d + r0,
                          x + (j0 + 1) * d + r0, x + (j0 + 2) * d + r0,
                          Centred ? c + r0 : nullptr, (r1 - r0) * 4, s);
      k = r1;
    }
#endif
    for (; k < r1; k += 8) {
      v8 a[R];
      for (int r = 0; r < R; ++r) a[r] = load_row(x + (i0 + r) * d + k);
      if constexpr (Centred) {
        const v8 ck = load8(c + k);
        for (int r = 0; r < R; ++r) a[r] -= ck;
      }
      for (int j = 0; j < C; ++j) {
        v8 b = load_row(x + (j0 + j) * d + k);
        if constexpr (Centred) b -= load8(c + k);
        for (int r = 0; r < R; ++r) s[r][j] += a[r] * b;
      }
    }
    // The run's lanes into float64 lanes: a run's rounding stays within it.
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < C; ++j) {
        wide[r][j][0] += __builtin_convertvector(
            __builtin_shufflevector(s[r][j], s[r][j], 0, 1, 2, 3), v4d);
        wide[r][j][1] += __builtin_convertvector(
            __builtin_shufflevector(s[r][j], s[r][j], 4, 5, 6, 7), v4d);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < C; ++j) {
      double total = 0.0;
      for (int l = 0; l < 4; ++l) total += wide[r][j][0][l] + wide[r][j][1][l];
      for (int64_t t = end; t < hi; ++t) {
        const double ct = Centred ? c[t] : 0.0;
        total += (to_float(x[(i0 + r) * d + t]) - ct) *
                 (to_float(x[(j0 + j) * d + t]) - ct);
      }
      acc[(i0 + r) * stride + j0 + j] += total;
    }
  }
}

#if defined(__AVX512F__)
// The AVX-512 form of gram_tile, 16 columns a step, where the CPU has it (the
// library is built with -march=native): twice the lanes of each multiply-add
// and 32 registers, room for a 5 x 5 tile. Each lane sums 64 products a run, as
// in AVX2, within `gram_error`'s bound.

//
// A tile on the diagonal (`Diagonal`: i0 == j0, R == C) takes its columns' rows
// from the R rows it holds and makes the upper triangle alone: R(R + 1)/2
// multiply-adds a step for R loads, where the square tile made R^2 for 2R (at
// n = 25, 325 products a step for 375, 125 loads for 150). The same products in
// the same order: the same bits.
template <typename T, int R, int C, bool Centred, bool Diagonal = false>
void gram_tile16(const T* x, const float* c, int64_t d, int64_t stride, int64_t i0,
                 int64_t j0, int64_t lo, int64_t hi, double* acc) {
  static_assert(!Diagonal || R == C, "a diagonal tile is square");
  // Whether the tile makes G_(i0 + r)(j0 + j): all of it, or its upper triangle.
  constexpr auto made = [](int r, int j) { return !Diagonal || j >= r; };
  // A centred diagonal tile also sums its rows' uncentred squares, q_i, from the
  // rows as loaded (acc[stride * stride + i]): 5 multiply-adds a step beside
  // its 15, where a 1 x 1 tile per row over the block from cache waited on one
  // chain's latency a step. The same products in the same order as that tile's:
  // the same bits. Alternated call by call in one process (session 27), the
  // centred Gram matrix at (25, 1e6) took 7.15 and 7.02 against 7.97 and 7.55 ms,
  // at (25, 1e5) 0.93 against 1.04 ms; at (100, 1e6) the same (67-69 ms).
  constexpr bool kSquares = Centred && Diagonal;
  __m512d wide[R][C], wide_q[R];
  for (int r = 0; r < R; ++r) {
    wide_q[r] = _mm512_setzero_pd();
    for (int j = 0; j < C; ++j) wide[r][j] = _mm512_setzero_pd();
  }
  const int64_t end = lo + (hi - lo) / 16 * 16;
  for (int64_t r0 = lo; r0 < end; r0 += kGramRun) {
    const int64_t r1 = std::min(end, r0 + kGramRun);
    __m512 s[R][C], q[R];
    for (int r = 0; r < R; ++r) {
      q[r] = _mm512_setzero_ps();
      for (int j = 0; j < C; ++j) s[r][j] = _mm512_setzero_ps();
    }
    for (int64_t k = r0; k < r1; k += 16) {
      __m512 a[R];
      for (int r = 0; r < R; ++r) a[r] = load16(x + (i0 + r) * d + k);
      if constexpr (kSquares) {
        for (int r = 0; r < R; ++r) q[r] = _mm512_fmadd_ps(a[r], a[r], q[r]);
      }
      if constexpr (Centred) {
        const __m512 ck = _mm512_loadu_ps(c + k);
        for (int r = 0; r < R; ++r) a[r] = _mm512_sub_ps(a[r], ck);
      }
      for (int j = 0; j < C; ++j) {
        // The rows are prefetched as they are streamed: a diagonal tile's as it
        // holds them.
        _mm_prefetch(reinterpret_cast<const char*>(x + (j0 + j) * d + k + kAhead),
                     _MM_HINT_T0);
        __m512 b;
        if constexpr (Diagonal) {
          b = a[j];
        } else {
          b = load16(x + (j0 + j) * d + k);
          if constexpr (Centred) b = _mm512_sub_ps(b, _mm512_loadu_ps(c + k));
        }
        for (int r = 0; r < R; ++r) {
          if (made(r, j)) s[r][j] = _mm512_fmadd_ps(a[r], b, s[r][j]);
        }
      }
    }
    // The run's lanes into float64 lanes: a run's rounding stays within it.
    for (int r = 0; r < R; ++r) {
      if constexpr (kSquares) wide_q[r] = _mm512_add_pd(wide_q[r], widened(q[r]));
      for (int j = 0; j < C; ++j) {
        if (made(r, j)) wide[r][j] = _mm512_add_pd(wide[r][j], widened(s[r][j]));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    if constexpr (kSquares) {
      double total = _mm512_reduce_add_pd(wide_q[r]);
      for (int64_t t = end; t < hi; ++t) {
        const double v = to_float(x[(i0 + r) * d + t]);
        total += v * v;
      }
      acc[stride * stride + i0 + r] += total;
    }
    for (int j = 0; j < C; ++j) {
      if (!made(r, j)) continue;
      double total = _mm512_reduce_add_pd(wide[r][j]);
      for (int64_t t = end; t < hi; ++t) {
        const double ct = Centred ? c[t] : 0.0;
        total += (to_float(x[(i0 + r) * d + t]) - ct) *
                 (to_float(x[(j0 + j) * d + t]) - ct);
      }
      acc[(i0 + r) * stride + j0 + j] += total;
    }
  }
}
// 5 x 5 (25 accumulators, 5 held rows, one streamed, the centre: 32 registers)
// against 4 x 4, alternated by process at (25, 1e6) and (100, 1e6) on the 2-core
// Xeon: 7.3-7.9 against 8.7-8.8 ms, and 99-107 against 113-114 ms (the AVX2 3 x 3
// tile: 11.5 ms at (25, 1e6)).
constexpr int kGramRows = 5, kGramCols = 5;
#define BYZJAX_GRAM_TILE gram_tile16
#else
constexpr int kGramRows = kRows, kGramCols = kCols;
#define BYZJAX_GRAM_TILE gram_tile
#endif

template <typename T, bool Centred>
struct GramTiles {
  const T* x;
  const float* c;
  int64_t d, n;
  double* acc;
  template <int R, int C>
  void run(int64_t i0, int64_t j0, int64_t lo, int64_t hi) const {
#if defined(__AVX512F__)
    if constexpr (R == C) {
      if (i0 == j0) {
        return gram_tile16<T, R, C, Centred, true>(x, c, d, n, i0, j0, lo, hi, acc);
      }
    }
#endif
    BYZJAX_GRAM_TILE<T, R, C, Centred>(x, c, d, n, i0, j0, lo, hi, acc);
  }
};

// Columns [lo, hi) of G (upper triangle and diagonal, into acc[0, n*n)) and, when
// centred, of q (into acc[n*n, n*n + n)).
template <typename T, bool Centred>
void gram_range(const T* x, const float* c, int64_t n, int64_t d, int64_t lo,
                int64_t hi, double* acc) {
  const int64_t block = block_columns(n);
  const GramTiles<T, Centred> tiles{x, c, d, n, acc};
  for (int64_t k0 = lo; k0 < hi; k0 += block) {
    const int64_t k1 = std::min(hi, k0 + block);
    for (int64_t i0 = 0; i0 < n; i0 += kGramRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kGramRows, n - i0));
      for (int64_t j0 = i0; j0 < n; j0 += kGramCols) {
        const int cols = static_cast<int>(std::min<int64_t>(kGramCols, n - j0));
        run_tile<kGramRows, kGramCols>(tiles, rows, cols, i0, j0, k0, k1);
      }
    }
#if !defined(__AVX512F__)  // the AVX-512 diagonal tiles sum them as they go
    if constexpr (Centred) {
      // The uncentred squared norms, from the block while it is in cache (a
      // 1 x 1 tile with stride 0 adds into acc[n * n + i]).
      for (int64_t i = 0; i < n; ++i) {
        BYZJAX_GRAM_TILE<T, 1, 1, false>(x, nullptr, d, 0, i, i, k0, k1, acc + n * n);
      }
    }
#endif
  }
}
#undef BYZJAX_GRAM_TILE

template <ffi::DataType DT>
ffi::Error GramImpl(ffi::ThreadPool pool, ffi::Buffer<DT> x,
                    ffi::Buffer<ffi::F32> c, ffi::ResultBuffer<ffi::F32> gram,
                    ffi::ResultBuffer<ffi::F32> sq) {
  const Shape shape = shape_of(x);
  if (!shape.ok) return ffi::Error::InvalidArgument("gram: x must be (..., n, d)");
  const int64_t n = shape.n, d = shape.d, batch = shape.batch;
  const bool centred = c.element_count() != 0;
  if (centred && c.element_count() * n != x.element_count()) {
    return ffi::Error::InvalidArgument("gram: c must be (..., d) or empty");
  }
  using T = ffi::NativeType<DT>;
  const int threads = thread_count(0.5 * n * n * static_cast<double>(d));
  const int64_t size = n * n + n;
  std::vector<std::vector<double>> acc(threads, std::vector<double>(size));
  for (int64_t b = 0; b < batch; ++b) {
    const T* xb = x.typed_data() + b * n * d;
    const float* cb = centred ? c.typed_data() + b * d : nullptr;
    for (auto& a : acc) std::fill(a.begin(), a.end(), 0.0);
    split_columns(pool, d, threads, [&](int t, int64_t lo, int64_t hi) {
      if (centred) {
        gram_range<T, true>(xb, cb, n, d, lo, hi, acc[t].data());
      } else {
        gram_range<T, false>(xb, cb, n, d, lo, hi, acc[t].data());
      }
    });
    float* gb = gram->typed_data() + b * n * n;
    float* qb = sq->typed_data() + b * n;
    auto total = [&](int64_t e) {
      double s = 0.0;
      for (auto& a : acc) s += a[e];
      return s;
    };
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = i; j < n; ++j) {
        gb[i * n + j] = gb[j * n + i] = static_cast<float>(total(i * n + j));
      }
      qb[i] = centred ? static_cast<float>(total(n * n + i)) : gb[i * n + i];
    }
  }
  return ffi::Error::Success();
}

// Columns of each row read in one run by the row kernels where nothing is to stay
// in cache but v (128 KB of it, in L2): runs the prefetchers stream. At (25, 1e6):
// 512 columns took 7.2 ms, 32,768 5.3 ms, one read of x 4.9 ms; at n = 100: 28.3,
// 21.3 and 16.7 ms.
constexpr int64_t kRunColumns = 32768;

// Rows read at once, interleaved, by `row_range`: four streams in flight on each
// core instead of one. Alternated with `w @ x` (one read) on the 2-core Zen 4,
// three processes each way (session 23), the distances of (25 | 100, 1e6) took
// 0.96-1.08 | 1.00-1.02 reads against 1.18-1.24 | 1.21-1.34 one row at a time;
// two rows 1.02 | 1.06, eight 1.18 | 1.06 (one process each).
constexpr int kRowStreams = 4;

// acc[r] += sum over columns [k0, k1) of (x_r - v)^2, or of x_r^2 where v is null,
// for the R rows from x (a stride of d), interleaved: R streams of each core in
// flight, each row's sum in its own float32 lanes in column order (the bits of one
// row at a time), float64 across blocks.
template <typename T, int R>
void row_block(const T* x, const float* v, int64_t d, int64_t k0, int64_t k1,
               double* acc) {
  v8 s0[R] = {}, s1[R] = {};
  int64_t k = k0;
  for (; k + 16 <= k1; k += 16) {
    const v8 v0 = v ? load8(v + k) : v8{}, v1 = v ? load8(v + k + 8) : v8{};
    for (int r = 0; r < R; ++r) {
      v8 t0 = load_row(x + r * d + k) - v0;
      v8 t1 = load_row(x + r * d + k + 8) - v1;
      s0[r] += t0 * t0;
      s1[r] += t1 * t1;
    }
  }
  for (int r = 0; r < R; ++r) {
    double tail = 0.0;
    for (int64_t j = k; j < k1; ++j) {
      double t = static_cast<double>(to_float(x[r * d + j])) - (v ? v[j] : 0.0f);
      tail += t * t;
    }
    acc[r] += hsum(s0[r] + s1[r]) + tail;
  }
}

// r_i += sum over columns [lo, hi) of (x_i - v)^2 for every row, block by block;
// v null: of x_i^2 (the norms).
template <typename T>
void row_range(const T* x, const float* v, int64_t n, int64_t d, int64_t lo,
               int64_t hi, double* acc) {
  for (int64_t k0 = lo; k0 < hi; k0 += kRunColumns) {
    const int64_t k1 = std::min(hi, k0 + kRunColumns);
    int64_t i = 0;
    for (; i + kRowStreams <= n; i += kRowStreams) {
      row_block<T, kRowStreams>(x + i * d, v, d, k0, k1, acc + i);
    }
    for (; i < n; ++i) row_block<T, 1>(x + i * d, v, d, k0, k1, acc + i);
  }
}

// Per-row sums over a column split: body(t, lo, hi, acc) adds thread t's columns
// [lo, hi) into its float64 sums acc[0..n); out[i] gets the threads' total.
template <typename Body>
void row_sums(ffi::ThreadPool& pool, int64_t n, int64_t d, int threads, float* out,
              Body body) {
  std::vector<std::vector<double>> acc(threads, std::vector<double>(n, 0.0));
  split_columns(pool, d, threads, [&](int t, int64_t lo, int64_t hi) {
    body(t, lo, hi, acc[t].data());
  });
  for (int64_t i = 0; i < n; ++i) {
    double s = 0.0;
    for (auto& a : acc) s += a[i];
    out[i] = static_cast<float>(s);
  }
}

// The row sums of (x_i - v)^2, or of x_i^2 where v is null (`RowSqNormsImpl`).
template <ffi::DataType DT>
ffi::Error RowSums(ffi::ThreadPool& pool, ffi::Buffer<DT>& x, const float* v,
                   int64_t v_count, ffi::ResultBuffer<ffi::F32>& out) {
  const Shape shape = shape_of(x);
  if (!shape.ok) {
    return ffi::Error::InvalidArgument("row_sq_dists: x must be (..., n, d)");
  }
  const int64_t n = shape.n, d = shape.d, batch = shape.batch;
  if (v != nullptr && v_count * n != x.element_count()) {
    return ffi::Error::InvalidArgument("row_sq_dists: v must be (..., d)");
  }
  const int threads = thread_count(static_cast<double>(n) * d);
  using T = ffi::NativeType<DT>;
  for (int64_t b = 0; b < batch; ++b) {
    const T* xb = x.typed_data() + b * n * d;
    const float* vb = v == nullptr ? nullptr : v + b * d;
    row_sums(pool, n, d, threads, out->typed_data() + b * n,
             [&](int, int64_t lo, int64_t hi, double* acc) {
               row_range(xb, vb, n, d, lo, hi, acc);
             });
  }
  return ffi::Error::Success();
}

template <ffi::DataType DT>
ffi::Error RowSqDistsImpl(ffi::ThreadPool pool, ffi::Buffer<DT> x,
                          ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out) {
  return RowSums(pool, x, v.typed_data(), v.element_count(), out);
}

template <ffi::DataType DT>
ffi::Error RowSqNormsImpl(ffi::ThreadPool pool, ffi::Buffer<DT> x,
                          ffi::ResultBuffer<ffi::F32> out) {
  return RowSums(pool, x, nullptr, 0, out);
}

// One step of a reweighting rule (the geometric median's Weiszfeld step, centered
// clipping's iteration) in one read of x:
//   z' = z (1 - sum_i w_i) + sum_{i : w_i != 0} w_i x_i,
//   r_i = sum_k (x_ik - z'_k)^2 for every row (skipped when `distances` is 0).
// A row of weight 0 is not read for the sum (a NaN or Inf row then adds nothing,
// where 0 * Inf would be NaN); its distance flows through IEEE arithmetic. The
// step's distances are the next step's weights, so a column block of z' is
// finished before the rows are read again for it: the block (n rows of 2,048
// columns) is read from memory for the sum and from cache for the distances,
// where a distance pass and a product read x twice.
int64_t step_block_columns(int64_t n) {
  // 2,048 columns (8 KB runs of each row), at most 8 MB of rows (a quarter of
  // this CPU's L3): alternated at (25 | 100, 1e6), blocks of 1,024 to 4,096
  // columns took 1.13-1.32x | 1.34-1.67x one read with the distances, 2,048 the
  // best or near it at both n (1.14-1.19x | 1.36-1.52x); blocks of a fixed 1 MB
  // (10,480 columns at n = 25) 1.28-1.48x at n = 25.
  int64_t b = (2097152 / std::max<int64_t>(n, 1)) / 8 * 8;
  return std::clamp<int64_t>(b, 256, 2048);
}

// out += sum_r w[r] * rows[r] over `len` columns, R rows per pass over out; the
// first pass (First) writes out = keep * z + ... instead, z null for zero, so out
// is not read before it is written.
template <typename T, int R, bool First>
void add_weighted(float* out, const float* z, float keep, const T* const* rows,
                  const float* w, int64_t len) {
  auto start = [&](int64_t k) -> v8 {
    if constexpr (!First) return load8(out + k);
    if (z == nullptr) return v8{};
    return keep * load8(z + k);
  };
  int64_t k = 0;
  for (; k + 8 <= len; k += 8) {
    v8 s = start(k);
    for (int r = 0; r < R; ++r) s += w[r] * load_row(rows[r] + k);
    std::memcpy(out + k, &s, sizeof(s));
  }
  for (; k < len; ++k) {
    float s = First ? (z == nullptr ? 0.0f : keep * z[k]) : out[k];
    for (int r = 0; r < R; ++r) s += w[r] * to_float(rows[r][k]);
    out[k] = s;
  }
}

// One pass of r <= kWeightedRows rows (`add_weighted` with R = r).
constexpr int kWeightedRows = 8;

template <typename T, bool First>
void weighted_pass(float* out, const float* z, float keep, const T* const* rows,
                   const float* w, int r, int64_t len) {
  switch (r) {
    case 0: return add_weighted<T, 0, First>(out, z, keep, rows, w, len);
    case 1: return add_weighted<T, 1, First>(out, z, keep, rows, w, len);
    case 2: return add_weighted<T, 2, First>(out, z, keep, rows, w, len);
    case 3: return add_weighted<T, 3, First>(out, z, keep, rows, w, len);
    case 4: return add_weighted<T, 4, First>(out, z, keep, rows, w, len);
    case 5: return add_weighted<T, 5, First>(out, z, keep, rows, w, len);
    case 6: return add_weighted<T, 6, First>(out, z, keep, rows, w, len);
    case 7: return add_weighted<T, 7, First>(out, z, keep, rows, w, len);
    default: return add_weighted<T, kWeightedRows, First>(out, z, keep, rows, w, len);
  }
}

template <typename T>
void step_range(const T* x, const float* z, const float* w, float keep,
                const std::vector<int64_t>& active, int64_t n, int64_t d,
                int64_t lo, int64_t hi, bool distances, float* zout, double* acc) {
  // Without the distances nothing is read again from cache: the rows in long
  // runs (131,072 columns, 512 KB of z' in L2), the same number of rows in each
  // pass over z', at most 8 (25 rows: 7, 6, 6 and 6, no pass for one row), the
  // first pass writing z' without reading it. Alternated in one process with
  // `w @ x` (XLA's 8-row passes over 125,000 columns) on the Zen 4 (session
  // 34), the weighted sum (an empty z) at (25 | 100, 1e6) float32 took 0.97-1.00
  // | 1.00-1.02 reads, against 1.10-1.47 | 1.11-1.18 in 4-row passes over 32,768
  // columns after a pass writing z' = z of zeros; bfloat16 0.75-0.79 the time.
  const int64_t block = distances ? step_block_columns(n) : 4 * kRunColumns;
  const int64_t m = static_cast<int64_t>(active.size());
  const int64_t passes = std::max<int64_t>(1, (m + kWeightedRows - 1) / kWeightedRows);
  for (int64_t k0 = lo; k0 < hi; k0 += block) {
    const int64_t len = std::min(hi, k0 + block) - k0;
    float* out = zout + k0;
    const float* zk = z == nullptr ? nullptr : z + k0;
    for (int64_t p = 0, a = 0; p < passes; ++p) {
      const int r = static_cast<int>((m - a) / (passes - p));  // rows left, shared
      const T* rows[kWeightedRows];
      float ws[kWeightedRows];
      for (int i = 0; i < r; ++i) {
        rows[i] = x + active[a + i] * d + k0;
        ws[i] = w[active[a + i]];
      }
      if (p == 0) {
        weighted_pass<T, true>(out, zk, keep, rows, ws, r, len);
      } else {
        weighted_pass<T, false>(out, zk, keep, rows, ws, r, len);
      }
      a += r;
    }
    if (distances) row_range(x, zout, n, d, k0, k0 + len, acc);
  }
}

template <ffi::DataType DT>
ffi::Error StepSqDistsImpl(ffi::ThreadPool pool, ffi::Buffer<DT> x,
                           ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> zout,
                           ffi::ResultBuffer<ffi::F32> out, int32_t distances) {
  const Shape shape = shape_of(x);
  if (!shape.ok) {
    return ffi::Error::InvalidArgument("step_sq_dists: x must be (..., n, d)");
  }
  const int64_t n = shape.n, d = shape.d, batch = shape.batch;
  // An empty z stands for zeros (a weighted sum of the rows), not read.
  const bool zeros = z.element_count() == 0;
  if ((!zeros && z.element_count() * n != x.element_count()) ||
      w.element_count() * d != x.element_count()) {
    return ffi::Error::InvalidArgument("step_sq_dists: z (..., d) or (0,), w (..., n)");
  }
  const int threads = thread_count(static_cast<double>(n) * d);
  using T = ffi::NativeType<DT>;
  for (int64_t b = 0; b < batch; ++b) {
    const T* xb = x.typed_data() + b * n * d;
    const float* zb = zeros ? nullptr : z.typed_data() + b * d;
    const float* wb = w.typed_data() + b * n;
    std::vector<int64_t> active;
    double wsum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      if (wb[i] != 0.0f) active.push_back(i);
      wsum += wb[i];
    }
    const float keep = static_cast<float>(1.0 - wsum);
    row_sums(pool, n, d, threads, out->typed_data() + b * n,
             [&](int, int64_t lo, int64_t hi, double* acc) {
               step_range(xb, zb, wb, keep, active, n, d, lo, hi, distances != 0,
                          zout->typed_data() + b * d, acc);
             });
  }
  return ffi::Error::Success();
}

// Two rules over the rows of an (..., n, d) array, to (..., d) of the same dtype:
// float32 or bfloat16. XLA:CPU runs its loops over 16-bit elements as scalar code
// (the bfloat16 mean of (25, 1e6) took 54-72 ms, against 3.4 ms to read the same
// bytes as float32), and its fused loop over 100 rows reads them as 100
// interleaved streams. Here a bfloat16 becomes a float32 by a shift of its bits,
// eight at a time, and a bfloat16 result is rounded to nearest even, as XLA's
// conversion does. Mode 0: the mean. Mode 1: the sign of the vote
// sum_i [x_i > 0] - [x_i < 0] (0 for a tie). Mode 2: zero counts as positive, in
// the votes ([x_i >= 0] - [x_i < 0]) and in the tie (+1). NaN votes nothing.
// Round to nearest even; NaN stays a (quiet) NaN.
inline u16x8 to_bf16(v8 v) {
  u32x8 u;
  std::memcpy(&u, &v, sizeof(u));
  u32x8 nan = (u & 0x7fffffffu) > 0x7f800000u;  // all ones where NaN
  u32x8 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  u32x8 quiet = (u >> 16) | 0x40u;
  return __builtin_convertvector((rounded & ~nan) | (quiet & nan), u16x8);
}

// The rule's value from the sums: the mean, or the sign of the votes.
template <int Mode>
inline v8 finish(v8 sum, float n) {
  if constexpr (Mode == 0) {
    return sum / n;
  } else if constexpr (Mode == 1) {
    return __builtin_convertvector((sum < 0.0f) - (sum > 0.0f), v8);
  } else {
    i32x8 up = sum >= 0.0f;
    return __builtin_convertvector(-2 * up - 1, v8);
  }
}

// What a row adds to the block's sums: its values (mode 0), or its sign votes in
// int32 lanes (modes 1 and 2), from the comparison masks (-1 where true); F and I
// are float and int32 vectors of one width.
template <int Mode, typename F, typename I>
inline std::conditional_t<Mode == 0, F, I> term_of(F v) {
  if constexpr (Mode == 0) {
    return v;
  } else {
    I up = Mode == 1 ? (v > 0.0f) : (v >= 0.0f);
    I down = v < 0.0f;
    return down - up;
  }
}

template <int Mode>
using Term = std::conditional_t<Mode == 0, v8, i32x8>;

template <int Mode>
inline Term<Mode> term(v8 v) {
  return term_of<Mode, v8, i32x8>(v);
}

template <int Mode>
inline void accumulate(float* acc, Term<Mode> t) {
  Term<Mode> a;
  std::memcpy(&a, acc, sizeof(a));
  a += t;
  std::memcpy(acc, &a, sizeof(a));
}

template <int Mode>
inline v8 block_sums(const float* acc) {
  Term<Mode> a;
  std::memcpy(&a, acc, sizeof(a));
  if constexpr (Mode == 0) {
    return a;
  } else {
    return __builtin_convertvector(a, v8);
  }
}

// Writes the first `count` lanes of v to dst, rounded to bfloat16 for a bfloat16
// output.
inline void store_out(v8 v, int64_t count, uint16_t* dst) {
  u16x8 h = to_bf16(v);
  uint16_t lanes[8];
  std::memcpy(lanes, &h, sizeof(h));
  std::copy(lanes, lanes + count, dst);
}

inline void store_out(v8 v, int64_t count, float* dst) {
  float lanes[8];
  std::memcpy(lanes, &v, sizeof(v));
  std::copy(lanes, lanes + count, dst);
}

#if defined(__AVX512F__)
// The same terms 16 columns a step, where the CPU has AVX-512: the same
// operations per lane, so the same bits.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

template <typename T>
inline v16 load_row16(const T* p) {
  const __m512 w = load16(p);
  v16 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

template <int Mode>
using Term16 = std::conditional_t<Mode == 0, v16, i32x16>;

template <int Mode>
inline Term16<Mode> term16(v16 v) {
  return term_of<Mode, v16, i32x16>(v);
}
#endif

#if defined(__AVX512BW__)
// A bfloat16 row's sign votes (`term_of`'s) added to t, from its bits on 16-bit
// lanes, 32 columns a step, where widening 16 columns to float32 and comparing
// took two instructions a lane more: a vote down for the bits 0x8001-0xFF80
// (v < 0: not -0, not NaN), up for 0x0001-0x7F80 (v > 0), or in mode 2 also
// for +0 and -0 (v >= 0).
template <int Mode>
inline __m512i votes32(const uint16_t* p, __m512i t) {
  const __m512i s = _mm512_loadu_si512(p);
  const __m512i one = _mm512_set1_epi16(1), inf = _mm512_set1_epi16(0x7F80);
  // Unsigned compares after an offset: each range as one comparison.
  const __m512i below = _mm512_sub_epi16(s, _mm512_set1_epi16(-0x7FFF));
  const __mmask32 down = _mm512_cmplt_epu16_mask(below, inf);
  __mmask32 up;
  if constexpr (Mode == 1) {
    up = _mm512_cmplt_epu16_mask(_mm512_sub_epi16(s, one), inf);
  } else {
    const __mmask32 minus_zero =
        _mm512_cmpeq_epi16_mask(s, _mm512_set1_epi16(-0x8000));
    up = _kor_mask32(_mm512_cmple_epu16_mask(s, inf), minus_zero);
  }
  t = _mm512_mask_add_epi16(t, up, t, one);
  return _mm512_mask_sub_epi16(t, down, t, one);
}
#endif

// Adds R rows' terms over `len` columns to the sums: R = 4 rows per pass over
// the sums (one load and store of them per 4 rows; row by row the sign majority
// of (25, 1e6) float32 took 10.2 ms against XLA's fused 7.5 ms).
template <typename T, int Mode, int R>
void add_rows(float* acc, const T* const* rows, int64_t len) {
  int64_t k = 0;
#if defined(__AVX512BW__)
  if constexpr (Mode != 0 && std::is_same_v<T, uint16_t>) {
    for (; k + 32 <= len; k += 32) {
      __m512i t = _mm512_setzero_si512();
      for (int r = 0; r < R; ++r) t = votes32<Mode>(rows[r] + k, t);
      // The R rows' votes (|t| <= R) into the int32 sums of columns k to k + 31.
      const __m256i halves[2] = {_mm512_castsi512_si256(t),
                                 _mm512_extracti64x4_epi64(t, 1)};
      for (int h = 0; h < 2; ++h) {
        float* a = acc + k + 16 * h;
        const __m512i sum = _mm512_add_epi32(_mm512_loadu_si512(a),
                                             _mm512_cvtepi16_epi32(halves[h]));
        _mm512_storeu_si512(a, sum);
      }
    }
  }
#endif
#if defined(__AVX512F__)
  for (; k + 16 <= len; k += 16) {
    Term16<Mode> t = term16<Mode>(load_row16(rows[0] + k));
    for (int r = 1; r < R; ++r) t += term16<Mode>(load_row16(rows[r] + k));
    Term16<Mode> a;
    std::memcpy(&a, acc + k, sizeof(a));
    a += t;
    std::memcpy(acc + k, &a, sizeof(a));
  }
#endif
  for (; k + 8 <= len; k += 8) {
    Term<Mode> t = term<Mode>(load_row(rows[0] + k));
    for (int r = 1; r < R; ++r) t += term<Mode>(load_row(rows[r] + k));
    accumulate<Mode>(acc + k, t);
  }
  if (k < len) {  // the column tail, padded to one vector
    for (int r = 0; r < R; ++r) {
      T tail[8] = {};
      std::copy(rows[r] + k, rows[r] + len, tail);
      accumulate<Mode>(acc + k, term<Mode>(load_row(tail)));
    }
  }
}

// Rows i, i + 1, ... of x, columns k0 to k0 + len, added to the sums R rows a
// pass (`add_rows`) while R are left; returns the first row not added.
template <typename T, int Mode, int R>
int64_t add_passes(float* acc, const T* x, int64_t n, int64_t d, int64_t k0,
                   int64_t len, int64_t i) {
  for (; i + R <= n; i += R) {
    const T* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = x + (i + r) * d + k0;
    add_rows<T, Mode, R>(acc, rows, len);
  }
  return i;
}

template <typename T, int Mode>
void rows_range(const T* x, int64_t n, int64_t d, int64_t lo, int64_t hi, T* out) {
  // 65,536 columns: each row is read in long runs that the prefetchers stream
  // (2,048 were slower at (25, 1e6)); the 256 KB of sums stay in L2, with 8 lanes
  // of padding for the column tail. Rows 8 a pass: half the passes over the
  // sums. Alternated in one process with `w @ x` (XLA's 8-row passes over
  // 125,000 columns) on the Zen 4 (session 34), against 4 float32 rows a pass
  // over 16,384 columns: the mean of (25 | 100, 1e6) float32 0.96-1.03 |
  // 1.01-1.11 reads against 1.04-1.35 | 1.03-1.22; bfloat16 (8 rows a pass
  // before) 0.88-0.93 the time.
  // Earlier, bfloat16 alone, in alternated processes: the votes (`votes32`) 8
  // rows a pass against 4, at (25 | 100, 1e6) 0.73-0.76 and 0.84-0.90 the time
  // (Zen 4); the mean on the Xeon of model 167 (session 30), at (25, 1e6)
  // 1.29-1.34 reads of its bytes against 1.46-1.56.
  constexpr int64_t kBlock = 65536;
  std::vector<float> acc(kBlock + 8);
  for (int64_t k0 = lo; k0 < hi; k0 += kBlock) {
    const int64_t len = std::min(hi, k0 + kBlock) - k0;
    std::fill(acc.begin(), acc.end(), 0.0f);  // 0.0f and int32 0: the same bits
    int64_t i = add_passes<T, Mode, 8>(acc.data(), x, n, d, k0, len, 0);
    i = add_passes<T, Mode, 4>(acc.data(), x, n, d, k0, len, i);
    add_passes<T, Mode, 1>(acc.data(), x, n, d, k0, len, i);
    for (int64_t k = 0; k < len; k += 8) {
      v8 v = finish<Mode>(block_sums<Mode>(&acc[k]), static_cast<float>(n));
      store_out(v, std::min<int64_t>(8, len - k), out + k0 + k);
    }
  }
}

template <ffi::DataType DT>
ffi::Error RowRuleImpl(ffi::ThreadPool pool, ffi::Buffer<DT> x,
                       ffi::ResultBuffer<DT> out, int32_t mode) {
  const Shape shape = shape_of(x);
  if (!shape.ok || mode < 0 || mode > 2) {
    return ffi::Error::InvalidArgument("row_rule: x must be (..., n, d), mode 0-2");
  }
  const int64_t n = shape.n, d = shape.d, batch = shape.batch;
  const int threads = thread_count(static_cast<double>(n) * d);
  using T = ffi::NativeType<DT>;
  for (int64_t b = 0; b < batch; ++b) {
    const T* xb = x.typed_data() + b * n * d;
    T* ob = out->typed_data() + b * d;
    split_columns(pool, d, threads, [&](int, int64_t lo, int64_t hi) {
      if (mode == 0) rows_range<T, 0>(xb, n, d, lo, hi, ob);
      if (mode == 1) rows_range<T, 1>(xb, n, d, lo, hi, ob);
      if (mode == 2) rows_range<T, 2>(xb, n, d, lo, hi, ob);
    });
  }
  return ffi::Error::Success();
}

// Mixing: out = s (w x) for an (n, d) float32 or bfloat16 x and an (m, n)
// float32 w, in float32: NNM's product (w holds ones and s = 1/(n - f), so that
// every product is exact and only the sums round). `sparse`: out_i = s sum over
// the rows j with w_ij != 0 alone, so that a row of weight 0 adds nothing even if
// it is not finite (as in `step_range`; bucketing's means, a few ones a row):
// tiles of one output row, over the rows it uses. The rows j with clean[j] != 0
// are read with their non-finite entries as zeros (NNM's rows at a non-finite
// distance), in the same pass: a cleaned copy of x, or a second product, would
// be another read and write of x.
// A register tile holds R output rows by C vectors of columns: each row j of x
// gives C loads and R broadcasts of w for R*C multiply-adds, summed over j in
// order. In a dense mix the chunk of columns of every row of x stays in L1 while
// the tiles pass over it (a sparse one runs each tile over the columns alone), and
// the next chunk's lines are prefetched into L2; where the output rows are
// aligned to a vector, it is written with non-temporal stores, so its lines are
// not read before they are written (session 32, the 2-core Xeon of model 167,
// (25 | 100, 1e6) on two threads: float32 6.2-7.8 | 67-81 ms against XLA's
// product's 10.4-10.5 | 76-83, bfloat16 5.9-6.2 | 83 against 10.5-11.1 | 69;
// `/tmp` programs, float32: 6 x 4 tiles 6.0-7.5 | 74-77 ms with the streaming
// stores against 8.5-8.8 | 112-117 without; 5 x 5 5.8-7.1 | 72-73, 6 x 2
// 4.6-4.8 | 84-85: an even count of vectors suits bfloat16's pairs).
#if defined(__AVX512F__)
typedef v16 MixVec;
constexpr int kMixLanes = 16, kMixRows = 6, kMixCols = 4;
inline MixVec mix_vec(__m512 v) {
  MixVec m;
  std::memcpy(&m, &v, sizeof(m));
  return m;
}
inline __m512 mix_m512(MixVec v) {
  __m512 m;
  std::memcpy(&m, &v, sizeof(m));
  return m;
}
// A row's chunk as kMixCols vectors. bfloat16: 32 columns a load, as their even
// columns (the low halves, shifted up) and odd ones (the high halves, masked),
// where widening 16 at a time took two more instructions a load
// (`mix_ordered` puts the columns back in order).
inline void mix_loads(const float* p, MixVec* v) {
  for (int c = 0; c < kMixCols; ++c) v[c] = load_row16(p + c * kMixLanes);
}
inline void mix_loads(const uint16_t* p, MixVec* v) {
  for (int c = 0; c < kMixCols; c += 2) {
    const __m512i b = _mm512_loadu_si512(p + c * kMixLanes);
    v[c] = mix_vec(_mm512_castsi512_ps(_mm512_slli_epi32(b, 16)));
    v[c + 1] = mix_vec(_mm512_castsi512_ps(
        _mm512_and_si512(b, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)))));
  }
}
template <typename T>
inline void mix_ordered(MixVec* v) {
  if constexpr (std::is_same_v<T, uint16_t>) {
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21,
                                         6, 22, 7, 23);
    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
    for (int c = 0; c < kMixCols; c += 2) {
      const __m512 even = mix_m512(v[c]), odd = mix_m512(v[c + 1]);
      v[c] = mix_vec(_mm512_permutex2var_ps(even, lo, odd));
      v[c + 1] = mix_vec(_mm512_permutex2var_ps(even, hi, odd));
    }
  }
}
inline void mix_stream(float* p, MixVec v) { _mm512_stream_ps(p, mix_m512(v)); }
#else
typedef v8 MixVec;
constexpr int kMixLanes = 8, kMixRows = 3, kMixCols = 3;
template <typename T>
inline void mix_loads(const T* p, MixVec* v) {
  for (int c = 0; c < kMixCols; ++c) v[c] = load_row(p + c * kMixLanes);
}
template <typename T>
inline void mix_ordered(MixVec*) {}
inline void mix_stream(float* p, MixVec v) {
#if defined(__AVX2__)
  __m256 w;
  std::memcpy(&w, &v, sizeof(w));
  _mm256_stream_ps(p, w);
#else
  std::memcpy(p, &v, sizeof(v));
#endif
}
#endif
constexpr int64_t kMixChunk = kMixLanes * kMixCols;

// Output rows i0 to i0 + R - 1 over one chunk of columns: x and out point at the
// chunk's first column of row 0, ldx and ldo apart.
// The tiles of output rows (`mix_tile`): tile t holds rows row0[t] to row0[t] +
// rows[t] - 1 and runs over the rows j used[start[t]] to used[start[t + 1]] - 1,
// in order: every j, or in a sparse mix (one output row a tile) those of nonzero
// weight.
struct MixUse {
  std::vector<int64_t> row0, start{0};
  std::vector<int> rows;
  std::vector<int32_t> used;
  bool sparse = false;
};

template <typename T, int R>
void mix_tile(const T* x, int64_t ldx, const float* w, const int32_t* clean,
              const int32_t* used, int64_t count, int64_t n, int64_t i0, float s,
              float* out, int64_t ldo, bool stream) {
  MixVec acc[R][kMixCols];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kMixCols; ++c) acc[r][c] = MixVec{};
  for (int64_t u = 0; u < count; ++u) {
    const int64_t j = used[u];
    MixVec v[kMixCols];
    mix_loads(x + j * ldx, v);
    if (clean[j]) {
      // v - v is 0 exactly where v is finite.
      for (int c = 0; c < kMixCols; ++c) v[c] = (v[c] - v[c] == 0) ? v[c] : MixVec{};
    }
    for (int r = 0; r < R; ++r) {
      const float wr = w[(i0 + r) * n + j];
      for (int c = 0; c < kMixCols; ++c) acc[r][c] += wr * v[c];
    }
  }
  for (int r = 0; r < R; ++r) {
    MixVec y[kMixCols];
    for (int c = 0; c < kMixCols; ++c) y[c] = s * acc[r][c];
    mix_ordered<T>(y);
    for (int c = 0; c < kMixCols; ++c) {
      float* dst = out + (i0 + r) * ldo + c * kMixLanes;
      if (stream) {
        mix_stream(dst, y[c]);
      } else {
        std::memcpy(dst, &y[c], sizeof(y[c]));
      }
    }
  }
}

// kMixRows output rows a tile (one where fewer are left), or one in a sparse mix.
MixUse mix_use(const float* w, int64_t m, int64_t n, bool sparse) {
  MixUse use;
  use.sparse = sparse;
  for (int64_t i0 = 0; i0 < m;) {
    const int rows = !sparse && i0 + kMixRows <= m ? kMixRows : 1;
    for (int64_t j = 0; j < n; ++j) {
      if (!sparse || w[i0 * n + j] != 0) use.used.push_back(static_cast<int32_t>(j));
    }
    use.row0.push_back(i0);
    use.rows.push_back(rows);
    use.start.push_back(static_cast<int64_t>(use.used.size()));
    i0 += rows;
  }
  return use;
}

// The tiles t0 to t1 - 1 over one chunk.
template <typename T>
void mix_chunk(const T* x, int64_t ldx, const float* w, const int32_t* clean,
               const MixUse& use, size_t t0, size_t t1, int64_t n, float s,
               float* out, int64_t ldo, bool stream) {
  for (size_t t = t0; t < t1; ++t) {
    const int32_t* used = use.used.data() + use.start[t];
    const int64_t count = use.start[t + 1] - use.start[t], i0 = use.row0[t];
    if (use.rows[t] == kMixRows) {
      mix_tile<T, kMixRows>(x, ldx, w, clean, used, count, n, i0, s, out, ldo, stream);
    } else {
      mix_tile<T, 1>(x, ldx, w, clean, used, count, n, i0, s, out, ldo, stream);
    }
  }
}

#if defined(__AVX512BF16__)
// bfloat16 rows by pairs (`vdpbf16ps`: 32 products a vector, two a float32 lane,
// where a multiply-add makes 16): for a w whose entries are all bfloat16 (NNM's
// ones), out_i = s sum over pairs p of (w_i,2p x_2p + w_i,2p+1 x_2p+1), each
// product exact, in float32 (the instruction reads bfloat16 subnormals as zeros
// and flushes subnormal sums). Zen 4 runs the instruction at the rate of a
// 16-lane multiply-add, so twice the products a cycle; the Xeon of model 167
// ran it at a quarter of its multiply-adds' rate, half the products
// (docs/performance.md, sessions 32 and 33), so the caller asks for it where the
// CPU is AMD's.
// The chunk's rows are interleaved once into `pairs` (the rows 2p and 2p + 1 of
// each column in one 32-bit lane, in column order, cleaned, a zero row after an
// odd n) and every tile of output rows reads them from L1.
constexpr int64_t kPairVecs = kMixCols;  // the 64 columns of a chunk
inline __m512i finite_bf16(__m512i b) {
  // A bfloat16 is finite where its exponent bits are not all set.
  const __m512i e = _mm512_set1_epi16(0x7F80);
  return _mm512_maskz_mov_epi16(
      _mm512_cmpneq_epi16_mask(_mm512_and_si512(b, e), e), b);
}
void pair_rows(const uint16_t* x, int64_t ldx, int64_t n, const int32_t* clean,
               __m512i* pairs) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7,
                                          20, 21, 22, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  for (int64_t p = 0; 2 * p < n; ++p) {
    const int64_t j = 2 * p;
    for (int h = 0; h < kPairVecs / 2; ++h) {
      __m512i a = _mm512_loadu_si512(x + j * ldx + 32 * h);
      __m512i b = _mm512_setzero_si512();
      if (j + 1 < n) b = _mm512_loadu_si512(x + (j + 1) * ldx + 32 * h);
      if (clean[j]) a = finite_bf16(a);
      if (j + 1 < n && clean[j + 1]) b = finite_bf16(b);
      // unpacklo/hi pair columns 0-3 | 4-7 of each 128-bit lane: put back in order.
      const __m512i lo = _mm512_unpacklo_epi16(a, b), hi = _mm512_unpackhi_epi16(a, b);
      pairs[p * kPairVecs + 2 * h] = _mm512_permutex2var_epi32(lo, first, hi);
      pairs[p * kPairVecs + 2 * h + 1] = _mm512_permutex2var_epi32(lo, second, hi);
    }
  }
}
// Output rows i0 to i0 + R - 1 of one chunk; wp holds w's bfloat16 pairs, np a row.
template <int R>
void pair_tile(const __m512i* pairs, const uint32_t* wp, int64_t np, int64_t i0,
               float s, float* out, int64_t ldo, bool stream) {
  __m512 acc[R][kPairVecs];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kPairVecs; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < np; ++p) {
    __m512bh v[kPairVecs];
    for (int c = 0; c < kPairVecs; ++c) v[c] = (__m512bh)pairs[p * kPairVecs + c];
    for (int r = 0; r < R; ++r) {
      const __m512bh wr = (__m512bh)_mm512_set1_epi32(wp[(i0 + r) * np + p]);
      for (int c = 0; c < kPairVecs; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], v[c], wr);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < kPairVecs; ++c) {
      const __m512 y = _mm512_mul_ps(_mm512_set1_ps(s), acc[r][c]);
      float* dst = out + (i0 + r) * ldo + c * kMixLanes;
      if (stream) {
        _mm512_stream_ps(dst, y);
      } else {
        _mm512_storeu_ps(dst, y);
      }
    }
  }
}
// Every output row over one chunk, its rows paired into `pairs` first.
void pair_chunk(const uint16_t* x, int64_t ldx, const int32_t* clean, const MixUse& use,
                const std::vector<uint32_t>& wp, int64_t n, __m512i* pairs, float s,
                float* out, int64_t ldo, bool stream) {
  const int64_t np = (n + 1) / 2;
  pair_rows(x, ldx, n, clean, pairs);
  for (size_t t = 0; t < use.row0.size(); ++t) {
    if (use.rows[t] == kMixRows) {
      pair_tile<kMixRows>(pairs, wp.data(), np, use.row0[t], s, out, ldo, stream);
    } else {
      pair_tile<1>(pairs, wp.data(), np, use.row0[t], s, out, ldo, stream);
    }
  }
}

// w's rows as bfloat16 pairs (the low half the even column), or empty where an
// entry is not a bfloat16 (the multiply-add tiles take such a w).
std::vector<uint32_t> weight_pairs(const float* w, int64_t m, int64_t n) {
  const int64_t np = (n + 1) / 2;
  std::vector<uint32_t> wp(m * np, 0);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      uint32_t bits;
      std::memcpy(&bits, w + i * n + j, sizeof(bits));
      if (bits & 0xFFFFu) return {};
      wp[i * np + j / 2] |= (bits >> 16) << (16 * (j % 2));
    }
  }
  return wp;
}
#endif

// Columns [lo, hi) of out = s (w x); the columns past the last whole chunk go
// through a zero-padded copy.
template <typename T>
void mix_range(const T* x, const float* w, const int32_t* clean, const MixUse& use,
               const std::vector<uint32_t>& wp, int64_t m, int64_t n, int64_t d,
               int64_t lo, int64_t hi, float s, float* out) {
  const bool stream =
      d % kMixLanes == 0 &&
      reinterpret_cast<uintptr_t>(out + lo) % (kMixLanes * sizeof(float)) == 0;
#if defined(__AVX512BF16__)
  std::vector<__m512i> pairs(wp.empty() ? 0 : (n + 1) / 2 * kPairVecs);
#endif
  auto chunk = [&](const T* xc, int64_t ldx, float* oc, int64_t ldo, bool st,
                   size_t t0, size_t t1) {
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, uint16_t>) {
      if (!pairs.empty()) {  // dense: every tile at once
        pair_chunk(xc, ldx, clean, use, wp, n, pairs.data(), s, oc, ldo, st);
        return;
      }
    }
#endif
    mix_chunk(xc, ldx, w, clean, use, t0, t1, n, s, oc, ldo, st);
  };
  // A dense mix runs every tile over a chunk, which stays in L1 for all of them;
  // a sparse one reads each row for one output row, so each tile runs over the
  // columns alone: a few long streams where a chunk of every row made n short
  // ones (session 33, Zen 4, bucketing's means then Krum at (100, 1e6) float32:
  // 33-36 ms by tiles, 63-66 by chunks, 46-55 through XLA's means).
  const size_t tiles = use.row0.size(), group = use.sparse ? 1 : tiles;
  const int64_t whole = lo + (hi - lo) / kMixChunk * kMixChunk;
  for (size_t t0 = 0; t0 < tiles; t0 += group) {
    const size_t t1 = std::min(tiles, t0 + group);
    // The rows the group reads: the first tile's (every row where dense).
    const int32_t* rows = use.used.data() + use.start[t0];
    const int64_t count = use.start[t0 + 1] - use.start[t0];
    for (int64_t k = lo; k < whole; k += kMixChunk) {
      if (k + 2 * kMixChunk <= hi) {
        for (int64_t u = 0; u < count; ++u) {
          const char* next = reinterpret_cast<const char*>(x + rows[u] * d + k + kMixChunk);
          // Into L2: into L1 the next chunk shared the Zen 4's 32 KB with the
          // chunk the tiles read (session 33, five alternated pairs of
          // processes, medians: at (25, 1e6) float32 11.0 against 13.4 ms,
          // bfloat16 5.3 against 7.5; at (100, 1e6) 111 against 116 and 57
          // against 65; on the Xeon of model 167, 48 KB, the same time either
          // way, session 32).
          for (int64_t c = 0; c < kMixChunk * static_cast<int64_t>(sizeof(T)); c += 64) {
            __builtin_prefetch(next + c, 0, 2);
          }
        }
      }
      chunk(x + k, d, out + k, d, stream, t0, t1);
    }
  }
#if defined(__AVX2__)
  if (stream) _mm_sfence();  // the streamed lines before the caller reads them
#endif
  if (whole < hi) {
    std::vector<T> xt(n * kMixChunk, T{});
    std::vector<float> ot(m * kMixChunk);
    for (int64_t j = 0; j < n; ++j) {
      std::copy(x + j * d + whole, x + j * d + hi, xt.data() + j * kMixChunk);
    }
    chunk(xt.data(), kMixChunk, ot.data(), kMixChunk, false, 0, tiles);
    for (int64_t i = 0; i < m; ++i) {
      std::copy(ot.data() + i * kMixChunk, ot.data() + i * kMixChunk + (hi - whole),
                out + i * d + whole);
    }
  }
}

template <ffi::DataType DT>
ffi::Error MixRowsImpl(ffi::ThreadPool pool, ffi::Buffer<DT> x,
                       ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> clean,
                       ffi::ResultBuffer<ffi::F32> out, float scale,
                       int32_t sparse, int32_t pairs) {
  const Shape shape = shape_of(x);
  const auto wdims = w.dimensions();
  if (!shape.ok || wdims.size() < 2 || wdims[wdims.size() - 1] != shape.n) {
    return ffi::Error::InvalidArgument("mix_rows: x (..., n, d), w (..., m, n)");
  }
  const int64_t n = shape.n, d = shape.d, batch = shape.batch;
  const int64_t m = wdims[wdims.size() - 2];
  if (static_cast<int64_t>(w.element_count()) != batch * m * n ||
      static_cast<int64_t>(clean.element_count()) != batch * n) {
    return ffi::Error::InvalidArgument("mix_rows: w (..., m, n), clean (..., n)");
  }
  const int threads = thread_count(static_cast<double>(m) * n * d);
  using T = ffi::NativeType<DT>;
  for (int64_t b = 0; b < batch; ++b) {
    const T* xb = x.typed_data() + b * n * d;
    const float* wb = w.typed_data() + b * m * n;
    const int32_t* cb = clean.typed_data() + b * n;
    float* ob = out->typed_data() + b * m * d;
    const MixUse use = mix_use(wb, m, n, sparse != 0);
    std::vector<uint32_t> wp;
#if defined(__AVX512BF16__)
    if (std::is_same_v<T, uint16_t> && pairs && !sparse) wp = weight_pairs(wb, m, n);
#endif
    split_columns(pool, d, threads, [&](int, int64_t lo, int64_t hi) {
      mix_range(xb, wb, cb, use, wp, m, n, d, lo, hi, scale, ob);
    });
  }
  return ffi::Error::Success();
}

// acc += sum_r (rows[r] - mu)^2 over `len` columns, R rows per pass over acc;
// mu and acc hold 8 lanes of padding (zeros in mu) for the column tail.
template <typename T, int R>
void add_sq_devs(float* acc, const T* const* rows, const float* mu, int64_t len) {
  int64_t k = 0;
#if defined(__AVX512F__)
  for (; k + 16 <= len; k += 16) {
    const v16 m = load_row16(mu + k);
    v16 s = load_row16(acc + k);
    for (int r = 0; r < R; ++r) {
      const v16 t = load_row16(rows[r] + k) - m;
      s += t * t;
    }
    std::memcpy(acc + k, &s, sizeof(s));
  }
#endif
  for (; k + 8 <= len; k += 8) {
    const v8 m = load8(mu + k);
    v8 s = load8(acc + k);
    for (int r = 0; r < R; ++r) {
      const v8 t = load_row(rows[r] + k) - m;
      s += t * t;
    }
    std::memcpy(acc + k, &s, sizeof(s));
  }
  if (k < len) {
    v8 s = load8(acc + k);
    for (int r = 0; r < R; ++r) {
      T tail[8] = {};
      std::copy(rows[r] + k, rows[r] + len, tail);
      const v8 t = load_row(tail) - load8(mu + k);
      s += t * t;
    }
    std::memcpy(acc + k, &s, sizeof(s));
  }
}

// The mean of every column and the sum of squared deviations from it (ALIE's
// mu and sigma), in one read of x: a block of rows summed from memory, then its
// deviations from the block's mean from cache (`step_block_columns`: blocks of
// 512 to 2,048 columns took the same time at (76 | 19, 1e6), 4,096 and more
// up to 1.9x longer), where XLA's mean and fused deviation loop took 5 reads.
// Both sums in float32 lanes, row after row.
template <typename T>
void moments_range(const T* x, int64_t n, int64_t d, int64_t lo, int64_t hi,
                   float* mean, float* m2) {
  const int64_t block = step_block_columns(n);
  std::vector<float> acc(block + 8), mu(block + 8);
  for (int64_t k0 = lo; k0 < hi; k0 += block) {
    const int64_t len = std::min(hi, k0 + block) - k0;
    std::fill(acc.begin(), acc.end(), 0.0f);
    int64_t i = add_passes<T, 0, 4>(acc.data(), x, n, d, k0, len, 0);
    add_passes<T, 0, 1>(acc.data(), x, n, d, k0, len, i);
    const float count = static_cast<float>(n);
    for (int64_t k = 0; k < len; ++k) mu[k] = acc[k] / count;
    std::fill(mu.begin() + len, mu.end(), 0.0f);
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (i = 0; i + 4 <= n; i += 4) {
      const T* rows[4] = {x + i * d + k0, x + (i + 1) * d + k0,
                          x + (i + 2) * d + k0, x + (i + 3) * d + k0};
      add_sq_devs<T, 4>(acc.data(), rows, mu.data(), len);
    }
    for (; i < n; ++i) {
      const T* row[1] = {x + i * d + k0};
      add_sq_devs<T, 1>(acc.data(), row, mu.data(), len);
    }
    std::copy(mu.begin(), mu.begin() + len, mean + k0);
    std::copy(acc.begin(), acc.begin() + len, m2 + k0);
  }
}

template <ffi::DataType DT>
ffi::Error RowMomentsImpl(ffi::ThreadPool pool, ffi::Buffer<DT> x,
                          ffi::ResultBuffer<ffi::F32> mean,
                          ffi::ResultBuffer<ffi::F32> m2) {
  const Shape shape = shape_of(x);
  if (!shape.ok) {
    return ffi::Error::InvalidArgument("row_moments: x must be (..., n, d)");
  }
  const int64_t n = shape.n, d = shape.d, batch = shape.batch;
  const int threads = thread_count(static_cast<double>(n) * d);
  using T = ffi::NativeType<DT>;
  for (int64_t b = 0; b < batch; ++b) {
    const T* xb = x.typed_data() + b * n * d;
    float* mb = mean->typed_data() + b * d;
    float* sb = m2->typed_data() + b * d;
    split_columns(pool, d, threads, [&](int, int64_t lo, int64_t hi) {
      moments_range(xb, n, d, lo, hi, mb, sb);
    });
  }
  return ffi::Error::Success();
}

// A generated network loop (byzjax/_native/networks.py): out[k] for the columns
// k in [lo, hi), hi - lo a multiple of its width (8, 16 or 32 columns a step), of
// the n rows rows[i] (float32 or bfloat16, as generated).
using NetworkFn = void (*)(const void* const* rows, float* out, int64_t lo,
                           int64_t hi);
struct Network {
  NetworkFn fn = nullptr;
  int64_t width = 8;
};

std::mutex network_mutex;
std::unordered_map<int64_t, Network> networks;

Network network_of(int64_t id) {
  std::lock_guard<std::mutex> lock(network_mutex);
  auto it = networks.find(id);
  return it == networks.end() ? Network{} : it->second;
}

// The network over rows of x: all n of them in order, or with a non-empty idx
// (..., m) the m rows x[idx] (clamped into [0, n)), read where they lie: a rule
// over chosen rows (Bulyan's) needs no gathered copy.
template <ffi::DataType DT>
ffi::Error NetworkImpl(ffi::ThreadPool pool, ffi::Buffer<DT> x,
                       ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> out,
                       int64_t id) {
  const Shape shape = shape_of(x);
  const Network network = network_of(id);
  const NetworkFn fn = network.fn;
  const int64_t w = network.width;
  if (!shape.ok || fn == nullptr || w < 1 || w > 32) {
    return ffi::Error::InvalidArgument(
        "network: x must be (..., n, d) and the network registered");
  }
  const int64_t n = shape.n, d = shape.d, batch = shape.batch;
  const bool taken = idx.element_count() != 0;
  if (taken && idx.element_count() % std::max<int64_t>(batch, 1) != 0) {
    return ffi::Error::InvalidArgument("network: idx must be (..., m) or empty");
  }
  const int64_t m = taken && batch ? idx.element_count() / batch : n;
  // The loop takes about four times a read's time per element.
  const int threads = thread_count(4.0 * m * d);
  using T = ffi::NativeType<DT>;
  for (int64_t b = 0; b < batch; ++b) {
    const T* xb = x.typed_data() + b * n * d;
    float* ob = out->typed_data() + b * d;
    std::vector<const void*> rows(m);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t r =
          taken ? std::clamp<int64_t>(idx.typed_data()[b * m + i], 0, n - 1) : i;
      rows[i] = xb + r * d;
    }
    split_columns(pool, d, threads, [&](int, int64_t lo, int64_t hi) {
      const int64_t full = lo + (hi - lo) / w * w;
      if (full > lo) fn(rows.data(), ob, lo, full);
      if (full == hi) return;
      // The column tail, padded to one vector with zeros.
      std::vector<T> pad(m * w, T{});
      std::vector<const void*> padded(m);
      for (int64_t i = 0; i < m; ++i) {
        const T* row = static_cast<const T*>(rows[i]);
        std::copy(row + full, row + hi, pad.data() + i * w);
        padded[i] = pad.data() + i * w;
      }
      float tail[32];
      fn(padded.data(), tail, 0, w);
      std::copy(tail, tail + (hi - full), ob + full);
    });
  }
  return ffi::Error::Success();
}

}  // namespace

#if BYZJAX_IN_PART(1)
// Called once per generated network (byzjax/_native/networks.py) before any
// computation names its id.
extern "C" void ByzjaxRegisterNetwork(int64_t id, NetworkFn fn, int64_t width) {
  std::lock_guard<std::mutex> lock(network_mutex);
  networks[id] = Network{fn, width};
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ByzjaxPairwiseSqDists,
                              PairwiseSqDistsImpl<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ByzjaxPairwiseSqDistsBf16,
                              PairwiseSqDistsImpl<ffi::DataType::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

#endif

#if BYZJAX_IN_PART(0)
XLA_FFI_DEFINE_HANDLER_SYMBOL(ByzjaxGram, GramImpl<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ByzjaxGramBf16, GramImpl<ffi::DataType::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ByzjaxRowSqDists, RowSqDistsImpl<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ByzjaxRowSqDistsBf16, RowSqDistsImpl<ffi::DataType::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ByzjaxRowSqNorms, RowSqNormsImpl<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ByzjaxRowSqNormsBf16, RowSqNormsImpl<ffi::DataType::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

#endif

#if BYZJAX_IN_PART(1)
XLA_FFI_DEFINE_HANDLER_SYMBOL(ByzjaxStepSqDists, StepSqDistsImpl<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("distances"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ByzjaxStepSqDistsBf16,
                              StepSqDistsImpl<ffi::DataType::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("distances"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ByzjaxBf16Rows, RowRuleImpl<ffi::DataType::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int32_t>("mode"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ByzjaxF32Rows, RowRuleImpl<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("mode"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ByzjaxNetwork, NetworkImpl<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("id"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ByzjaxNetworkBf16, NetworkImpl<ffi::DataType::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("id"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ByzjaxMixRows, MixRowsImpl<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("sparse")
                                  .Attr<int32_t>("pairs"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ByzjaxMixRowsBf16, MixRowsImpl<ffi::DataType::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("sparse")
                                  .Attr<int32_t>("pairs"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ByzjaxRowMoments, RowMomentsImpl<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ByzjaxRowMomentsBf16, RowMomentsImpl<ffi::DataType::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
#endif
