// Softmax family, CUDA backend: the registration. The kernels are the row engine's (cuda/row_engine.cuh)
// with the epilogues of cuda/softmax_epilogues.cuh, compiled per dtype in softmax_<dtype>.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda/softmax_launch.h"
#include "ops/softmax.h"

namespace torch_vjp::cuda {
namespace {

using math::SoftmaxKind;

struct CudaSoftmax {
  template <SoftmaxKind K>
  static void forward(const RowLayout& l, const at::Tensor& input, const at::Tensor& output) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "torch_vjp_softmax_cuda", [&] {
      softmax_forward_cuda<K, scalar_t>(l, input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>());
    });
  }

  template <SoftmaxKind K>
  static void backward(const RowLayout& l, const at::Tensor& grad_output, const at::Tensor& output,
                       const at::Tensor& input, const at::Tensor& grad_input) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, grad_input.scalar_type(), "torch_vjp_softmax_backward_cuda", [&] {
          const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
          const scalar_t* y = output.const_data_ptr<scalar_t>();
          scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
          if constexpr (K == SoftmaxKind::LogSumExp)
            logsumexp_backward_cuda<scalar_t>(l, dy, y, input.const_data_ptr<scalar_t>(), dx);
          else
            softmax_backward_cuda<K, scalar_t>(l, dy, y, dx);
        });
  }
};

}  // namespace
}  // namespace torch_vjp::cuda

TORCH_LIBRARY_IMPL(torch_vjp, CUDA, m) { torch_vjp::register_softmax<torch_vjp::cuda::CudaSoftmax>(m); }
