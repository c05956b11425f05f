// Softmax family, CUDA backend. The math is math/softmax.h, evaluated in at::opmath_type (float for
// half/bfloat16, double for double); reductions are in that type too.
//
// Paths (RowLayout (outer, n, inner); a row is x[o, 0:n, i]):
//   inner == 1, n <= 1024        warp per row, the row in registers (32·E elements, E = 8 or 32 per lane;
//                                double: n <= 256 only); two-pass max / Σexp on the registers.
//   inner == 1, longer rows      block per row. Pass 1 reads the row once, accumulating the online
//                                (max, Σexp) pair (forward) or Σ vjp_term (backward); pass 2 writes the row.
//                                When the row (both rows in backward) fits in shared memory, pass 1 caches it
//                                there in the input dtype and pass 2 reads the cache, so global memory is read
//                                once; otherwise pass 2 reads global memory again. logsumexp has no pass 2.
//   inner > 1                    thread per (o, i) column, adjacent threads adjacent i (coalesced for
//                                inner >= 32); online pass over n, then the write pass.
//   logsumexp backward           elementwise over x, no reduction.
// Rows are read in 16-byte packs when the base pointers are 16-byte aligned and n is a multiple of the
// pack size (so every row start is aligned too); otherwise in scalars, with the same chunk structure.
//
// Special values follow the exact two-pass algorithm of math/softmax.h (see online_add and finish_online
// for how the online paths match it): rows holding NaN give NaN; softmax and log_softmax give NaN on rows
// of all -inf and on rows holding +inf; logsumexp gives -inf on rows of all -inf and +inf on rows holding
// +inf (and no NaN).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cstdint>

#include "cuda/launch.cuh"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"
#include "ops/softmax.h"

namespace torch_vjp::cuda {
namespace {

using math::SoftmaxKind;

template <class T>
using Opmath = at::opmath_type<T>;

constexpr int kWarpRowThreads = 128;  // warp-per-row kernels: 4 rows per block
constexpr int kMaxBlockThreads = 512;  // 1024 would cap registers at 64 and spill the unrolled loops
constexpr int kUnroll = 4;            // packs in flight per thread in the block-per-row loops
constexpr int kColumnThreads = 256;
constexpr int kColumnChunk = 4;       // elements per online merge in the column kernels
constexpr int kElemThreads = 256;

// ---------------------------------------------------------------------------------------------------------
// A row of n elements as chunks of P = kPackElems<T> elements. Vectorised: chunk c is elements
// [cP, cP + P), one 16-byte pack (requires n % P == 0 and an aligned row start). Scalar: chunks come in
// groups of 32 (one per lane of a warp) covering 32P consecutive elements, and element k of chunk c is
// (c / 32)·32P + 32k + c % 32, so the k-th scalar load of a warp touches 32 consecutive elements
// (coalesced); elements past n are padding. Each kernel maps chunks to threads; the chunk is the unit of
// loads, stores, caching and online merges.
template <class T>
struct RowChunks {
  static constexpr int P = kPackElems<T>;

