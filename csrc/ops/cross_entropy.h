// Losses: cross_entropy and fused_linear_cross_entropy, op schemas' implementations for one backend (math
// in math/cross_entropy.h).
//
// A backend supplies two row kernels over logits x of shape (rows, C), contiguous, rows > 0, with int64
// targets (rows,) and per-row values in the compute type T (opmath of x):
//   Backend::cross_entropy_rows(x, target, ignore_index, smoothing, weights, loss, row_max, log_sum)
//       loss_i, and the statistics m_i = max_j x_ij, log_sum_i = log Σ_j exp(x_ij - m_i); loss_i = 0 where
//       target_i == ignore_index
//   Backend::cross_entropy_grad_rows(x, target, row_max, log_sum, scale, ignore_index, smoothing, weights, dx)
//       dx_i = scale_i (softmax(x_i) - smoothed one-hot(t_i)); dx may be x itself (written in place)
//   Backend::kChunkBytes   the bytes of logits one chunk of fused_linear_cross_entropy may hold
// `weights` (SmoothingWeights) is defined only for class weights with label smoothing (ε > 0): the kernels
// then compute the weighted, smoothed loss and gradient of math/cross_entropy.h. Class weights without
// smoothing never reach a kernel: the frontend scales the unweighted rows by w_t (ClassWeights).
// A backend with `kFusesOptions` true takes the loss options (LossOptions, after `weights`) in both kernels
// and applies them in its row passes: the loss over z = c·tanh(x / c) and, in the gradient, the softcap's
// chain rule and the z-loss's term. Otherwise they run around its kernels here (option_logits: one more pass
// over the logits each way, in float32 temporaries). Either way the z-loss's λ lse² is added to the losses here.
// A backend may supply both in one pass (one read of x; used by fused_linear_cross_entropy's chunks when the
// gradient is wanted), with the bits of cross_entropy_rows followed by cross_entropy_grad_rows:
//   Backend::cross_entropy_with_grad_rows(x, target, ignore_index, smoothing, weights, scale, loss, row_max,
//                                         log_sum, dx)
// and calls register_cross_entropy<Backend>(m) in its TORCH_LIBRARY_IMPL. Checks, shapes, the reductions and
// the fused op's chunk loop (matrix products through at::mm / at::addmm: cuBLAS or the CPU BLAS) are here.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "math/cross_entropy.h"

namespace torch_vjp {

// Whether Backend has cross_entropy_with_grad_rows (the CUDA backend; the CPU's runs the two passes).
template <class Backend, class = void>
struct HasCrossEntropyWithGrad : std::false_type {};
template <class Backend>
struct HasCrossEntropyWithGrad<Backend, std::void_t<decltype(&Backend::cross_entropy_with_grad_rows)>>
    : std::true_type {};

using math::Reduction;

inline Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "none") return Reduction::None;
  if (reduction == "mean") return Reduction::Mean;
  TORCH_CHECK_VALUE(reduction == "sum", reduction, " is not a valid value for reduction");
  return Reduction::Sum;
}

// ε as torch takes it: above 1 an error; 0 (no smoothing) where it is not positive, NaN included.
inline double label_smoothing_of(double label_smoothing) {
  if (!(label_smoothing > 0.0)) return 0.0;
  TORCH_CHECK(label_smoothing <= 1.0, "label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
  return label_smoothing;
}

// The loss options of math/cross_entropy.h ("Options"): softcap c and the z-loss scale λ, 0 meaning off.
// Class weights with the z-loss are refused (which weight the z-loss term would take is a choice torch does
// not make).
struct LossOptions {
  double softcap = 0.0, lse_square_scale = 0.0;
  bool active() const { return softcap > 0.0 || lse_square_scale > 0.0; }
};

inline LossOptions loss_options_of(double softcap, double lse_square_scale, bool class_weights, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, "torch_vjp.", op,
                    ": softcap must be a positive finite number (or 0 for none), got ", softcap);
  TORCH_CHECK_VALUE(std::isfinite(lse_square_scale) && lse_square_scale >= 0.0, "torch_vjp.", op,
                    ": lse_square_scale must be a non-negative finite number, got ", lse_square_scale);
  TORCH_CHECK_NOT_IMPLEMENTED(!(class_weights && lse_square_scale > 0.0), "torch_vjp.", op,
                              ": class weights with the z-loss (lse_square_scale > 0) are not implemented");
  return {softcap, lse_square_scale};
}

