// Argument checks shared by every op, so that bad input raises a Python exception with the op's name
// (TORCH_CHECK → RuntimeError, TORCH_CHECK_VALUE → ValueError, TORCH_CHECK_INDEX → IndexError)
// and never reaches a kernel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/WrapDimUtils.h>

namespace torch_vjp {

inline void check_floating(const at::Tensor& t, const char* op, const char* arg) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "torch_vjp.", op, ": expected ", arg, " to be float32, float64, float16 or bfloat16, got ",
                   dtype);
}

// Tensors a kernel reads together must share device and dtype.
inline void check_like(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                       const char* op) {
  TORCH_CHECK(a.device() == b.device(), "torch_vjp.", op, ": expected ", a_name, " and ", b_name,
              " on the same device, got ", a.device(), " and ", b.device());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "torch_vjp.", op, ": expected ", a_name, " and ", b_name,
                   " to have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

// ... and a gradient must have exactly the shape of the tensor it is paired with.
inline void check_same(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                       const char* op) {
  check_like(a, a_name, b, b_name, op);
  TORCH_CHECK(a.sizes() == b.sizes(), "torch_vjp.", op, ": expected ", a_name, " of shape ", b.sizes(),
              " (the shape of ", b_name, "), got ", a.sizes());
}

}  // namespace torch_vjp
