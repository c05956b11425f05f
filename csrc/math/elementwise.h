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

// y = log(1 + e^{βx}) / β, or x where βx > threshold (torch's linear region);
// f' = e^{βx} / (e^{βx} + 1) = σ(βx), or 1 in the linear region.
struct Softplus {
  static constexpr bool kSavesOutput = false;
  double beta, threshold;
  template <class T> TVJP_HD T forward(T x) const {
    T bx = x * T(beta);
    return select(greater(bx, T(threshold)), x, log1p_(exp_(bx)) / T(beta));
  }
  template <class T> TVJP_HD T backward(T dy, T x) const {
    T bx = x * T(beta);
    T z = exp_(bx);
    return select(greater(bx, T(threshold)), dy, dy * z / (z + T(1)));
  }
};

// Exact GELU: y = x Φ(x), Φ(x) = (1 + erf(x/√2)) / 2;  f' = Φ(x) + x φ(x), φ(x) = e^{-x²/2} / √(2π).
struct Gelu {
  static constexpr bool kSavesOutput = false;
  static constexpr double kSqrtHalf = 0.70710678118654752440;
  static constexpr double kInvSqrt2Pi = 0.39894228040143267794;
  template <class T> TVJP_HD T forward(T x) const { return x * T(0.5) * (T(1) + erf_(x * T(kSqrtHalf))); }
  template <class T> TVJP_HD T backward(T dy, T x) const {
    T cdf = T(0.5) * (T(1) + erf_(x * T(kSqrtHalf)));
    T pdf = exp_(T(-0.5) * x * x) * T(kInvSqrt2Pi);
    return dy * (cdf + x * pdf);
  }
};

// Tanh GELU: y = x (1 + t) / 2, t = tanh(u), u = √(2/π) (x + κx³);
// f' = (1 + t)/2 + (x/2)(1 - t²) u',  u' = √(2/π)(1 + 3κx²).
struct GeluTanh {
  static constexpr bool kSavesOutput = false;
  static constexpr double kSqrt2OverPi = 0.79788456080286535588;
  static constexpr double kKappa = 0.044715;
  template <class T> TVJP_HD T forward(T x) const {
    T u = T(kSqrt2OverPi) * (x + T(kKappa) * x * x * x);
    return T(0.5) * x * (T(1) + tanh_(u));
  }
  template <class T> TVJP_HD T backward(T dy, T x) const {
    T x2 = x * x;
    T t = tanh_(T(kSqrt2OverPi) * (x + T(kKappa) * x2 * x));
    T du = T(kSqrt2OverPi) * (T(1) + T(3 * kKappa) * x2);
    return dy * (T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * du);
  }
};

// y = x σ(x);  f' = σ(x) (1 + x (1 - σ(x))).
struct Silu {
  static constexpr bool kSavesOutput = false;
  template <class T> TVJP_HD T forward(T x) const { return x / (T(1) + exp_(T(0) - x)); }
  template <class T> TVJP_HD T backward(T dy, T x) const {
    T s = T(1) / (T(1) + exp_(T(0) - x));
    return dy * s * (T(1) + x * (T(1) - s));
  }
};

// y = x tanh(softplus(x)), softplus(x) = log(1 + eˣ);  f' = t + x σ(x) (1 - t²), t = tanh(softplus(x)).
struct Mish {
  static constexpr bool kSavesOutput = false;
  template <class T> TVJP_HD T forward(T x) const { return x * tanh_(log1p_(exp_(x))); }
  template <class T> TVJP_HD T backward(T dy, T x) const {
    T s = T(1) / (T(1) + exp_(T(0) - x));
    T t = tanh_(log1p_(exp_(x)));
    return dy * (t + x * s * (T(1) - t * t));
  }
};

}  // namespace torch_vjp::math
