// Cross-entropy with class-index targets over C classes, label smoothing ε, per row i with target t.
// Statistics, saved for the VJP (as the log_softmax forward's, never rounded into one lse):
//   m = max_j x_j,   log_s = log Σ_j exp(x_j - m)                         (lse = m + log_s)
// Loss, formed from the shifted logits x - m so that an offset shared by the row cancels exactly:
//   loss_i = log_s - (1 - ε)(x_t - m) - (ε / C) Σ_j (x_j - m)             (= lse - (1-ε) x_t - (ε/C) Σ_j x_j)
//   a row whose target is ignore_index has loss 0 and does not count in 'mean'
// reduction: 'none' → loss_i; 'sum' → Σ_i loss_i; 'mean' → Σ_i loss_i / (rows not ignored), NaN if none.
//
// Backward (VJP). ∂loss_i/∂x_ij = p_ij - (1 - ε)[j = t_i] - ε/C with p_i = softmax(x_i): a gradient row per
// sample (the Jacobian of the summed loss is one row), so with s_i the row's scale (dy_i for 'none', dy for
// 'sum', dy / count for 'mean', 0 for an ignored row):
//   dx_ij = s_i (exp((x_ij - m_i) - log_s_i) - ε/C - (1 - ε)[j = t_i])
// one pass from the logits and the saved (m, log_s). p is torch's exp(log_softmax(x)): exp(x - lse) with lse
// rounded would carry |lse|·ε of relative error into every p near 1.
//
// Class weights w (C,), W = Σ_j w_j (torch's F.cross_entropy(weight=w); its label smoothing with weights
// smooths over the weighted log-probabilities):
//   loss_i = (1 - ε) w_t (log_s - (x_t - m)) + (ε/C) Σ_j w_j (log_s - (x_j - m))
//   'mean' divides Σ_i loss_i by Σ_i w_{t_i} over the rows not ignored (the weights of their targets).
// ε = 0: loss_i = w_t · (the unweighted loss_i) and its gradient w_t · (the unweighted one), so the frontend
// multiplies the row's loss and its scale s_i by w_t and the kernels run unweighted (ops/cross_entropy.h).
// ε > 0: the row reduction adds Σ_j w_j (x_j - m) (every term ≤ 0 for w ≥ 0: no cancellation), and
//   loss_i = (1 - ε) w_t (log_s - (x_t - m)) + (ε/C) (W log_s - Σ_j w_j (x_j - m))
//   ∂loss_i/∂x_ik = a_i p_ik - (ε/C) w_k - (1 - ε) w_t [k = t],     a_i = (1 - ε) w_t + (ε/C) W
//   dx_ik = (s_i a_i) p_ik - (s_i ε/C) w_k - s_i (1 - ε) w_t [k = t]
// (w = 1: a_i = 1, and these are the unweighted formulas).
//
// Options (a backend's kernels apply them in the row passes, or ops/cross_entropy.h around the kernels):
// softcap c > 0 (Gemma 2): every formula above on z = c·tanh(x / c); m, log_s are z's. Chain rule, from
// u = tanh(x / c):
//   dx_ij = dz_ij (1 - u_ij²)                                             (tanh' = 1 - tanh², as torch's)
// z-loss λ > 0 (PaLM): loss_i += λ lse_i², lse_i = m + log_s (0 for an ignored row), so ∂/∂z_ij adds
//   2 λ lse_i p_ij:   dz_ij = s_i (1 + 2 λ lse_i) p_ij - (the rest, unchanged)
// T is float, double, or (CPU only) at::vec::Vectorized<float|double>.
#pragma once

#include "math/common.h"
#include "math/softmax.h"  // ExpMinus, log_softmax_out

