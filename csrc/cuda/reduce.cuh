// Warp and block all-reductions: sum and max in float/double, and the online (max, Σexp) pair of
// math/softmax.h.
//
// Assumptions:
//   - One-dimensional blocks (threadIdx.x only); blockDim.x is a multiple of 32 and at most 1024, so every
//     warp is full and the 32 shuffle lanes are all active (full mask).
//   - warp_allreduce: called by all 32 lanes of a warp, in warp-uniform control flow. Every lane gets the
//     result: an xor butterfly, then lane 0's value is broadcast, so all lanes hold the same bits even
//     where the operation is not exactly commutative (online_merge's products may be contracted to FMAs
//     in either order).
//   - block_allreduce: called by every thread of the block, in block-uniform control flow (it contains
//     __syncthreads). Every thread gets the result: each warp writes its partial to shared memory, and
//     every warp then reduces all the partials itself (same data, same operations, so the same bits in
//     every warp).
//     It opens with a __syncthreads, so it may be called back to back (even with the same V and Op, which
//     share one shared buffer): a later call cannot overwrite partials an earlier call is still reading.
//   - The shared buffer is static (__shared__ in the function, 32 values per instantiation), so it adds to
//     the kernel's static shared memory, not to the dynamic shared memory the caller sizes.
#pragma once

#include <cmath>

#include "math/softmax.h"

namespace torch_vjp::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// max that propagates NaN and is symmetric (max_nan(a, b) == max_nan(b, a) for non-zero operands).
template <class S>
__device__ __forceinline__ S max_nan(S a, S b) {
  return (a != a || a > b) ? a : b;
}

template <class S>
__device__ __forceinline__ S neg_inf() {
  return -S(INFINITY);
}

// Partial of the online softmax reduction: m = max, s = Σ exp(x - m) over the elements seen so far.
// The empty partial is {-inf, 0}; math::online_merge leaves the other side unchanged when merging it.
template <class S>
struct MaxSum {
  S m, s;
};

struct SumOp {
  template <class S>
  __device__ __forceinline__ S operator()(S a, S b) const { return a + b; }
};

struct MaxOp {
  template <class S>
  __device__ __forceinline__ S operator()(S a, S b) const { return max_nan(a, b); }
};

struct OnlineMergeOp {
  template <class S>
  __device__ __forceinline__ MaxSum<S> operator()(MaxSum<S> a, MaxSum<S> b) const {
    math::online_merge(a.m, a.s, b.m, b.s);
    return a;
  }
};

__device__ __forceinline__ float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(kFullMask, v, lane_mask); }
__device__ __forceinline__ double shfl_xor(double v, int lane_mask) { return __shfl_xor_sync(kFullMask, v, lane_mask); }
template <class S>
__device__ __forceinline__ MaxSum<S> shfl_xor(MaxSum<S> v, int lane_mask) {
  return {shfl_xor(v.m, lane_mask), shfl_xor(v.s, lane_mask)};
}
__device__ __forceinline__ float shfl(float v, int lane) { return __shfl_sync(kFullMask, v, lane); }
__device__ __forceinline__ double shfl(double v, int lane) { return __shfl_sync(kFullMask, v, lane); }
template <class S>
__device__ __forceinline__ MaxSum<S> shfl(MaxSum<S> v, int lane) {
  return {shfl(v.m, lane), shfl(v.s, lane)};
}

template <class V, class Op>
__device__ __forceinline__ V warp_allreduce(V v, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = op(v, shfl_xor(v, offset));
  return shfl(v, 0);
}

// `identity` pads the partials of the warps that do not exist (lanes >= blockDim.x / 32).
template <class V, class Op>
__device__ __forceinline__ V block_allreduce(V v, Op op, V identity) {
  __shared__ V partials[kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  v = warp_allreduce(v, op);
  __syncthreads();  // the previous call's readers are done with `partials`
  if (lane == 0) partials[warp] = v;
  __syncthreads();
  v = lane < num_warps ? partials[lane] : identity;
  return warp_allreduce(v, op);
}

template <class S>
__device__ __forceinline__ S warp_sum(S v) { return warp_allreduce(v, SumOp{}); }
template <class S>
__device__ __forceinline__ S warp_max(S v) { return warp_allreduce(v, MaxOp{}); }
template <class S>
__device__ __forceinline__ S block_sum(S v) { return block_allreduce(v, SumOp{}, S(0)); }
template <class S>
__device__ __forceinline__ S block_max(S v) { return block_allreduce(v, MaxOp{}, neg_inf<S>()); }
template <class S>
__device__ __forceinline__ MaxSum<S> block_online_merge(MaxSum<S> v) {
  return block_allreduce(v, OnlineMergeOp{}, MaxSum<S>{neg_inf<S>(), S(0)});
}

}  // namespace torch_vjp::cuda
