// Normalization family, CUDA: the launchers the registration (norm.cu) calls. Defined in
// cuda/norm_epilogues.cuh and instantiated once per dtype in norm_<dtype>.cu, so that the four dtypes
// compile in parallel. Element tensors are contiguous (any alignment); weight, bias, the statistics and the
// parameter gradients are n-vectors or per-row values in at::opmath_type<T>.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "ops/softmax.h"  // RowLayout

namespace torch_vjp::cuda {

// layer_norm (kCentered: mean and bias too) and rms_norm over rows of n: y, and per row (mean,) rstd.
// round_xhat: casting_mode="llama", x̂ rounded to T before the weight multiplies it.
// residual and sum (add_layer_norm, add_rms_norm; both or neither): the norm is of s = x + residual rounded to
// T, written to sum in the same pass as y (one read of x and of residual).
template <bool kCentered, class T>
void norm_forward_cuda(int64_t rows, int64_t n, const T* x, const at::opmath_type<T>* weight,
                       const at::opmath_type<T>* bias, double eps, T* y, at::opmath_type<T>* mean,
                       at::opmath_type<T>* rstd, bool round_xhat = false, const T* residual = nullptr,
                       T* sum = nullptr);

// The VJP: any of dx, dweight, dbias (nullptr: not wanted); dweight and dbias are written, not accumulated.
// grad_sum (add_*_norm; nullptr: none): added to dx in the pass that writes it.
template <bool kCentered, class T>
void norm_backward_cuda(int64_t rows, int64_t n, const T* dy, const T* x, const at::opmath_type<T>* mean,
                        const at::opmath_type<T>* rstd, const at::opmath_type<T>* weight, T* dx,
                        at::opmath_type<T>* dweight, at::opmath_type<T>* dbias, const T* grad_sum = nullptr);

// normalize (p = 2) along the layout's dim: y, and per row the norm.
template <class T>
void normalize_forward_cuda(const RowLayout& l, const T* x, double eps, T* y, at::opmath_type<T>* norm);

template <class T>
void normalize_backward_cuda(const RowLayout& l, const T* dy, const T* y, const at::opmath_type<T>* norm, double eps,
                             T* dx);

}  // namespace torch_vjp::cuda
