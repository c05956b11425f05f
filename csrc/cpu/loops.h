// CPU loop helpers shared by the CPU kernels. Data stays in its storage type S (float, double, or a half
// type) in memory; the math runs on at::opmath_type<S> (float for half types) in at::vec registers: each
// Vectorized<S> worth of elements is widened to one or two opmath vectors, and narrowed once on store.
// So a map or a reduction is one pass over memory, and a scalar tail finishes what is left.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>

#include "math/common.h"
#include "ops/softmax.h"

namespace torch_vjp::cpu {

template <class S>
using opmath = at::opmath_type<S>;

using math::Vec;  // at::vec::Vectorized

// One group of Vectorized<S>::size() elements as kParts opmath vectors.
template <class S>
struct Lanes {
  using T = opmath<S>;
  static constexpr int64_t kWidth = Vec<S>::size();
  static constexpr int kParts = std::is_same_v<S, T> ? 1 : 2;
  using Parts = std::array<Vec<T>, kParts>;

  static Parts load(const S* p) {
    if constexpr (kParts == 1) {
      return {Vec<T>::loadu(p)};
    } else {
      const auto [lo, hi] = at::vec::convert_to_float<S>(Vec<S>::loadu(p));
      return {lo, hi};
    }
  }
  static void store(S* p, const Parts& v) {
    if constexpr (kParts == 1) v[0].store(p);
    else at::vec::convert_from_float<S>(v[0], v[1]).store(p);
  }
};

// out[j] = fn(in[j]...) for j < n; fn takes opmath vectors and, for the tail, opmath scalars
// (the same math functor serves both: see math/common.h).
template <class S, class Fn, class... In>
void map_row(S* out, int64_t n, const Fn& fn, const In*... in) {
  static_assert((std::is_same_v<S, In> && ...), "one storage type per row map (loadu would reinterpret)");
  using L = Lanes<S>;
  int64_t j = 0;
  for (; j + L::kWidth <= n; j += L::kWidth) {
    const auto apply = [&](const auto&... parts) {
      typename L::Parts r;
      for (int k = 0; k < L::kParts; ++k) r[k] = fn(parts[k]...);
      return r;
    };
    L::store(out + j, apply(L::load(in + j)...));
  }
  for (; j < n; ++j) out[j] = static_cast<S>(fn(static_cast<opmath<S>>(in[j])...));  // Scalar math: same fn
}

// out[j] = fn(in[j]) into an opmath array, from storage type S (a half type: widened, never narrowed).
template <class S, class Fn>
void widen_map_row(opmath<S>* out, int64_t n, const Fn& fn, const S* in) {
  using L = Lanes<S>;
  using T = opmath<S>;
  int64_t j = 0;
  for (; j + L::kWidth <= n; j += L::kWidth) {
    const auto parts = L::load(in + j);
    for (int k = 0; k < L::kParts; ++k) fn(parts[k]).store(out + j + k * Vec<T>::size());
  }
  for (; j < n; ++j) out[j] = fn(static_cast<T>(in[j]));  // Scalar math: same fn
}

// out[j] = fn(in[j]) from an opmath array into storage type S (narrowed once).
template <class S, class Fn>
void narrow_map_row(S* out, int64_t n, const Fn& fn, const opmath<S>* in) {
  using L = Lanes<S>;
  using T = opmath<S>;
  int64_t j = 0;
  for (; j + L::kWidth <= n; j += L::kWidth) {
    typename L::Parts r;
    for (int k = 0; k < L::kParts; ++k) r[k] = fn(Vec<T>::loadu(in + j + k * Vec<T>::size()));
    L::store(out + j, r);
  }
  for (; j < n; ++j) out[j] = static_cast<S>(fn(in[j]));  // Scalar math: same fn
}

// Σ_j term(in[j]...) over a row. Chunk partials are summed in double, so rounding grows with the chunk
// length plus n / chunk rather than with n (long rows; torch's own sums are cascaded too).
template <class Term, class S, class... Rest>
opmath<S> sum_row(int64_t n, const Term& term, const S* first, const Rest*... rest) {
  static_assert((std::is_same_v<S, Rest> && ...), "one storage type per row sum (loadu would reinterpret)");
  using L = Lanes<S>;
  using T = opmath<S>;
  constexpr int64_t kChunk = 16 * L::kWidth;
  double total = 0;
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t end = std::min(n, c + kChunk);
    Vec<T> acc(T(0));
    int64_t j = c;
    for (; j + L::kWidth <= end; j += L::kWidth) {
      const auto add = [&](const auto&... parts) {
        for (int k = 0; k < L::kParts; ++k) acc = acc + term(parts[k]...);
      };
      add(L::load(first + j), L::load(rest + j)...);
    }
    T tail = 0;
    for (; j < end; ++j) tail += term(static_cast<T>(first[j]), static_cast<T>(rest[j])...);
    total += double(at::vec::vec_reduce_all<T>([](Vec<T> a, Vec<T> b) { return a + b; }, acc)) + double(tail);
  }
  return static_cast<T>(total);
}

// max_j x[j], NaN if any element is NaN (as torch's max).
template <class S>
opmath<S> max_row(int64_t n, const S* x) {
  using L = Lanes<S>;
  using T = opmath<S>;
  Vec<T> acc(-std::numeric_limits<T>::infinity());
  int64_t j = 0;
  for (; j + L::kWidth <= n; j += L::kWidth)
    for (const auto& part : L::load(x + j)) acc = at::vec::maximum(acc, part);
  T m = at::vec::vec_reduce_all<T>([](Vec<T> a, Vec<T> b) { return at::vec::maximum(a, b); }, acc);
  for (; j < n; ++j) {
    const T v = static_cast<T>(x[j]);
    if (std::isnan(v) || v > m) m = std::isnan(m) ? m : v;
  }
  return m;
}

// Elementwise map over whole tensors, in parallel.
template <class S, class Fn, class... In>
void map_elementwise(S* out, int64_t numel, const Fn& fn, const In*... in) {
  at::parallel_for(0, numel, 2048, [&](int64_t begin, int64_t end) {
    map_row(out + begin, end - begin, fn, (in + begin)...);
  });
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

}  // namespace torch_vjp::cpu
