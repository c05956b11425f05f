// Losses, CUDA: cross-entropy's two row kernels as the row engine's epilogues (cuda/row_engine.cuh), over
// logits (rows, C) with int64 class targets. The math is math/cross_entropy.h, in at::opmath_type S.
//   forward   one read of the logits: per row the max and Σ exp (the log_softmax forward's (m, s), merged
//             across threads), and Σx for label smoothing; then the target logit, one element a row (from L1
//             or L2: its row was just read); writes loss_i and lse_i (S), nothing else.
//   gradient  dlogits in one pass from the logits and the saved lse, in place when dx is x: each thread
//             reads its own packs before it writes them (the grid is aligned for dx, so x needs no realigning
//             loads from a neighbour's packs), and no element is read after another thread may have written it.
// Vocabularies such as 50257 (odd: row starts at every alignment, realigned in registers) and 128256 run at
// full vector width; long rows take a cluster of blocks of up to 512 threads on sm_90 (128256 in bf16: 8 of
// them, two rows' blocks a SM), or are split across blocks (forward: partials, then a combine that reads no
// logits again).
//
// Out-of-range targets (neither in [0, C) nor ignore_index) raise a device-side assert (CUDA_KERNEL_ASSERT,
// as torch's nll_loss does; the engine's kAsserts, once a kernel's rows are done): the launch fails with
// "device-side assert triggered" at the next synchronisation and the CUDA context is unusable afterwards, as
// with torch. No memory is read at such a target (the target logit is read only for targets in range).
#pragma once

#include <c10/macros/Macros.h>

#include <climits>

#include "cuda/fast_math.cuh"
#include "cuda/row_engine.cuh"
#include "cuda/softmax_epilogues.cuh"  // SoftmaxForward: the (max, Σ exp) merge
#include "math/cross_entropy.h"

namespace torch_vjp::cuda {

// A row's target position relative to its run: element e of the run holds the target when e == result;
// -1 (no element) for ignore_index or a target outside the run.
__device__ __forceinline__ int target_in_run(int64_t target, int64_t ignore_index, const RowAt& at) {
  const int64_t e = target - at.first;
  return target != ignore_index && e >= 0 && e <= INT_MAX ? static_cast<int>(e) : -1;
}

__device__ __forceinline__ bool target_ok(int64_t target, int64_t ignore_index, int64_t classes) {
  return target == ignore_index || (target >= 0 && target < classes);
}

template <class S>
struct LossStat {
  MaxSum<S> ms;  // max and Σ exp(x - max), as the log_softmax forward's
  S sum_x;       // Σx (label smoothing)
};

// Forward: loss_i = lse - (1 - ε) x_t - (ε / C) Σx (0 for ignore_index), lse = m + log s. Without smoothing
// (kSmoothing false) the reduction is exactly the log_softmax forward's (padding -inf); with it, Σx too, and
// the reduction is masked (padding not seen: no pad value is neutral for both a max and a sum). The target
// logit is read by finish, one element a row (from L1 or L2: its row was just read).
template <class T_, bool kSmoothing>
struct CrossEntropyForward : EpilogueDefaults {
  using T = T_;
  using S = Opmath<T>;
  using R = S;
  using LogSoftmaxForward = SoftmaxForward<math::SoftmaxKind::LogSoftmax, T>;
  using Stat = std::conditional_t<kSmoothing, LossStat<S>, MaxSum<S>>;
  static constexpr int kIn = 1;
  static constexpr bool kElementOut = false;
  static constexpr int kRowOut = 2;  // loss, lse
  static constexpr bool kReduces = true;
  static constexpr bool kMasked = kSmoothing;
  static constexpr bool kRowsOnly = true;
  static constexpr bool kAsserts = true;  // the target
  static constexpr int kClusterThreads = 512;
  const T* logits;
  const int64_t* target;
  int64_t ignore_index, classes;
  S smoothing, per_class;  // ε, ε / C

  struct Row {
    S loss, lse;
    bool ok;  // the target is in range
  };

  __device__ __forceinline__ S pad(int i) const { return LogSoftmaxForward{}.pad(i); }
  __device__ __forceinline__ Stat identity() const {
    if constexpr (kSmoothing) return {LogSoftmaxForward{}.identity(), S(0)};
    else return LogSoftmaxForward{}.identity();
  }
  // (m, s) merge as the log_softmax forward's (NaN rows stay NaN, +inf rows give NaN); Σx adds.
  __device__ __forceinline__ Stat combine(Stat a, Stat b) const {
    if constexpr (kSmoothing) return {LogSoftmaxForward{}.combine(a.ms, b.ms), a.sum_x + b.sum_x};
    else return LogSoftmaxForward{}.combine(a, b);
  }