  static __host__ __device__ __forceinline__ int64_t count(int64_t n, bool vec) {
    return vec ? n / P : ceil_div(n, int64_t(kWarpSize) * P) * kWarpSize;
  }
  static __device__ __forceinline__ int64_t elem(int64_t c, int k) {
    return (c / kWarpSize) * (int64_t(kWarpSize) * P) + int64_t(k) * kWarpSize + c % kWarpSize;
  }
  static __device__ __forceinline__ Pack<T> load(const T* row, int64_t c, int64_t n, bool vec, T pad) {
    if (vec) return load_pack(row + c * P);
    Pack<T> p;
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int64_t e = elem(c, k);
      p.v[k] = e < n ? row[e] : pad;
    }
    return p;
  }
  static __device__ __forceinline__ void store(T* row, int64_t c, int64_t n, bool vec, const Pack<T>& p) {
    if (vec) return store_pack(row + c * P, p);
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int64_t e = elem(c, k);
      if (e < n) row[e] = p.v[k];
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// Forward epilogue: the row constants of math/softmax.h from (m, s), m the row max and s the two-pass
// Σ exp(x - shift_for<K>(m)); out(x) is the output element, lse the logsumexp row value.
template <SoftmaxKind K, class S>
struct ForwardRow {
  S m = 0, inv_s = 0, log_s = 0, lse = 0;
  __device__ __forceinline__ ForwardRow(S row_max, S s) : m(row_max) {
    if constexpr (K == SoftmaxKind::Softmax) inv_s = S(1) / s;
    else if constexpr (K == SoftmaxKind::LogSoftmax) log_s = math::log_(s);
    else lse = math::shift_for<K>(row_max) + math::log_(s);
  }
  __device__ __forceinline__ S out(S x) const {
    if constexpr (K == SoftmaxKind::Softmax) return math::softmax_out(x, m, inv_s);
    else return math::log_softmax_out(x, m, log_s);
  }
};

// Folds a chunk of values (padding = -inf) into the online partial `st`. The chunk's own partial is exact
// two-pass (cm = max, cs = Σ exp(v - cm)), so e^{inf - inf} = NaN appears wherever the two-pass algorithm
// over the row would have it. A chunk of only -inf is skipped: it adds e^{-inf - M} = 0 to any row whose max
// M is above -inf, and a row of only -inf ends as the empty partial {-inf, 0}, which finish_online maps to
// the two-pass result. nan_seen (logsumexp only) records a NaN element, which max_nan makes cm NaN.
template <SoftmaxKind K, class S, int C>
__device__ __forceinline__ void online_add(MaxSum<S>& st, const S (&v)[C], bool& nan_seen) {
  S cm = v[0];
#pragma unroll
  for (int k = 1; k < C; ++k) cm = max_nan(cm, v[k]);
  if constexpr (K == SoftmaxKind::LogSumExp) nan_seen |= (cm != cm);
  if (cm == neg_inf<S>()) return;
  S cs = 0;
#pragma unroll
  for (int k = 0; k < C; ++k) cs += math::exp_(v[k] - cm);
  math::online_merge(st.m, st.s, cm, cs);
}

// The row constants from the merged online partial. Online s is Σ exp(x - m). For softmax and log_softmax
// shift_for(m) = m, so that is the two-pass s (and for the empty partial {-inf, 0} of an all -inf row they
// give NaN, as the two-pass algorithm does). For logsumexp the two-pass s is Σ exp(x - shift_for(m)): the
// same for finite (or NaN) m; for m = -inf (empty partial) it is 0 = s; for m = +inf it is Σ exp(x) = +inf,
// or NaN if some x is NaN, while online s is NaN (e^{inf - inf}) either way, hence nan_seen.
template <SoftmaxKind K, class S>
__device__ __forceinline__ ForwardRow<K, S> finish_online(MaxSum<S> st, bool nan_seen) {
  if constexpr (K == SoftmaxKind::LogSumExp) {
    if (st.m == S(INFINITY)) st.s = nan_seen ? S(NAN) : S(INFINITY);
  }
  return ForwardRow<K, S>(st.m, st.s);
}

// Backward: the row reduction term and the gradient of math/softmax.h.
template <SoftmaxKind K>
struct BackwardMath {
  static_assert(K != SoftmaxKind::LogSumExp, "logsumexp backward has no row reduction");
  template <class S>
  static __device__ __forceinline__ S term(S dy, S y) {
    if constexpr (K == SoftmaxKind::Softmax) return math::softmax_vjp_term(dy, y);
    else return math::log_softmax_vjp_term(dy, y);
  }
  template <class S>
  static __device__ __forceinline__ S grad(S dy, S y, S c) {
    if constexpr (K == SoftmaxKind::Softmax) return math::softmax_vjp(dy, y, c);
    else return math::log_softmax_vjp(dy, y, c);
  }
};

// =========================================================================================================
// inner == 1, n <= 32·E: one warp per row, row in registers. Lane l holds chunks l, l + 32, ... (kChunks of
// them, E elements); chunks past the row's count are not loaded and not used.
template <SoftmaxKind K, class T, int E>
__global__ void __launch_bounds__(kWarpRowThreads)
    forward_warp_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t n, bool vec) {
  using S = Opmath<T>;
  using Row = RowChunks<T>;
  constexpr int P = Row::P;
  constexpr int kChunks = E / P;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  const int64_t num_chunks = Row::count(n, vec);
  for (int64_t row = blockIdx.x * warps_per_block + threadIdx.x / kWarpSize; row < rows;
       row += int64_t(gridDim.x) * warps_per_block) {
    const T* xr = x + row * n;
    Pack<T> p[kChunks];
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      const int64_t c = lane + j * kWarpSize;
      p[j] = c < num_chunks ? Row::load(xr, c, n, vec, T(neg_inf<S>())) : filled_pack(T(neg_inf<S>()));
    }
    S m = neg_inf<S>();
#pragma unroll
    for (int j = 0; j < kChunks; ++j)
#pragma unroll
      for (int k = 0; k < P; ++k) m = max_nan(m, S(p[j].v[k]));
    m = warp_max(m);
    const S shift = math::shift_for<K>(m);
    S s = 0;
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      if (lane + j * kWarpSize < num_chunks) {
#pragma unroll
        for (int k = 0; k < P; ++k) s += math::exp_(S(p[j].v[k]) - shift);  // padding adds exp(-inf - shift) = 0
      }
    }
    s = warp_sum(s);
    const ForwardRow<K, S> r(m, s);
    if constexpr (K == SoftmaxKind::LogSumExp) {
      if (lane == 0) y[row] = T(r.lse);
    } else {
      T* yr = y + row * n;
#pragma unroll
      for (int j = 0; j < kChunks; ++j) {
        const int64_t c = lane + j * kWarpSize;
        if (c < num_chunks) {
          Pack<T> q;
#pragma unroll
          for (int k = 0; k < P; ++k) q.v[k] = T(r.out(S(p[j].v[k])));
          Row::store(yr, c, n, vec, q);
        }
      }
    }
  }
}