// For a backend whose kernels do not apply the options: the logits they see, z = c·tanh(x / c) with a
// softcap, else x, in the compute type (so that z and the gradient's two extra terms are rounded once).
inline at::Tensor option_logits(const at::Tensor& x, const LossOptions& o) {
  auto z = x.to(at::toOpMathType(x.scalar_type()));
  if (o.softcap > 0.0) z = at::tanh(z / o.softcap).mul_(o.softcap);
  return z.contiguous();
}

// λ lse_i² for the counted rows (0 where ignored), added to the per-row losses.
inline void add_z_loss(at::Tensor& losses, const at::Tensor& row_max, const at::Tensor& log_sum,
                       const at::Tensor& target, int64_t ignore_index, const LossOptions& o) {
  if (!(o.lse_square_scale > 0.0)) return;
  const auto lse = row_max + log_sum;
  losses.add_(at::where(target != ignore_index, lse * lse * o.lse_square_scale, at::zeros({}, lse.options())));
}

// For a backend whose kernels do not apply the options: dz (their gradient over z, in place) → dx, the
// z-loss's term, then the softcap's chain rule (math/cross_entropy.h "Options"). scale: the rows' s_i.
inline void finish_option_grad(at::Tensor& dz, const at::Tensor& z, const at::Tensor& row_max,
                               const at::Tensor& log_sum, const at::Tensor& scale, const LossOptions& o) {
  if (o.lse_square_scale > 0.0) {
    const auto coefficient = (row_max + log_sum).mul_(scale).mul_(2.0 * o.lse_square_scale).unsqueeze(1);
    dz.add_(at::exp((z - row_max.unsqueeze(1)) - log_sum.unsqueeze(1)).mul_(coefficient));
  }
  if (o.softcap > 0.0) {
    const auto u = z / o.softcap;
    dz.mul_(1.0 - u * u);
  }
}

// Class-index targets: (rows,) (or 0-d for one unbatched row), Long or Byte as torch's, each in [0, classes)
// or ignore_index.
inline void check_target(const at::Tensor& target, int64_t rows, int64_t classes, bool batched,
                         const at::Device& device, int64_t ignore_index, const char* op) {
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte, "torch_vjp.", op,
              ": expected target dtype to be Long or Byte, but got ", target.scalar_type());
  TORCH_CHECK(target.device() == device, "torch_vjp.", op, ": expected target on the input's device ", device,
              ", got ", target.device());
  if (batched) {
    TORCH_CHECK(target.dim() == 1, "0D or 1D target tensor expected, multi-target not supported");  // torch's
    TORCH_CHECK_VALUE(target.size(0) == rows, "Expected input batch_size (", rows, ") to match target batch_size (",
                      target.size(0), ").");
  } else {
    TORCH_CHECK(target.dim() == 0, "torch_vjp.", op, ": expected a 0-d target for input of shape (C,), got target of "
                "shape ", target.sizes());
  }
  // Checking on the device would cost a sync on CUDA; the CUDA kernels assert instead (documented). On the CPU
  // one plain loop: the same test as tensor ops took five ops and ~20 µs a call, more than a small loss itself.
  if (target.is_cpu() && rows > 0) {
    const auto t = target.contiguous();
    const auto check_in_range = [&](const auto* index) {
      for (int64_t i = 0; i < t.numel(); ++i) {
        const auto v = static_cast<int64_t>(index[i]);
        TORCH_CHECK_INDEX((v >= 0 && v < classes) || v == ignore_index, "Target ", v, " is out of bounds.");
      }
    };
    if (t.scalar_type() == at::kLong) check_in_range(t.const_data_ptr<int64_t>());
    else check_in_range(t.const_data_ptr<uint8_t>());
  }
}

