// CPU loop helpers shared by the CPU kernels. Data stays in its storage type S (float, double, or a half
// type) in memory; the math runs on at::opmath_type<S> (float for half types) in at::vec registers: each
// Vectorized<S> worth of elements is widened to one or two opmath vectors, and narrowed once on store.
// A row's last, partial group is loaded and stored with a lane count (zeros in the unused lanes, which a
// reduction pads with its identity), so every element goes through the same vector code, rows shorter
// than one vector included. A map or a reduction is one pass over memory.
//
// Outputs of at least kStreamBytes are written with streaming (non-temporal) stores, see `stream`.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "math/common.h"
#include "ops/softmax.h"

namespace torch_vjp::cpu {

template <class S>
using opmath = at::opmath_type<S>;

using math::Vec;  // at::vec::Vectorized

// On the row loops: inline the op's lambda and its math into the loop, whatever the compiler's size
// heuristics say (an out-of-line call per vector costs more than the math).
#define TVJP_ROW_LOOP __attribute__((flatten))
// A row loop copies the op's lambda into a local first. Reached through a reference, its captures
// (a row's 1/ρ, shift or scale) may alias the loop's stores, so the compiler reloads and re-broadcasts them every
// vector where the loop is not inlined into its caller (normalize's forward: twice the instructions a vector).

// A store of a whole new cache line first reads the line (read-for-ownership): writing an output costs
// two passes over memory, a streaming store one. Worth it when the output would not stay in cache for
// its reader anyway; below this size a cached store keeps it there for the next op.
constexpr int64_t kStreamBytes = int64_t(4) << 20;

inline bool should_stream(int64_t output_bytes) { return output_bytes >= kStreamBytes; }

// Streaming stores need an address aligned to the vector; the default build has none and stores normally.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
constexpr bool kCanStream = true;
#else
constexpr bool kCanStream = false;
#endif

// One group of Vectorized<S>::size() elements as kParts opmath vectors.
template <class S>
struct Lanes {
  using T = opmath<S>;
  static constexpr int64_t kWidth = Vec<S>::size();
  static constexpr int kParts = std::is_same_v<S, T> ? 1 : 2;
  using Parts = std::array<Vec<T>, kParts>;

  // The first `count` (≤ kWidth) elements at p; the other lanes hold 0.
  TVJP_HD static Parts load(const S* p, int64_t count = kWidth) {
    if constexpr (kParts == 1) {
      return {Vec<T>::loadu(p, count)};
    } else {
      const auto [lo, hi] = at::vec::convert_to_float<S>(Vec<S>::loadu(p, count));
      return {lo, hi};
    }
  }

  // The same group from an opmath array (a half type's parameters or scratch, kept in float).
  TVJP_HD static Parts load(const T* p, int64_t count = kWidth)
    requires(kParts == 2)
  {
    constexpr int64_t kPart = Vec<T>::size();
    return {Vec<T>::loadu(p, std::min(count, kPart)), Vec<T>::loadu(p + kPart, std::max<int64_t>(count - kPart, 0))};
  }

  TVJP_HD static void store(S* p, const Parts& v, int64_t count = kWidth) {
    if constexpr (kParts == 1) v[0].store(p, count);
    else at::vec::convert_from_float<S>(v[0], v[1]).store(p, count);
  }

  // A whole group, non-temporal; p aligned to sizeof(Vec<S>). Fenced by `fence` before others read it.
  TVJP_HD static void stream(S* p, const Parts& v) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<S, float>) _mm512_stream_ps(p, v[0]);
    else if constexpr (std::is_same_v<S, double>) _mm512_stream_pd(p, v[0]);
    else _mm512_stream_si512(reinterpret_cast<__m512i*>(p), at::vec::convert_from_float<S>(v[0], v[1]));
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<S, float>) _mm256_stream_ps(p, v[0]);
    else if constexpr (std::is_same_v<S, double>) _mm256_stream_pd(p, v[0]);
    else _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::convert_from_float<S>(v[0], v[1]));
#else
    store(p, v);
#endif
  }

  // Lanes at and past `count` set to `fill`, the identity of the reduction that follows.
  TVJP_HD static Parts pad(Parts v, int64_t count, T fill) {
    for (int k = 0; k < kParts; ++k) {
      const int64_t first = k * int64_t(Vec<T>::size());
      const auto inside = Vec<T>::arange(T(first), T(1)) < Vec<T>(T(count));
      v[k] = Vec<T>::blendv(Vec<T>(fill), v[k], inside);
    }
    return v;
  }
};