// Softmax / log_softmax backward, warp per row. y = softmax(x) has J = diag(y) - y yᵀ (symmetric), so
// dx = Jᵀ dy = y ⊙ (dy - c), c = Σ dy·y; y = log_softmax(x) has J = I - 1 pᵀ, p = exp(y), so
// dx = dy - exp(y) ⊙ S, S = Σ dy. Both are one row sum of term(dy, y) then the elementwise grad.
// Reads dy and y once (kept in registers), writes dx once. Padding dy = y = 0 adds 0 to either sum.
template <SoftmaxKind K, class T, int E>
__global__ void __launch_bounds__(kWarpRowThreads)
    backward_warp_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, int64_t rows,
                         int64_t n, bool vec) {
  using S = Opmath<T>;
  using Row = RowChunks<T>;
  using B = BackwardMath<K>;
  constexpr int P = Row::P;
  constexpr int kChunks = E / P;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  const int64_t num_chunks = Row::count(n, vec);
  for (int64_t row = blockIdx.x * warps_per_block + threadIdx.x / kWarpSize; row < rows;
       row += int64_t(gridDim.x) * warps_per_block) {
    const T* dyr = dy + row * n;
    const T* yr = y + row * n;
    Pack<T> pdy[kChunks], py[kChunks];
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      const int64_t c = lane + j * kWarpSize;
      pdy[j] = c < num_chunks ? Row::load(dyr, c, n, vec, T(0)) : filled_pack(T(0));
      py[j] = c < num_chunks ? Row::load(yr, c, n, vec, T(0)) : filled_pack(T(0));
    }
    S sum = 0;
#pragma unroll
    for (int j = 0; j < kChunks; ++j)
#pragma unroll
      for (int k = 0; k < P; ++k) sum += B::term(S(pdy[j].v[k]), S(py[j].v[k]));
    sum = warp_sum(sum);
    T* dxr = dx + row * n;
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      const int64_t c = lane + j * kWarpSize;
      if (c < num_chunks) {
        Pack<T> q;
#pragma unroll
        for (int k = 0; k < P; ++k) q.v[k] = T(B::grad(S(pdy[j].v[k]), S(py[j].v[k]), sum));
        Row::store(dxr, c, n, vec, q);
      }
    }
  }
}

// =========================================================================================================
// inner == 1, long rows: one block per row (grid-stride over rows). Thread t owns chunks t, t + blockDim,
// ...; with kCached, pass 1 stores each chunk it loads at cache[c] (dynamic shared memory, count(n) packs)
// and pass 2 reads the same slots back. Each slot is written and read by the same thread only, so the
// cache needs no barrier; block_allreduce's barriers separate the passes and the rows.