// Class weights with label smoothing, as the kernels take them (math/cross_entropy.h): w (C,), w_{t_i} per
// row (0 where ignored) and W = Σ_j w_j (0-d), all in the compute type, contiguous. Undefined: none.
struct SmoothingWeights {
  at::Tensor weight, row_weight, total;
  bool defined() const { return weight.defined(); }
  SmoothingWeights rows(int64_t begin, int64_t n) const {
    return defined() ? SmoothingWeights{weight, row_weight.narrow(0, begin, n), total} : SmoothingWeights{};
  }
};

// The backend's two row kernels with the options applied, in its kernels (kFusesOptions) or around them.
template <class Backend>
void loss_rows(const at::Tensor& x, const at::Tensor& target, int64_t ignore_index, double smoothing,
               const SmoothingWeights& weights, const LossOptions& o, const at::Tensor& loss, const at::Tensor& row_max,
               const at::Tensor& log_sum) {
  if constexpr (Backend::kFusesOptions)
    Backend::cross_entropy_rows(x, target, ignore_index, smoothing, weights, o, loss, row_max, log_sum);
  else
    Backend::cross_entropy_rows(o.active() ? option_logits(x, o) : x, target, ignore_index, smoothing, weights, loss,
                                row_max, log_sum);
}

// For a backend whose kernels do not apply the options: its gradient over z = option_logits(x), then the
// options' terms, rounded once into dx.
template <class Backend>
void grad_rows_over(const at::Tensor& z, const at::Tensor& target, const at::Tensor& row_max,
                    const at::Tensor& log_sum, const at::Tensor& scale, int64_t ignore_index, double smoothing,
                    const SmoothingWeights& weights, const LossOptions& o, const at::Tensor& dx) {
  auto dz = at::empty_like(z);
  Backend::cross_entropy_grad_rows(z, target, row_max, log_sum, scale, ignore_index, smoothing, weights, dz);
  finish_option_grad(dz, z, row_max, log_sum, scale, o);
  dx.copy_(dz);
}

// dx may be x itself.
template <class Backend>
void grad_rows(const at::Tensor& x, const at::Tensor& target, const at::Tensor& row_max, const at::Tensor& log_sum,
               const at::Tensor& scale, int64_t ignore_index, double smoothing, const SmoothingWeights& weights,
               const LossOptions& o, const at::Tensor& dx) {
  if constexpr (Backend::kFusesOptions)
    Backend::cross_entropy_grad_rows(x, target, row_max, log_sum, scale, ignore_index, smoothing, weights, o, dx);
  else if (!o.active())
    Backend::cross_entropy_grad_rows(x, target, row_max, log_sum, scale, ignore_index, smoothing, weights, dx);
  else
    grad_rows_over<Backend>(option_logits(x, o), target, row_max, log_sum, scale, ignore_index, smoothing, weights, o,
                            dx);
}

// torch's F.cross_entropy(weight=w): w (C,) of the input's dtype and device, with torch's messages. Held in the
// compute type; row_weight = w_{t_i} (0 for an ignored row) is the weight of row i in the loss and in the
// 'mean' divisor (Σ_i w_{t_i}, not the count).
struct ClassWeights {
  at::Tensor weight;      // (C,) compute type, or undefined: no class weights
  at::Tensor row_weight;  // (rows,) compute type
  bool defined() const { return weight.defined(); }
  // The kernels' view: defined for ε > 0 only (ε = 0 scales the unweighted rows instead).
  SmoothingWeights smoothing(double label_smoothing) const {
    if (!defined() || !(label_smoothing > 0.0)) return {};
    return {weight, row_weight, weight.sum()};
  }
  // ε = 0: the factor w_t of row i's loss and gradient; undefined otherwise.
  at::Tensor row_factor(double label_smoothing) const {
    return defined() && !(label_smoothing > 0.0) ? row_weight : at::Tensor();
  }
};

