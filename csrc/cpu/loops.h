// CPU loop helpers shared by the CPU kernels: elementwise maps and row access, both evaluated in
// at::opmath_type (float for half types) with at::vec::Vectorized lanes and a scalar tail.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <type_traits>
#include <utility>

#include "ops/softmax.h"

namespace torch_vjp::cpu {

template <class scalar_t>
using opmath = at::opmath_type<scalar_t>;

// out[i] = fn(in[0][i], ..., in[N-1][i]) over contiguous opmath arrays; fn takes Vectorized lanes and,
// for the tail, scalars. (The same math functor serves both: see math/common.h.)
template <class T, size_t N, class Fn, size_t... I>
void map_opmath(T* out, const std::array<const T*, N>& in, int64_t len, const Fn& fn, std::index_sequence<I...>) {
  using Vec = at::vec::Vectorized<T>;
  int64_t i = 0;
  for (; i + Vec::size() <= len; i += Vec::size()) fn(Vec::loadu(in[I] + i)...).store(out + i);
  for (; i < len; ++i) out[i] = fn(in[I][i]...);  // Scalar math: the same fn on one element
}

// The same for half types: each 16-byte lane group is widened to two float vectors in registers,
// mapped, and narrowed once.
template <class scalar_t, size_t N, class Fn, size_t... I>
void map_reduced(scalar_t* out, const std::array<const scalar_t*, N>& in, int64_t len, const Fn& fn,
                 std::index_sequence<I...>) {
  using VecS = at::vec::Vectorized<scalar_t>;
  int64_t i = 0;
  for (; i + VecS::size() <= len; i += VecS::size()) {
    const std::array<std::tuple<at::vec::Vectorized<float>, at::vec::Vectorized<float>>, N> wide = {
        at::vec::convert_to_float<scalar_t>(VecS::loadu(in[I] + i))...};
    const auto lo = fn(std::get<0>(wide[I])...);
    const auto hi = fn(std::get<1>(wide[I])...);
    at::vec::convert_from_float<scalar_t>(lo, hi).store(out + i);
  }
  for (; i < len; ++i) out[i] = static_cast<scalar_t>(fn(static_cast<float>(in[I][i])...));  // Scalar math
}

// Elementwise map over tensors of any floating dtype, in parallel; the math runs on
// Vectorized<float|double> (float for half types).
template <size_t N, class scalar_t, class Fn>
void map_elementwise(scalar_t* out, std::array<const scalar_t*, N> in, int64_t numel, const Fn& fn) {
  at::parallel_for(0, numel, 2048, [&](int64_t begin, int64_t end) {
    std::array<const scalar_t*, N> shifted;
    for (size_t k = 0; k < N; ++k) shifted[k] = in[k] + begin;
    if constexpr (std::is_same_v<scalar_t, opmath<scalar_t>>) {
      map_opmath<scalar_t, N>(out + begin, shifted, end - begin, fn, std::make_index_sequence<N>{});
    } else {
      map_reduced<scalar_t, N>(out + begin, shifted, end - begin, fn, std::make_index_sequence<N>{});
    }
  });
}

// One row of a tensor viewed as (outer, n, inner), as a contiguous opmath array: the tensor's own memory
// when the row is contiguous and already opmath, else a per-thread buffer (gathered on read,
// scattered on commit).
template <class scalar_t>
class RowAccess {
 public:
  using T = opmath<scalar_t>;
  RowAccess(scalar_t* base, const RowLayout& l) : base_(base), l_(l) {}

  static constexpr bool kDirectType = std::is_same_v<scalar_t, T>;
  bool direct() const { return kDirectType && l_.inner == 1; }
  scalar_t* row_ptr(int64_t row) const { return base_ + (row / l_.inner) * l_.n * l_.inner + row % l_.inner; }

  // Read row into buf (unless direct); returns the array to read.
  const T* read(int64_t row, T* buf) const {
    scalar_t* p = row_ptr(row);
    if (direct()) return reinterpret_cast<const T*>(p);
    if (l_.inner == 1) {
      at::vec::convert(p, buf, l_.n);
    } else {
      for (int64_t j = 0; j < l_.n; ++j) buf[j] = static_cast<T>(p[j * l_.inner]);
    }
    return buf;
  }
  // Where to write row: the tensor itself when direct, else buf (then call commit).
  T* target(int64_t row, T* buf) const { return direct() ? reinterpret_cast<T*>(row_ptr(row)) : buf; }
  void commit(int64_t row, const T* buf) const {
    if (direct()) return;
    scalar_t* p = row_ptr(row);
    if (l_.inner == 1) {
      at::vec::convert(buf, p, l_.n);
    } else {
      for (int64_t j = 0; j < l_.n; ++j) p[j * l_.inner] = static_cast<scalar_t>(buf[j]);
    }
  }

 private:
  scalar_t* base_;
  RowLayout l_;
};

// Rows per parallel task: aim for ~32k elements of work per task.
inline int64_t rows_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

}  // namespace torch_vjp::cpu