// body(c, load(c)) for c = first, first + stride, ... < end, issuing U loads before the U bodies.
template <int U, class Load, class Body>
__device__ __forceinline__ void chunk_loop(int64_t first, int64_t stride, int64_t end, const Load& load,
                                           const Body& body) {
  using D = decltype(load(first));
  for (int64_t c0 = first; c0 < end; c0 += U * stride) {
    D d[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (c0 + u * stride < end) d[u] = load(c0 + u * stride);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (c0 + u * stride < end) body(c0 + u * stride, d[u]);
  }
}

template <class T>
struct Pack2 {
  Pack<T> a, b;
};

// body(c, chunk c of the row(s)) over this thread's chunks, read from global memory. The vectorised and the
// scalar loops are separate so that each gets its own unrolling: kUnroll packs in flight, or one scalar
// chunk (whose P loads are already independent) at a time.
template <class T, class Body>
__device__ __forceinline__ void for_own_chunks(const T* a, int64_t n, bool vec, T pad, const Body& body) {
  using Row = RowChunks<T>;
  const int64_t num_chunks = Row::count(n, vec);
  if (vec) {
    chunk_loop<kUnroll>(threadIdx.x, blockDim.x, num_chunks, [a](int64_t c) { return load_pack(a + c * Row::P); },
                        body);
  } else {
    chunk_loop<1>(threadIdx.x, blockDim.x, num_chunks, [=](int64_t c) { return Row::load(a, c, n, false, pad); },
                  body);
  }
}

template <class T, class Body>
__device__ __forceinline__ void for_own_chunks(const T* a, const T* b, int64_t n, bool vec, T pad,
                                               const Body& body) {
  using Row = RowChunks<T>;
  const int64_t num_chunks = Row::count(n, vec);
  if (vec) {
    chunk_loop<kUnroll>(threadIdx.x, blockDim.x, num_chunks, [a, b](int64_t c) {
      return Pack2<T>{load_pack(a + c * Row::P), load_pack(b + c * Row::P)};
    }, body);
  } else {
    chunk_loop<1>(threadIdx.x, blockDim.x, num_chunks, [=](int64_t c) {
      return Pack2<T>{Row::load(a, c, n, false, pad), Row::load(b, c, n, false, pad)};
    }, body);
  }
}

template <SoftmaxKind K, class T, bool kCached>
__global__ void __launch_bounds__(kMaxBlockThreads)
    forward_block_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t n, bool vec) {
  static_assert(!(kCached && K == SoftmaxKind::LogSumExp), "logsumexp reads the row once: nothing to cache");
  using S = Opmath<T>;
  using Row = RowChunks<T>;
  constexpr int P = Row::P;
  extern __shared__ __align__(16) unsigned char smem[];
  Pack<T>* cache = reinterpret_cast<Pack<T>*>(smem);
  const int64_t num_chunks = Row::count(n, vec);
  const T pad = T(neg_inf<S>());
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * n;
    MaxSum<S> st{neg_inf<S>(), S(0)};
    bool nan_seen = false;
    for_own_chunks(xr, n, vec, pad, [&](int64_t c, const Pack<T>& p) {
      if constexpr (kCached) cache[c] = p;
      S v[P];
#pragma unroll
      for (int k = 0; k < P; ++k) v[k] = S(p.v[k]);
      online_add<K>(st, v, nan_seen);
    });
    st = block_online_merge(st);
    if constexpr (K == SoftmaxKind::LogSumExp) nan_seen = __syncthreads_or(nan_seen);
    const ForwardRow<K, S> r = finish_online<K>(st, nan_seen);
    if constexpr (K == SoftmaxKind::LogSumExp) {
      if (threadIdx.x == 0) y[row] = T(r.lse);
    } else {
      T* yr = y + row * n;
      const auto write = [&](int64_t c, const Pack<T>& p) {
        Pack<T> q;
#pragma unroll
        for (int k = 0; k < P; ++k) q.v[k] = T(r.out(S(p.v[k])));
        Row::store(yr, c, n, vec, q);
      };
      if constexpr (kCached)
        chunk_loop<kUnroll>(threadIdx.x, blockDim.x, num_chunks, [cache](int64_t c) { return cache[c]; }, write);
      else
        for_own_chunks(xr, n, vec, pad, write);
    }
  }
}

