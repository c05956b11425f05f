// Float transcendentals on at::vec registers (CPU only), inline, for every CPU capability.
//
// Why not at::vec's own (SLEEF, 1 ulp)? They are out-of-line calls of 30-60 instructions a vector, and
// torch's kernels for these ops do not use them where it matters: exp and tanh go to MKL VML, GELU to
// oneDNN, which on Intel are several times faster than SLEEF. These take 15-35 instructions and keep
// torch's behaviour at the edges, checked element by element in tests/test_values.py:
//   - about 1-2 ulp (exp, sigmoid-type ratios) and a few ulp (tanh, log1p, normal_cdf) in float;
//   - overflow gives inf, underflow is gradual (denormals, then 0), NaN propagates (at::vec::clamp
//     keeps NaN in every capability: min(hi, max(lo, NaN)) is NaN);
//   - tanh reaches ±1 exactly where the correctly rounded result does (|x| ≥ 9.011), not before.
// Built only from at::vec operations, so the same code serves the default, AVX2 and AVX-512 builds.
#pragma once

#include <ATen/cpu/vec/vec.h>

// Inlined into the vector loops that call them (a call per vector costs more than the math).
#define TVJP_VEC_INLINE inline __attribute__((always_inline))

namespace torch_vjp::math::vecf {

using V = at::vec::Vectorized<float>;
using at::vec::fmadd;

// 2ⁿ for integral n in [-126, 127]: (n + 127) · 2²³ is exact in float; converted to int, it is the bit
// pattern of 2ⁿ.
TVJP_VEC_INLINE V exp2_integer(const V& n) {
  return at::vec::cast<float>(at::vec::convert_to_int_of_same_size(fmadd(n, V(8388608.f), V(127.f * 8388608.f))));
}

// The core of exp and exp_nonpositive, for a clamped x: eˣ = 2ⁿ eʳ, n = round(x log₂e), r = x - n ln2 in two
// parts (Cody-Waite, exact with FMA); returns p = eʳ = 1 + r + r² P(r) on |r| ≤ ln2/2, P minimax of degree 4
// (relative error 3e-9), and n.
TVJP_VEC_INLINE V exp_reduced(const V& xc, V& n) {
  n = (xc * V(1.44269504088896341f)).round();
  V r = fmadd(n, V(-0.693145751953125f), xc);  // ln2's high part has 16 bits: n · it is exact
  r = fmadd(n, V(-1.428606765330187e-06f), r);
  V p = fmadd(r, V(0.001381461f), V(0.00836871f));
  p = fmadd(p, r, V(0.04166839f));
  p = fmadd(p, r, V(0.16666521f));
  p = fmadd(p, r, V(0.49999994f));
  return fmadd(p, r * r, r) + V(1.f);
}

// eˣ, with 2ⁿ applied as two factors 2^⌊n/2⌋ 2^(n-⌊n/2⌋), so n may reach -150: results below FLT_MIN come out
// as denormals, as torch's do. x is clamped to [-104, 89] first: eˣ is 0 below, inf above (via 2⁶⁴·2⁶⁴).
TVJP_VEC_INLINE V exp(const V& x) {
  V n;
  const V p = exp_reduced(at::vec::clamp(x, V(-104.f), V(89.f)), n);
  const V half = (n * V(0.5f)).floor();
  return p * exp2_integer(half) * exp2_integer(n - half);
}

// eˣ for x ≤ 0 (and +inf → inf, NaN → NaN), as exp above with one scale factor: where eˣ < FLT_MIN
// (x < ln FLT_MIN = -87.3365) the result is 0, not a denormal (see exp_nonpositive_ in math/common.h).
TVJP_VEC_INLINE V exp_nonpositive(const V& x) {
  V n;  // clamped so that n ≥ -126 (one normal 2ⁿ); n = 128 → inf
  const V p = exp_reduced(at::vec::clamp(x, V(-87.3365478515625f), V(89.f)), n);
  return V::blendv(p * exp2_integer(n), V(0.f), x < V(-87.3365478515625f));
}

// tanh x, odd: for a = |x| < 0.55, a + a³ Q(a²) (Q minimax, degree 4, relative error 1e-9);
// above, 1 - 2e/(1 + e) with e = e^{-2a} ≤ 1/3: no cancellation, and 1 - q is rounded once, so the
// result reaches 1 only where the correctly rounded tanh does. The sign of x is copied back (tanh(-0) = -0).
TVJP_VEC_INLINE V tanh(const V& x) {
  const V sign_bit(-0.f);
  const V a = x.abs();
  const V a2 = a * a;
  V q = fmadd(a2, V(-0.0062742434f), V(0.021071682f));
  q = fmadd(q, a2, V(-0.053852312f));
  q = fmadd(q, a2, V(0.13332586f));
  q = fmadd(q, a2, V(-0.33333316f));
  const V small = fmadd(q, a2 * a, a);
  const V e = exp_nonpositive(V(-2.f) * a);
  const V large = V(1.f) - (e + e) / (V(1.f) + e);
  return V::blendv(large, small, a < V(0.55f)) | (x & sign_bit);
}

// log(1 + u) for u in [0, 1] (softplus's log1p(e^{-|z|})). w = 1 + u rounded, then
// log1p(u) = k ln2 + log m + (u - (w - 1)) / w, with w = 2ᵏ m, m in [√2/2, √2), k in {0, 1} (the last term
// restores what rounding w lost); log m = 2 atanh(s) = 2s + s³ R(s²), s = (m - 1)/(m + 1), |s| ≤ 0.1716,
// R minimax of degree 2 (relative error 8e-10).
TVJP_VEC_INLINE V log1p_unit(const V& u) {
  const V one(1.f);
  const V w = one + u;
  const V k = V::blendv(V(0.f), one, w > V(1.41421356f));
  const V m = w * V::blendv(one, V(0.5f), w > V(1.41421356f));
  const V s = (m - one) / (m + one);
  const V s2 = s * s;
  V r = fmadd(s2, V(0.29870933f), V(0.39977574f));
  r = fmadd(r, s2, V(0.66666776f));
  const V log_m = fmadd(r, s2 * s, s + s);
  return fmadd(k, V(0.693147180559945309f), log_m) + (u - (w - one)) / w;
}

// Φ(x) = erfc(-x/√2)/2, the standard normal CDF, and φ(x) = e^{-x²/2}/√(2π), its density, from one exp.
// With a = |x|/√2 and t = 1/(1 + a/2): erfc(a) = t q(t) e^{-a²}, where q(t) = erfcx(a)/t is smooth on
// [0, 1] (q(0) = 1/(2√π), the large-a limit); q is a degree-10 polynomial in s = 2t - 1, least-squares fit
// for relative error (within 1e-7 evaluated in float). e^{-a²} = e^{-x²/2} is √(2π) φ(x), so the two share
// the exp; x²/2 is split into its rounded value and the rounding error (FMA), so the exp argument is exact.
// Φ is accurate relative to itself in the lower tail too (where 1 + erf would cancel): Φ(x) = h for x < 0,
// 1 - h for x ≥ 0, h = erfc(a)/2. Both flush to 0 where e^{-x²/2} < FLT_MIN (|x| > 13.2).
TVJP_VEC_INLINE void normal_cdf_and_density(const V& x, V& cdf, V& density) {
  const V t = V(1.f) / fmadd(x.abs(), V(0.35355339059327376f), V(1.f));
  const V s = fmadd(t, V(2.f), V(-1.f));
  V q = fmadd(s, V(4.136396819376387e-05f), V(-3.729109448613599e-05f));
  q = fmadd(q, s, V(-0.000297719263471663f));
  q = fmadd(q, s, V(0.00043208716670051217f));
  q = fmadd(q, s, V(0.001528020016849041f));
  q = fmadd(q, s, V(-0.003244400955736637f));
  q = fmadd(q, s, V(-0.010751345194876194f));
  q = fmadd(q, s, V(0.01822189800441265f));
  q = fmadd(q, s, V(0.13973571360111237f));
  q = fmadd(q, s, V(0.34358030557632446f));
  q = fmadd(q, s, V(0.5107913613319397f));
  const V xc = at::vec::clamp(x, V(-14.f), V(14.f));  // e = 0 beyond; keeps fma(x, x, -x²) finite at ±inf
  const V square = xc * xc;
  const V square_error = fmadd(xc, xc, V(0.f) - square);  // xc² - square, exact
  const V e = exp_nonpositive(V(-0.5f) * square) * fmadd(square_error, V(-0.5f), V(1.f));
  const V h = V(0.5f) * t * q * e;
  cdf = V::blendv(V(1.f) - h, h, x < V(0.f));
  density = e * V(0.3989422804014327f);
}

TVJP_VEC_INLINE V normal_cdf(const V& x) {
  V cdf, density;
  normal_cdf_and_density(x, cdf, density);
  return cdf;
}

}  // namespace torch_vjp::math::vecf
