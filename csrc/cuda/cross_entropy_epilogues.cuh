// Losses, CUDA: cross-entropy's two row kernels as the row engine's epilogues (cuda/row_engine.cuh), over
// logits (rows, C) with int64 class targets. The math is math/cross_entropy.h, in at::opmath_type S.
//   forward   one read of the logits: per row the max m and s = Σ exp(x - m) (the log_softmax forward's,
//             merged across threads), and for label smoothing Σ(x - m) (below); then the target logit, one
//             element a row (from L1 or L2: its row was just read); writes loss_i, m_i and log_sum_i = log s_i
//             (S), nothing else. lse = m + log_sum is never formed: its rounding would cost |lse|·ε in every p.
//   gradient  dlogits in one pass from the logits and the saved (m, log_sum), in place when dx is x: each
//             thread reads its own packs before it writes them (the grid is aligned for dx, so x needs no
//             realigning loads from a neighbour's packs), and no element is read after another thread may have
//             written it.
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

// The smoothed forward's partial: the log_softmax forward's (m, s), and Σ(x - m) over the `count` elements
// seen, relative to their own max m. Merged as Σ_a + count_a (m_a - M), M the merged max: every term is ≤ 0
// (x ≤ m_a ≤ M), so the sum has no cancellation however large an offset the logits share (Σx - C·m would
// lose it all). Special values: a partial of -inf only has m = -inf and Σ = -inf (never -inf - -inf); a
// -inf logit makes Σ = -inf, so the smoothed loss is +inf, as torch's; +inf or NaN make it NaN.
template <class S>
struct LossStat {
  MaxSum<S> ms;  // max and Σ exp(x - max), as the log_softmax forward's
  S sum;         // Σ(x - ms.m) over the partial's elements
  S count;       // its elements (0: empty, the identity)
};

// Forward: loss_i = log_s - (1 - ε)(x_t - m) - (ε / C) Σ(x - m) (0 for ignore_index): every term ≥ 0, none
// rounded against a large offset. Without smoothing (kSmoothing false) the reduction is exactly the
// log_softmax forward's (padding -inf) and Σ(x - m) is not formed (0 is passed: ε = 0 must not turn a -inf
// logit's Σ into NaN); with it, LossStat, over the row's elements only (kMasked: no pad value is neutral for
// a max, a count and a sum at once). The target logit is read by finish, one element a row.
template <class T_, bool kSmoothing>
struct CrossEntropyForward : EpilogueDefaults {
  using T = T_;
  using S = Opmath<T>;
  using R = S;
  using LogSoftmaxForward = SoftmaxForward<math::SoftmaxKind::LogSoftmax, T>;
  using Stat = std::conditional_t<kSmoothing, LossStat<S>, MaxSum<S>>;
  static constexpr int kIn = 1;
  static constexpr bool kElementOut = false;
  static constexpr int kRowOut = 3;  // loss, row_max, log_sum
  static constexpr bool kReduces = true;
  static constexpr bool kMasked = kSmoothing;
  static constexpr bool kRowsOnly = true;
  static constexpr bool kAsserts = true;  // the target
  // double: 512 threads a block at most, so 128 registers: at 64 (1024 threads) ptxas spilled the (m, s)
  // merge's doubles, and with smoothing the 32-byte LossStat's. Rows of more than 4096 doubles take an sm_90
  // cluster (as 512-thread blocks anyway) or, on sm_80, are split.
  static constexpr int kMaxThreads = sizeof(T) == 8 ? 512 : 1024;
  static constexpr int kClusterThreads = 512;
  const T* logits;
  const int64_t* target;
  int64_t ignore_index, classes;
  S smoothing, per_class;  // ε, ε / C

  struct Row {
    S loss, m, log_s;
    bool ok;  // the target is in range
  };

  __device__ __forceinline__ S pad(int i) const { return LogSoftmaxForward{}.pad(i); }
  __device__ __forceinline__ Stat identity() const {
    if constexpr (kSmoothing) return {LogSoftmaxForward{}.identity(), S(0), S(0)};
    else return LogSoftmaxForward{}.identity();
  }

