// Losses, CUDA backend: cross-entropy's row kernels (cuda/cross_entropy_epilogues.cuh) for the frontends of
// ops/cross_entropy.h (cross_entropy, and fused_linear_cross_entropy's chunks), and the size of one chunk of
// logits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "cuda/cross_entropy_epilogues.cuh"
#include "ops/cross_entropy.h"

namespace torch_vjp::cuda {
namespace {

// The weighted gradient's own fields (the common ones are set by the caller).
template <class T>
WeightedCrossEntropyGrad<T> weighted_grad(double smoothing, const SmoothingWeights& weights) {
  using S = Opmath<T>;
  TORCH_CHECK(weights.weight.numel() <= INT_MAX, "torch_vjp.cross_entropy: class weights with label smoothing take at "
              "most 2^31 - 1 classes on CUDA, got ", weights.weight.numel());
  WeightedCrossEntropyGrad<T> op{};
  op.smoothing = static_cast<S>(smoothing);
  op.class_weight = weights.weight.const_data_ptr<S>();
  op.row_weight = weights.row_weight.const_data_ptr<S>();
  op.weight_total = weights.total.const_data_ptr<S>();
  return op;
}

struct CudaCrossEntropy {
  // x (rows, C) contiguous, target (rows,) int64; loss, row_max and log_sum (rows,) in the compute type.
  // weights: class weights with smoothing (ops/cross_entropy.h's SmoothingWeights), or undefined.
  static void cross_entropy_rows(const at::Tensor& x, const at::Tensor& target, int64_t ignore_index, double smoothing,
                                 const SmoothingWeights& weights, const at::Tensor& loss, const at::Tensor& row_max,
                                 const at::Tensor& log_sum) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_vjp_cross_entropy_cuda", [&] {
      const auto run = [&](auto op) {
        using Op = decltype(op);
        using S = typename Op::S;
        op.logits = x.const_data_ptr<scalar_t>();
        op.target = target.const_data_ptr<int64_t>();
        op.ignore_index = ignore_index;
        op.classes = x.size(1);
        op.smoothing = static_cast<S>(smoothing);
        op.per_class = static_cast<S>(smoothing / static_cast<double>(op.classes));
        Operands<Op> ops;
        ops.in[0] = op.logits;
        ops.row_out[0] = loss.mutable_data_ptr<S>();
        ops.row_out[1] = row_max.mutable_data_ptr<S>();
        ops.row_out[2] = log_sum.mutable_data_ptr<S>();
        run_rows(op, RowLayout{x.size(0), x.size(1), 1}, ops);
      };
      if (weights.defined()) {
        using S = Opmath<scalar_t>;
        WeightedCrossEntropyForward<scalar_t> op{};
        op.class_weight = weights.weight.const_data_ptr<S>();
        op.row_weight = weights.row_weight.const_data_ptr<S>();
        op.weight_total = weights.total.const_data_ptr<S>();
        run(op);
      } else if (smoothing > 0) {
        run(CrossEntropyForward<scalar_t, true>{});
      } else {
        run(CrossEntropyForward<scalar_t, false>{});
      }
    });
  }

  // dx = x allowed (written in place).
  static void cross_entropy_grad_rows(const at::Tensor& x, const at::Tensor& target, const at::Tensor& row_max,
                                      const at::Tensor& log_sum, const at::Tensor& scale, int64_t ignore_index,
                                      double smoothing, const SmoothingWeights& weights, const at::Tensor& dx) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_vjp_cross_entropy_grad_cuda", [&] {
      const int64_t classes = x.size(1);
      const auto run = [&](auto op) {
        using Op = decltype(op);
        using S = typename Op::S;
        op.target = target.const_data_ptr<int64_t>();
        op.ignore_index = ignore_index;
        op.classes = classes;
        op.per_class = static_cast<S>(smoothing / static_cast<double>(classes));
        op.per_class_target = static_cast<S>(smoothing / static_cast<double>(classes) + (1.0 - smoothing));
        Operands<Op> ops;
        ops.in[0] = x.const_data_ptr<scalar_t>();
        ops.out = dx.mutable_data_ptr<scalar_t>();
        ops.row_in[0] = row_max.const_data_ptr<S>();
        ops.row_in[1] = log_sum.const_data_ptr<S>();
        ops.row_in[2] = scale.const_data_ptr<S>();
        run_rows(op, RowLayout{x.size(0), classes, 1}, ops);
      };
      if (weights.defined()) {
        run(weighted_grad<scalar_t>(smoothing, weights));
      } else {
        run(CrossEntropyGrad<scalar_t>{});
      }
    });
  }

  // Both in one kernel (CrossEntropyForwardGrad): loss, row_max, log_sum and dx from one read of x, with the
  // bits of cross_entropy_rows followed by cross_entropy_grad_rows. dx = x allowed (written in place).
  static void cross_entropy_with_grad_rows(const at::Tensor& x, const at::Tensor& target, int64_t ignore_index,
                                           double smoothing, const SmoothingWeights& weights, const at::Tensor& scale,
                                           const at::Tensor& loss, const at::Tensor& row_max, const at::Tensor& log_sum,
                                           const at::Tensor& dx) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_vjp_cross_entropy_with_grad_cuda", [&] {
      const auto run = [&](auto op) {
        using Op = decltype(op);
        using S = typename Op::S;
        const int64_t classes = x.size(1);
        op.forward.target = target.const_data_ptr<int64_t>();
        op.forward.ignore_index = ignore_index;
        op.forward.classes = classes;
        op.forward.smoothing = static_cast<S>(smoothing);
        op.forward.per_class = static_cast<S>(smoothing / static_cast<double>(classes));
        if constexpr (std::is_same_v<Op, WeightedCrossEntropyForwardGrad<scalar_t>>) {
          op.forward.class_weight = weights.weight.const_data_ptr<S>();
          op.forward.row_weight = weights.row_weight.const_data_ptr<S>();
          op.forward.weight_total = weights.total.const_data_ptr<S>();
          op.grad = weighted_grad<scalar_t>(smoothing, weights);
          op.grad.target = op.forward.target;
          op.grad.ignore_index = ignore_index;
          op.grad.classes = classes;
          op.grad.per_class = op.forward.per_class;
        } else {
          op.per_class_target = static_cast<S>(smoothing / static_cast<double>(classes) + (1.0 - smoothing));
        }
        Operands<Op> ops;
        ops.in[0] = x.const_data_ptr<scalar_t>();
        ops.out = dx.mutable_data_ptr<scalar_t>();
        ops.row_in[0] = scale.const_data_ptr<S>();
        ops.row_out[0] = loss.mutable_data_ptr<S>();
        ops.row_out[1] = row_max.mutable_data_ptr<S>();
        ops.row_out[2] = log_sum.mutable_data_ptr<S>();
        run_rows(op, RowLayout{x.size(0), classes, 1}, ops);
      };
      if (weights.defined()) run(WeightedCrossEntropyForwardGrad<scalar_t>{});
      else if (smoothing > 0) run(CrossEntropyForwardGrad<scalar_t, true>{});
      else run(CrossEntropyForwardGrad<scalar_t, false>{});
    });
  }

  // The logits of one chunk of fused_linear_cross_entropy: 112 MiB, whatever memory is free (a chunk sized from
  // free memory made the gradient's bits depend on it: the chunks decide the order of the fp32 sums). The size
  // keeps the reference case (8192 tokens × hidden 4096 × vocab 128256, bf16, on an H200) near its memory
  // target beyond the inputs: grad_input (64 MiB) + one chunk of 456 rows (111.6 MiB) + per-row values, beside
  // grad_weight (ops/cross_entropy.h accumulates it in float32, 2,004 MiB, then rounds it to the weight's
  // dtype, 1,002 MiB); and 456 rows still keep the three matrix products compute-bound (each reads the whole
  // weight once per chunk: about 2·rows flops a byte of weight, against an H200's ~200 flops a byte of
  // bandwidth).
  // softcap and the z-loss run around these kernels (ops/cross_entropy.h), not in them yet.
  static constexpr bool kFusesOptions = false;
  static constexpr int64_t kChunkBytes = int64_t(112) << 20;
};

}  // namespace

