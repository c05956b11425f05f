// Launch-size helpers shared by the CUDA kernels (host side).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <climits>
#include <cstdint>

namespace torch_vjp::cuda {

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of kThreads threads of kKernel (no dynamic shared memory) resident on the current device at once:
// one full wave, the natural size of a grid-stride launch. Occupancy is computed once per kernel.
template <auto kKernel, int kThreads>
int64_t one_wave_blocks() {
  static const int per_sm = [] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kKernel, kThreads, 0));
    return std::max(blocks, 1);
  }();
  return int64_t(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Static shared memory of kKernel (the reduction buffers), to budget its dynamic shared memory.
template <auto kKernel>
size_t static_smem_bytes() {
  static const size_t bytes = [] {
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kKernel));
    return attr.sharedSizeBytes;
  }();
  return bytes;
}

// A grid dimension x: at least 1, at most `cap` and at most 2^31 - 1 (the hardware limit). Kernels
// launched with it loop (grid-stride) over whatever work exceeds the grid.
inline unsigned grid_blocks(int64_t blocks_needed, int64_t cap = INT_MAX) {
  return static_cast<unsigned>(std::clamp<int64_t>(blocks_needed, 1, std::min<int64_t>(cap, INT_MAX)));
}

}  // namespace torch_vjp::cuda
