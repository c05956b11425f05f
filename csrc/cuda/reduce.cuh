// All-reductions of any statistic V (a float, a (max, Σexp) pair, a struct of several sums) over a group of
// threads: part of a warp, a block, or a thread-block cluster (sm_90).
//
// Assumptions:
//   - V is trivially copyable and sizeof(V) is a multiple of 4 (it travels through shuffles word by word);
//     `op` is associative, and op(identity, v) == v exactly.
//   - One-dimensional blocks; blockDim.x is a multiple of 32 and at most 1024.
//   - Every function is called by all threads of the block (cluster_allreduce: of every block of the
//     cluster), in uniform control flow: they contain shuffles with the full mask and barriers.
//   - On return EVERY thread of a group holds the group's result, with the same bits in every thread: each
//     stage broadcasts one thread's value (a butterfly alone can leave lanes differing in the last bit where
//     op is not bitwise commutative, e.g. an FMA-contracted online merge); so every thread may use the
//     result to compute outputs that must agree across the row (a softmax row summing to 1).
//   - block_allreduce_columns uses a static shared buffer of 32 · kSlots values (one instance per V, kSlots
//     and kCols) and opens with a barrier, so back-to-back calls are safe. cluster_allreduce_columns uses
//     a static buffer of 2 · kSlots values per block, alternated by `parity` (flip it on every call): a
//     block writes its half for call i only after the cluster barrier of call i - 1, which every reader of
//     call i - 2 has passed. A kernel that calls it must end with cluster_sync() so that no block exits while
//     another still reads its shared memory.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>
#endif

#include "cuda/vec.cuh"

namespace torch_vjp::cuda {

// max that propagates NaN from either side. float: one FMNMX.NAN (max.NaN.f32, sm_80 on) instead of two
// compares and a select per element.
template <class S>
__device__ __forceinline__ S max_nan(S a, S b) {
  return (a != a || a > b) ? a : b;
}
template <>
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a != a || a > b) ? a : b;
#endif
}

template <class S>
__device__ __forceinline__ S neg_inf() {
  return -S(INFINITY);
}

// Partial of the online softmax reduction: m = max, s = Σ exp(x - m) over the elements seen so far.
template <class S>
struct MaxSum {
  S m, s;
};

template <class V>
__device__ __forceinline__ V shfl_xor_any(const V& v, int lane_mask) {
  static_assert(sizeof(V) % 4 == 0, "a statistic travels through shuffles as 32-bit words");
  uint32_t w[sizeof(V) / 4];
  std::memcpy(w, &v, sizeof(V));
#pragma unroll
  for (int i = 0; i < int(sizeof(V) / 4); ++i) w[i] = __shfl_xor_sync(kFullMask, w[i], lane_mask);
  V r;
  std::memcpy(&r, w, sizeof(V));
  return r;
}

// The value of lane `src` of this lane's aligned segment of `width` lanes.
template <class V>
__device__ __forceinline__ V shfl_any(const V& v, int src, int width = kWarpSize) {
  uint32_t w[sizeof(V) / 4];
  std::memcpy(w, &v, sizeof(V));
#pragma unroll
  for (int i = 0; i < int(sizeof(V) / 4); ++i) w[i] = __shfl_sync(kFullMask, w[i], src, width);
  V r;
  std::memcpy(&r, w, sizeof(V));
  return r;
}

// Groups of `width` consecutive lanes (a power of two, at most 32): every lane gets its group's result.
template <class V, class Op>
__device__ __forceinline__ V group_allreduce(V v, const Op& op, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) v = op(v, shfl_xor_any(v, offset));
  return shfl_any(v, 0, width);
}

// Block-wide, in groups by column: threads t with the same t % W (W a power of two, at most 32) form a
// group, and each thread holds kCols values, one per column it covers (W · kCols <= kSlots <= 32). W = 1,
// kCols = 1 is the whole block as one group. Every thread gets, per column, its group's result.
template <int kSlots, int kCols, class V, class Op>
__device__ __forceinline__ void block_allreduce_columns(V (&v)[kCols], const Op& op, V identity, int W) {
  static_assert(kCols <= kSlots && kSlots <= kWarpSize, "at most 32 column slots per warp");
  __shared__ V partials[kWarpSize * kSlots];  // [warp][column slot tx · kCols + c]
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  const int tx = lane % W;
#pragma unroll
  for (int c = 0; c < kCols; ++c)
    for (int offset = W; offset < kWarpSize; offset *= 2) v[c] = op(v[c], shfl_xor_any(v[c], offset));
  __syncthreads();  // the previous call's readers are done with `partials`
  if (lane < W) {  // lane tx holds its column group's warp result: one writer per warp and column
#pragma unroll
    for (int c = 0; c < kCols; ++c) partials[warp * kSlots + lane * kCols + c] = v[c];
  }
  __syncthreads();
  // The 32 / W lanes of a column combine warps lane / W, lane / W + 32 / W, ..., then a butterfly among them.
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    V acc = identity;
    for (int w = lane / W; w < num_warps; w += kWarpSize / W) acc = op(acc, partials[w * kSlots + tx * kCols + c]);
    for (int offset = W; offset < kWarpSize; offset *= 2) acc = op(acc, shfl_xor_any(acc, offset));
    v[c] = shfl_any(acc, tx);
  }
}

struct ClusterInfo {
  int rank, size;  // this block's rank in its cluster, and the cluster's size in blocks (1: no cluster)
};

__device__ __forceinline__ ClusterInfo cluster_info() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  return {static_cast<int>(cluster.block_rank()), static_cast<int>(cluster.num_blocks())};
#else
  return {0, 1};
#endif
}

__device__ __forceinline__ void cluster_sync(const ClusterInfo& cluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cluster.size > 1) cooperative_groups::this_cluster().sync();
#endif
}

// After block_allreduce_columns (every thread holds its block's result per column): the same across the
// blocks of the cluster, through distributed shared memory. A no-op without a cluster (and before sm_90,
// where the host never launches one).
template <int kSlots, int kCols, class V, class Op>
__device__ __forceinline__ void cluster_allreduce_columns(V (&v)[kCols], const Op& op, int W,
                                                          const ClusterInfo& info, int parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (info.size == 1) return;
  __shared__ V slots[2 * kSlots];  // [parity][tx · kCols + c]: this block's results
  V* mine = slots + parity * kSlots;
  const int tx = threadIdx.x % W;
  if (threadIdx.x < W) {  // lanes 0..W-1 of warp 0: one per column slot
#pragma unroll
    for (int c = 0; c < kCols; ++c) mine[tx * kCols + c] = v[c];
  }
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  cluster.sync();
  // Every thread combines the blocks' results in rank order: the same bits in every block.
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    V acc = *cluster.map_shared_rank(mine + tx * kCols + c, 0);
    for (int r = 1; r < info.size; ++r) acc = op(acc, *cluster.map_shared_rank(mine + tx * kCols + c, r));
    v[c] = acc;
  }
#endif
}

}  // namespace torch_vjp::cuda
