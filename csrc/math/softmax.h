// Softmax family: row-wise maps over one dim of length n.
//
// Forward, per row: m = max_j x_j, s = Σ_j exp(x_j - shift), with shift = m (shift_for), then
//   softmax      y_j = exp(x_j - m) / s
//   log_softmax  y_j = (x_j - m) - log s
//   logsumexp    out = shift + log s          (one value per row)
//
// Backward (the VJP, derived at each function below) needs at most one row reduction:
//   softmax      c = Σ_j dy_j y_j,  dx = y ⊙ (dy - c)
//   log_softmax  S = Σ_j dy_j,      dx = dy - exp(y) ⊙ S
//   logsumexp    no reduction,      dx = dy_row · exp(x - out)
// T is float, double, or (CPU only) at::vec::Vectorized<float|double>; row constants are scalars that
// callers broadcast.
#pragma once

#include "math/common.h"

namespace torch_vjp::math {

enum class SoftmaxKind { Softmax, LogSoftmax, LogSumExp };

// What is subtracted before exp. torch's logsumexp shifts a ±inf max by 0, so a row of -inf gives -inf
// and a row holding +inf gives +inf; softmax and log_softmax shift by the max and so give NaN on such
// rows, exactly as torch does.
template <SoftmaxKind K, class S>
TVJP_HD S shift_for(S row_max) {
  if (K == SoftmaxKind::LogSumExp && (row_max == S(INFINITY) || row_max == S(-INFINITY))) return S(0);
  return row_max;
}

// Streaming merge of two partial (max, sum-of-exp) pairs, for rows too long to keep on chip:
// s = s_a e^{m_a - M} + s_b e^{m_b - M}, M = max(m_a, m_b). A side with s = 0 (nothing seen yet)
// contributes nothing, so -inf maxima never produce e^{-inf + inf}.
template <class S>
TVJP_HD void online_merge(S& m_a, S& s_a, S m_b, S s_b) {
  if (s_b == S(0)) return;
  if (s_a == S(0)) { m_a = m_b; s_a = s_b; return; }
  S m = m_a > m_b ? m_a : m_b;
  s_a = s_a * exp_(m_a - m) + s_b * exp_(m_b - m);
  m_a = m;
}

// e^x and e^(x - c): the exponentials in the formulas below, as functors, so that a kernel may evaluate
// the same formula with another exponential (CUDA's half types use exp2 on prescaled inputs,
// cuda/softmax_epilogues.cuh) without writing the formula twice.
struct ExpOf {
  template <class T>
  TVJP_HD T operator()(T x) const { return exp_(x); }
};
// e^(x - c) with c the row max or the row's log-sum-exp, so x - c ≤ 0 (exp_nonpositive_: see common.h).
template <class S>
struct ExpMinus {
  S c;
  TVJP_HD explicit ExpMinus(S c_) : c(c_) {}
  template <class T>
  TVJP_HD T operator()(T x) const { return exp_nonpositive_(x - T(c)); }
};

// y_j = exp(x_j - m) · (1/s), as two steps so a kernel holding the row can keep e_j = exp(x_j - m)
// from the pass that sums it: softmax_out(x) = softmax_scale(softmax_exp(x)).
template <class T, class S>
TVJP_HD T softmax_exp(T x, S m) { return ExpMinus<S>(m)(x); }
template <class T, class S>
TVJP_HD T softmax_scale(T e, S inv_s) { return e * T(inv_s); }
template <class T, class S>
TVJP_HD T softmax_out(T x, S m, S inv_s) { return softmax_scale(softmax_exp(x, m), inv_s); }

// y_j = (x_j - m) - log s. Not x_j - (m + log s): rounding m + log s costs an ulp of m, which the
// backward's exp(y) then carries into every gradient.
template <class T, class S>
TVJP_HD T log_softmax_out(T x, S m, S log_s) { return (x - T(m)) - T(log_s); }

// softmax: J = diag(y) - y yᵀ, symmetric, so
//   dx = Jᵀ dy = y ⊙ dy - y (yᵀ dy) = y ⊙ (dy - c),   c = Σ_j dy_j y_j   (softmax_vjp_term summed)
template <class T> TVJP_HD T softmax_vjp_term(T dy, T y) { return dy * y; }
template <class T, class S>
TVJP_HD T softmax_vjp(T dy, T y, S c) { return y * (dy - T(c)); }

// log_softmax: y = x - lse(x), J = I - 1 pᵀ with p = softmax(x) = exp(y), so
//   dx = Jᵀ dy = dy - p (1ᵀ dy) = dy - exp(y) ⊙ S,   S = Σ_j dy_j   (log_softmax_vjp_term summed)
template <class T> TVJP_HD T log_softmax_vjp_term(T dy, T /*y*/) { return dy; }
template <class T, class S, class Exp>
TVJP_HD T log_softmax_vjp_with(T dy, T y, S sum_dy, const Exp& exp) { return dy - exp(y) * T(sum_dy); }
template <class T, class S>
TVJP_HD T log_softmax_vjp(T dy, T y, S sum_dy) { return log_softmax_vjp_with(dy, y, sum_dy, ExpOf{}); }

// logsumexp: out = lse(x), a 1×n Jacobian J = pᵀ, p = exp(x - out), so
//   dx = Jᵀ dy_row = dy_row · exp(x - out)
template <class T, class S, class ExpMinusOut>
TVJP_HD T logsumexp_vjp_with(S dy_row, T x, const ExpMinusOut& exp_minus_out) { return T(dy_row) * exp_minus_out(x); }
template <class T, class S>
TVJP_HD T logsumexp_vjp(S dy_row, T x, S out) { return logsumexp_vjp_with(dy_row, x, ExpMinus<S>(out)); }

}  // namespace torch_vjp::math
