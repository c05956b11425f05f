// Softmax family: op schemas' implementations for one backend.
//
// The input is viewed as (outer, n, inner) around the reduced dim (RowLayout). A backend supplies,
// for each SoftmaxKind K, two kernels over contiguous tensors with outer·n·inner > 0:
//   Backend::forward<K>(layout, input, output)
//       output: like input (softmax, log_softmax) or outer·inner values (logsumexp)
//   Backend::backward<K>(layout, grad_output, output, input, grad_input)
//       grad_output, output: like input, or outer·inner values for logsumexp;
//       input: defined for logsumexp only (its VJP needs x); grad_input: like input
// and calls register_softmax<Backend>(m) in its TORCH_LIBRARY_IMPL. Checks, dim wrapping, layout,
// allocation and the device guard are here, once.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "common/checks.h"
#include "math/softmax.h"

namespace torch_vjp {

struct RowLayout {
  int64_t outer, n, inner;  // the row of (o, i) is x[o, 0:n, i]; elements of one row are `inner` apart
};

inline RowLayout row_layout(const at::Tensor& x, int64_t dim) {
  if (x.dim() == 0) return {1, 1, 1};
  RowLayout l{1, x.size(dim), 1};
  for (int64_t d = 0; d < dim; ++d) l.outer *= x.size(d);
  for (int64_t d = dim + 1; d < x.dim(); ++d) l.inner *= x.size(d);
  return l;
}

inline std::vector<int64_t> reduced_sizes(const at::Tensor& x, int64_t dim, bool keepdim) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  if (x.dim() == 0) return sizes;
  if (keepdim) sizes[dim] = 1;
  else sizes.erase(sizes.begin() + dim);
  return sizes;
}

template <class Backend, math::SoftmaxKind K>
at::Tensor softmax_family_forward(const at::Tensor& input, int64_t dim, bool keepdim, const char* name) {
  check_floating(input, name, "input");
  dim = at::maybe_wrap_dim(dim, input.dim());
  const c10::OptionalDeviceGuard guard(input.device());
  auto x = input.contiguous();
  const RowLayout layout = row_layout(x, dim);
  at::Tensor out;
  if constexpr (K == math::SoftmaxKind::LogSumExp) {
    out = at::empty(reduced_sizes(x, dim, keepdim), x.options());
    if (layout.n == 0) return out.fill_(-std::numeric_limits<double>::infinity());  // log Σ over nothing
  } else {
    out = at::empty_like(x, at::MemoryFormat::Contiguous);
  }
  if (x.numel() > 0) Backend::template forward<K>(layout, x, out);
  return out;
}

// softmax_backward(grad_output, output, dim), log_softmax_backward(grad_output, output, dim)
template <class Backend, math::SoftmaxKind K>
at::Tensor softmax_family_backward(const at::Tensor& grad_output, const at::Tensor& output, int64_t dim,
                                   const char* name) {
  check_floating(output, name, "output");
  check_same(grad_output, "grad_output", output, "output", name);
  dim = at::maybe_wrap_dim(dim, output.dim());
  const c10::OptionalDeviceGuard guard(output.device());
  auto dy = grad_output.contiguous();
  auto y = output.contiguous();
  auto dx = at::empty_like(y, at::MemoryFormat::Contiguous);
  if (y.numel() > 0) Backend::template backward<K>(row_layout(y, dim), dy, y, at::Tensor(), dx);
  return dx;
}

// logsumexp_backward(grad_output, input, output, dim, keepdim)
template <class Backend>
at::Tensor logsumexp_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& output,
                              int64_t dim, bool keepdim) {
  const char* name = "logsumexp_backward";
  check_floating(input, name, "input");
  dim = at::maybe_wrap_dim(dim, input.dim());
  const auto expected = reduced_sizes(input, dim, keepdim);
  TORCH_CHECK(output.sizes() == at::IntArrayRef(expected), "torch_vjp.", name, ": expected output of shape ",
              at::IntArrayRef(expected), " for input of shape ", input.sizes(), ", dim=", dim,
              ", keepdim=", keepdim, ", got ", output.sizes());
  check_like(output, "output", input, "input", name);
  check_same(grad_output, "grad_output", output, "output", name);
  const c10::OptionalDeviceGuard guard(input.device());
  auto x = input.contiguous();
  auto dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() > 0)
    Backend::template backward<math::SoftmaxKind::LogSumExp>(row_layout(x, dim), grad_output.contiguous(),
                                                              output.contiguous(), x, dx);
  return dx;
}

template <class Backend>
void register_softmax(torch::Library& m) {
  using at::Tensor;
  using math::SoftmaxKind;
  m.impl("softmax", [](const Tensor& x, int64_t dim) {
    return softmax_family_forward<Backend, SoftmaxKind::Softmax>(x, dim, false, "softmax");
  });
  m.impl("softmax_backward", [](const Tensor& dy, const Tensor& y, int64_t dim) {
    return softmax_family_backward<Backend, SoftmaxKind::Softmax>(dy, y, dim, "softmax_backward");
  });
  m.impl("log_softmax", [](const Tensor& x, int64_t dim) {
    return softmax_family_forward<Backend, SoftmaxKind::LogSoftmax>(x, dim, false, "log_softmax");
  });
  m.impl("log_softmax_backward", [](const Tensor& dy, const Tensor& y, int64_t dim) {
    return softmax_family_backward<Backend, SoftmaxKind::LogSoftmax>(dy, y, dim, "log_softmax_backward");
  });
  m.impl("logsumexp", [](const Tensor& x, int64_t dim, bool keepdim) {
    return softmax_family_forward<Backend, SoftmaxKind::LogSumExp>(x, dim, keepdim, "logsumexp");
  });
  m.impl("logsumexp_backward", &logsumexp_backward<Backend>);
}

}  // namespace torch_vjp