// compute_dtype_too: the fused op also takes them in the compute type (float32 beside a half-type input), as
// autocast leaves them (torch's linear + cross_entropy apply them in float32 after the low-precision product).
inline ClassWeights class_weights_of(const std::optional<at::Tensor>& weight, const at::Tensor& input,
                                     const at::Tensor& target_long /* (rows,) int64 */, int64_t classes,
                                     int64_t ignore_index, bool compute_dtype_too = false) {
  if (!weight.has_value()) return {};
  const auto& w = *weight;
  TORCH_CHECK(w.dim() == 1 && w.numel() == classes, "weight tensor should be defined either for all ", classes,
              " classes or no classes but got weight tensor of shape: ", w.sizes());  // torch's
  TORCH_CHECK(w.scalar_type() == input.scalar_type() ||
                  (compute_dtype_too && w.scalar_type() == at::toOpMathType(input.scalar_type())),
              "expected scalar type ", input.scalar_type(), " but found ", w.scalar_type());
  TORCH_CHECK(w.device() == input.device(), "Tensor on device ", w.device(), " is not on the expected device ",
              input.device(), "!");
  const auto cw = w.to(at::toOpMathType(input.scalar_type())).contiguous();
  const auto counted = target_long != ignore_index;
  const auto picked = classes > 0 ? cw.index_select(0, at::where(counted, target_long, 0).clamp(0, classes - 1))
                                  : at::zeros(target_long.sizes(), cw.options());
  return {cw, at::where(counted, picked, at::zeros({}, cw.options())).contiguous()};
}

// Logits (N, C) with targets (N,), or (C,) with a 0-d target; returns (rows, classes).
inline std::pair<int64_t, int64_t> check_logits_and_target(const at::Tensor& input, const at::Tensor& target,
                                                           int64_t ignore_index, const char* op) {
  check_floating(input, op, "input");
  TORCH_CHECK(input.dim() == 1 || input.dim() == 2, "torch_vjp.", op, ": expected input of shape (N, C) or (C,) "
              "(class-index targets), got ", input.sizes());
  const int64_t rows = input.dim() == 2 ? input.size(0) : 1;
  check_target(target, rows, input.size(-1), input.dim() == 2, input.device(), ignore_index, op);
  return {rows, input.size(-1)};
}

// The loss of `rows` per-row losses (compute type) under a reduction, in the input's dtype: summed in double
// (as torch's CPU nll_loss accumulates), divided, rounded once. With class weights 'mean' divides by
// Σ_i w_{t_i} (row_weight) in place of the count.
inline at::Tensor reduce_loss(const at::Tensor& row_losses, const at::Tensor& target, int64_t ignore_index,
                              Reduction reduction, at::ScalarType dtype, const at::Tensor& row_weight = {}) {
  if (reduction == Reduction::None) return row_losses.to(dtype).view(target.sizes());
  auto total = row_losses.sum(at::kDouble);
  if (reduction == Reduction::Mean && row_weight.defined()) {
    // torch's weighted mean is (1 - ε) Σ nll / Σ w_t + (ε/C) Σ smooth / Σ w_t: NaN where Σ w_t = 0 (0/0 in its
    // first term) even when the smoothing term alone would be +inf.
    const auto divisor = row_weight.sum(at::kDouble);
    total = at::where(divisor == 0, at::full({}, std::numeric_limits<double>::quiet_NaN(), divisor.options()),
                      total / divisor);
  } else if (reduction == Reduction::Mean) {
    total = total / (target != ignore_index).sum().to(at::kDouble);
  }
  return total.to(dtype);
}