// Softmax / log_softmax backward, block per row. softmax: J = diag(y) - y yᵀ, so dx = y ⊙ (dy - Σ dy·y);
// log_softmax: J = I - 1 exp(y)ᵀ, so dx = dy - exp(y) Σ dy (derivations at backward_warp_kernel): one row
// sum of term(dy, y), then dx = grad(dy, y, sum). Pass 1 reads dy and y and sums term; pass 2 writes dx
// from the shared-memory copies (kCached: dy at cache[c], y at cache[count + c]; global memory read once)
// or from a second global read.
template <SoftmaxKind K, class T, bool kCached>
__global__ void __launch_bounds__(kMaxBlockThreads)
    backward_block_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, int64_t rows,
                          int64_t n, bool vec) {
  using S = Opmath<T>;
  using Row = RowChunks<T>;
  using B = BackwardMath<K>;
  constexpr int P = Row::P;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t num_chunks = Row::count(n, vec);
  Pack<T>* cache_dy = reinterpret_cast<Pack<T>*>(smem);
  Pack<T>* cache_y = cache_dy + num_chunks;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* dyr = dy + row * n;
    const T* yr = y + row * n;
    S sum = 0;
    for_own_chunks(dyr, yr, n, vec, T(0), [&](int64_t c, const Pack2<T>& p) {
      if constexpr (kCached) {
        cache_dy[c] = p.a;
        cache_y[c] = p.b;
      }
#pragma unroll
      for (int k = 0; k < P; ++k) sum += B::term(S(p.a.v[k]), S(p.b.v[k]));
    });
    sum = block_sum(sum);
    T* dxr = dx + row * n;
    const auto write = [&](int64_t c, const Pack2<T>& p) {
      Pack<T> q;
#pragma unroll
      for (int k = 0; k < P; ++k) q.v[k] = T(B::grad(S(p.a.v[k]), S(p.b.v[k]), sum));
      Row::store(dxr, c, n, vec, q);
    };
    if constexpr (kCached) {
      chunk_loop<kUnroll>(threadIdx.x, blockDim.x, num_chunks,
                          [cache_dy, cache_y](int64_t c) { return Pack2<T>{cache_dy[c], cache_y[c]}; }, write);
    } else {
      for_own_chunks(dyr, yr, n, vec, T(0), write);
    }
  }
}

// =========================================================================================================
// inner > 1: thread per column (o, i), elements `inner` apart. Online pass over n in chunks of kColumnChunk,
// then the write pass (logsumexp: one value per column, at o·inner + i = the column index).
template <SoftmaxKind K, class T>
__global__ void __launch_bounds__(kColumnThreads)
    forward_column_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t outer, int64_t n, int64_t inner) {
  using S = Opmath<T>;
  const int64_t columns = outer * inner;
  for (int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; col < columns;
       col += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = col / inner;
    const int64_t offset = o * n * inner + (col - o * inner);
    const T* xc = x + offset;
    MaxSum<S> st{neg_inf<S>(), S(0)};
    bool nan_seen = false;
    for (int64_t j0 = 0; j0 < n; j0 += kColumnChunk) {
      S v[kColumnChunk];
#pragma unroll
      for (int k = 0; k < kColumnChunk; ++k) v[k] = j0 + k < n ? S(xc[(j0 + k) * inner]) : neg_inf<S>();
      online_add<K>(st, v, nan_seen);
    }
    const ForwardRow<K, S> r = finish_online<K>(st, nan_seen);
    if constexpr (K == SoftmaxKind::LogSumExp) {
      y[col] = T(r.lse);
    } else {
      T* yc = y + offset;
      for (int64_t j = 0; j < n; ++j) yc[j * inner] = T(r.out(S(xc[j * inner])));
    }
  }
}

// Softmax / log_softmax backward, thread per column. softmax: J = diag(y) - y yᵀ, so dx = y ⊙ (dy - Σ dy·y);
// log_softmax: J = I - 1 exp(y)ᵀ, so dx = dy - exp(y) Σ dy (derivations at backward_warp_kernel): one column
// sum of term(dy, y), then dx = grad(dy, y, sum). Reads dy and y twice (the second time mostly from
// cache), writes dx once.
template <SoftmaxKind K, class T>
__global__ void __launch_bounds__(kColumnThreads)
    backward_column_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, int64_t outer,
                           int64_t n, int64_t inner) {
  using S = Opmath<T>;
  using B = BackwardMath<K>;
  const int64_t columns = outer * inner;
  for (int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; col < columns;
       col += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = col / inner;
    const int64_t offset = o * n * inner + (col - o * inner);
    S sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += B::term(S(dy[offset + j * inner]), S(y[offset + j * inner]));
    for (int64_t j = 0; j < n; ++j) {
      const int64_t e = offset + j * inner;
      dx[e] = T(B::grad(S(dy[e]), S(y[e]), sum));
    }
  }
}

