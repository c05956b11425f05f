// Cross-entropy with class-index targets over C classes, label smoothing ε, per row i with target t:
//   lse = log Σ_j exp(x_j)                                  (max, then Σ exp(x - max): the softmax family's)
//   loss_i = lse - (1 - ε) x_t - (ε / C) Σ_j x_j             (ε = 0: lse - x_t)
//   a row whose target is ignore_index has loss 0 and does not count in 'mean'
// reduction: 'none' → loss_i; 'sum' → Σ_i loss_i; 'mean' → Σ_i loss_i / (rows not ignored), NaN if none.
//
// Backward (VJP). ∂loss_i/∂x_ij = p_ij - (1 - ε)[j = t_i] - ε/C with p_i = softmax(x_i) = exp(x_i - lse_i): a
// gradient row per sample (the Jacobian of the summed loss is one row), so with s_i the row's scale
// (dy_i for 'none', dy for 'sum', dy / count for 'mean', 0 for an ignored row):
//   dx_ij = s_i (exp(x_ij - lse_i) - ε/C - (1 - ε)[j = t_i])
// one pass from the logits and the saved lse; the forward stores no gradient.
// T is float, double, or (CPU only) at::vec::Vectorized<float|double>.
#pragma once

#include "math/common.h"
#include "math/softmax.h"  // ExpMinus

namespace torch_vjp::math {

enum class Reduction { None, Mean, Sum };

// loss_i from the row's lse, its target logit and its sum of logits. _with: ε/C given (a kernel computes it
// once, not once a row).
template <class S>
TVJP_HD S cross_entropy_loss_with(S lse, S target_logit, S sum_logits, S smoothing, S smoothing_per_class) {
  return lse - (S(1) - smoothing) * target_logit - smoothing_per_class * sum_logits;
}
template <class S>
TVJP_HD S cross_entropy_loss(S lse, S target_logit, S sum_logits, S smoothing, S classes) {
  return cross_entropy_loss_with(lse, target_logit, sum_logits, smoothing, smoothing / classes);
}

// dx_ij without the target's term: s (exp(x - lse) - ε/C); the caller subtracts s (1 - ε) at j = t.
// _with: the same with exp(x - lse) from a functor (math/softmax.h's ExpMinus, or a kernel's faster one).
template <class T, class S, class ExpMinusLse>
TVJP_HD T cross_entropy_vjp_with(T x, const ExpMinusLse& exp_minus_lse, S scale, S smoothing_per_class) {
  return T(scale) * (exp_minus_lse(x) - T(smoothing_per_class));
}
template <class T, class S>
TVJP_HD T cross_entropy_vjp(T x, S lse, S scale, S smoothing_per_class) {
  return cross_entropy_vjp_with(x, ExpMinus<S>(lse), scale, smoothing_per_class);
}

}  // namespace torch_vjp::math