// Per-row scale of the VJP: dy_i ('none'), dy ('sum') or dy / count ('mean'), and 0 for ignored rows. With
// class weights (w: ClassWeights) 'mean' divides by Σ_i w_{t_i}, and without smoothing the row's scale is
// also multiplied by w_{t_i} (ClassWeights::row_factor).
inline at::Tensor row_scale(const at::Tensor& grad_output, const at::Tensor& target, int64_t ignore_index,
                            Reduction reduction, at::ScalarType compute, const char* op,
                            const ClassWeights& w = {}, double label_smoothing = 0.0) {
  const int64_t rows = target.numel();
  auto counted = (target != ignore_index).reshape({rows});
  auto g = grad_output.to(compute);
  if (reduction == Reduction::None) {
    TORCH_CHECK(grad_output.sizes() == target.sizes(), "torch_vjp.", op, ": expected grad_output of shape ",
                target.sizes(), " for reduction='none', got ", grad_output.sizes());
    g = g.reshape({rows});
  } else {
    TORCH_CHECK(grad_output.dim() == 0, "torch_vjp.", op, ": expected a 0-d grad_output, got ",
                grad_output.sizes());
    if (reduction == Reduction::Mean) g = g / (w.defined() ? w.row_weight.sum() : counted.sum().to(compute));
    g = g.expand({rows});
  }
  if (const auto factor = w.row_factor(label_smoothing); factor.defined()) g = g * factor;
  return at::where(counted, g, at::zeros({}, g.options())).contiguous();
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& input, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight,
                                                         int64_t ignore_index, c10::string_view reduction,
                                                         double label_smoothing, double softcap,
                                                         double lse_square_scale) {
  const char* op = "cross_entropy";
  const Reduction r = parse_reduction(reduction);
  label_smoothing = label_smoothing_of(label_smoothing);
  const auto o = loss_options_of(softcap, lse_square_scale, weight.has_value(), op);
  const auto [rows, classes] = check_logits_and_target(input, target, ignore_index, op);
  const c10::OptionalDeviceGuard guard(input.device());
  const auto compute = input.options().dtype(at::toOpMathType(input.scalar_type()));
  auto x = input.contiguous().view({rows, classes});
  auto t = target.to(at::kLong).contiguous().view({rows});
  const auto w = class_weights_of(weight, input, t, classes, ignore_index);
  auto losses = at::zeros({rows}, compute);
  auto row_max = at::empty({rows}, compute);
  auto log_sum = at::empty({rows}, compute);
  if (rows > 0 && classes > 0) {
    loss_rows<Backend>(x, t, ignore_index, label_smoothing, w.smoothing(label_smoothing), o, losses, row_max, log_sum);
    if (const auto factor = w.row_factor(label_smoothing); factor.defined()) losses.mul_(factor);
    add_z_loss(losses, row_max, log_sum, t, ignore_index, o);
  } else {  // rows of no classes: the max of nothing, and log 0
    row_max.fill_(-std::numeric_limits<double>::infinity());
    log_sum.fill_(-std::numeric_limits<double>::infinity());
  }
  return {reduce_loss(losses, target, ignore_index, r, input.scalar_type(), w.row_weight),
          row_max.view(target.sizes()), log_sum.view(target.sizes())};
}

// The saved statistics (row_max, log_sum): shaped like the target, in the compute type, on the input's device.
inline void check_statistics(const at::Tensor& row_max, const at::Tensor& log_sum, const at::Tensor& target,
                             const at::Tensor& input, const char* op) {
  const auto compute = at::toOpMathType(input.scalar_type());
  for (const auto& [stat, name] : {std::pair{&row_max, "row_max"}, std::pair{&log_sum, "log_sum"}}) {
    TORCH_CHECK(stat->sizes() == target.sizes() && stat->scalar_type() == compute && stat->device() == input.device(),
                "torch_vjp.", op, ": expected ", name, " of shape ", target.sizes(), " and dtype ", compute, " on ",
                input.device(), ", got ", stat->sizes(), " ", stat->scalar_type(), " on ", stat->device());
  }
}

template <class Backend>
at::Tensor cross_entropy_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& row_max,
                                  const at::Tensor& log_sum, int64_t ignore_index, c10::string_view reduction,
                                  double label_smoothing, double softcap, double lse_square_scale) {
  const char* op = "cross_entropy_backward";
  const Reduction r = parse_reduction(reduction);
  label_smoothing = label_smoothing_of(label_smoothing);
  const auto o = loss_options_of(softcap, lse_square_scale, weight.has_value(), op);
  const auto [rows, classes] = check_logits_and_target(input, target, ignore_index, op);
  const auto compute = at::toOpMathType(input.scalar_type());
  check_statistics(row_max, log_sum, target, input, op);
  TORCH_CHECK(grad_output.device() == input.device(), "torch_vjp.", op, ": expected grad_output on ", input.device());
  const c10::OptionalDeviceGuard guard(input.device());
  auto x = input.contiguous().view({rows, classes});
  auto dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto t = target.to(at::kLong).contiguous().view({rows});
  const auto w = class_weights_of(weight, input, t, classes, ignore_index);
  if (rows > 0 && classes > 0) {
    const auto m = row_max.contiguous().view({rows}), log_s = log_sum.contiguous().view({rows});
    const auto s = row_scale(grad_output, target, ignore_index, r, compute, op, w, label_smoothing);
    grad_rows<Backend>(x, t, m, log_s, s, ignore_index, label_smoothing, w.smoothing(label_smoothing), o, dx);
  }
  return dx.view(input.sizes());
}