  // (m, s) merge as the log_softmax forward's (NaN rows stay NaN, +inf rows give NaN). Σ(x - m): the side with
  // the smaller max moves to the larger, + count (m_lo - m_hi) ≤ 0; equal maxima (both -inf included: d NaN)
  // move nothing. A NaN or +inf max has made its own side's Σ NaN already, which the sum keeps.
  __device__ __forceinline__ Stat combine(Stat a, Stat b) const {
    if constexpr (kSmoothing) {
      if (b.count == S(0)) return a;
      if (a.count == S(0)) return b;
      const S d = a.ms.m - b.ms.m;
      const S shift = d > S(0) ? -b.count * d : d < S(0) ? a.count * d : S(0);
      return {LogSoftmaxForward{}.combine(a.ms, b.ms), a.sum + b.sum + shift, a.count + b.count};
    } else {
      return LogSoftmaxForward{}.combine(a, b);
    }
  }

  template <class Each>
  __device__ __forceinline__ Stat partial(const Each& each, const S (&)[1], const RowAt&) const {
    return partial_seeing(each, [](const S (&)[1], int) {});
  }

  // The partial, with see(v, e) called on every element slot in the first pass (CrossEntropyForwardGrad picks
  // the target logit there). Without smoothing: the log_softmax forward's partial (SoftmaxForward::partial).
  template <class Each, class See>
  __device__ __forceinline__ Stat partial_seeing(const Each& each, const See& see) const {
    S m = neg_inf<S>();
    if constexpr (kSmoothing) {
      int count = 0;  // an int: the adds of a whole pack fold into one
      each([&](const S (&v)[1], int e) {
        m = max_nan(m, v[0]);
        ++count;
        see(v, e);
      });
      if (count == 0) return identity();
      if (m == neg_inf<S>()) return {LogSoftmaxForward{}.identity(), neg_inf<S>(), S(count)};  // -inf only
      const typename LogSoftmaxForward::Exp exp_minus_m(m);
      S s = 0, sum = 0;
      each([&](const S (&v)[1], int) {
        s += exp_minus_m(v[0]);
        sum += v[0] - m;
      });
      return {{m, s}, sum, S(count)};
    } else {
      each([&](const S (&v)[1], int e) {
        m = max_nan(m, v[0]);
        see(v, e);
      });
      if (m == neg_inf<S>()) return identity();  // padding only, or -inf only: nothing to add
      const typename LogSoftmaxForward::Exp e(math::shift_for<math::SoftmaxKind::LogSoftmax>(m));
      S s = 0;
      each([&](const S (&v)[1], int) { s += e(v[0]); });
      return {m, s};
    }
  }

  __device__ __forceinline__ Row finish(Stat st, const S (&)[1], const RowAt& at) const {
    const int64_t t = target[at.row];
    const bool counted = t != ignore_index && t >= 0 && t < classes;
    const S x_t = counted ? static_cast<S>(logits[at.row * classes + t]) : S(0);
    MaxSum<S> ms;
    S sum_shifted = 0;
    if constexpr (kSmoothing) {
      ms = st.ms;
      sum_shifted = st.sum;
    } else {
      ms = st;
    }
    const S log_s = math::log_(ms.s);
    const S loss = counted ? math::cross_entropy_loss_with(log_s, x_t - ms.m, sum_shifted, smoothing, per_class) : S(0);
    return {loss, ms.m, log_s, target_ok(t, ignore_index, classes)};
  }

  __device__ __forceinline__ S map(const Row&, const S (&)[1], int) const { return S(0); }
  __device__ __forceinline__ S row_out(const Row& r, int i) const { return i == 0 ? r.loss : i == 1 ? r.m : r.log_s; }
  __device__ __forceinline__ bool row_ok(const Row& r) const { return r.ok; }
};