// Orders this thread's streaming stores before whatever signals their completion to other threads.
inline void fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// Row inputs are in the storage type S or in opmath<S> (parameters and scratch of a half type).
template <class S, class... In>
constexpr bool kRowInputs = ((std::is_same_v<S, In> || std::is_same_v<opmath<S>, In>) && ...);

// fn applied to one group, for K outputs: fn returns one opmath vector (K = 1) or std::array of K.
template <class L, size_t K, class Fn, class... Groups>
TVJP_HD std::array<typename L::Parts, K> apply_outputs(const Fn& fn, const Groups&... groups) {
  std::array<typename L::Parts, K> r;
  for (int p = 0; p < L::kParts; ++p) {
    if constexpr (K == 1) {
      r[0][p] = fn(groups[p]...);
    } else {
      const auto values = fn(groups[p]...);
      for (size_t k = 0; k < K; ++k) r[k][p] = values[k];
    }
  }
  return r;
}

// outs[k][j] = fn(in[j]...)[k] for j < n, fn taking opmath vectors (one output: fn returns a vector). Inlined
// into its caller too: out of line (normalize's forward, once its row lambda grew) the loop took 3 instructions
// a vector where inlined it took 2.
// `stream`: full groups are written with streaming stores (a first, partial group aligns them; outputs
// aligned differently from each other are stored normally).
template <class S, size_t K, class Fn, class... In>
TVJP_HD TVJP_ROW_LOOP void map_row(const std::array<S*, K>& outs, int64_t n, bool stream, const Fn& fn_ref, const In*... in) {
  static_assert(kRowInputs<S, In...>, "row inputs in S or opmath<S> (loadu would reinterpret)");
  using L = Lanes<S>;
  const Fn fn = fn_ref;  // a local copy: see TVJP_ROW_LOOP
  const auto offset = [](const S* p) {
    return int64_t(reinterpret_cast<std::uintptr_t>(p) % sizeof(Vec<S>)) / int64_t(sizeof(S));
  };
  const auto store = [&](int64_t at, const auto& results, int64_t count) {
    for (size_t k = 0; k < K; ++k) L::store(outs[k] + at, results[k], count);
  };
  bool aligned_alike = true;
  for (size_t k = 1; k < K; ++k) aligned_alike = aligned_alike && offset(outs[k]) == offset(outs[0]);
  int64_t j = 0;
  if (kCanStream && stream && aligned_alike) {
    const int64_t head = offset(outs[0]) == 0 ? 0 : std::min(n, L::kWidth - offset(outs[0]));
    if (head > 0) store(0, apply_outputs<L, K>(fn, L::load(in, head)...), head);
    for (j = head; j + L::kWidth <= n; j += L::kWidth) {
      const auto results = apply_outputs<L, K>(fn, L::load(in + j)...);
      for (size_t k = 0; k < K; ++k) L::stream(outs[k] + j, results[k]);
    }
  } else {
    for (; j + L::kWidth <= n; j += L::kWidth) store(j, apply_outputs<L, K>(fn, L::load(in + j)...), L::kWidth);
  }
  if (j < n) store(j, apply_outputs<L, K>(fn, L::load(in + j, n - j)...), n - j);
}

template <class S, class Fn, class... In>
TVJP_HD void map_row(S* out, int64_t n, bool stream, const Fn& fn, const In*... in) {
  map_row(std::array<S*, 1>{out}, n, stream, fn, in...);
}

