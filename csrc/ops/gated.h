// Gated family (swiglu, geglu): op schemas' implementations for one backend (math in math/gated.h).
//
// A backend supplies, over contiguous tensors of one numel (> 0), templated on a math::Gated functor:
//   Backend::gated_forward(op, gate, up, output)                          output = f(gate) ⊙ up
//   Backend::gated_backward(op, grad_output, gate, up, grad_gate, grad_up) the VJP, one pass
// and calls register_gated<Backend>(m) in its TORCH_LIBRARY_IMPL. Checks, layout, allocation and the device
// guard are here, once. gate and up must have one shape (no broadcasting: a mismatch is an error).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <tuple>

#include "common/checks.h"
#include "math/gated.h"
#include "ops/elementwise.h"  // gelu_is_tanh

namespace torch_vjp {

template <class Backend, class Op>
at::Tensor gated_forward(const at::Tensor& gate, const at::Tensor& up, Op op, const char* name) {
  check_floating(gate, name, "gate");
  check_same(up, "up", gate, "gate", name);
  const c10::OptionalDeviceGuard guard(gate.device());
  auto a = gate.contiguous();
  auto b = up.contiguous();
  auto y = at::empty_like(a, at::MemoryFormat::Contiguous);
  if (a.numel() > 0) Backend::gated_forward(op, a, b, y);
  return y;
}

template <class Backend, class Op>
std::tuple<at::Tensor, at::Tensor> gated_backward(const at::Tensor& grad_output, const at::Tensor& gate,
                                                  const at::Tensor& up, Op op, const char* name) {
  check_floating(gate, name, "gate");
  check_same(up, "up", gate, "gate", name);
  check_same(grad_output, "grad_output", gate, "gate", name);
  const c10::OptionalDeviceGuard guard(gate.device());
  auto a = gate.contiguous();
  auto da = at::empty_like(a, at::MemoryFormat::Contiguous);
  auto db = at::empty_like(a, at::MemoryFormat::Contiguous);
  if (a.numel() > 0) Backend::gated_backward(op, grad_output.contiguous(), a, up.contiguous(), da, db);
  return {da, db};
}

template <class Backend>
void register_gated(torch::Library& m) {
  using at::Tensor;
  using math::Gated;
  m.impl("swiglu", [](const Tensor& a, const Tensor& b) { return gated_forward<Backend>(a, b, Gated<math::Silu>{}, "swiglu"); });
  m.impl("swiglu_backward", [](const Tensor& dy, const Tensor& a, const Tensor& b) {
    return gated_backward<Backend>(dy, a, b, Gated<math::Silu>{}, "swiglu_backward");
  });
  m.impl("geglu", [](const Tensor& a, const Tensor& b, c10::string_view approximate) {
    return gelu_is_tanh(approximate, "geglu") ? gated_forward<Backend>(a, b, Gated<math::GeluTanh>{}, "geglu")
                                              : gated_forward<Backend>(a, b, Gated<math::Gelu>{}, "geglu");
  });
  m.impl("geglu_backward", [](const Tensor& dy, const Tensor& a, const Tensor& b, c10::string_view approximate) {
    return gelu_is_tanh(approximate, "geglu_backward")
               ? gated_backward<Backend>(dy, a, b, Gated<math::GeluTanh>{}, "geglu_backward")
               : gated_backward<Backend>(dy, a, b, Gated<math::Gelu>{}, "geglu_backward");
  });
}

}  // namespace torch_vjp