// p = exp((x - m) - log_s) for the half types: one FADD, one FFMA and one MUFU.EX2, as
// 2^((x - m)·log2e - log_s·log2e) with log_s·log2e folded once a row. Error, with u = log2 p: x - m,
// log_s·log2e, log2e and the FFMA round by 2^-24 each, ex2.approx by ~2^-22, so
//   |Δp|/p ≤ ln2·2^-24·(3|u| + 2·log_s·log2e) + 2^-22,
// at log_s ≤ log 128256 5e-6 for p ≥ 2^-24 and 3e-6 for p ≥ 2^-8: about 100 times below fp16's relative
// rounding (2^-11) and 400 times below bf16's (2^-9), whatever the logits' magnitude. exp2 on a prescaled
// lse = m + log_s (one FADD fewer) would add |lse|·1.4·2^-23 (1.7e-4 at |lse| = 1000, fp16's rounding itself),
// so x - m comes first.
// Special values as SoftmaxFromStats: x = -inf gives 0; m = ±inf or NaN anywhere gives NaN.
struct FastSoftmaxFromStats {
  float m, neg_log_s_log2e;
  __device__ __forceinline__ FastSoftmaxFromStats(float m_, float log_s) : m(m_), neg_log_s_log2e(-log_s * kLog2e) {}
  __device__ __forceinline__ float operator()(float x) const { return ex2_approx(fmaf(x - m, kLog2e, neg_log_s_log2e)); }
};

// fp32 and fp64: math::SoftmaxFromStats, exp((x - m) - log_s) with the IEEE-accurate exp (torch's
// exp(log_softmax(x)), within an ulp or two).
template <class T>
using SoftmaxFromStatsFor =
    std::conditional_t<sizeof(T) == 2, FastSoftmaxFromStats, math::SoftmaxFromStats<at::opmath_type<T>>>;

template <class T>
__device__ __forceinline__ SoftmaxFromStatsFor<T> softmax_from_stats(Opmath<T> m, Opmath<T> log_s) {
  if constexpr (sizeof(T) == 2) return FastSoftmaxFromStats(m, log_s);
  else return math::SoftmaxFromStats<Opmath<T>>{m, log_s};
}

// Gradient: the VJP, derived once here for every kernel shape. loss_i = lse_i - (1 - ε) x_it - (ε/C) Σ_j x_ij
// with lse_i = m_i + log_s_i, so ∂loss_i/∂x_ij = p_ij - ε/C - (1 - ε)[j = t_i] with p_i = softmax(x_i) =
// exp((x_i - m_i) - log_s_i) (never exp(x - lse) with lse rounded): one gradient row per sample (the summed
// loss's Jacobian is a row). With s_i the row's scale (dy_i for 'none', dy for 'sum', dy / count for 'mean',
// 0 for ignored rows; the frontend's row_scale):
//   dx_ij = s_i (p_ij - c_ij),   c_ij = ε/C + (1 - ε)[j = t_i]               (math::cross_entropy_vjp_with)
// No reduction: row inputs m, log_s, s; x read once, dx written once.
template <class T_>
struct CrossEntropyGrad : SumEpilogue<Opmath<T_>> {
  using T = T_;
  using S = Opmath<T>;
  using R = S;
  static constexpr int kIn = 1;
  static constexpr int kRowIn = 3;  // row_max, log_sum, scale
  static constexpr bool kElementOut = true;
  static constexpr bool kReduces = false;
  static constexpr bool kRowsOnly = true;
  static constexpr bool kAsserts = true;  // the target
  // No reduction, so a row split across blocks costs nothing (one launch, each element read once): blocks of
  // at most 512 threads (128 registers: at 64, 1024 threads, the float instance of 8 packs spilled once it held
  // m and log_s), long rows split into independent chunks, never a cluster (row_engine.cuh's plan_row_kernel).
  static constexpr int kMaxThreads = 512;
  static constexpr int kClusterThreads = 512;
  const int64_t* target;
  int64_t ignore_index, classes;
  S per_class, per_class_target;  // ε/C, and ε/C + (1 - ε)

  struct Row {
    SoftmaxFromStatsFor<T> softmax;
    S scale;
    int t;    // the target's run element, or -1
    bool ok;  // the target is in range
  };

  template <class Each>
  __device__ __forceinline__ S partial(const Each&, const S (&)[3], const RowAt&) const { return S(0); }

  __device__ __forceinline__ Row finish(S, const S (&row_in)[3], const RowAt& at) const {
    const int64_t t = target[at.row];
    return {softmax_from_stats<T>(row_in[0], row_in[1]), row_in[2], target_in_run(t, ignore_index, at),
            target_ok(t, ignore_index, classes)};
  }
  __device__ __forceinline__ S map(const Row& r, const S (&v)[1], int e) const {
    return math::cross_entropy_vjp_with(v[0], r.softmax, r.scale, e == r.t ? per_class_target : per_class);
  }
  __device__ __forceinline__ bool row_ok(const Row& r) const { return r.ok; }
};

