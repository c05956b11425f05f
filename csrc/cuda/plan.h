// The row engine's plan (cuda/row_engine.cuh: which kernel, which shape), host side only, and the queries that
// report the plan an op would run with, so that tests can assert the path they reach
// (torch.ops.torch_vjp_cuda.row_plan, csrc/cuda/row_plan.cu).
#pragma once

#include <cstdint>
#include <string_view>

#include "cuda/plan_rows.h"  // Plan, plan_path, plan_rows, plan_columns
#include "ops/softmax.h"     // RowLayout

namespace torch_vjp::cuda {

// The plan the kernel of `op` runs with over layout l on the current device, for 16-byte aligned tensors, or
// false if this family has no such op. Each is defined where its kernels are compiled (the plan asks the
// kernels whether a cluster fits), for T = float, double, c10::Half, c10::BFloat16:
//   softmax_plan        softmax, log_softmax, logsumexp, and each with _backward    (softmax_<dtype>.cu)
//   norm_plan           layer_norm, rms_norm, normalize, and each with _backward    (norm_<dtype>.cu); a norm's
//                       backward: the kernel that writes dx when weight and bias gradients are wanted too
//   cross_entropy_plan  cross_entropy, cross_entropy_backward                        (cross_entropy.cu)
template <class T>
bool softmax_plan(std::string_view op, const RowLayout& l, Plan& plan);
template <class T>
bool norm_plan(std::string_view op, const RowLayout& l, Plan& plan);
template <class T>
bool cross_entropy_plan(std::string_view op, const RowLayout& l, Plan& plan);

}  // namespace torch_vjp::cuda