// fused_linear_cross_entropy: cross_entropy(input @ weightᵀ + bias) without ever holding all the logits.
// Rows go in chunks; for each, logits = x_c weightᵀ + bias (at::addmm), their loss, and, when gradients are
// wanted, dlogits written over the chunk's own logits (on CUDA by the same kernel as the loss: one read of
// the chunk's logits, one write), then grad_input_c = dlogits weight and
// grad_weight += dlogitsᵀ x_c, grad_bias += Σ_rows dlogits, both accumulated in the compute type (float32
// for half types) across chunks and rounded once at the end, as one product over every row would be.
//
// The chunk is a function of the shapes and the device type alone (Backend::kChunkBytes of logits, a
// multiple of 8 rows), never of the memory free at the time: the same call gives the same bits every time.
struct LinearCrossEntropy {
  at::Tensor input, weight, target;  // (N, H), (V, H), (N,) int64
  std::optional<at::Tensor> bias;    // (V,)
  int64_t ignore_index;
  double label_smoothing;
  ClassWeights class_weights;        // class_weight=: undefined when absent
  LossOptions options;
};

// Rows a chunk of logits holds: `bytes` of them, a multiple of 8 rows, at least 8.
inline int64_t chunk_rows(int64_t rows, int64_t vocab, int64_t element_size, int64_t bytes) {
  return std::clamp<int64_t>(bytes / std::max<int64_t>(1, vocab * element_size) / 8 * 8, 8, std::max<int64_t>(rows, 8));
}

