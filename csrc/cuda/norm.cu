// Normalization family, CUDA backend: the registration. The kernels are the row engine's
// (cuda/row_engine.cuh) with the epilogues of cuda/norm_epilogues.cuh, compiled per dtype in norm_<dtype>.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda/norm_launch.h"
#include "ops/norm.h"

namespace torch_vjp::cuda {
namespace {

template <class S>
S* optional_ptr(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<S>() : nullptr;
}

struct CudaNorm {
  // add_*: one kernel reads input and residual once, forms s = input + residual rounded to the input dtype (as
  // torch's add: the statistics are those of the s it writes) and writes s and y (the row engine's added input,
  // cuda/norm_epilogues.cuh's AddNormForward).
  template <bool kCentered>
  static void norm_forward(const NormRows& r, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                           double eps, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd,
                           const NormOptions& options) {
    const bool add = options.sum.defined();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "torch_vjp_norm_cuda", [&] {
      using S = at::opmath_type<scalar_t>;
      norm_forward_cuda<kCentered, scalar_t>(
          r.rows, r.n, input.const_data_ptr<scalar_t>(), weight.const_data_ptr<S>(),
          kCentered ? bias.const_data_ptr<S>() : nullptr, eps, y.mutable_data_ptr<scalar_t>(),
          kCentered ? mean.mutable_data_ptr<S>() : nullptr, rstd.mutable_data_ptr<S>(), options.round_xhat,
          add ? options.residual.const_data_ptr<scalar_t>() : nullptr, add ? options.sum.mutable_data_ptr<scalar_t>() : nullptr);
    });
  }

  template <bool kCentered>
  static void norm_backward(const NormRows& r, const at::Tensor& grad_output, const at::Tensor& x,
                            const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                            const at::Tensor& grad_input, const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                            const at::Tensor& grad_sum) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_vjp_norm_backward_cuda", [&] {
      using S = at::opmath_type<scalar_t>;
      norm_backward_cuda<kCentered, scalar_t>(
          r.rows, r.n, grad_output.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
          kCentered ? mean.const_data_ptr<S>() : nullptr, rstd.const_data_ptr<S>(), weight.const_data_ptr<S>(),
          optional_ptr<scalar_t>(grad_input), optional_ptr<S>(grad_weight), optional_ptr<S>(grad_bias),
          // add_*: d_input = d_residual = grad_sum + the norm's dx (math::add_norm_vjp), added in the dx pass
          grad_sum.defined() ? grad_sum.const_data_ptr<scalar_t>() : nullptr);
    });
  }

  static void normalize_forward(const RowLayout& l, const at::Tensor& x, double eps, const at::Tensor& y,
                                const at::Tensor& norm) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_vjp_normalize_cuda", [&] {
      normalize_forward_cuda<scalar_t>(l, x.const_data_ptr<scalar_t>(), eps, y.mutable_data_ptr<scalar_t>(),
                                       norm.mutable_data_ptr<at::opmath_type<scalar_t>>());
    });
  }

  static void normalize_backward(const RowLayout& l, const at::Tensor& grad_output, const at::Tensor& y,
                                 const at::Tensor& norm, double eps, const at::Tensor& grad_input) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "torch_vjp_normalize_backward_cuda", [&] {
      normalize_backward_cuda<scalar_t>(l, grad_output.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                        norm.const_data_ptr<at::opmath_type<scalar_t>>(), eps,
                                        grad_input.mutable_data_ptr<scalar_t>());
    });
  }
};

}  // namespace
}  // namespace torch_vjp::cuda

TORCH_LIBRARY_IMPL(torch_vjp, CUDA, m) { torch_vjp::register_norm<torch_vjp::cuda::CudaNorm>(m); }
