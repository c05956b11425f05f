// Normalization family: op schemas' implementations for one backend (math in math/norm.h).
//
// layer_norm / rms_norm normalize rows of n = prod(normalized_shape) elements (the trailing dims of a
// contiguous input, so rows·n = numel). Weight and bias are handed to the backend as contiguous n-vectors in
// the compute type T = opmath of the input (float for half types), ones and zeros when absent, so a backend
// has one code path; parameter gradients come back in T and are returned in each parameter's own dtype. The
// output has the input's dtype (as torch's, whatever the parameters' dtype); mean and rstd are per row, in T.
//
// rms_norm's options: `offset` is added to the weight vector here (the kernels scale by offset + w, Gemma's
// 1 + w, rounded in T as Gemma's float32 `1.0 + weight.float()`), and casting_mode "llama" asks the kernel to
// round x̂ to the input dtype before the weight multiplies it (NormOptions::round_xhat). add_rms_norm and
// add_layer_norm hand the backend the residual and a tensor for s = input + residual, rounded to the input
// dtype as torch's `residual + hidden_states`; the norm is of s, and the VJP adds grad_sum into dx.
//
// A backend supplies (tensors contiguous, rows·n > 0):
//   Backend::norm_forward<kCentered>(NormRows, x, weight, bias, eps, y, mean, rstd, NormOptions)
//       mean undefined if !kCentered; with options.residual defined, normalizes s = x + residual, written to
//       options.sum
//   Backend::norm_backward<kCentered>(NormRows, dy, x, mean, rstd, weight, dx, dweight, dbias, grad_sum)
//       dx, dweight, dbias undefined when not wanted; dweight, dbias in T; grad_sum (undefined: none) added
//       into dx
//   Backend::normalize_forward(RowLayout, x, eps, y, norm)
//   Backend::normalize_backward(RowLayout, dy, y, norm, eps, dx)
// and calls register_norm<Backend>(m) in its TORCH_LIBRARY_IMPL. Checks, shapes, allocation, parameter
// conversion and the device guard are here, once.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "math/norm.h"
#include "ops/softmax.h"  // RowLayout

namespace torch_vjp {

struct NormRows {
  int64_t rows, n;
};

inline at::ScalarType compute_type(const at::Tensor& input) {
  return at::toOpMathType(input.scalar_type());
}

// Checks normalized_shape against the input's trailing dims and returns (rows, n).
inline NormRows norm_rows(const at::Tensor& input, at::IntArrayRef normalized_shape, const char* op) {
  const int64_t k = normalized_shape.size();
  TORCH_CHECK(k >= 1, "torch_vjp.", op, ": expected normalized_shape to be at least 1-dimensional, i.e., containing "
              "at least one element, but got normalized_shape = ", normalized_shape);
  TORCH_CHECK(input.dim() >= k && input.sizes().slice(input.dim() - k).equals(normalized_shape), "torch_vjp.", op,
              ": given normalized_shape=", normalized_shape, ", expected input with shape [*, ",
              c10::Join(", ", normalized_shape), "], but got input of size", input.sizes());
  int64_t n = 1;
  for (int64_t d : normalized_shape) n *= d;
  int64_t rows = 1;  // from the leading dims: a row of no elements is still a row, with statistics
  for (int64_t d : input.sizes().slice(0, input.dim() - k)) rows *= d;
  return {rows, n};
}

// weight or bias: absent, or of shape normalized_shape, floating, on the input's device.
inline void check_parameter(const std::optional<at::Tensor>& p, const char* name, const at::Tensor& input,
                            at::IntArrayRef normalized_shape, const char* op) {
  if (!p.has_value() || !p->defined()) return;
  check_floating(*p, op, name);
  TORCH_CHECK(p->device() == input.device(), "torch_vjp.", op, ": expected ", name, " on the input's device ",
              input.device(), ", got ", p->device());
  TORCH_CHECK(p->sizes().equals(normalized_shape), "torch_vjp.", op, ": expected ", name,
              " to be of same shape as normalized_shape, but got ", name, " of shape ", p->sizes(),
              " and normalized_shape = ", normalized_shape);
}

// The parameter as a contiguous n-vector in the compute type, or `fill` when absent.
inline at::Tensor parameter_vector(const std::optional<at::Tensor>& p, const at::Tensor& input, int64_t n,
                                   double fill) {
  const auto options = input.options().dtype(compute_type(input));
  if (!p.has_value() || !p->defined()) return at::full({n}, fill, options);
  return p->to(options.dtype()).contiguous().view({n});
}

// layer_norm's parameter dtypes, as torch's: each the input's, or else (mixed precision) every parameter
// float32 beside a float16 or bfloat16 input. rms_norm takes any floating parameter (torch's composite does).
inline void check_layer_norm_dtypes(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias) {
  const auto dtype = input.scalar_type();
  bool mixed = false, all_float = true;
  for (const auto* p : {&weight, &bias}) {
    if (!p->has_value() || !(*p)->defined()) continue;
    mixed = mixed || (*p)->scalar_type() != dtype;
    all_float = all_float && (*p)->scalar_type() == at::kFloat;
  }
  if (!mixed) return;
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
              "torch_vjp.layer_norm: mixed dtype: all inputs must share same datatype (float32 parameters are taken "
              "only beside float16 or bfloat16 input, as torch's), got input ", dtype);
  TORCH_CHECK(all_float, "torch_vjp.layer_norm: mixed dtype: expect parameter to have scalar type of Float beside ",
              dtype, " input, as torch's");
}