// acc += a b, with acc in the compute type and a, b in the input's: products of half types accumulated in
// float32 (cuBLAS's mixed-precision product on CUDA; on the CPU, whose BLAS has none, the factors widened).
inline void add_product(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == acc.scalar_type()) {
    acc.addmm_(a, b);
  } else if (acc.is_cuda()) {
    at::_ops::addmm_dtype_out::call(acc, a, b, acc.scalar_type(), 1, 1, acc);
  } else {
    acc.addmm_(a.to(acc.scalar_type()), b.to(acc.scalar_type()));
  }
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> linear_cross_entropy_chunks(
    const LinearCrossEntropy& a, const at::Tensor& scale /* (N,) compute type, or undefined: no gradients */) {
  const int64_t rows = a.input.size(0), vocab = a.weight.size(0);
  const auto compute = a.input.options().dtype(at::toOpMathType(a.input.scalar_type()));
  const int64_t chunk = chunk_rows(rows, vocab, a.input.element_size(), Backend::kChunkBytes);
  auto losses = at::zeros({rows}, compute);
  auto row_max = at::empty({rows}, compute);
  auto log_sum = at::empty({rows}, compute);
  const bool grads = scale.defined();
  at::Tensor grad_input = grads ? at::empty_like(a.input) : at::Tensor();
  at::Tensor grad_weight = grads ? at::zeros(a.weight.sizes(), compute) : at::Tensor();
  std::optional<at::Tensor> grad_bias;
  if (grads && a.bias.has_value()) grad_bias = at::zeros({vocab}, compute);
  const auto weights = a.class_weights.smoothing(a.label_smoothing);
  for (int64_t begin = 0; begin < rows; begin += chunk) {
    const int64_t n = std::min(chunk, rows - begin);
    const auto x = a.input.narrow(0, begin, n);
    const auto t = a.target.narrow(0, begin, n);
    auto logits = a.bias.has_value() ? at::addmm(*a.bias, x, a.weight.t()) : at::mm(x, a.weight.t());
    const auto chunk_max = row_max.narrow(0, begin, n), chunk_log_sum = log_sum.narrow(0, begin, n);
    const auto chunk_losses = losses.narrow(0, begin, n);
    const auto chunk_weights = weights.rows(begin, n);
    if (!grads) {
      loss_rows<Backend>(logits, t, a.ignore_index, a.label_smoothing, chunk_weights, a.options, chunk_losses,
                         chunk_max, chunk_log_sum);
      continue;
    }
    const auto chunk_scale = scale.narrow(0, begin, n);
    const auto two_passes = [&] {
      if constexpr (!Backend::kFusesOptions) {
        if (a.options.active()) {  // z formed once, for both kernels
          const auto z = option_logits(logits, a.options);
          Backend::cross_entropy_rows(z, t, a.ignore_index, a.label_smoothing, chunk_weights, chunk_losses, chunk_max,
                                      chunk_log_sum);
          grad_rows_over<Backend>(z, t, chunk_max, chunk_log_sum, chunk_scale, a.ignore_index, a.label_smoothing,
                                  chunk_weights, a.options, logits);
          return;
        }
      }
      loss_rows<Backend>(logits, t, a.ignore_index, a.label_smoothing, chunk_weights, a.options, chunk_losses,
                         chunk_max, chunk_log_sum);
      grad_rows<Backend>(logits, t, chunk_max, chunk_log_sum, chunk_scale, a.ignore_index, a.label_smoothing,
                         chunk_weights, a.options, logits);
    };
    if constexpr (HasCrossEntropyWithGrad<Backend>::value) {
      if (a.options.active()) two_passes();
      else  // dlogits over the chunk's own logits, from one read
        Backend::cross_entropy_with_grad_rows(logits, t, a.ignore_index, a.label_smoothing, chunk_weights, chunk_scale,
                                              chunk_losses, chunk_max, chunk_log_sum, logits);
    } else {
      two_passes();
    }
    auto grad_input_rows = grad_input.narrow(0, begin, n);
    at::mm_out(grad_input_rows, logits, a.weight);
    add_product(grad_weight, logits.t(), x);
    if (grad_bias.has_value()) grad_bias->add_(logits.sum(0, false, compute.dtype().toScalarType()));
  }
  if (grads) grad_weight = grad_weight.to(a.weight.scalar_type());
  if (grad_bias.has_value()) grad_bias = grad_bias->to(a.bias->scalar_type());
  if (const auto factor = a.class_weights.row_factor(a.label_smoothing); factor.defined()) losses.mul_(factor);
  if (rows > 0) add_z_loss(losses, row_max, log_sum, a.target, a.ignore_index, a.options);
  return {losses, grad_input, grad_weight, grad_bias};
}

inline LinearCrossEntropy check_linear_cross_entropy(const at::Tensor& input, const at::Tensor& weight,
                                                     const at::Tensor& target, const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& class_weight,
                                                     int64_t ignore_index, double label_smoothing, double softcap,
                                                     double lse_square_scale, const char* op) {
  check_floating(input, op, "input");  // first: an integer input is told so, not that the head's dtype differs
  TORCH_CHECK(input.dim() == 2, "torch_vjp.", op, ": expected input of shape (N, H), got ", input.sizes());
  TORCH_CHECK(weight.dim() == 2, "torch_vjp.", op, ": expected weight of shape (V, H), got ", weight.sizes());
  TORCH_CHECK(weight.size(1) == input.size(1), "torch_vjp.", op, ": the hidden sizes differ: input ", input.sizes(),
              " and weight ", weight.sizes(), " (expected weight of shape (V, ", input.size(1), "))");
  check_like(weight, "weight", input, "input", op);
  if (bias.has_value()) {
    check_like(*bias, "bias", input, "input", op);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "torch_vjp.", op, ": expected bias of shape (",
                weight.size(0), ",), got ", bias->sizes());
  }
  check_target(target, input.size(0), weight.size(0), true, input.device(), ignore_index, op);
  auto t = target.to(at::kLong).contiguous();
  auto w = class_weights_of(class_weight, input, t, weight.size(0), ignore_index, /*compute_dtype_too=*/true);
  const auto o = loss_options_of(softcap, lse_square_scale, class_weight.has_value(), op);
  return {input.contiguous(), weight.contiguous(), std::move(t),
          bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt, ignore_index,
          label_smoothing_of(label_smoothing), std::move(w), o};
}

