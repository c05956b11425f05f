// Softmax family, CUDA: the row engine's epilogues (cuda/row_engine.cuh) for softmax, log_softmax and
// logsumexp, forward and backward, and their launchers. The math is math/softmax.h, in at::opmath_type
// (float for half and bfloat16, double for double).
//
// Special values follow the two-pass algorithm of math/softmax.h: rows holding NaN give NaN; softmax and
// log_softmax give NaN on rows of all -inf and on rows holding +inf; logsumexp gives -inf on rows of all -inf
// and +inf on rows holding +inf (and no NaN). See SoftmaxForward::combine and finish for how the merged
// partials reach the same results.
//
// Instruction budget (bf16, the tightest: ~35 instructions an element at 90% of an H200's bandwidth): a
// forward element costs a max, an exp and an add (the partial), then an exp and a multiply (the map), plus
// conversions; exp is ExpMinusFor<T> (cuda/fast_math.cuh), one FFMA and one MUFU.EX2 for the half types.
#pragma once

#include <cmath>
#include <string_view>
#include <type_traits>

#include "cuda/fast_math.cuh"
#include "cuda/row_engine.cuh"
#include "math/softmax.h"

namespace torch_vjp::cuda {

using math::SoftmaxKind;

// ---------------------------------------------------------------------------------------------------------
// Forward. Stat = (m, s): m the max of the elements seen, s = Σ exp(x - shift_for<K>(m)) over them; each
// thread computes its own exactly (a max pass, then a sum pass over its registers), and partials merge.
template <SoftmaxKind K, class T_>
struct SoftmaxForward : EpilogueDefaults {
  using T = T_;
  using S = Opmath<T>;
  using R = T;
  using Exp = ExpMinusFor<T>;
  using Stat = MaxSum<S>;
  static constexpr int kIn = 1;
  static constexpr bool kElementOut = K != SoftmaxKind::LogSumExp;
  static constexpr int kRowOut = K == SoftmaxKind::LogSumExp ? 1 : 0;
  static constexpr bool kReduces = true;
  // float softmax and log_softmax: one instance for every block size, bound at 1024 threads (64 registers, no
  // spill); bound at 512 (128 registers) ptxas kept more values live and spilled 48-64 bytes.
  static constexpr int kBlockThreads = sizeof(T) == 4 && K != SoftmaxKind::LogSumExp ? 1024 : 512;

  struct Row {
    S m, c;  // the row max; c = 1/s (softmax), log s (log_softmax), logsumexp (logsumexp)
    Exp exp_minus_m;
  };

  __device__ __forceinline__ S pad(int) const { return neg_inf<S>(); }
  __device__ __forceinline__ Stat identity() const { return {neg_inf<S>(), S(0)}; }

  // s = 0 only in the empty partial (a finite max contributes e^0 = 1), which leaves the other side as is:
  // so rows of -inf never meet e^{-inf + inf}. max_nan keeps a NaN in m, so a merged m of +inf proves the
  // row holds no NaN (used by finish). A merge with m = ±inf on both sides gives s = NaN: the two-pass
  // result for softmax and log_softmax; finish repairs it for logsumexp.
  __device__ __forceinline__ Stat combine(Stat a, Stat b) const {
    if (b.s == S(0)) return a;
    if (a.s == S(0)) return b;
    const S m = max_nan(a.m, b.m);
    const Exp e(m);
    return {m, a.s * e(a.m) + b.s * e(b.m)};
  }

  template <class Each>
  __device__ __forceinline__ Stat partial(const Each& each, const S (&)[1], const RowAt&) const {
    S m = neg_inf<S>();
    each([&](const S (&v)[1], int) { m = max_nan(m, v[0]); });
    if (m == neg_inf<S>()) return identity();  // padding only, or -inf only: nothing to add
    const Exp e(math::shift_for<K>(m));
    S s = 0;
    each([&](const S (&v)[1], int) { s += e(v[0]); });
    return {m, s};
  }

