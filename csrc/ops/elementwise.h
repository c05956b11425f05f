// Elementwise family: op schemas' implementations for one backend.
//
// A backend supplies two kernels over contiguous tensors of equal numel (> 0), each templated on a
// functor of math/elementwise.h:
//   Backend::forward(op, input, output)                   output = op.forward(input)
//   Backend::backward(op, grad_output, saved, grad_input) grad_input = op.backward(grad_output, saved)
// and calls register_elementwise<Backend>(m) inside its TORCH_LIBRARY_IMPL. Everything else (checks,
// layout, allocation, device guard, argument parsing) is here, once.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <c10/util/string_view.h>

#include "common/checks.h"
#include "math/elementwise.h"

namespace torch_vjp {

template <class Backend, class Op>
at::Tensor unary_forward(const at::Tensor& input, Op op, const char* name) {
  check_floating(input, name, "input");
  const c10::OptionalDeviceGuard guard(input.device());
  auto x = input.contiguous();
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() > 0) Backend::forward(op, x, y);
  return y;
}

template <class Backend, class Op>
at::Tensor unary_backward(const at::Tensor& grad_output, const at::Tensor& saved, Op op, const char* name) {
  const char* saved_name = Op::kSavesOutput ? "output" : "input";
  check_floating(saved, name, saved_name);
  check_same(grad_output, "grad_output", saved, saved_name, name);
  const c10::OptionalDeviceGuard guard(saved.device());
  auto dy = grad_output.contiguous();
  auto s = saved.contiguous();
  auto dx = at::empty_like(s, at::MemoryFormat::Contiguous);
  if (s.numel() > 0) Backend::backward(op, dy, s, dx);
  return dx;
}

inline bool gelu_is_tanh(c10::string_view approximate, const char* name) {  // c10: the type of a schema `str`
  TORCH_CHECK_VALUE(approximate == "none" || approximate == "tanh", "torch_vjp.", name,
                    ": approximate must be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "tanh";
}

template <class Backend>
void register_elementwise(torch::Library& m) {
  using at::Tensor;
  using namespace math;
#define TVJP_PLAIN_UNARY(name, Op)                                                                        \
  m.impl(#name, [](const Tensor& x) { return unary_forward<Backend>(x, Op{}, #name); });                 \
  m.impl(#name "_backward",                                                                               \
         [](const Tensor& dy, const Tensor& s) { return unary_backward<Backend>(dy, s, Op{}, #name "_backward"); });
  TVJP_PLAIN_UNARY(exp, Exp)
  TVJP_PLAIN_UNARY(sigmoid, Sigmoid)
  TVJP_PLAIN_UNARY(tanh, Tanh)
  TVJP_PLAIN_UNARY(silu, Silu)
  TVJP_PLAIN_UNARY(mish, Mish)
#undef TVJP_PLAIN_UNARY
  m.impl("softplus", [](const Tensor& x, double beta, double threshold) {
    return unary_forward<Backend>(x, Softplus{beta, threshold}, "softplus");
  });
  m.impl("softplus_backward", [](const Tensor& dy, const Tensor& x, double beta, double threshold) {
    return unary_backward<Backend>(dy, x, Softplus{beta, threshold}, "softplus_backward");
  });
  m.impl("gelu", [](const Tensor& x, c10::string_view approximate) {
    return gelu_is_tanh(approximate, "gelu") ? unary_forward<Backend>(x, GeluTanh{}, "gelu")
                                             : unary_forward<Backend>(x, Gelu{}, "gelu");
  });
  m.impl("gelu_backward", [](const Tensor& dy, const Tensor& x, c10::string_view approximate) {
    return gelu_is_tanh(approximate, "gelu_backward") ? unary_backward<Backend>(dy, x, GeluTanh{}, "gelu_backward")
                                                      : unary_backward<Backend>(dy, x, Gelu{}, "gelu_backward");
  });
}

}  // namespace torch_vjp
