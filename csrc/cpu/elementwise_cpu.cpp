// Elementwise family, CPU backend: one vectorised map per direction; the math is math/elementwise.h.
#include <ATen/Dispatch.h>

#include "cpu/loops.h"
#include "ops/elementwise.h"

namespace torch_vjp {
namespace {

struct CpuElementwise {
  template <class Op>
  static void forward(Op op, const at::Tensor& input, const at::Tensor& output) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "torch_vjp_unary_cpu", [&] {
      cpu::map_elementwise(output.mutable_data_ptr<scalar_t>(), input.numel(), [op](auto x) { return op.forward(x); },
                           input.const_data_ptr<scalar_t>());
    });
  }

  // dx = dy ⊙ f'(x), with f' written in terms of the saved tensor (x or y): see math/elementwise.h.
  template <class Op>
  static void backward(Op op, const at::Tensor& grad_output, const at::Tensor& saved, const at::Tensor& grad_input) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "torch_vjp_unary_backward_cpu", [&] {
      cpu::map_elementwise(grad_input.mutable_data_ptr<scalar_t>(), saved.numel(),
                           [op](auto dy, auto s) { return op.backward(dy, s); }, grad_output.const_data_ptr<scalar_t>(),
                           saved.const_data_ptr<scalar_t>());
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_vjp, CPU, m) { register_elementwise<CpuElementwise>(m); }

}  // namespace torch_vjp