  __device__ __forceinline__ Row finish(Stat st, const S (&)[1], const RowAt&) const {
    if constexpr (K == SoftmaxKind::LogSumExp) {
      // m = +inf and no NaN (see combine): the two-pass s is Σ exp(x - 0) = +inf, whatever the merges gave.
      if (st.m == S(INFINITY)) st.s = S(INFINITY);
      return {st.m, math::shift_for<K>(st.m) + math::log_(st.s), Exp(S(0))};
    } else if constexpr (K == SoftmaxKind::Softmax) {
      return {st.m, reciprocal(st.s), Exp(st.m)};
    } else {
      return {st.m, math::log_(st.s), Exp(st.m)};
    }
  }

  __device__ __forceinline__ S map(const Row& r, const S (&v)[1], int) const {
    if constexpr (K == SoftmaxKind::Softmax) return math::softmax_scale(r.exp_minus_m(v[0]), r.c);
    else return math::log_softmax_out(v[0], r.m, r.c);
  }

  __device__ __forceinline__ S row_out(const Row& r, int) const { return r.c; }
};

// ---------------------------------------------------------------------------------------------------------
// Backward of softmax and log_softmax: the VJP, derived once here for every kernel shape.
//   softmax      y = softmax(x), J = diag(y) - y yᵀ (symmetric), so
//                dx = Jᵀ dy = y ⊙ dy - y (yᵀ dy) = y ⊙ (dy - c),     c = Σ_j dy_j y_j
//   log_softmax  y = x - lse(x), J = I - 1 pᵀ with p = softmax(x) = exp(y), so
//                dx = Jᵀ dy = dy - p (1ᵀ dy) = dy - exp(y) ⊙ S,       S = Σ_j dy_j
// Saved: y only. Stat: the row sum (c or S) of term(dy, y) = math::softmax_vjp_term / log_softmax_vjp_term;
// Row: that sum; map: dx = math::softmax_vjp(dy, y, c) / math::log_softmax_vjp_with(dy, y, S, exp).
// Inputs: 0 = dy, 1 = y; padding dy = y = 0 adds 0 to either sum. Reads dy and y once, writes dx once.
template <SoftmaxKind K, class T_>
struct SoftmaxBackward : SumEpilogue<Opmath<T_>> {
  static_assert(K != SoftmaxKind::LogSumExp, "logsumexp backward has no row reduction");
  using T = T_;
  using S = Opmath<T>;
  using R = T;
  static constexpr int kIn = 2;
  static constexpr bool kElementOut = true;
  static constexpr bool kReduces = true;

  struct Row {
    S sum;
  };

  template <class Each>
  __device__ __forceinline__ S partial(const Each& each, const S (&)[1], const RowAt&) const {
    S sum = 0;
    each([&](const S (&v)[2], int) {
      if constexpr (K == SoftmaxKind::Softmax) sum += math::softmax_vjp_term(v[0], v[1]);
      else sum += math::log_softmax_vjp_term(v[0], v[1]);
    });
    return sum;
  }

  __device__ __forceinline__ Row finish(S st, const S (&)[1], const RowAt&) const { return {st}; }

  __device__ __forceinline__ S map(const Row& r, const S (&v)[2], int) const {
    if constexpr (K == SoftmaxKind::Softmax) return math::softmax_vjp(v[0], v[1], r.sum);
    else return math::log_softmax_vjp_with(v[0], v[1], r.sum, ExpMinusFor<T>(S(0)));
  }
};

// Backward of logsumexp: out = lse(x) over each row, a 1×n Jacobian J = pᵀ with p = exp(x - out), so
//   dx = Jᵀ dy_row = dy_row · exp(x - out)
// elementwise, no reduction. Input 0 = x; row inputs: 0 = dy_row, 1 = out. Reads x once, writes dx once.
template <class T_>
struct LogSumExpBackward : SumEpilogue<Opmath<T_>> {
  using T = T_;
  using S = Opmath<T>;
  using R = T;
  static constexpr int kIn = 1;
  static constexpr int kRowIn = 2;
  static constexpr bool kElementOut = true;
  static constexpr bool kReduces = false;
  // No reduction: long rows split into independent 512-thread chunks (one read), never a cluster.
  static constexpr int kMaxThreads = 512;

