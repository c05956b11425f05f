// Elementary functions for the CUDA kernels without the IEEE slow paths: CUDA's IEEE float division and
// square root branch to an out-of-line subroutine for special operands (a CALL in SASS), whose calling
// convention makes ptxas spill live registers around it, and the row kernels hold whole rows in registers.
// Double keeps the IEEE functions (its MUFU seeds need the Newton steps and fix-ups anyway).
#pragma once

#include <ATen/OpMathType.h>

#include <type_traits>

#include "math/softmax.h"

namespace torch_vjp::cuda {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// e^(x - c) for a fixed c, as 2^(x·log2e - c·log2e): c·log2e is folded once per row, so an element costs
// one FFMA and one MUFU.EX2 (ex2.approx: about 2 ulp of float; results below 2^-126 flush to 0). For the
// half types only, whose outputs round to 8 or 11 bits: that rounding is far larger than this error.
// Special values as exp_(x - c): x = -inf gives 0; x = c = ±inf gives NaN.
struct FastExpMinus {
  float neg_c_log2e;
  __device__ __forceinline__ explicit FastExpMinus(float c) : neg_c_log2e(-c * kLog2e) {}
  __device__ __forceinline__ float operator()(float x) const { return ex2_approx(fmaf(x, kLog2e, neg_c_log2e)); }
};

// 1 / s: MUFU.RCP and one Newton step, within an ulp, for |s| in [2^-126, 2^126] (a row's Σ exp in [1, n],
// an element count, a norm clamped below by eps). 0, inf and NaN give NaN (rows whose outputs are NaN anyway).
__device__ __forceinline__ float reciprocal(float s) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(s));
  return fmaf(r, fmaf(-s, r, 1.0f), r);
}
__device__ __forceinline__ double reciprocal(double s) { return 1.0 / s; }

// 1 / s where s may be ±inf or 0 (a norm that overflowed or is 0): as reciprocal() for normal |s|, and the IEEE
// results 1/±inf = ±0, 1/±0 = ±inf where the Newton step would make NaN (rcp.approx gives 0 or inf there,
// and fma(-s, r, 1) is then inf·0). NaN gives NaN; denormal s (flushed by rcp.approx.ftz) gives ±inf. The
// test is once a row.
__device__ __forceinline__ float reciprocal_ieee(float s) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(s));
  return (r == 0.0f || fabsf(r) == INFINITY) ? r : fmaf(r, fmaf(-s, r, 1.0f), r);
}
__device__ __forceinline__ double reciprocal_ieee(double s) { return 1.0 / s; }

template <class T>
using ExpMinusFor = std::conditional_t<sizeof(T) == 2, FastExpMinus, math::ExpMinus<at::opmath_type<T>>>;

// 1 / √x: MUFU.RSQ alone (rsqrtf, within 2 ulp). For a norm's rstd = 1 / √(σ² + eps), x >= eps > 0.
__device__ __forceinline__ float rsqrt_fast(float x) { return rsqrtf(x); }
__device__ __forceinline__ double rsqrt_fast(double x) { return rsqrt(x); }

// √x: MUFU.SQRT (sqrt.approx, within about an ulp; denormal x flush to 0). For a row's 2-norm √Σx²; 0, +inf
// and NaN map to themselves.
__device__ __forceinline__ float sqrt_fast(float x) {
  float y;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ double sqrt_fast(double x) { return sqrt(x); }

}  // namespace torch_vjp::cuda