namespace torch_vjp::math {

enum class Reduction { None, Mean, Sum };

// loss_i from log_s, the target's shifted logit x_t - m and the row's Σ(x - m) (pass 0 when ε = 0: a -inf
// logit must not turn 0 · Σ into NaN). _with: ε/C given (a kernel computes it once, not once a row).
template <class S>
TVJP_HD S cross_entropy_loss_with(S log_s, S target_shifted, S sum_shifted, S smoothing, S smoothing_per_class) {
  return log_s - (S(1) - smoothing) * target_shifted - smoothing_per_class * sum_shifted;
}
template <class S>
TVJP_HD S cross_entropy_loss(S log_s, S target_shifted, S sum_shifted, S smoothing, S classes) {
  return cross_entropy_loss_with(log_s, target_shifted, sum_shifted, smoothing, smoothing / classes);
}

// p = exp((x - m) - log_s): log_softmax_out, then its exponential (≤ 0: exp_nonpositive_).
template <class S>
struct SoftmaxFromStats {
  S m, log_s;
  template <class T>
  TVJP_HD T operator()(T x) const { return exp_nonpositive_(log_softmax_out(x, m, log_s)); }
};

// dx_ij without the target's term: s (p - ε/C); the caller subtracts s (1 - ε) at j = t.
// _with: the same with p from a functor (SoftmaxFromStats, or a kernel's faster exponential).
template <class T, class S, class Softmax>
TVJP_HD T cross_entropy_vjp_with(T x, const Softmax& softmax, S scale, S smoothing_per_class) {
  return T(scale) * (softmax(x) - T(smoothing_per_class));
}
template <class T, class S>
TVJP_HD T cross_entropy_vjp(T x, S m, S log_s, S scale, S smoothing_per_class) {
  return cross_entropy_vjp_with(x, SoftmaxFromStats<S>{m, log_s}, scale, smoothing_per_class);
}
// ε = 0: s p (the same bits as the above with ε/C = 0, one subtraction fewer an element).
template <class T, class S>
TVJP_HD T cross_entropy_vjp_unsmoothed(T x, S m, S log_s, S scale) {
  return T(scale) * SoftmaxFromStats<S>{m, log_s}(x);
}

// The weighted, smoothed loss (ε > 0; see the top): from log_s, x_t - m, Σ_j w_j (x_j - m), w_t, ε, ε/C and W.
template <class S>
TVJP_HD S weighted_cross_entropy_loss(S log_s, S target_shifted, S weighted_sum_shifted, S target_weight, S smoothing,
                                      S smoothing_per_class, S weight_total) {
  return (S(1) - smoothing) * target_weight * (log_s - target_shifted) +
         smoothing_per_class * (weight_total * log_s - weighted_sum_shifted);
}

// The weighted, smoothed gradient row's constants: sc = s ε/C, st = s (1 - ε) w_t, and s a_i = sc W + st
// (= s ((1 - ε) w_t + (ε/C) W)), summed as the target's subtrahend sc w_t + st is (weighted_target_subtrahend),
// so that a row of one class (p = 1, W = w_t) gets exactly 0 at its target, as torch's.
template <class S>
struct WeightedGradRow {
  S scaled_coefficient, scaled_per_class, target_term;  // s a, s ε/C, s (1 - ε) w_t
};
template <class S>
TVJP_HD S weighted_target_subtrahend(S scaled_per_class, S class_weight, S target_term) {
  return scaled_per_class * class_weight + target_term;
}
template <class S>
TVJP_HD WeightedGradRow<S> weighted_grad_row(S scale, S target_weight, S smoothing, S smoothing_per_class,
                                             S weight_total) {
  const S sc = scale * smoothing_per_class, st = scale * (S(1) - smoothing) * target_weight;
  return {weighted_target_subtrahend(sc, weight_total, st), sc, st};
}

// dx_ik off the target, from the row's constants: (s a) p_k - (s ε/C) w_k.
template <class T, class S, class Softmax>
TVJP_HD T weighted_cross_entropy_vjp_with(T x, T class_weight, const Softmax& softmax, S scaled_coefficient,
                                          S scaled_per_class) {
  return T(scaled_coefficient) * softmax(x) - T(scaled_per_class) * class_weight;
}
// dx_it at the target: (s a) p_t - (s ε/C w_t + s (1 - ε) w_t).
template <class T, class S, class Softmax>
TVJP_HD T weighted_cross_entropy_target_vjp_with(T x_t, T class_weight_t, const Softmax& softmax,
                                                 const WeightedGradRow<S>& r) {
  return T(r.scaled_coefficient) * softmax(x_t) -
         weighted_target_subtrahend(T(r.scaled_per_class), class_weight_t, T(r.target_term));
}

// The softcap as the kernels evaluate it: u = tanh(x / c) once an element, then z = u c and the chain rule's
// 1 - u² from it (torch's composite rounds tanh(x / c) · c the same way).
template <class S>
struct Softcap {
  S c;  // > 0
  template <class T>
  TVJP_HD T tanh_of(T x) const { return tanh_(x / T(c)); }
  template <class T>
  TVJP_HD T logit(T u) const { return u * T(c); }
  template <class T>
  TVJP_HD static T slope(T u) { return T(1) - u * u; }
};

// a_i = 1 + 2 λ lse_i: the z-loss's factor on p in the gradient row (see Options), lse_i = m + log_s.
template <class S>
TVJP_HD S z_loss_softmax_factor(S m, S log_s, S lse_square_scale) {
  return S(1) + S(2) * lse_square_scale * (m + log_s);
}

// dz_ij with the z-loss, without the target's term: s (a p - ε/C), s outermost as in cross_entropy_vjp (so a
// gradient for s = 1 scaled after by dy rounds as one formed for s = dy); the caller subtracts s (1 - ε) at t.
template <class T, class S, class Softmax>
TVJP_HD T z_loss_cross_entropy_vjp_with(T x, const Softmax& softmax, S factor, S scale, S smoothing_per_class) {
  return T(scale) * (T(factor) * softmax(x) - T(smoothing_per_class));
}

}  // namespace torch_vjp::math