// Forward and gradient in one kernel, for fused_linear_cross_entropy's chunks where the gradient is wanted:
// the logits are read once (into registers), reduced to (m, log_s) and the loss exactly as CrossEntropyForward
// does, and dlogits written over them (in place) as CrossEntropyGrad does, from the same (m, log_s) bits it
// would have read back. Launched with CrossEntropyForward's block and cluster sizes, so that the plan, and with
// it the order of the (m, s) merges, is the forward's: loss, m, log_s and dlogits have the bits of the two
// kernels they replace. Per row: reads the logits once, writes dlogits once (the split path, rows longer than
// a block or a cluster holds, reads its chunk a second time, from L2 where the few rows fit, as the forward).
//
// VJP (CrossEntropyGrad's derivation above): dx_ij = s_i (p_ij - ε/C - (1 - ε)[j = t_i]), p_i = exp((x_i - m_i)
// - log_s_i), with (m_i, log_s_i) this kernel's own reduction and s_i the row input (the frontend's row_scale).
//
// The target logit rides in the Stat (read from the thread's registers in partial): finish may not read it
// from memory, because in place another thread of the row (of the block, the cluster, or an earlier chunk of
// a split row) may already have written dlogits over it.
template <class T_, bool kSmoothing>
struct CrossEntropyForwardGrad : EpilogueDefaults {
  using T = T_;
  using S = Opmath<T>;
  using R = S;
  using Forward = CrossEntropyForward<T, kSmoothing>;
  // The target logit, NaN where not among the elements seen: no flag needed, because a NaN target logit
  // makes the row max NaN (max_nan), and with it the loss, whichever NaN the merges keep.
  struct Stat {
    typename Forward::Stat loss;  // the forward's reduction
    S target_logit;
  };
  static constexpr int kIn = 1;
  static constexpr int kRowIn = 1;  // scale
  static constexpr bool kElementOut = true;
  static constexpr int kRowOut = 3;  // loss, row_max, log_sum
  static constexpr bool kReduces = true;
  static constexpr bool kMasked = Forward::kMasked;
  static constexpr bool kRowsOnly = true;
  static constexpr bool kAsserts = true;  // the target
  // The forward's plan (same merges, same bits), except with smoothing: at 1024 threads (64 registers) ptxas
  // spilled 56-152 B of that variant's WideBlock instance, so its rows longer than 512 threads hold, where no
  // cluster runs, are split (read twice, as the forward and gradient kernels read them; merged in another
  // order, so their bits may differ from those two kernels').
  static constexpr int kMaxThreads = kSmoothing ? 512 : Forward::kMaxThreads;
  static constexpr int kClusterThreads = Forward::kClusterThreads;
  // fp32 without smoothing (8 packs of logits a thread): the Block instance bound at 768 threads (80 registers:
  // 76-79, no spill); at 512 (128 registers) ptxas hoisted element indices out of the row loop and spilled 24-32
  // bytes, at 1024 (64) 16-24. Blocks of 769-1024 threads take WideBlock. The plan does not depend on it.
  static constexpr int kBlockThreads = !kSmoothing && sizeof(T) == 4 ? 768 : EpilogueDefaults::kBlockThreads;
  Forward forward;  // logits unused (the target logit comes from the Stat)
  S per_class_target;  // ε/C + (1 - ε)

  struct Row {
    S loss, m, log_s;
    SoftmaxFromStatsFor<T> softmax;
    S scale;
    int t;    // the target's run element, or -1
    bool ok;  // the target is in range
  };

  __device__ __forceinline__ S pad(int i) const { return forward.pad(i); }
  __device__ __forceinline__ Stat identity() const { return {forward.identity(), S(NAN)}; }
  __device__ __forceinline__ Stat combine(Stat a, Stat b) const {
    return {forward.combine(a.loss, b.loss), b.target_logit == b.target_logit ? b.target_logit : a.target_logit};
  }

  template <class Each>
  __device__ __forceinline__ Stat partial(const Each& each, const S (&)[1], const RowAt& at) const {
    const int t = target_in_run(forward.target[at.row], forward.ignore_index, at);
    S x_t = S(NAN);
    const auto loss = forward.partial_seeing(each, [&](const S (&v)[1], int e) {
      if (e == t) x_t = v[0];
    });
    return {loss, x_t};
  }

