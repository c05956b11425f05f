// Host-side launch helpers shared by the CUDA kernels: sizes, occupancy, and launches (plain or as
// thread-block clusters), every one checked.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "cuda/plan_rows.h"

namespace torch_vjp::cuda {

// ceil_div, round_up, pow2_ceil: cuda/plan_rows.h.

// A grid dimension x: at least 1, at most `cap` and at most 2^31 - 1 (the hardware limit). Kernels launched
// with it loop (grid-stride) over whatever work exceeds the grid.
inline unsigned grid_blocks(int64_t blocks_needed, int64_t cap = INT_MAX) {
  return static_cast<unsigned>(std::clamp<int64_t>(blocks_needed, 1, std::min<int64_t>(cap, INT_MAX)));
}

// TORCH_VJP_DISABLE_CLUSTERS=1 (any value but empty or "0"), read once per process: plan as on sm_80, never
// a cluster, so that a Hopper GPU (the only kind we may be lent) also runs the block and split paths that
// sm_80 takes for rows too long for one block.
inline bool clusters_disabled() {
  static const bool disabled = [] {
    const char* v = std::getenv("TORCH_VJP_DISABLE_CLUSTERS");
    return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
  }();
  return disabled;
}

// The device has thread-block clusters (sm_90+) and they are not disabled; cluster_fits also asks whether a
// kernel's code uses them.
inline bool has_clusters() { return !clusters_disabled() && at::cuda::getCurrentDeviceProperties()->major >= 9; }

// A launch configuration for clusters of `cluster` blocks along x; `attribute` is storage it points to.
inline cudaLaunchConfig_t cluster_config(dim3 grid, int threads, int cluster, cudaStream_t stream,
                                         cudaLaunchAttribute& attribute) {
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(cluster);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return config;
}

// Whether `kernel`'s device code was generated for sm_90 or later, where the cluster primitives of
// cuda/reduce.cuh exist: a build for 8.0+PTX JIT-compiled on a Hopper GPU has them as no-ops (each block
// its own cluster of 1), so clusters must not be planned for it. ptxVersion is the virtual architecture the
// code was generated for, whichever card runs it: a 9.0+PTX build JIT-compiled on a Blackwell GPU (sm_100,
// sm_120, which have clusters too) reports 90 and plans clusters, whose fit resident_blocks then asks the
// driver about on that card.
template <class Kernel>
bool cluster_code(Kernel kernel) {
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  return attributes.ptxVersion >= 90;
}

// Blocks of `kernel` (no dynamic shared memory) that the current device holds at once when launched with
// `threads` threads a block, in clusters of `cluster` blocks when cluster > 1: one full wave. 0 when such
// clusters cannot run at all (a partitioned GPU may not run them, nor code built for an earlier
// architecture). Asked once per device, kernel and shape, and remembered only when the driver answered: a
// failed query (a transient error) reads as 0 this time and is asked again next time, so one failure cannot
// turn clusters off (and change the fused parameter sums' slot count) for the life of the process.
// Thread-safe.
template <class Kernel>
int64_t resident_blocks(Kernel kernel, int threads, int cluster) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int, int>, int64_t> known;
  const auto key = std::make_tuple(int(c10::cuda::current_device()), reinterpret_cast<const void*>(kernel), threads, cluster);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(key);
  if (found != known.end()) return found->second;
  int64_t blocks = 0;
  if (cluster <= 1) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
    blocks = int64_t(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  } else if (!cluster_code(kernel)) {
    blocks = 0;
  } else {
    cudaLaunchAttribute attribute;
    const cudaLaunchConfig_t config = cluster_config(dim3(cluster), threads, cluster, nullptr, attribute);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
      (void)cudaGetLastError();  // "cannot" is an answer here, not an error to report later
      return 0;                  // not cached: see above
    }
    blocks = int64_t(clusters) * cluster;
  }
  return known[key] = blocks;
}

// Blocks of kThreads threads of kKernel resident on the current device at once (at least one a
// multiprocessor): one full wave, the natural size of a grid-stride launch.
template <auto kKernel, int kThreads>
int64_t one_wave_blocks() {
  return std::max<int64_t>(resident_blocks(kKernel, kThreads, 1), at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

// Whether the current device can run clusters of `cluster` blocks of `threads` threads of `kernel` at all.
template <class Kernel>
bool cluster_fits(Kernel kernel, int threads, int cluster) {
  return resident_blocks(kernel, threads, cluster) > 0;
}

// kernel<<<grid, threads>>>(args...) on the current stream, as clusters of `cluster` blocks along x when
// cluster > 1 (grid.x a multiple of it); checked.
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, int threads, int cluster, Args&&... args) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (cluster <= 1) {
    kernel<<<grid, threads, 0, stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = cluster_config(grid, threads, cluster, stream, attribute);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace torch_vjp::cuda