// What a forward does beyond torch's layer_norm / rms_norm.
struct NormOptions {
  bool round_xhat = false;  // rms_norm casting_mode="llama": y = w · round_to_input_dtype(x̂)
  at::Tensor residual;      // add_*: s = input + residual is normalized (undefined: the input is)
  at::Tensor sum;           // add_*: where s is written
};

// casting_mode, as the public functions take it: "torch" (torch.nn.functional.rms_norm's rounding: x̂ ⊙ w in
// the compute type, rounded once), "gemma" (the same rounding: Gemma's modules scale in float32, then cast)
// or "llama" (x̂ rounded to the input dtype, then scaled: LlamaRMSNorm's).
inline bool rounds_xhat(c10::string_view casting_mode, const char* op) {
  if (casting_mode == "llama") return true;
  TORCH_CHECK_VALUE(casting_mode == "torch" || casting_mode == "gemma", "torch_vjp.", op,
                    ": casting_mode must be 'torch', 'gemma' or 'llama', got '", casting_mode, "'");
  return false;
}

// The weight the kernels multiply by: offset + w in the compute type (ones when absent).
inline at::Tensor scale_vector(const std::optional<at::Tensor>& weight, const at::Tensor& input, int64_t n,
                               double offset) {
  auto w = parameter_vector(weight, input, n, 1.0);
  return offset == 0.0 ? w : w.add(offset);
}

inline std::vector<int64_t> stats_shape(const at::Tensor& input, int64_t k) {
  return std::vector<int64_t>(input.sizes().begin(), input.sizes().end() - k);
}

// (y, mean, rstd, s): s is defined for add_* (residual given) alone.
template <class Backend, bool kCentered>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_forward(
    const at::Tensor& input, c10::SymIntArrayRef shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const char* op, double offset = 0.0, bool round_xhat = false,
    const std::optional<at::Tensor>& residual = std::nullopt) {
  const auto normalized_shape = C10_AS_INTARRAYREF_SLOW(shape);
  check_floating(input, op, "input");
  if (residual.has_value()) check_same(*residual, "residual", input, "input", op);
  const NormRows r = norm_rows(input, normalized_shape, op);
  if (kCentered) check_layer_norm_dtypes(input, weight, bias);
  check_parameter(weight, "weight", input, normalized_shape, op);
  check_parameter(bias, "bias", input, normalized_shape, op);
  const c10::OptionalDeviceGuard guard(input.device());
  auto x = input.contiguous();
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const auto stats_options = x.options().dtype(compute_type(x));
  const auto shape_of_stats = stats_shape(x, normalized_shape.size());
  auto rstd = at::empty(shape_of_stats, stats_options);
  auto mean = kCentered ? at::empty(shape_of_stats, stats_options) : at::Tensor();
  NormOptions options;
  options.round_xhat = round_xhat;
  if (residual.has_value()) {
    options.residual = residual->contiguous();
    options.sum = at::empty_like(x, at::MemoryFormat::Contiguous);
  }
  if (r.rows > 0 && r.n > 0) {
    Backend::template norm_forward<kCentered>(r, x, scale_vector(weight, x, r.n, offset),
                                              parameter_vector(bias, x, r.n, 0.0), eps, y, mean, rstd, options);
  } else if (r.rows > 0) {  // rows of no elements: torch's statistics of nothing (mean 0, rstd NaN)
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    if (kCentered) mean.zero_();
  }
  return {y, mean, rstd, options.sum};
}

