// Losses, CUDA backend: cross-entropy's row kernels (cuda/cross_entropy_epilogues.cuh) for the frontends of
// ops/cross_entropy.h (cross_entropy, and fused_linear_cross_entropy's chunks), and the memory budget of one
// chunk of logits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/cross_entropy_epilogues.cuh"
#include "ops/cross_entropy.h"

namespace torch_vjp::cuda {
namespace {

struct CudaCrossEntropy {
  // x (rows, C) contiguous, target (rows,) int64; loss and lse (rows,) in the compute type.
  static void cross_entropy_rows(const at::Tensor& x, const at::Tensor& target, int64_t ignore_index, double smoothing,
                                 const at::Tensor& loss, const at::Tensor& lse) {
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
        ops.row_out[1] = lse.mutable_data_ptr<S>();
        run_rows(op, RowLayout{x.size(0), x.size(1), 1}, ops);
      };
      if (smoothing > 0) run(CrossEntropyForward<scalar_t, true>{});
      else run(CrossEntropyForward<scalar_t, false>{});
    });
  }

  // dx = x allowed (written in place).
  static void cross_entropy_grad_rows(const at::Tensor& x, const at::Tensor& target, const at::Tensor& lse,
                                      const at::Tensor& scale, int64_t ignore_index, double smoothing,
                                      const at::Tensor& dx) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_vjp_cross_entropy_grad_cuda", [&] {
      using Op = CrossEntropyGrad<scalar_t>;
      using S = typename Op::S;
      const int64_t classes = x.size(1);
      Op op;
      op.target = target.const_data_ptr<int64_t>();
      op.ignore_index = ignore_index;
      op.classes = classes;
      op.per_class = static_cast<S>(smoothing / static_cast<double>(classes));
      op.per_class_target = static_cast<S>(smoothing / static_cast<double>(classes) + (1.0 - smoothing));
      Operands<Op> ops;
      ops.in[0] = x.const_data_ptr<scalar_t>();
      ops.out = dx.mutable_data_ptr<scalar_t>();
      ops.row_in[0] = lse.const_data_ptr<S>();
      ops.row_in[1] = scale.const_data_ptr<S>();
      run_rows(op, RowLayout{x.size(0), classes, 1}, ops);
    });
  }

  // The logits of one chunk of fused_linear_cross_entropy: an eighth of the free device memory, at most
  // 112 MiB and at least 8 MiB. The cap keeps the reference case (8192 tokens × hidden 4096 × vocab 128256,
  // bf16, on an H200) within its memory target of 1,200 MiB beyond the inputs: grad_weight (1,002 MiB, in the
  // weight's dtype) + grad_input (64 MiB) + one chunk of 456 rows (111.6 MiB) + per-row values; and 456 rows
  // still keep the three matrix products compute-bound (each reads the whole weight once per chunk: about
  // 2·rows flops a byte of weight, against an H200's ~200 flops a byte of bandwidth).
  static int64_t chunk_budget_bytes(const at::Device& device) {
    const c10::cuda::CUDAGuard guard(device);
    size_t free = 0, total = 0;
    C10_CUDA_CHECK(cudaMemGetInfo(&free, &total));
    return std::clamp<int64_t>(static_cast<int64_t>(free / 8), int64_t(8) << 20, int64_t(112) << 20);
  }
};

}  // namespace
}  // namespace torch_vjp::cuda

TORCH_LIBRARY_IMPL(torch_vjp, CUDA, m) { torch_vjp::register_cross_entropy<torch_vjp::cuda::CudaCrossEntropy>(m); }