// The sum of a row's vectors: lanes accumulate in opmath for a chunk of kChunk groups, then the chunk's total
// is added in double with a compensation (Knuth's TwoSum: the exact low part of each addition, branch-free, so
// the flush stays off the loop's critical path), and rounding grows with the chunk length alone, not with n (a
// double row of 128256 terms summed chunk after chunk lost ~30 ulps; torch's own sums are cascaded).
// for_each_chunk runs the groups: whole chunks in a loop of their own, flushed after each, so the loop carries
// no per-group counter (a count and a test a vector cost as much as the sum's own add); the last chunk, whole
// or not, and the row's tail share result()'s flush (a row of exactly one chunk flushes once, not twice).
template <class T>
struct RowSum {
  static constexpr int64_t kChunk = 16;
  Vec<T> acc = Vec<T>(T(0));
  double total = 0, compensation = 0;
  TVJP_HD void add(const Vec<T>& v) { acc = acc + v; }
  TVJP_HD void flush() {
    const double term = double(at::vec::vec_reduce_all<T>([](Vec<T> a, Vec<T> b) { return a + b; }, acc));
    const double sum = total + term, term_part = sum - total;
    compensation += (total - (sum - term_part)) + (term - term_part);
    total = sum;
    acc = Vec<T>(T(0));
  }
  // group(j) for j = 0, width, ... below `end`, the sums in `sums` flushed after each whole chunk but the last.
  template <size_t K, class Group>
  static TVJP_HD void for_each_chunk(std::array<RowSum, K>& sums, int64_t end, int64_t width, const Group& group) {
    int64_t j = 0;
    for (; j + kChunk * width <= end;) {
      for (const int64_t stop = j + kChunk * width; j < stop; j += width) group(j);
      if (j == end) return;
      for (auto& sum : sums) sum.flush();
    }
    for (; j < end; j += width) group(j);
  }
  TVJP_HD T result() {
    // Nothing flushed yet (a row of one chunk), or flushes that summed to exactly 0: the double sum below would
    // give the lanes' total back bit for bit (never -0: the lanes start at +0), so skip it.
    if (total == 0 && compensation == 0) return at::vec::vec_reduce_all<T>([](Vec<T> a, Vec<T> b) { return a + b; }, acc);
    flush();
    // A total that became ±inf or NaN stays non-finite, and its compensation (inf - inf) means nothing.
    return static_cast<T>(std::isfinite(total) ? total + compensation : total);
  }
};

// out[j] = fn(in[j]) into an opmath array, from storage type S (a half type: widened, never narrowed);
// returns Σ_j out[j].
template <class S, class Fn>
TVJP_ROW_LOOP opmath<S> widen_map_sum_row(opmath<S>* out, int64_t n, const Fn& fn_ref, const S* in) {
  using L = Lanes<S>;
  const Fn fn = fn_ref;  // a local copy: see TVJP_ROW_LOOP
  using T = opmath<S>;
  constexpr int64_t kPart = Vec<T>::size();
  std::array<RowSum<T>, 1> sum;
  RowSum<T>::for_each_chunk(sum, n, L::kWidth, [&](int64_t j) {
    const int64_t count = std::min(L::kWidth, n - j);
    auto mapped = apply_outputs<L, 1>(fn, L::load(in + j, count))[0];
    if (count < L::kWidth) mapped = L::pad(mapped, count, T(0));
    for (int k = 0; k < L::kParts && k * kPart < count; ++k) {
      mapped[k].store(out + j + k * kPart, std::min(kPart, count - k * kPart));
      sum[0].add(mapped[k]);
    }
  });
  return sum[0].result();
}

// K row sums at once: Σ_j terms(in[j]...)[k], with terms returning std::array<Vec<T>, K> (RowSum's cascade).
template <int K, class Terms, class S, class... Rest>
TVJP_ROW_LOOP std::array<opmath<S>, K> sums_row(int64_t n, const Terms& terms_ref, const S* first, const Rest*... rest) {
  static_assert(kRowInputs<S, Rest...>, "row inputs in S or opmath<S> (loadu would reinterpret)");
  const Terms terms = terms_ref;  // a local copy: see TVJP_ROW_LOOP
  using L = Lanes<S>;
  using T = opmath<S>;
  std::array<RowSum<T>, K> sums;
  // One group of `count` elements at j; only the row's last group (kTail) masks the lanes past the row.
  const auto group = [&](int64_t j, int64_t count, auto tail) {
    const auto first_parts = L::load(first + j, count);
    const auto rest_parts = std::make_tuple(L::load(rest + j, count)...);
    for (int p = 0; p < L::kParts; ++p) {
      std::array<Vec<T>, K> values = std::apply([&](const auto&... r) { return terms(first_parts[p], r[p]...); }, rest_parts);
      const int64_t in_part = count - p * int64_t(Vec<T>::size());
      for (int k = 0; k < K; ++k) {
        if constexpr (decltype(tail)::value)
          values[k] = Vec<T>::blendv(Vec<T>(T(0)), values[k], Vec<T>::arange(T(0), T(1)) < Vec<T>(T(in_part)));
        sums[k].add(values[k]);
      }
    }
  };
  const int64_t full = n - n % L::kWidth;
  RowSum<T>::for_each_chunk(sums, full, L::kWidth, [&](int64_t j) { group(j, L::kWidth, std::false_type{}); });
  if (full < n) group(full, n - full, std::true_type{});
  std::array<T, K> out;
  for (int k = 0; k < K; ++k) out[k] = sums[k].result();
  return out;
}

