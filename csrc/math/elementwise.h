// Elementwise family: y = f(x), applied independently to every element.
//
// Jacobian: diagonal, J = diag(f'(x)). So the VJP needs no reduction:
//     dx = Jᵀ dy = dy ⊙ f'(x)
// Each functor writes f'(x) in terms of the tensor its backward saves: the output y where f' is
// cheapest from y (exp, sigmoid, tanh), otherwise the input x. `backward(dy, saved)` is that product.
// T is float, double, or (CPU only) at::vec::Vectorized<float|double>; see math/common.h.
#pragma once

#include "math/common.h"

namespace torch_vjp::math {

// y = eˣ;  f'(x) = eˣ = y  ⇒  dx = dy · y
struct Exp {
  static constexpr bool kSavesOutput = true;
  template <class T> TVJP_HD T forward(T x) const { return exp_(x); }
  template <class T> TVJP_HD T backward(T dy, T y) const { return dy * y; }
};

// y = 1 / (1 + e⁻ˣ);  f' = y (1 - y)  ⇒  dx = dy · y · (1 - y)
struct Sigmoid {
  static constexpr bool kSavesOutput = true;
  template <class T> TVJP_HD T forward(T x) const { return T(1) / (T(1) + exp_(T(0) - x)); }
  template <class T> TVJP_HD T backward(T dy, T y) const { return dy * y * (T(1) - y); }
};

// y = tanh x;  f' = 1 - y²  ⇒  dx = dy · (1 - y²)
struct Tanh {
  static constexpr bool kSavesOutput = true;
  template <class T> TVJP_HD T forward(T x) const { return tanh_(x); }
  template <class T> TVJP_HD T backward(T dy, T y) const { return dy * (T(1) - y * y); }
};

// y = log(1 + e^{βx}) / β, or x where βx > threshold (torch's linear region). With z = βx, written
// log(1 + eᶻ) = max(z, 0) + log1p(e^{-|z|}): no overflow, and log1p's argument stays in [0, 1].
// f' = σ(z) = 1 / (1 + e^{-z}), or 1 in the linear region.
struct Softplus {
  static constexpr bool kSavesOutput = false;
  double beta, threshold;
  template <class T> TVJP_HD T forward(T x) const {
    T z = x * T(beta);
    return select(greater(z, T(threshold)), x, (positive_part(z) + log1p_unit_(exp_nonpositive_(T(0) - abs_(z)))) / T(beta));
  }
  template <class T> TVJP_HD T backward(T dy, T x) const {
    T z = x * T(beta);
    return select(greater(z, T(threshold)), dy, dy / (T(1) + exp_(T(0) - z)));
  }
};

// The ops gated activations use (silu, both GELUs; math/gated.h) also give value_and_slope(x, f, f'), which
// shares the work of f and f'; their backward is dy · f' from it.

// Exact GELU: y = x Φ(x), Φ the standard normal CDF;  f' = Φ(x) + x φ(x), φ(x) = e^{-x²/2} / √(2π).
struct Gelu {
  static constexpr bool kSavesOutput = false;
  template <class T> TVJP_HD T forward(T x) const { return x * normal_cdf_(x); }
  template <class T> TVJP_HD void value_and_slope(T x, T& f, T& df) const {
    T cdf, density;
    normal_cdf_and_density_(x, cdf, density);
    f = x * cdf;
    df = cdf + x * density;
  }
  template <class T> TVJP_HD T backward(T dy, T x) const {
    T f, df;
    value_and_slope(x, f, df);
    return dy * df;
  }
};

// Tanh GELU: y = x (1 + tanh u) / 2, u = √(2/π) (x + κx³). As (1 + tanh u)/2 = σ(2u):
//   y = x s,  s = σ(2u);   f' = s + x (1 - t²) u' / 2 = s + 2x s(1 - s) u',  u' = √(2/π)(1 + 3κx²).
// With e = e^{-2|u|} ≤ 1 and r = 1/(1 + e): s = r (u ≥ 0) or e r (u < 0), and s(1 - s) = e r², so
// nothing overflows and the lower tail (x ≲ -5) does not cancel to 0 as 1 + tanh u would.
struct GeluTanh {
  static constexpr bool kSavesOutput = false;
  static constexpr double kSqrt2OverPi = 0.79788456080286535588;
  static constexpr double kKappa = 0.044715;
  template <class T> TVJP_HD T u_of(T x) const { return T(kSqrt2OverPi) * (x + T(kKappa) * x * x * x); }
  template <class T> TVJP_HD T forward(T x) const {
    T u = u_of(x);
    T e = exp_nonpositive_(T(-2) * abs_(u));
    T r = T(1) / (T(1) + e);
    return x * select(greater(u, T(0)), r, e * r);
  }
  template <class T> TVJP_HD void value_and_slope(T x, T& f, T& df) const {
    T u = u_of(x);
    T e = exp_nonpositive_(T(-2) * abs_(u));
    T r = T(1) / (T(1) + e);
    T s = select(greater(u, T(0)), r, e * r);
    T du = T(kSqrt2OverPi) * (T(1) + T(3 * kKappa) * x * x);
    f = x * s;
    df = s + T(2) * x * e * r * r * du;
  }
  template <class T> TVJP_HD T backward(T dy, T x) const {
    T f, df;
    value_and_slope(x, f, df);
    return dy * df;
  }
};

// y = x σ(x);  f' = σ(x) (1 + x (1 - σ(x))).
struct Silu {
  static constexpr bool kSavesOutput = false;
  template <class T> TVJP_HD T forward(T x) const { return x / (T(1) + exp_(T(0) - x)); }
  template <class T> TVJP_HD void value_and_slope(T x, T& f, T& df) const {
    T s = T(1) / (T(1) + exp_(T(0) - x));
    f = x * s;
    df = s * (T(1) + x * (T(1) - s));
  }
  template <class T> TVJP_HD T backward(T dy, T x) const {
    T f, df;
    value_and_slope(x, f, df);
    return dy * df;
  }
};

// y = x t, t = tanh(softplus x);  f' = t + x σ(x) (1 - t²).
// One exponential, e = e^{-|x|} ≤ 1: with eˣ = 1/e (x ≥ 0) or e (x < 0), t = eˣ(eˣ + 2) / (eˣ(eˣ + 2) + 2) is
//   x ≥ 0: (1 + 2e) / (1 + 2e + 2e²)      x < 0: (e² + 2e) / (e² + 2e + 2),
// i.e. t = p / (p + q) with q = 2e² or 2; then 1 - t² = (q / (p + q)) ((2p + q) / (p + q)), and
// σ(x) = 1/(1 + e) or e/(1 + e). Nothing overflows and nothing cancels.
struct Mish {
  static constexpr bool kSavesOutput = false;
  // e = e^{-|x|}, and t = p / (p + q).
  template <class T> TVJP_HD static void tanh_softplus(T x, T& e, T& p, T& q) {
    e = exp_nonpositive_(T(0) - abs_(x));
    auto nonneg = greater(x, T(0));
    p = select(nonneg, T(1) + T(2) * e, e * e + T(2) * e);
    q = select(nonneg, T(2) * e * e, T(2));
  }
  template <class T> TVJP_HD T forward(T x) const {
    T e, p, q;
    tanh_softplus(x, e, p, q);
    return x * p / (p + q);
  }
  template <class T> TVJP_HD T backward(T dy, T x) const {
    T e, p, q;
    tanh_softplus(x, e, p, q);
    T inv = T(1) / (p + q);
    T one_minus_t2 = q * inv * ((T(2) * p + q) * inv);
    T sigmoid = select(greater(x, T(0)), T(1), e) / (T(1) + e);
    return dy * (p * inv + x * sigmoid * one_minus_t2);
  }
};

}  // namespace torch_vjp::math