  struct Row {
    S dy;
    ExpMinusFor<T> exp_minus_out;
  };

  template <class Each>
  __device__ __forceinline__ S partial(const Each&, const S (&)[2], const RowAt&) const { return S(0); }

  __device__ __forceinline__ Row finish(S, const S (&row_in)[2], const RowAt&) const {
    return {row_in[0], ExpMinusFor<T>(row_in[1])};
  }
  __device__ __forceinline__ S map(const Row& r, const S (&v)[1], int) const {
    return math::logsumexp_vjp_with(r.dy, v[0], r.exp_minus_out);
  }
};

// ---------------------------------------------------------------------------------------------------------
// Launchers (declared in cuda/softmax_launch.h, instantiated once per dtype in softmax_<dtype>.cu).

template <SoftmaxKind K, class T>
void softmax_forward_cuda(const RowLayout& l, const T* x, T* y) {
  Operands<SoftmaxForward<K, T>> ops;
  ops.in[0] = x;
  if constexpr (K == SoftmaxKind::LogSumExp) ops.row_out[0] = y;
  else ops.out = y;
  run_rows(SoftmaxForward<K, T>{}, l, ops);
}

template <SoftmaxKind K, class T>
void softmax_backward_cuda(const RowLayout& l, const T* dy, const T* y, T* dx) {
  Operands<SoftmaxBackward<K, T>> ops;
  ops.in[0] = dy;
  ops.in[1] = y;
  ops.out = dx;
  run_rows(SoftmaxBackward<K, T>{}, l, ops);
}

template <class T>
void logsumexp_backward_cuda(const RowLayout& l, const T* dy, const T* out, const T* x, T* dx) {
  Operands<LogSumExpBackward<T>> ops;
  ops.in[0] = x;
  ops.out = dx;
  ops.row_in[0] = dy;
  ops.row_in[1] = out;
  run_rows(LogSumExpBackward<T>{}, l, ops);
}

// The plan of each kernel (cuda/plan.h).
template <class T>
bool softmax_plan(std::string_view op, const RowLayout& l, Plan& plan) {
  if (op == "softmax") plan = engine_plan<SoftmaxForward<SoftmaxKind::Softmax, T>>(l);
  else if (op == "log_softmax") plan = engine_plan<SoftmaxForward<SoftmaxKind::LogSoftmax, T>>(l);
  else if (op == "logsumexp") plan = engine_plan<SoftmaxForward<SoftmaxKind::LogSumExp, T>>(l);
  else if (op == "softmax_backward") plan = engine_plan<SoftmaxBackward<SoftmaxKind::Softmax, T>>(l);
  else if (op == "log_softmax_backward") plan = engine_plan<SoftmaxBackward<SoftmaxKind::LogSoftmax, T>>(l);
  else if (op == "logsumexp_backward") plan = engine_plan<LogSumExpBackward<T>>(l);
  else return false;
  return true;
}

}  // namespace torch_vjp::cuda

// Explicit instantiation of every launcher for one dtype (one per softmax_<dtype>.cu, so that the dtypes
// compile in parallel).
#define TORCH_VJP_SOFTMAX_INSTANTIATE(T)                                                                     \
  namespace torch_vjp::cuda {                                                                              \
  template void softmax_forward_cuda<SoftmaxKind::Softmax, T>(const RowLayout&, const T*, T*);             \
  template void softmax_forward_cuda<SoftmaxKind::LogSoftmax, T>(const RowLayout&, const T*, T*);          \
  template void softmax_forward_cuda<SoftmaxKind::LogSumExp, T>(const RowLayout&, const T*, T*);           \
  template void softmax_backward_cuda<SoftmaxKind::Softmax, T>(const RowLayout&, const T*, const T*, T*);  \
  template void softmax_backward_cuda<SoftmaxKind::LogSoftmax, T>(const RowLayout&, const T*, const T*, T*); \
  template void logsumexp_backward_cuda<T>(const RowLayout&, const T*, const T*, const T*, T*);            \
  template bool softmax_plan<T>(std::string_view, const RowLayout&, Plan&);                                \
  }