  __device__ __forceinline__ Row finish(Stat st, const S (&row_in)[1], const RowAt& at) const {
    const int64_t t = forward.target[at.row];
    const bool counted = t != forward.ignore_index && t >= 0 && t < forward.classes;
    MaxSum<S> ms;
    S sum_shifted = 0;
    if constexpr (kSmoothing) {
      ms = st.loss.ms;
      sum_shifted = st.loss.sum;
    } else {
      ms = st.loss;
    }
    const S log_s = math::log_(ms.s);
    const S loss = counted ? math::cross_entropy_loss_with(log_s, st.target_logit - ms.m, sum_shifted,
                                                           forward.smoothing, forward.per_class)
                           : S(0);
    return {loss, ms.m, log_s, softmax_from_stats<T>(ms.m, log_s), row_in[0], target_in_run(t, forward.ignore_index, at),
            target_ok(t, forward.ignore_index, forward.classes)};
  }
  __device__ __forceinline__ S map(const Row& r, const S (&v)[1], int e) const {
    return math::cross_entropy_vjp_with(v[0], r.softmax, r.scale, e == r.t ? per_class_target : forward.per_class);
  }
  __device__ __forceinline__ S row_out(const Row& r, int i) const { return i == 0 ? r.loss : i == 1 ? r.m : r.log_s; }
  __device__ __forceinline__ bool row_ok(const Row& r) const { return r.ok; }
};

// ---------------------------------------------------------------------------------------------------------
// Class weights with label smoothing (ε > 0; math/cross_entropy.h): the three kernels above, weighted. Class
// weights without smoothing never reach a kernel (the frontend scales the unweighted rows by w_t), and the
// unweighted instances above are unchanged. Column j of a run is at.first + e; w_j is read from the (C,)
// weights (compute type, L1/L2-resident: every row reads the same C values): by the forward's partial for the
// row's elements alone (kMasked), by the gradient's map only where the slot is in the row (map runs on padding
// slots too; their stores are dropped). Not the engine's parameter vector (kParamIn, a norm's weight): its
// packs held beside the logits' spilled 8-56 B in the fused kernel's fp32/bf16/fp16 instances (ptxas -v).
//
// Forward: loss_i = (1 - ε) w_t (log_s - (x_t - m)) + (ε/C) (W log_s - Σ_j w_j (x_j - m)), so the smoothed
// partial holds Σ w_j (x_j - m_a) and Σ w_j over its elements (WeightedLossStat), merged as LossStat with the
// weight sum in place of the count: Σ_a + W_a (m_a - M). A -inf logit of weight w > 0 makes Σ -inf (the loss
// +inf), of weight 0 NaN (0 · -inf), as torch's -(log_softmax(x) · w).sum().
template <class S>
struct WeightedLossStat {
  MaxSum<S> ms;  // max and Σ exp(x - max)
  S sum;         // Σ w_j (x_j - ms.m) over the partial's elements
  S weight;      // Σ w_j over them
  S count;       // its elements (0: empty, the identity)
};

template <class T_>
struct WeightedCrossEntropyForward : CrossEntropyForward<T_, true> {
  using Base = CrossEntropyForward<T_, true>;
  using typename Base::S;
  using typename Base::T;
  using typename Base::Row;
  using LogSoftmaxForward = typename Base::LogSoftmaxForward;
  using Stat = WeightedLossStat<S>;
  // 512 threads a block at most (128 registers), all dtypes: at 1024 (64 registers) ptxas spilled 80 B of the
  // float WideBlock instance (the weight sum rides the merge beside LossStat's). Longer rows take a cluster on
  // sm_90 or are split on sm_80, as the smoothed CrossEntropyForwardGrad's.
  static constexpr int kMaxThreads = 512;
  const S* class_weight;  // (C,)
  const S* row_weight;    // (rows,) w_t (0 where ignored)
  const S* weight_total;  // W (one value)

  __device__ __forceinline__ Stat identity() const { return {LogSoftmaxForward{}.identity(), S(0), S(0), S(0)}; }