template <class Backend, bool kCentered>
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>> norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, c10::SymIntArrayRef shape,
    std::array<bool, 3> output_mask, const char* op, double offset = 0.0,
    const std::optional<at::Tensor>& grad_sum = std::nullopt) {
  const auto normalized_shape = C10_AS_INTARRAYREF_SLOW(shape);
  check_floating(input, op, "input");
  check_same(grad_output, "grad_output", input, "input", op);
  const bool has_grad_sum = grad_sum.has_value() && grad_sum->defined();
  if (has_grad_sum) check_same(*grad_sum, "grad_sum", input, "sum", op);
  const NormRows r = norm_rows(input, normalized_shape, op);
  if (kCentered) check_layer_norm_dtypes(input, weight, bias);
  check_parameter(weight, "weight", input, normalized_shape, op);
  check_parameter(bias, "bias", input, normalized_shape, op);
  const auto expected_stats = stats_shape(input, normalized_shape.size());
  for (const at::Tensor* stat : {&mean, &rstd}) {
    if (!kCentered && stat == &mean) continue;
    TORCH_CHECK(stat->sizes().equals(expected_stats) && stat->scalar_type() == compute_type(input) &&
                    stat->device() == input.device(),
                "torch_vjp.", op, ": expected ", stat == &mean ? "mean" : "rstd", " of shape ",
                at::IntArrayRef(expected_stats), " and dtype ", compute_type(input), " on ", input.device(), ", got ",
                stat->sizes(), " ", stat->scalar_type(), " on ", stat->device());
  }
  const bool has_weight = weight.has_value() && weight->defined();
  const bool has_bias = bias.has_value() && bias->defined();
  const c10::OptionalDeviceGuard guard(input.device());
  auto x = input.contiguous();
  const auto compute = x.options().dtype(compute_type(x));
  at::Tensor dx = output_mask[0] ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor dweight = output_mask[1] && has_weight ? at::zeros({r.n}, compute) : at::Tensor();
  at::Tensor dbias = output_mask[2] && has_bias ? at::zeros({r.n}, compute) : at::Tensor();
  if (r.rows > 0 && r.n > 0 && (dx.defined() || dweight.defined() || dbias.defined())) {
    Backend::template norm_backward<kCentered>(r, grad_output.contiguous(), x, kCentered ? mean.contiguous() : mean,
                                               rstd.contiguous(), scale_vector(weight, x, r.n, offset), dx, dweight,
                                               dbias, has_grad_sum && dx.defined() ? grad_sum->contiguous() : at::Tensor());
  }
  const auto as_parameter = [&](const at::Tensor& grad, const std::optional<at::Tensor>& p) -> std::optional<at::Tensor> {
    if (!grad.defined()) return std::nullopt;
    return grad.view(p->sizes()).to(p->scalar_type());
  };
  return {dx.defined() ? std::optional<at::Tensor>(dx) : std::nullopt, as_parameter(dweight, weight),
          as_parameter(dbias, bias)};
}

// normalize(input, dim, eps) -> (output, norm): p = 2 along dim; norm is ‖x‖₂ per row, in the compute type,
// shaped like the input with dim kept as 1.
template <class Backend>
std::tuple<at::Tensor, at::Tensor> normalize_forward(const at::Tensor& input, int64_t dim, double eps) {
  const char* op = "normalize";
  check_floating(input, op, "input");
  dim = at::maybe_wrap_dim(dim, input.dim());
  const c10::OptionalDeviceGuard guard(input.device());
  auto x = input.contiguous();
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto norm = at::empty(reduced_sizes(x, dim, true), x.options().dtype(compute_type(x)));
  const RowLayout layout = row_layout(x, dim);
  if (x.numel() > 0) Backend::normalize_forward(layout, x, eps, y, norm);
  else norm.zero_();
  return {y, norm};
}