// compute_grad: also the gradients of the reduced loss for grad_output = 1 (of Σ loss_i for 'none'), which
// autograd then only scales: three matrix products in all, no second pass over the logits.
template <class Backend>
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
fused_linear_cross_entropy(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& class_weight,
                           int64_t ignore_index, c10::string_view reduction, double label_smoothing,
                           bool compute_grad, double softcap, double lse_square_scale) {
  const char* op = "fused_linear_cross_entropy";
  const Reduction r = parse_reduction(reduction);
  const c10::OptionalDeviceGuard guard(input.device());
  const auto a = check_linear_cross_entropy(input, weight, target, bias, class_weight, ignore_index, label_smoothing,
                                            softcap, lse_square_scale, op);
  const auto compute = at::toOpMathType(input.scalar_type());
  const auto ones = at::ones({}, input.options().dtype(compute));
  at::Tensor scale;
  if (compute_grad && a.input.size(0) > 0)
    scale = row_scale(r == Reduction::None ? ones.expand(a.target.sizes()) : ones, a.target, ignore_index, r, compute, op,
                      a.class_weights, a.label_smoothing);
  auto [losses, grad_input, grad_weight, grad_bias] = linear_cross_entropy_chunks<Backend>(a, scale);
  // In the compute type: the public function rounds it to the input's dtype, except under autocast, where
  // torch's cross_entropy gives the float32 loss of the low-precision logits unrounded.
  auto loss = reduce_loss(losses, a.target, ignore_index, r, compute, a.class_weights.row_weight);
  if (!compute_grad) return {loss, std::nullopt, std::nullopt, std::nullopt};
  if (!grad_input.defined()) {  // no rows
    grad_input = at::zeros_like(a.input);
    grad_weight = at::zeros_like(a.weight);
    if (bias.has_value()) grad_bias = at::zeros_like(*bias);
  }
  return {loss, grad_input, grad_weight, grad_bias};
}

// The VJP for any grad_output (per row for 'none'), recomputing the logits chunk by chunk.
template <class Backend>
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> fused_linear_cross_entropy_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
    c10::string_view reduction, double label_smoothing, double softcap, double lse_square_scale) {
  const char* op = "fused_linear_cross_entropy_backward";
  const Reduction r = parse_reduction(reduction);
  const c10::OptionalDeviceGuard guard(input.device());
  const auto a = check_linear_cross_entropy(input, weight, target, bias, class_weight, ignore_index, label_smoothing,
                                            softcap, lse_square_scale, op);
  TORCH_CHECK(grad_output.device() == input.device(), "torch_vjp.", op, ": expected grad_output on ", input.device());
  if (a.input.size(0) == 0)
    return {at::zeros_like(a.input), at::zeros_like(a.weight),
            bias.has_value() ? std::optional<at::Tensor>(at::zeros_like(*bias)) : std::nullopt};
  const auto scale = row_scale(grad_output, a.target, ignore_index, r, at::toOpMathType(input.scalar_type()), op,
                               a.class_weights, a.label_smoothing);
  auto [losses, grad_input, grad_weight, grad_bias] = linear_cross_entropy_chunks<Backend>(a, scale);
  return {grad_input, grad_weight, grad_bias};
}

template <class Backend>
void register_cross_entropy(torch::Library& m) {
  m.impl("cross_entropy", &cross_entropy_forward<Backend>);
  m.impl("cross_entropy_backward", &cross_entropy_backward<Backend>);
  m.impl("fused_linear_cross_entropy", &fused_linear_cross_entropy<Backend>);
  m.impl("fused_linear_cross_entropy_backward", &fused_linear_cross_entropy_backward<Backend>);
}

}  // namespace torch_vjp