// Σ_j term(in[j]...) over a row.
template <class Term, class S, class... Rest>
TVJP_HD opmath<S> sum_row(int64_t n, const Term& term, const S* first, const Rest*... rest) {
  return sums_row<1>(n, [&](const auto&... v) { return std::array{term(v...)}; }, first, rest...)[0];
}

// accs[k][j] += fn(in[j]...)[k] for j < n, into K opmath arrays (per-block column sums); fn returns one
// opmath vector (K = 1) or std::array of K.
template <class S, size_t K, class Fn, class... In>
TVJP_ROW_LOOP void add_map_row(const std::array<opmath<S>*, K>& accs, int64_t n, const Fn& fn_ref, const In*... in) {
  static_assert(kRowInputs<S, In...>, "row inputs in S or opmath<S> (loadu would reinterpret)");
  const Fn fn = fn_ref;  // a local copy: see TVJP_ROW_LOOP
  using L = Lanes<S>;
  using T = opmath<S>;
  constexpr int64_t kPart = Vec<T>::size();
  for (int64_t j = 0; j < n; j += L::kWidth) {
    const int64_t count = std::min(L::kWidth, n - j);
    const auto terms = apply_outputs<L, K>(fn, L::load(in + j, count)...);
    for (size_t out = 0; out < K; ++out) {
      for (int k = 0; k < L::kParts && k * kPart < count; ++k) {
        const int64_t c = std::min(kPart, count - k * kPart);
        T* a = accs[out] + j + k * kPart;
        (Vec<T>::loadu(a, c) + terms[out][k]).store(a, c);
      }
    }
  }
}

template <class S, class Fn, class... In>
TVJP_HD void add_map_row(opmath<S>* acc, int64_t n, const Fn& fn, const In*... in) {
  add_map_row<S>(std::array<opmath<S>*, 1>{acc}, n, fn, in...);
}

// max_j x[j], NaN if any element is NaN (as torch's max). Four accumulators: at::vec::maximum propagates NaN
// with several dependent instructions, and one chain through them made this the slowest pass of a short
// half-type row.
template <class S>
TVJP_ROW_LOOP opmath<S> max_row(int64_t n, const S* x) {
  using L = Lanes<S>;
  using T = opmath<S>;
  constexpr T kLowest = -std::numeric_limits<T>::infinity();
  constexpr int kAcc = 4;
  constexpr int64_t kGroups = kAcc / L::kParts;  // groups a step, kAcc parts
  std::array<Vec<T>, kAcc> acc;
  acc.fill(Vec<T>(kLowest));
  int64_t j = 0;
  for (; j + kGroups * L::kWidth <= n; j += kGroups * L::kWidth) {
    for (int64_t g = 0; g < kGroups; ++g) {
      const auto parts = L::load(x + j + g * L::kWidth);
      for (int p = 0; p < L::kParts; ++p) acc[g * L::kParts + p] = at::vec::maximum(acc[g * L::kParts + p], parts[p]);
    }
  }
  for (; j < n; j += L::kWidth) {
    const int64_t count = std::min(L::kWidth, n - j);
    auto parts = L::load(x + j, count);
    if (count < L::kWidth) parts = L::pad(parts, count, kLowest);
    for (int p = 0; p < L::kParts; ++p) acc[p] = at::vec::maximum(acc[p], parts[p]);
  }
  const Vec<T> all = at::vec::maximum(at::vec::maximum(acc[0], acc[1]), at::vec::maximum(acc[2], acc[3]));
  return at::vec::vec_reduce_all<T>([](Vec<T> a, Vec<T> b) { return at::vec::maximum(a, b); }, all);
}

