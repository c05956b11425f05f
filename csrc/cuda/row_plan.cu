// torch.ops.torch_vjp_cuda.row_plan: the row engine's plan for an op on the current device (cuda/plan.h), so
// that tests assert the kernel path a shape reaches instead of assuming it. CUDA builds only; its own
// namespace, so that torch.ops.torch_vjp holds exactly the ops of the op table.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdint>
#include <string_view>
#include <tuple>

#include "cuda/plan.h"

namespace torch_vjp::cuda {
namespace {

// (path, threads a block, blocks a cluster, chunks a row, packs a thread) for `op` (a registered op's name:
// softmax, ..., cross_entropy_backward) over (outer, n, inner) elements of `dtype`, reduced along n, with
// 16-byte aligned tensors.
std::tuple<std::string_view, int64_t, int64_t, int64_t, int64_t> row_plan(std::string_view op, int64_t outer, int64_t n,
                                                                          int64_t inner, c10::ScalarType dtype) {
  TORCH_CHECK(outer > 0 && n > 0 && inner > 0, "torch_vjp_cuda.row_plan: expected positive sizes, got (", outer, ", ",
              n, ", ", inner, ")");
  Plan plan{};
  bool found = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "torch_vjp_cuda_row_plan", [&] {
    const RowLayout l{outer, n, inner};
    found = softmax_plan<scalar_t>(op, l, plan) || norm_plan<scalar_t>(op, l, plan) ||
            cross_entropy_plan<scalar_t>(op, l, plan);
  });
  TORCH_CHECK(found, "torch_vjp_cuda.row_plan: no row-engine kernel for op '", op, "'");
  return {plan_path(plan), plan.threads, plan.cluster, plan.chunks, plan.V};
}

}  // namespace
}  // namespace torch_vjp::cuda

TORCH_LIBRARY(torch_vjp_cuda, m) {
  m.def("row_plan(str op, int outer, int n, int inner, ScalarType dtype) -> (str, int, int, int, int)",
        &torch_vjp::cuda::row_plan);
}
