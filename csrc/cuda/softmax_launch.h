// Softmax family, CUDA: the launchers the registration (softmax.cu) calls. Defined in
// cuda/softmax_epilogues.cuh and instantiated once per dtype in softmax_<dtype>.cu, so that the four
// dtypes compile in parallel. Inputs and outputs are contiguous with layout l; any alignment.
#pragma once

#include "math/softmax.h"
#include "ops/softmax.h"

namespace torch_vjp::cuda {

// y: like x (softmax, log_softmax), or one value per row (logsumexp).
template <math::SoftmaxKind K, class T>
void softmax_forward_cuda(const RowLayout& l, const T* x, T* y);

// softmax and log_softmax: dx from dy and the saved output y.
template <math::SoftmaxKind K, class T>
void softmax_backward_cuda(const RowLayout& l, const T* dy, const T* y, T* dx);

// logsumexp: dx from dy and out (one value per row each) and the saved input x.
template <class T>
void logsumexp_backward_cuda(const RowLayout& l, const T* dy, const T* out, const T* x, T* dx);

}  // namespace torch_vjp::cuda