  __device__ __forceinline__ Stat combine(Stat a, Stat b) const {
    if (b.count == S(0)) return a;
    if (a.count == S(0)) return b;
    const S d = a.ms.m - b.ms.m;
    const S shift = d > S(0) ? -b.weight * d : d < S(0) ? a.weight * d : S(0);
    return {LogSoftmaxForward{}.combine(a.ms, b.ms), a.sum + b.sum + shift, a.weight + b.weight, a.count + b.count};
  }

  template <class Each>
  __device__ __forceinline__ Stat partial(const Each& each, const S (&)[1], const RowAt& at) const {
    return partial_seeing(each, [](const S (&)[1], int) {}, at);
  }

  template <class Each, class See>
  __device__ __forceinline__ Stat partial_seeing(const Each& each, const See& see, const RowAt& at) const {
    S m = neg_inf<S>();
    int count = 0;
    each([&](const S (&v)[1], int e) {
      m = max_nan(m, v[0]);
      ++count;
      see(v, e);
    });
    if (count == 0) return identity();
    const S* w = class_weight + at.first;
    S sum = 0, weight = 0;
    if (m == neg_inf<S>()) {  // -inf only: each term w · -inf
      each([&](const S (&)[1], int e) {
        sum += w[e] * neg_inf<S>();
        weight += w[e];
      });
      return {LogSoftmaxForward{}.identity(), sum, weight, S(count)};
    }
    const typename LogSoftmaxForward::Exp exp_minus_m(m);
    S s = 0;
    each([&](const S (&v)[1], int e) {
      s += exp_minus_m(v[0]);
      sum += w[e] * (v[0] - m);
      weight += w[e];
    });
    return {{m, s}, sum, weight, S(count)};
  }

  // The loss from the merged statistics and the target logit x_t (read by the caller).
  __device__ __forceinline__ Row row(Stat st, S x_t, bool counted, bool ok, int64_t row_index) const {
    const S log_s = math::log_(st.ms.s);
    const S loss = counted ? math::weighted_cross_entropy_loss(log_s, x_t - st.ms.m, st.sum, row_weight[row_index],
                                                               this->smoothing, this->per_class, *weight_total)
                           : S(0);
    return {loss, st.ms.m, log_s, ok};
  }

  __device__ __forceinline__ Row finish(Stat st, const S (&)[1], const RowAt& at) const {
    const int64_t t = this->target[at.row];
    const bool counted = t != this->ignore_index && t >= 0 && t < this->classes;
    const S x_t = counted ? static_cast<S>(this->logits[at.row * this->classes + t]) : S(0);
    return row(st, x_t, counted, target_ok(t, this->ignore_index, this->classes), at.row);
  }
};

// Gradient (CrossEntropyGrad's derivation, weighted; math/cross_entropy.h):
//   dx_ij = (s_i a_i) p_ij - (s_i ε/C) w_j - s_i (1 - ε) w_t [j = t_i],   a_i = (1 - ε) w_t + (ε/C) W
// (the target's two terms subtracted as one, math::WeightedGradRow: a row of one class gets exactly 0)
// Row inputs m, log_s, s as CrossEntropyGrad's; w_t and W read once a row, w_j once an element. The Row holds
// three products of s (the fewest registers: the fused kernel's cluster instance holds the row's logits too).
template <class T_>
struct WeightedCrossEntropyGrad : CrossEntropyGrad<T_> {
  using Base = CrossEntropyGrad<T_>;
  using typename Base::S;
  using typename Base::T;
  S smoothing;            // ε (per_class = ε/C is the base's)
  const S* class_weight;  // (C,)
  const S* row_weight;    // (rows,) w_t (0 where ignored)
  const S* weight_total;  // W

  struct Row {
    SoftmaxFromStatsFor<T> softmax;
    math::WeightedGradRow<S> terms;  // s a, s ε/C, s (1 - ε) w_t
    int first;  // the run's first column (int: C <= INT_MAX is checked); slots may lie outside the row
    int t;      // the target's run element, or -1
    bool ok;    // the target is in range
  };

