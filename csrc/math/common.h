// Scalar building blocks shared by the CPU and CUDA kernels.
//
// Every derivative formula in csrc/math/ is written once, as a template on the compute type T, and
// evaluated with T = float or double (CUDA threads) and, on the CPU, with
// T = at::vec::Vectorized<float|double> (the vectorised CPU loops; partial vectors cover row tails). The
// helpers below give both kinds of T the same spelling: exp_, log_, log1p_, tanh_, erf_, and
//   exp_nonpositive_(x)  eˣ for x ≤ 0 (or +inf): x - max in the softmax family, -|x| and -x²/2 in the
//                    activations. Cheaper on the CPU, where results below FLT_MIN (x < -87.34) are 0, not
//                    denormals: they add nothing to a row sum of at least 1, and an output under 1.2e-38
//                    (a softmax of such a term, an activation's far tail) is 0 there;
//   log1p_unit_(u)   log(1 + u) for u in [0, 1] only (a cheaper reduction on the CPU),
//   normal_cdf_(x)   Φ(x) = erfc(-x/√2)/2, accurate relative to itself in both tails,
//   normal_cdf_and_density_(x, Φ, φ)   Φ(x) and φ(x) = e^{-x²/2}/√(2π) (float vectors: from one exp),
//   abs_, positive_part (max(x, 0)), greater, select.
// Float vectors use csrc/math/vec_float.h (inline, torch's edge behaviour); double vectors use at::vec's
// SLEEF functions.
#pragma once

#include <cmath>

#include "math/hd.h"

#if !defined(__CUDACC__)
#include <ATen/cpu/vec/vec.h>

#include "math/vec_float.h"
#endif

namespace torch_vjp::math {

inline constexpr double kSqrtHalf = 0.70710678118654752440;

TVJP_HD float exp_(float x) { return ::expf(x); }
TVJP_HD double exp_(double x) { return ::exp(x); }
TVJP_HD float exp_nonpositive_(float x) { return ::expf(x); }
TVJP_HD double exp_nonpositive_(double x) { return ::exp(x); }
TVJP_HD float log_(float x) { return ::logf(x); }
TVJP_HD double log_(double x) { return ::log(x); }
TVJP_HD float log1p_(float x) { return ::log1pf(x); }
TVJP_HD double log1p_(double x) { return ::log1p(x); }
TVJP_HD float log1p_unit_(float u) { return ::log1pf(u); }
TVJP_HD double log1p_unit_(double u) { return ::log1p(u); }
TVJP_HD float tanh_(float x) { return ::tanhf(x); }
TVJP_HD double tanh_(double x) { return ::tanh(x); }
TVJP_HD float erf_(float x) { return ::erff(x); }
TVJP_HD double erf_(double x) { return ::erf(x); }
TVJP_HD float normal_cdf_(float x) { return 0.5f * ::erfcf(-x * float(kSqrtHalf)); }
TVJP_HD double normal_cdf_(double x) { return 0.5 * ::erfc(-x * kSqrtHalf); }
TVJP_HD float sqrt_(float x) { return ::sqrtf(x); }
TVJP_HD double sqrt_(double x) { return ::sqrt(x); }
TVJP_HD float abs_(float x) { return ::fabsf(x); }
TVJP_HD double abs_(double x) { return ::fabs(x); }
template <class T>
TVJP_HD T positive_part(T x) { return x > T(0) ? x : T(0); }
TVJP_HD bool greater(float a, float b) { return a > b; }
TVJP_HD bool greater(double a, double b) { return a > b; }
template <class T>
TVJP_HD T select(bool mask, T if_true, T if_false) { return mask ? if_true : if_false; }

#if !defined(__CUDACC__)
template <class S>
using Vec = at::vec::Vectorized<S>;
// The non-template float overloads below win over these templates for Vec<float>.
template <class S>
TVJP_HD Vec<S> exp_(const Vec<S>& x) { return x.exp(); }
TVJP_HD Vec<float> exp_(const Vec<float>& x) { return vecf::exp(x); }
template <class S>
TVJP_HD Vec<S> exp_nonpositive_(const Vec<S>& x) { return x.exp(); }
TVJP_HD Vec<float> exp_nonpositive_(const Vec<float>& x) { return vecf::exp_nonpositive(x); }
template <class S>
TVJP_HD Vec<S> log_(const Vec<S>& x) { return x.log(); }
template <class S>
TVJP_HD Vec<S> log1p_(const Vec<S>& x) { return x.log1p(); }
template <class S>
TVJP_HD Vec<S> log1p_unit_(const Vec<S>& u) { return u.log1p(); }
TVJP_HD Vec<float> log1p_unit_(const Vec<float>& u) { return vecf::log1p_unit(u); }
TVJP_HD Vec<float> tanh_(const Vec<float>& x) { return vecf::tanh(x); }
// Double: SLEEF's tanh near 0, and 1 - 2e/(1 + e), e = e^{-2|x|}, from |x| = 0.55 on, because SLEEF's
// reaches ±1 at |x| = 18.715 where the correctly rounded result is 1 - 1 ulp until 19.062.
TVJP_HD Vec<double> tanh_(const Vec<double>& x) {
  const Vec<double> a = x.abs();
  const Vec<double> e = (Vec<double>(-2.0) * a).exp();
  const Vec<double> large = (Vec<double>(1.0) - (e + e) / (Vec<double>(1.0) + e)) | (x & Vec<double>(-0.0));
  return Vec<double>::blendv(large, x.tanh(), a < Vec<double>(0.55));
}
template <class S>
TVJP_HD Vec<S> erf_(const Vec<S>& x) { return x.erf(); }
TVJP_HD Vec<float> normal_cdf_(const Vec<float>& x) { return vecf::normal_cdf(x); }
TVJP_HD void normal_cdf_and_density_(const Vec<float>& x, Vec<float>& cdf, Vec<float>& density) {
  vecf::normal_cdf_and_density(x, cdf, density);
}
TVJP_HD Vec<double> normal_cdf_(const Vec<double>& x) {
  return Vec<double>(0.5) * (x * Vec<double>(-kSqrtHalf)).erfc();
}
template <class S>
TVJP_HD Vec<S> abs_(const Vec<S>& x) { return x.abs(); }
template <class S>
TVJP_HD Vec<S> positive_part(const Vec<S>& x) { return at::vec::clamp_min(x, Vec<S>(S(0))); }
// A lane mask (all bits set where a > b), consumed by select.
template <class S>
TVJP_HD Vec<S> greater(const Vec<S>& a, const Vec<S>& b) { return a > b; }
template <class S>
TVJP_HD Vec<S> select(const Vec<S>& mask, const Vec<S>& if_true, const Vec<S>& if_false) {
  return Vec<S>::blendv(if_false, if_true, mask);
}
#endif

template <class T>
TVJP_HD void normal_cdf_and_density_(const T& x, T& cdf, T& density) {
  cdf = normal_cdf_(x);
  density = exp_nonpositive_(T(-0.5) * x * x) * T(0.39894228040143267794);
}

}  // namespace torch_vjp::math
