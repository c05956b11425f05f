// Gated family, CPU backend: one vectorised pass per direction; the math is math/gated.h.
#include <ATen/Dispatch.h>

#include <array>

#include "cpu/loops.h"
#include "ops/gated.h"

namespace torch_vjp {
namespace {

struct CpuGated {
  template <class Op>
  static void gated_forward(Op op, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& output) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "torch_vjp_gated_cpu", [&] {
      cpu::map_elementwise(output.mutable_data_ptr<scalar_t>(), gate.numel(),
                           [op](auto a, auto b) { return op.forward(a, b); }, gate.const_data_ptr<scalar_t>(),
                           up.const_data_ptr<scalar_t>());
    });
  }

  // da = dy ⊙ b ⊙ f'(a), db = dy ⊙ f(a): reads dy, a, b once, writes da and db once (math/gated.h).
  template <class Op>
  static void gated_backward(Op op, const at::Tensor& grad_output, const at::Tensor& gate, const at::Tensor& up,
                             const at::Tensor& grad_gate, const at::Tensor& grad_up) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "torch_vjp_gated_backward_cpu", [&] {
      cpu::map_elementwise(
          std::array{grad_gate.mutable_data_ptr<scalar_t>(), grad_up.mutable_data_ptr<scalar_t>()}, gate.numel(),
          [op](auto dy, auto a, auto b) {
            decltype(a) da, db;
            op.backward(dy, a, b, da, db);
            return std::array{da, db};
          },
          grad_output.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>());
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_vjp, CPU, m) { register_gated<CpuGated>(m); }

}  // namespace torch_vjp