// The plan of each kernel (cuda/plan.h); the forward's with and without smoothing are the same, and the fused
// kernel's (fused_linear_cross_entropy's chunks of logits with the gradient) is the forward's.
template <class T>
bool cross_entropy_plan(std::string_view op, const RowLayout& l, Plan& plan) {
  if (op == "cross_entropy") plan = engine_plan<CrossEntropyForward<T, false>>(l);
  else if (op == "cross_entropy_backward") plan = engine_plan<CrossEntropyGrad<T>>(l);
  else if (op == "fused_linear_cross_entropy") plan = engine_plan<CrossEntropyForwardGrad<T, false>>(l);  // a chunk's
  else return false;
  return true;
}
template bool cross_entropy_plan<float>(std::string_view, const RowLayout&, Plan&);
template bool cross_entropy_plan<double>(std::string_view, const RowLayout&, Plan&);
template bool cross_entropy_plan<c10::Half>(std::string_view, const RowLayout&, Plan&);
template bool cross_entropy_plan<c10::BFloat16>(std::string_view, const RowLayout&, Plan&);

}  // namespace torch_vjp::cuda

TORCH_LIBRARY_IMPL(torch_vjp, CUDA, m) { torch_vjp::register_cross_entropy<torch_vjp::cuda::CudaCrossEntropy>(m); }
