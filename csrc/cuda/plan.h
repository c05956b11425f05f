// The row engine's plan (cuda/row_engine.cuh: which kernel, which shape), host side only, and the queries that
// report the plan an op would run with, so that tests can assert the path they reach
// (torch.ops.torch_vjp_cuda.row_plan, csrc/cuda/row_plan.cu).
#pragma once

#include <cstdint>
#include <string_view>

#include "ops/softmax.h"  // RowLayout

namespace torch_vjp::cuda {

struct Plan {
  int V;               // packs per thread per input (the kernel instance)
  bool column, vec;    // column_kernel (and its kVec); else row_kernel
  int threads;         // per block
  int lanes;           // G (row) or W (column)
  int cluster;         // blocks per cluster along x (1: none)
  int64_t chunks;      // split: chunks per row (column), along y; 1 otherwise
  int64_t chunk_len;   // split: packs (row) / rows (column) per chunk
  int64_t blocks;      // grid x wanted: row groups or tiles, times the cluster (the kernels loop over the
                       // rest beyond 2^31 - 1, and over chunks beyond 65535)
};

// The path's name, as the engine's header names them: "rows_per_warp" (G < 32 lanes a row), "warp", "block",
// "cluster", "split" (rows along the last dim); "column", "column_cluster", "column_split" (another dim).
inline const char* plan_path(const Plan& p) {
  if (p.column) return p.chunks > 1 ? "column_split" : p.cluster > 1 ? "column_cluster" : "column";
  if (p.chunks > 1) return "split";
  if (p.cluster > 1) return "cluster";
  if (p.lanes < 32) return "rows_per_warp";
  return p.lanes == 32 ? "warp" : "block";
}

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