// =========================================================================================================
// logsumexp backward. out = lse(x) over each row: a 1×n Jacobian J = pᵀ, p = exp(x - out), so
// dx = Jᵀ dy_row = dy_row · exp(x - out), elementwise with no reduction. Reads x once and the row's dy and
// out (outer·inner values, index o·inner + i; cached, as neighbouring elements share them), writes dx once.
// Element e = (o·n + j)·inner + i; I is uint32_t when the indices fit (cheaper division), else uint64_t.
template <class T, class I>
__global__ void __launch_bounds__(kElemThreads)
    logsumexp_backward_kernel(const T* __restrict__ dy, const T* __restrict__ out, const T* __restrict__ x,
                              T* __restrict__ dx, int64_t numel, I n, I inner, bool vec) {
  using S = Opmath<T>;
  constexpr int P = kPackElems<T>;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t num_threads = int64_t(gridDim.x) * blockDim.x;
  int64_t scalar_begin = 0;
  if (vec) {
    const int64_t num_packs = numel / P;
    for (int64_t p = tid; p < num_packs; p += num_threads) {
      const Pack<T> px = load_pack(x + p * P);
      // (o, j, i) of the pack's first element, then stepped: one division per pack.
      const I e = I(p * P);
      I i = e % inner;
      const I t = e / inner;
      I j = t % n;
      I o = t / n;
      Pack<T> q;
#pragma unroll
      for (int k = 0; k < P; ++k) {
        const I r = o * inner + i;
        q.v[k] = T(math::logsumexp_vjp(S(dy[r]), S(px.v[k]), S(out[r])));
        if (++i == inner) {
          i = 0;
          if (++j == n) {
            j = 0;
            ++o;
          }
        }
      }
      store_pack(dx + p * P, q);
    }
    scalar_begin = num_packs * P;
  }
  for (int64_t e = scalar_begin + tid; e < numel; e += num_threads) {
    const I ie = I(e);
    const I r = ie / (n * inner) * inner + ie % inner;
    dx[e] = T(math::logsumexp_vjp(S(dy[r]), S(x[e]), S(out[r])));
  }
}

// =========================================================================================================
// Launchers.

// Longest row of the warp-per-row kernels: 32 elements per lane (E = 32), or 8 for double, whose E = 32
// kernels would need ~170 registers.
template <class T>
inline constexpr int64_t kWarpRowMax = sizeof(T) <= 4 ? 32 * 32 : 32 * 8;

// Block size for the block-per-row kernels: about kUnroll chunks per thread, 128..512 threads.
inline int block_threads(int64_t num_chunks) {
  int threads = 128;
  while (threads < kMaxBlockThreads && int64_t(threads) * kUnroll < num_chunks) threads *= 2;
  return threads;
}