// Elementwise map over whole tensors, in parallel, into K outputs; chunks start on whole groups.
template <class S, size_t K, class Fn, class... In>
void map_elementwise(const std::array<S*, K>& outs, int64_t numel, const Fn& fn, const In*... in) {
  const bool stream = should_stream(numel * int64_t(sizeof(S)));
  constexpr int64_t kGroup = Lanes<S>::kWidth;
  at::parallel_for(0, (numel + kGroup - 1) / kGroup, 2048 / kGroup, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * kGroup;
    std::array<S*, K> chunk;
    for (size_t k = 0; k < K; ++k) chunk[k] = outs[k] + first;
    map_row(chunk, std::min(end * kGroup, numel) - first, stream, fn, (in + first)...);
    fence();
  });
}

template <class S, class Fn, class... In>
void map_elementwise(S* out, int64_t numel, const Fn& fn, const In*... in) {
  map_elementwise(std::array<S*, 1>{out}, numel, fn, in...);
}

// Rows of a tensor viewed as (outer, n, inner). Contiguous rows (inner == 1) are handed to `body` in
// place, in the storage type; strided rows are gathered into opmath buffers first and scattered back
// after, so `body` is generic over the pointer type. buffers: one per row argument, n elements each.
template <class S>
struct StridedRow {
  S* base;
  const RowLayout& l;
  S* row(int64_t r) const { return base + (r / l.inner) * l.n * l.inner + r % l.inner; }
  void gather(int64_t r, opmath<S>* buf) const {
    const S* p = row(r);
    for (int64_t j = 0; j < l.n; ++j) buf[j] = static_cast<opmath<S>>(p[j * l.inner]);
  }
  void scatter(int64_t r, const opmath<S>* buf) const {
    S* p = row(r);
    for (int64_t j = 0; j < l.n; ++j) p[j * l.inner] = static_cast<S>(buf[j]);
  }
};

// Rows per parallel task: aim for ~32k elements of work per task.
inline int64_t rows_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

// What a row body gets besides its row pointers.
template <class S>
struct RowContext {
  int64_t row;          // in (outer, inner) row-major order: the index of the row's per-row values
  bool stream;          // the row's output may be written with streaming stores
  opmath<S>* scratch;   // n opmath values of this thread's own, for the body to use
};

// Calls body(ctx, ptrs...) for every row of the tensors in `bases`, in parallel: with the tensors' own row
// pointers when rows are contiguous, else with gathered opmath buffers (the last, written, tensor is
// scattered back unless `write_last` is false). `stream` is set for contiguous rows of an output of at
// least kStreamBytes. Buffers and scratch are allocated once per parallel chunk, not per row.
template <class S, size_t N, class Body>
void for_each_row(const RowLayout& l, const std::array<S*, N>& bases, bool write_last, const Body& body) {
  const bool stream = l.inner == 1 && should_stream(l.outer * l.n * int64_t(sizeof(S)));
  at::parallel_for(0, l.outer * l.inner, rows_grain(l.n), [&](int64_t begin, int64_t end) {
    const bool strided = l.inner != 1;
    std::vector<opmath<S>> buffers((strided ? N + 1 : 1) * l.n);
    RowContext<S> ctx{0, stream, buffers.data() + (strided ? N : 0) * l.n};
    if (!strided) {
      for (int64_t row = begin; row < end; ++row) {
        std::array<S*, N> ptrs;
        for (size_t k = 0; k < N; ++k) ptrs[k] = bases[k] + row * l.n;
        ctx.row = row;
        std::apply([&](auto*... p) { body(ctx, p...); }, ptrs);
      }
      fence();
      return;
    }
    std::array<opmath<S>*, N> ptrs;
    for (size_t k = 0; k < N; ++k) ptrs[k] = buffers.data() + k * l.n;
    for (int64_t row = begin; row < end; ++row) {
      for (size_t k = 0; k + (write_last ? 1 : 0) < N; ++k) StridedRow<S>{bases[k], l}.gather(row, ptrs[k]);
      ctx.row = row;
      std::apply([&](auto*... p) { body(ctx, p...); }, ptrs);
      if (write_last) StridedRow<S>{bases[N - 1], l}.scatter(row, ptrs[N - 1]);
    }
  });
}

}  // namespace torch_vjp::cpu
