// Normalization family: layer_norm, rms_norm (rows of N elements, the trailing normalized_shape) and
// normalize (p = 2 along one dim). Statistics are per row; weight and bias are shared by every row.
//
// layer_norm (kCentered) and rms_norm (not centered), per row:
//   μ = c + Σ(x - c) / N with c a row element (0 for rms_norm),  σ² = Σ(x - μ)² / N,  r = 1 / √(σ² + eps),
//   x̂ = (x - μ) r,
//   y = x̂ ⊙ w + b                         (w = 1, b = 0 when absent; rms_norm's w is offset + weight, Gemma's 1 + w)
// Saved: x and the per-row μ, r (never x̂ or y).
//
// Backward (VJP), with g = dy ⊙ w. ∂x̂ᵢ/∂xⱼ = r (δᵢⱼ - 1/N - x̂ᵢ x̂ⱼ / N) (rms_norm: without the 1/N), a
// symmetric matrix, so
//   dx = r (g - mean(g) - x̂ ⊙ mean(g ⊙ x̂))        two row reductions (term 1: mean g, term 2: mean g x̂),
//                                                  then one pass; rms_norm drops mean(g)
//   dw = Σ_rows dy ⊙ x̂,   db = Σ_rows dy           column sums over the batch: the gradient of a shared
//                                                  parameter is the sum of the per-sample gradients
//
// normalize, per row along dim: ρ = ‖x‖₂ (|x| for a row of one element, as torch's norm: no square to
// overflow or underflow), y = x / max(ρ, eps), NaN kept, the clamp decided in the input's dtype
// (normalize_clamped). Saved: y and ρ.
//   not clamped: ∂y/∂x = (I - y yᵀ) / ρ, symmetric  ⇒  dx = (dy - y ⟨y, dy⟩) / ρ
//   clamped (ρ ≤ eps): y = x / eps                   ⇒  dx = dy / eps    (torch's clamp_min passes no
//                                                                          gradient, at the tie ρ = eps too)
// T is float, double, or (CPU only) at::vec::Vectorized<float|double>.
#pragma once

#include "math/common.h"

namespace torch_vjp::math {

// μ = c + Σ(x - c) / n, c any element of the row (the first): a constant row has every x - c = 0, so μ is
// its value exactly and x - μ = 0 (Σx / n is off by an ulp there, which a large r, eps = 1e-12, magnifies).
template <class S>
TVJP_HD S shifted_mean(S shift, S sum_shifted, S n) { return shift + sum_shifted / n; }

// r = 1 / √(σ² + eps); σ² from the two-pass sum Σ(x - μ)² (no cancellation: μ is subtracted first).
template <class S>
TVJP_HD S norm_rstd(S sum_sq_centered, S n, S eps) {
  return S(1) / sqrt_(sum_sq_centered / n + eps);
}

template <class T, class S>
TVJP_HD T norm_xhat(T x, S mean, S rstd) { return (x - T(mean)) * T(rstd); }

// y = x̂ ⊙ w + b
template <class T, class S>
TVJP_HD T norm_out(T x, S mean, S rstd, T w, T b) { return norm_xhat(x, mean, rstd) * w + b; }

// rms_norm's casting_mode="llama" (LlamaRMSNorm: x̂ in float32, cast to the input dtype, then times the
// weight): y = round(x̂) ⊙ w + b, `round` rounding to the input dtype and back. The default (torch's and
// Gemma's rule) is norm_out, rounded once. The rounding's derivative is taken as 1: the VJP is the same.
template <class T, class S, class Round>
TVJP_HD T norm_out_rounded(T x, S mean, S rstd, T w, T b, const Round& round) {
  return round(norm_xhat(x, mean, rstd)) * w + b;
}

// add_rms_norm / add_layer_norm, s = input + residual then y = norm(s): ∂s/∂input = ∂s/∂residual = I, and s
// reaches the loss through y and through its other uses (grad_sum, the next residual), so
//   d_input = d_residual = grad_sum + norm_vjp(dy at s)     one tensor, added in the dx pass
// and the parameters' gradients are the norm's, at s.
template <class T>
TVJP_HD T add_norm_vjp(T norm_dx, T grad_sum) { return norm_dx + grad_sum; }

// dx = r (g - mean(g) - x̂ mean(g x̂)); mean_g = 0 for rms_norm.
template <class T, class S>
TVJP_HD T norm_vjp(T g, T xhat, S mean_g, S mean_g_xhat, S rstd) {
  return T(rstd) * (g - T(mean_g) - xhat * T(mean_g_xhat));
}

// normalize's clamp as torch decides it, in the input's dtype: its norm comes back rounded to that dtype and
// eps is a scalar of it, so whether a row clamps is ρ ≤ eps between those roundings, the tie included
// (torch's clamp_min passes no gradient there; in bfloat16 a norm of 1.0016 is 1.0, at the tie with eps = 1).
// The division then uses ρ or eps unrounded, in the compute type: torch's float16 norm of a row above 65504
// would be inf (y = 0), and its float16 eps = 1e-12 is 0 (a zero row 0/0 = NaN); float64 torch is followed
// there. NaN is kept (a NaN ρ never clamps). No change for float and double input.
template <class Storage, class S>
TVJP_HD S as_stored(S v) { return static_cast<S>(static_cast<Storage>(v)); }
// NormalizeClamp rounds eps once, for a loop over rows; the two functions below are its one-row forms.
template <class Storage, class S>
struct NormalizeClamp {
  S eps, eps_stored;
  TVJP_HD explicit NormalizeClamp(S eps_) : eps(eps_), eps_stored(as_stored<Storage>(eps_)) {}
  TVJP_HD bool clamped(S rho) const { return as_stored<Storage>(rho) <= eps_stored; }
  TVJP_HD S denominator(S rho) const { return clamped(rho) ? eps : rho; }
};
template <class Storage, class S>
TVJP_HD bool normalize_clamped(S rho, S eps) { return NormalizeClamp<Storage, S>(eps).clamped(rho); }
template <class Storage, class S>
TVJP_HD S normalize_denominator(S rho, S eps) { return NormalizeClamp<Storage, S>(eps).denominator(rho); }

// normalize: dx = (dy - y ⟨y, dy⟩) / ρ, or dy / eps where clamped (scale = 1/ρ or 1/eps, dot = ⟨y, dy⟩ or 0).
template <class T, class S>
TVJP_HD T normalize_vjp(T dy, T y, S dot, S scale) { return (dy - y * T(dot)) * T(scale); }

}  // namespace torch_vjp::math