template <auto kKernel>
void set_dynamic_smem(size_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

// Shared memory left for the cache of a block-per-row kernel, per block.
template <auto kKernel>
size_t cache_budget() {
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  const size_t used = static_smem_bytes<kKernel>();
  return optin > used ? optin - used : 0;
}

template <SoftmaxKind K, class T>
void launch_forward(const RowLayout& l, const T* x, T* y) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int P = kPackElems<T>;
  if (l.inner > 1) {
    const unsigned blocks = grid_blocks(ceil_div(l.outer * l.inner, kColumnThreads));
    forward_column_kernel<K, T><<<blocks, kColumnThreads, 0, stream>>>(x, y, l.outer, l.n, l.inner);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t rows = l.outer, n = l.n;
  // logsumexp writes one scalar per row, so only x's alignment matters for it.
  const bool vec = n % P == 0 && can_vectorize(x) && (K == SoftmaxKind::LogSumExp || can_vectorize(y));
  if (n <= kWarpRowMax<T>) {
    const unsigned blocks = grid_blocks(ceil_div(rows, kWarpRowThreads / kWarpSize));
    if (n <= 32 * 8) forward_warp_kernel<K, T, 8><<<blocks, kWarpRowThreads, 0, stream>>>(x, y, rows, n, vec);
    else if constexpr (kWarpRowMax<T> > 32 * 8)
      forward_warp_kernel<K, T, 32><<<blocks, kWarpRowThreads, 0, stream>>>(x, y, rows, n, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t num_chunks = RowChunks<T>::count(n, vec);
  const int threads = block_threads(num_chunks);
  const unsigned blocks = grid_blocks(rows);
  if constexpr (K != SoftmaxKind::LogSumExp) {
    constexpr auto cached = forward_block_kernel<K, T, true>;
    const size_t bytes = size_t(num_chunks) * sizeof(Pack<T>);
    if (bytes <= cache_budget<cached>()) {
      set_dynamic_smem<cached>(bytes);
      cached<<<blocks, threads, bytes, stream>>>(x, y, rows, n, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  forward_block_kernel<K, T, false><<<blocks, threads, 0, stream>>>(x, y, rows, n, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <SoftmaxKind K, class T>
void launch_backward(const RowLayout& l, const T* dy, const T* y, T* dx) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int P = kPackElems<T>;
  if (l.inner > 1) {
    const unsigned blocks = grid_blocks(ceil_div(l.outer * l.inner, kColumnThreads));
    backward_column_kernel<K, T><<<blocks, kColumnThreads, 0, stream>>>(dy, y, dx, l.outer, l.n, l.inner);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t rows = l.outer, n = l.n;
  const bool vec = n % P == 0 && can_vectorize(dy, y, dx);
  if (n <= kWarpRowMax<T>) {
    const unsigned blocks = grid_blocks(ceil_div(rows, kWarpRowThreads / kWarpSize));
    if (n <= 32 * 8) backward_warp_kernel<K, T, 8><<<blocks, kWarpRowThreads, 0, stream>>>(dy, y, dx, rows, n, vec);
    else if constexpr (kWarpRowMax<T> > 32 * 8)
      backward_warp_kernel<K, T, 32><<<blocks, kWarpRowThreads, 0, stream>>>(dy, y, dx, rows, n, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t num_chunks = RowChunks<T>::count(n, vec);
  const int threads = block_threads(num_chunks);
  const unsigned blocks = grid_blocks(rows);
  constexpr auto cached = backward_block_kernel<K, T, true>;
  const size_t bytes = 2 * size_t(num_chunks) * sizeof(Pack<T>);
  if (bytes <= cache_budget<cached>()) {
    set_dynamic_smem<cached>(bytes);
    cached<<<blocks, threads, bytes, stream>>>(dy, y, dx, rows, n, vec);
  } else {
    backward_block_kernel<K, T, false><<<blocks, threads, 0, stream>>>(dy, y, dx, rows, n, vec);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T, class I>
void launch_logsumexp_backward(const RowLayout& l, const T* dy, const T* out, const T* x, T* dx) {
  constexpr auto kernel = logsumexp_backward_kernel<T, I>;
  const int64_t numel = l.outer * l.n * l.inner;
  const bool vec = can_vectorize(x, dx);
  const int64_t per_thread = vec ? kPackElems<T> : 1;
  const unsigned blocks =
      grid_blocks(ceil_div(numel, per_thread * kElemThreads), one_wave_blocks<kernel, kElemThreads>());
  kernel<<<blocks, kElemThreads, 0, at::cuda::getCurrentCUDAStream()>>>(dy, out, x, dx, numel, I(l.n), I(l.inner),
                                                                        vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct CudaSoftmax {
  template <SoftmaxKind K>
  static void forward(const RowLayout& l, const at::Tensor& input, const at::Tensor& output) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "torch_vjp_softmax_cuda", [&] {
      launch_forward<K, scalar_t>(l, input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>());
    });
  }

  template <SoftmaxKind K>
  static void backward(const RowLayout& l, const at::Tensor& grad_output, const at::Tensor& output,
                       const at::Tensor& input, const at::Tensor& grad_input) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, grad_input.scalar_type(), "torch_vjp_softmax_backward_cuda", [&] {
          const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
          const scalar_t* y = output.const_data_ptr<scalar_t>();
          scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
          if constexpr (K == SoftmaxKind::LogSumExp) {
            const scalar_t* x = input.const_data_ptr<scalar_t>();
            // 32-bit index arithmetic (cheaper division) when every element index fits.
            if (grad_input.numel() < (int64_t(1) << 31)) launch_logsumexp_backward<scalar_t, uint32_t>(l, dy, y, x, dx);
            else launch_logsumexp_backward<scalar_t, uint64_t>(l, dy, y, x, dx);
          } else {
            launch_backward<K, scalar_t>(l, dy, y, dx);
          }
        });
  }
};

}  // namespace
}  // namespace torch_vjp::cuda

TORCH_LIBRARY_IMPL(torch_vjp, CUDA, m) { torch_vjp::register_softmax<torch_vjp::cuda::CudaSoftmax>(m); }
