// Scalar building blocks shared by the CPU and CUDA kernels.
//
// Every derivative formula in csrc/math/ is written once, as a template on the compute type T, and
// evaluated with T = float or double (CUDA threads, CPU tails) and, on the CPU only, with
// T = at::vec::Vectorized<float|double> (the vectorised CPU loop). The helpers below give both kinds
// of T the same spelling: exp_, log1p_, tanh_, erf_, greater, select.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define TVJP_HD __host__ __device__ __forceinline__
#else
#define TVJP_HD inline
#include <ATen/cpu/vec/vec.h>
#endif

namespace torch_vjp::math {

TVJP_HD float exp_(float x) { return ::expf(x); }
TVJP_HD double exp_(double x) { return ::exp(x); }
TVJP_HD float log_(float x) { return ::logf(x); }
TVJP_HD double log_(double x) { return ::log(x); }
TVJP_HD float log1p_(float x) { return ::log1pf(x); }
TVJP_HD double log1p_(double x) { return ::log1p(x); }
TVJP_HD float tanh_(float x) { return ::tanhf(x); }
TVJP_HD double tanh_(double x) { return ::tanh(x); }
TVJP_HD float erf_(float x) { return ::erff(x); }
TVJP_HD double erf_(double x) { return ::erf(x); }
TVJP_HD bool greater(float a, float b) { return a > b; }
TVJP_HD bool greater(double a, double b) { return a > b; }
template <class T>
TVJP_HD T select(bool mask, T if_true, T if_false) { return mask ? if_true : if_false; }

#if !defined(__CUDACC__)
template <class S>
using Vec = at::vec::Vectorized<S>;
template <class S>
inline Vec<S> exp_(const Vec<S>& x) { return x.exp(); }
template <class S>
inline Vec<S> log_(const Vec<S>& x) { return x.log(); }
template <class S>
inline Vec<S> log1p_(const Vec<S>& x) { return x.log1p(); }
template <class S>
inline Vec<S> tanh_(const Vec<S>& x) { return x.tanh(); }
template <class S>
inline Vec<S> erf_(const Vec<S>& x) { return x.erf(); }
// A lane mask (all bits set where a > b), consumed by select.
template <class S>
inline Vec<S> greater(const Vec<S>& a, const Vec<S>& b) { return a > b; }
template <class S>
inline Vec<S> select(const Vec<S>& mask, const Vec<S>& if_true, const Vec<S>& if_false) {
  return Vec<S>::blendv(if_false, if_true, mask);
}
#endif

}  // namespace torch_vjp::math
