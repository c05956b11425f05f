// Exact GELU for the CUDA kernels of the half types: y = x Φ(x), f' = Φ(x) + x φ(x) (math/elementwise.h's
// Gelu, whose derivation this shares) from one exp2 and one reciprocal of the hardware's approximate kind
// (MUFU.EX2, MUFU.RCP) instead of erfcf, expf and an IEEE division.
//
// Φ as math/vec_float.h's normal_cdf_and_density (the CPU kernels'): with a = |x|/√2 and t = 1/(1 + a/2),
// erfc(a) = t q(t) e^{-a²}, q(t) = erfcx(a)/t a degree-10 polynomial in s = 2t - 1 (relative error within
// 1e-7), and e^{-a²} = e^{-x²/2} = √(2π) φ(x). So with k = t q / 2 and c = 1/√(2π):
//   x < 0:  Φ = e k,      f' = e (k + c x)
//   x ≥ 0:  Φ = 1 - e k,  f' = 1 + e (c x - k)
// For x < 0, f' has e as a factor (its relative error stays relative where k + c x cancels, near the minimum
// of GELU at x ≈ -0.75), and Φ keeps its relative accuracy in the lower tail (no 1 - Φ).
// What the hardware gives (PTX: ex2.approx.ftz about 2^-22 relative, flushing results below 2^-126;
// rcp.approx.ftz within 1 ulp):
//   t = rcp(1 + |x|·(1/(2√2)))
//   e = exp2(x² · (-log2(e)/2) + 24) · 2^-24: x² is exact for bf16 and fp16 inputs (at most 22 significant
//       bits); the offset keeps e^{-x²/2} down to 2^-150 above the flush (|x| up to 14.4, where bf16 still has
//       denormal results), at the price of the argument's rounding (24·2^-24 absolute, 1e-6 of e)
// ±inf: t = 0 and e = 0, so Φ(+inf) = 1, Φ(-inf) = 0, as the CUDA float kernel's; NaN stays NaN.
// Checked for every finite bf16 and fp16 input against float64, with exp2 and rcp off by the hardware's bound
// in each direction: benchmarks/gelu_accuracy.py, asserted by tests/test_cuda_static.py.
//
// Approx: static exp2(float) and rcp(float).
#pragma once

#include <cmath>

#include "math/hd.h"  // (no ATen: this header is also compiled alone for the host, benchmarks/gelu_host.cpp)

namespace torch_vjp::math {

template <class Approx>
struct GeluFast {
  static constexpr bool kSavesOutput = false;
  static constexpr float kInvSqrt2Pi = 0.3989422804014327f;

  // e = e^{-x²/2}, and k = t q(t) / 2 (Φ = e k for x < 0).
  TVJP_HD static void parts(float x, float& e, float& k) {
    const float d = ::fmaf(::fabsf(x), 0.35355339059327376f, 1.0f);
    const float r = Approx::rcp(d);
    const float t = ::fmaf(r, ::fmaf(-d, r, 1.0f), r);  // one Newton step: within an ulp of 1/d
    const float s = ::fmaf(t, 2.0f, -1.0f);
    float q = ::fmaf(s, 4.136396819376387e-05f, -3.729109448613599e-05f);
    q = ::fmaf(q, s, -0.000297719263471663f);
    q = ::fmaf(q, s, 0.00043208716670051217f);
    q = ::fmaf(q, s, 0.001528020016849041f);
    q = ::fmaf(q, s, -0.003244400955736637f);
    q = ::fmaf(q, s, -0.010751345194876194f);
    q = ::fmaf(q, s, 0.01822189800441265f);
    q = ::fmaf(q, s, 0.13973571360111237f);
    q = ::fmaf(q, s, 0.34358030557632446f);
    q = ::fmaf(q, s, 0.5107913613319397f);
    e = Approx::exp2(::fmaf(x * x, -0.72134752044448170f, 24.0f)) * 5.9604644775390625e-08f;  // · 2^-24
    k = 0.5f * t * q;
  }

  TVJP_HD static float cdf(float x, float e, float k) { return x < 0.0f ? e * k : 1.0f - e * k; }

  template <class T> TVJP_HD T forward(T x) const {
    float e, k;
    parts(x, e, k);
    return x * cdf(x, e, k);
  }
  template <class T> TVJP_HD void value_and_slope(T x, T& f, T& df) const {
    float e, k;
    parts(x, e, k);
    f = x * cdf(x, e, k);
    df = x < 0.0f ? e * ::fmaf(kInvSqrt2Pi, x, k) : ::fmaf(e, ::fmaf(kInvSqrt2Pi, x, -k), 1.0f);
  }
  template <class T> TVJP_HD T backward(T dy, T x) const {
    T f, df;
    value_and_slope(x, f, df);
    return dy * df;
  }
};

}  // namespace torch_vjp::math