  template <class Each>
  __device__ __forceinline__ Stat partial(const Each& each, const S (&row_in)[1], const RowAt& at) const {
    if constexpr (kSmoothing) {
      S m = neg_inf<S>(), sum_x = 0;
      each([&](const S (&v)[1], int) {
        m = max_nan(m, v[0]);
        sum_x += v[0];
      });
      if (m == neg_inf<S>()) return {LogSoftmaxForward{}.identity(), sum_x};  // nothing, or -inf only: no Σ exp
      const typename LogSoftmaxForward::Exp exp_minus_m(m);
      S s = 0;
      each([&](const S (&v)[1], int) { s += exp_minus_m(v[0]); });
      return {{m, s}, sum_x};
    } else {
      return LogSoftmaxForward{}.partial(each, row_in, at);
    }
  }

  __device__ __forceinline__ Row finish(Stat st, const S (&)[1], const RowAt& at) const {
    const int64_t t = target[at.row];
    const bool counted = t != ignore_index && t >= 0 && t < classes;
    const S x_t = counted ? static_cast<S>(logits[at.row * classes + t]) : S(0);
    MaxSum<S> ms;
    S sum_x = 0;  // Σx only with smoothing: with ε = 0 a -inf logit must not turn 0 · Σx into NaN
    if constexpr (kSmoothing) {
      ms = st.ms;
      sum_x = st.sum_x;
    } else {
      ms = st;
    }
    const S lse = ms.m + math::log_(ms.s);
    const S loss = counted ? math::cross_entropy_loss_with(lse, x_t, sum_x, smoothing, per_class) : S(0);
    return {loss, lse, target_ok(t, ignore_index, classes)};
  }

  __device__ __forceinline__ S map(const Row&, const S (&)[1], int) const { return S(0); }
  __device__ __forceinline__ S row_out(const Row& r, int i) const { return i == 0 ? r.loss : r.lse; }
  __device__ __forceinline__ bool row_ok(const Row& r) const { return r.ok; }
};

// Gradient: the VJP, derived once here for every kernel shape. loss_i = lse_i - (1 - ε) x_it - (ε/C) Σ_j x_ij,
// so ∂loss_i/∂x_ij = p_ij - ε/C - (1 - ε)[j = t_i] with p_i = softmax(x_i) = exp(x_i - lse_i): one gradient
// row per sample (the summed loss's Jacobian is a row). With s_i the row's scale (dy_i for 'none', dy for
// 'sum', dy / count for 'mean', 0 for ignored rows; the frontend's row_scale):
//   dx_ij = s_i (exp(x_ij - lse_i) - c_ij),   c_ij = ε/C + (1 - ε)[j = t_i]     (math::cross_entropy_vjp_with)
// No reduction: row inputs lse, s; x read once, dx written once.
template <class T_>
struct CrossEntropyGrad : SumEpilogue<Opmath<T_>> {
  using T = T_;
  using S = Opmath<T>;
  using R = S;
  static constexpr int kIn = 1;
  static constexpr int kRowIn = 2;  // lse, scale
  static constexpr bool kElementOut = true;
  static constexpr bool kReduces = false;
  static constexpr bool kRowsOnly = true;
  static constexpr bool kAsserts = true;  // the target
  const int64_t* target;
  int64_t ignore_index, classes;
  S per_class, per_class_target;  // ε/C, and ε/C + (1 - ε)

  struct Row {
    ExpMinusFor<T> exp_minus_lse;
    S scale;
    int t;    // the target's run element, or -1
    bool ok;  // the target is in range
  };

  template <class Each>
  __device__ __forceinline__ S partial(const Each&, const S (&)[2], const RowAt&) const { return S(0); }

  __device__ __forceinline__ Row finish(S, const S (&row_in)[2], const RowAt& at) const {
    const int64_t t = target[at.row];
    return {ExpMinusFor<T>(row_in[0]), row_in[1], target_in_run(t, ignore_index, at), target_ok(t, ignore_index, classes)};
  }
  __device__ __forceinline__ S map(const Row& r, const S (&v)[1], int e) const {
    return math::cross_entropy_vjp_with(v[0], r.exp_minus_lse, r.scale, e == r.t ? per_class_target : per_class);
  }
  __device__ __forceinline__ bool row_ok(const Row& r) const { return r.ok; }
};

}  // namespace torch_vjp::cuda