  __device__ __forceinline__ Row finish(S, const S (&row_in)[3], const RowAt& at) const {
    const int64_t t = this->target[at.row];
    return {softmax_from_stats<T>(row_in[0], row_in[1]),
            math::weighted_grad_row(row_in[2], row_weight[at.row], smoothing, this->per_class, *weight_total),
            static_cast<int>(at.first), target_in_run(t, this->ignore_index, at),
            target_ok(t, this->ignore_index, this->classes)};
  }
  __device__ __forceinline__ S map(const Row& r, const S (&v)[1], int e) const {
    // The column; padding slots lie outside [0, C) (one unsigned compare: C <= INT_MAX) and read no weight.
    const int j = r.first + e;
    const S w = static_cast<unsigned>(j) < static_cast<unsigned>(this->classes) ? class_weight[j] : S(0);
    // math::weighted_cross_entropy_(target_)vjp_with, one exponential for both: (s a) p - the subtrahend.
    const S subtrahend = e == r.t ? math::weighted_target_subtrahend(r.terms.scaled_per_class, w, r.terms.target_term)
                                  : r.terms.scaled_per_class * w;
    return r.terms.scaled_coefficient * r.softmax(v[0]) - subtrahend;
  }
  __device__ __forceinline__ bool row_ok(const Row& r) const { return r.ok; }
};

// Forward and gradient in one kernel (CrossEntropyForwardGrad's contract and plan), weighted.
template <class T_>
struct WeightedCrossEntropyForwardGrad : EpilogueDefaults {
  using T = T_;
  using S = Opmath<T>;
  using R = S;
  using Forward = WeightedCrossEntropyForward<T>;
  struct Stat {
    typename Forward::Stat loss;
    S target_logit;  // NaN where not among the elements seen (CrossEntropyForwardGrad's rule)
  };
  static constexpr int kIn = 1;
  static constexpr int kRowIn = 1;  // scale
  static constexpr bool kElementOut = true;
  static constexpr int kRowOut = 3;  // loss, row_max, log_sum
  static constexpr bool kReduces = true;
  static constexpr bool kMasked = true;
  static constexpr bool kRowsOnly = true;
  static constexpr bool kAsserts = true;  // the target
  static constexpr int kMaxThreads = 512;  // as CrossEntropyForwardGrad<T, true>'s (its smoothed variant)
  static constexpr int kClusterThreads = Forward::kClusterThreads;
  Forward forward;  // logits unused (the target logit comes from the Stat)
  WeightedCrossEntropyGrad<T> grad;  // its per_class, smoothing and weights (target unused: forward's)

  struct Row {
    S loss, m, log_s;
    typename WeightedCrossEntropyGrad<T>::Row g;
  };

  __device__ __forceinline__ S pad(int i) const { return forward.pad(i); }
  __device__ __forceinline__ Stat identity() const { return {forward.identity(), S(NAN)}; }
  __device__ __forceinline__ Stat combine(Stat a, Stat b) const {
    return {forward.combine(a.loss, b.loss), b.target_logit == b.target_logit ? b.target_logit : a.target_logit};
  }

  template <class Each>
  __device__ __forceinline__ Stat partial(const Each& each, const S (&)[1], const RowAt& at) const {
    const int t = target_in_run(forward.target[at.row], forward.ignore_index, at);
    S x_t = S(NAN);
    const auto loss = forward.partial_seeing(each, [&](const S (&v)[1], int e) {
      if (e == t) x_t = v[0];
    }, at);
    return {loss, x_t};
  }

  __device__ __forceinline__ Row finish(Stat st, const S (&row_in)[1], const RowAt& at) const {
    const int64_t t = forward.target[at.row];
    const bool counted = t != forward.ignore_index && t >= 0 && t < forward.classes;
    const auto f = forward.row(st.loss, st.target_logit, counted, target_ok(t, forward.ignore_index, forward.classes),
                               at.row);
    const S grad_in[3] = {f.m, f.log_s, row_in[0]};
    return {f.loss, f.m, f.log_s, grad.finish(S(0), grad_in, at)};
  }
  __device__ __forceinline__ S map(const Row& r, const S (&v)[1], int e) const { return grad.map(r.g, v, e); }
  __device__ __forceinline__ S row_out(const Row& r, int i) const { return i == 0 ? r.loss : i == 1 ? r.m : r.log_s; }
  __device__ __forceinline__ bool row_ok(const Row& r) const { return r.g.ok; }
};

}  // namespace torch_vjp::cuda