template <class Backend>
at::Tensor normalize_backward(const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& norm,
                              int64_t dim, double eps) {
  const char* op = "normalize_backward";
  check_floating(output, op, "output");
  check_same(grad_output, "grad_output", output, "output", op);
  dim = at::maybe_wrap_dim(dim, output.dim());
  const auto expected = reduced_sizes(output, dim, true);
  TORCH_CHECK(norm.sizes().equals(expected) && norm.scalar_type() == compute_type(output) &&
                  norm.device() == output.device(),
              "torch_vjp.", op, ": expected norm of shape ", at::IntArrayRef(expected), " and dtype ",
              compute_type(output), ", got ", norm.sizes(), " ", norm.scalar_type());
  const c10::OptionalDeviceGuard guard(output.device());
  auto y = output.contiguous();
  auto dx = at::empty_like(y, at::MemoryFormat::Contiguous);
  if (y.numel() > 0) Backend::normalize_backward(row_layout(y, dim), grad_output.contiguous(), y, norm.contiguous(), eps, dx);
  return dx;
}

template <class Backend>
void register_norm(torch::Library& m) {
  using at::Tensor;
  using OptTensor = std::optional<Tensor>;
  m.impl("layer_norm", [](const Tensor& x, c10::SymIntArrayRef shape, const OptTensor& w, const OptTensor& b, double eps) {
    auto [y, mean, rstd, no_sum] = norm_forward<Backend, true>(x, shape, w, b, eps, "layer_norm");
    return std::make_tuple(y, mean, rstd);
  });
  m.impl("layer_norm_backward", [](const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& rstd,
                                   const OptTensor& w, const OptTensor& b, c10::SymIntArrayRef shape,
                                   std::array<bool, 3> mask) {
    return norm_backward<Backend, true>(dy, x, mean, rstd, w, b, shape, mask, "layer_norm_backward");
  });
  m.impl("rms_norm", [](const Tensor& x, c10::SymIntArrayRef shape, const OptTensor& w, double eps, double offset,
                        c10::string_view casting_mode) {
    auto [y, no_mean, rstd, no_sum] = norm_forward<Backend, false>(x, shape, w, std::nullopt, eps, "rms_norm", offset,
                                                                   rounds_xhat(casting_mode, "rms_norm"));
    return std::make_tuple(y, rstd);
  });
  m.impl("rms_norm_backward", [](const Tensor& dy, const Tensor& x, const Tensor& rstd, const OptTensor& w,
                                 c10::SymIntArrayRef shape, std::array<bool, 2> mask, double offset) {
    auto [dx, dw, unused] = norm_backward<Backend, false>(dy, x, Tensor(), rstd, w, std::nullopt, shape,
                                                          {mask[0], mask[1], false}, "rms_norm_backward", offset);
    return std::make_tuple(dx, dw);
  });
  m.impl("add_rms_norm", [](const Tensor& x, const Tensor& residual, c10::SymIntArrayRef shape, const OptTensor& w,
                            double eps, double offset, c10::string_view casting_mode) {
    auto [y, no_mean, rstd, sum] = norm_forward<Backend, false>(
        x, shape, w, std::nullopt, eps, "add_rms_norm", offset, rounds_xhat(casting_mode, "add_rms_norm"), residual);
    return std::make_tuple(y, sum, rstd);
  });
  m.impl("add_rms_norm_backward", [](const Tensor& dy, const OptTensor& grad_sum, const Tensor& sum,
                                     const Tensor& rstd, const OptTensor& w, c10::SymIntArrayRef shape,
                                     std::array<bool, 2> mask, double offset) {
    auto [dx, dw, unused] = norm_backward<Backend, false>(dy, sum, Tensor(), rstd, w, std::nullopt, shape,
                                                          {mask[0], mask[1], false}, "add_rms_norm_backward", offset,
                                                          grad_sum);
    return std::make_tuple(dx, dw);
  });
  m.impl("add_layer_norm", [](const Tensor& x, const Tensor& residual, c10::SymIntArrayRef shape, const OptTensor& w,
                              const OptTensor& b, double eps) {
    auto [y, mean, rstd, sum] = norm_forward<Backend, true>(x, shape, w, b, eps, "add_layer_norm", 0.0, false,
                                                            residual);
    return std::make_tuple(y, sum, mean, rstd);
  });
  m.impl("add_layer_norm_backward", [](const Tensor& dy, const OptTensor& grad_sum, const Tensor& sum,
                                       const Tensor& mean, const Tensor& rstd, const OptTensor& w, const OptTensor& b,
                                       c10::SymIntArrayRef shape, std::array<bool, 3> mask) {
    return norm_backward<Backend, true>(dy, sum, mean, rstd, w, b, shape, mask, "add_layer_norm_backward", 0.0,
                                        grad_sum);
  });
  m.impl("normalize", &normalize_forward<Backend>);
  m.impl("normalize_backward", &normalize_backward<Backend>);
}

}  // namespace torch_vjp
