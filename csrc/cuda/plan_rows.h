// The row engine's planning arithmetic (cuda/row_engine.cuh: which kernel path, which block and cluster sizes),
// host code with no CUDA or torch dependency: nvcc compiles it into the library, and the plan tests
// (benchmarks/plans.py, tests/test_cuda_static.py) compile it with the host compiler alone, so that the plans
// of the benchmark shapes on an A100, H100 and H200 are checked on a machine without a GPU.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__CUDACC__)
#define TORCH_VJP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TORCH_VJP_HOST_DEVICE inline
#endif

namespace torch_vjp::cuda {

constexpr int kWarpSize = 32;
// column_kernel's largest block, and the blocks an SM its launch bound asks for: two, so that one loads its
// tile while the other reduces (one 512-thread block an SM alternated the two). The vectorised kernel (kVec,
// P statistics a thread: 84-105 registers on sm_90) takes blocks of up to 256 threads (128 registers), the
// other up to 512 (64 registers).
constexpr int kColumnMaxThreads = 512;
constexpr int kColumnVecMaxThreads = 256;
constexpr int kColumnMinBlocks = 2;
TORCH_VJP_HOST_DEVICE constexpr int column_max_threads(bool vec) { return vec ? kColumnVecMaxThreads : kColumnMaxThreads; }
constexpr int kSubWarpThreads = 256;    // row_kernel with G <= 32 lanes a row: 256 / G rows a block
constexpr int kSplitMinThreads = 128;   // the smallest chunk of a split row, in threads

TORCH_VJP_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
TORCH_VJP_HOST_DEVICE int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

inline int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

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

// inner == 1. P: elements a pack; Vmax: kRowPacks; max_threads: a block's threads at most (Op::kMaxThreads);
// cluster_threads: with clusters, the block size above which a row takes a cluster, and a cluster block's
// largest (Op::kClusterThreads: the cluster instance's launch bound); sms: multiprocessors; clusters:
// sm_90 clusters usable; max_off: the largest grid offset of a row start (every row's when n % P == 0, else
// up to P - 1).
inline Plan plan_rows(int64_t rows, int64_t n, int P, int Vmax, int max_threads, int cluster_threads, int sms,
                      bool clusters, int max_off) {
  const int64_t packs = ceil_div(n + max_off, P);  // packs a row touches, at most
  if (packs <= int64_t(kWarpSize) * Vmax) {
    // Shuffles only. Up to 32 packs: one pack a lane, the fewest lanes that hold the row (several rows a
    // warp); longer rows: a warp, with the fewest packs a lane that hold it.
    const int V = packs <= kWarpSize ? 1 : static_cast<int>(pow2_ceil(ceil_div(packs, kWarpSize)));
    const int G = packs <= kWarpSize ? static_cast<int>(pow2_ceil(packs)) : kWarpSize;
    const int threads = static_cast<int>(std::clamp<int64_t>(round_up(rows * G, kWarpSize), kWarpSize, kSubWarpThreads));
    return {V, false, true, threads, G, 1, 1, 0, ceil_div(rows, threads / G)};
  }
  const int64_t width = ceil_div(packs, Vmax);  // threads that hold the row at Vmax packs each
  int cluster = 0;
  if (width <= (clusters ? cluster_threads : max_threads)) cluster = 1;
  // A cluster's blocks hold at most cluster_threads (the cluster instance's launch bound): rows longer than 8
  // such blocks are split.
  else if (clusters && width <= 8 * int64_t(cluster_threads)) cluster = static_cast<int>(ceil_div(width, cluster_threads));
  // Too few rows to give every SM a block: split long rows into more, smaller pieces (the tensor is then
  // small, so phase 2's re-read comes from L2).
  const bool few = rows * cluster < sms / 2 && packs >= 4 * int64_t(kSplitMinThreads) * Vmax;
  if (cluster > 0 && !few) {
    const int threads = static_cast<int>(round_up(ceil_div(width, cluster), kWarpSize));
    return {Vmax, false, true, threads, threads, cluster, 1, 0, rows * cluster};
  }
  const int64_t least = ceil_div(packs, int64_t(max_threads) * Vmax);
  const int64_t most = std::max(least, ceil_div(packs, int64_t(kSplitMinThreads) * Vmax));
  const int64_t chunks0 = std::min(most, std::max(least, ceil_div(2 * int64_t(sms), rows)));
  const int threads = static_cast<int>(round_up(ceil_div(ceil_div(packs, chunks0), Vmax), kWarpSize));
  const int64_t chunk_len = int64_t(threads) * Vmax;
  const int64_t chunks = ceil_div(packs, chunk_len);
  return {Vmax, false, true, threads, threads, 1, chunks, chunk_len, rows};
}

// inner > 1. vec: inner % P == 0 and every pointer 16-byte aligned.
inline Plan plan_columns(int64_t outer, int64_t n, int64_t inner, int P, int V, bool vec, int sms, bool clusters) {
  const int Pe = vec ? P : 1;
  const int max_threads = column_max_threads(vec);
  const int64_t col_packs = outer * inner / Pe;
  const int64_t rows_threads = ceil_div(n, V);  // threads along n that hold a whole column
  // Widest slot count first (W · Pe <= 32: the reduction's shared buffer; wider tiles, longer contiguous
  // segments a row), narrowing to fit n on chip; at least 32 bytes a row segment (a sector).
  const int widest = static_cast<int>(std::min<int64_t>(pow2_ceil(col_packs), vec ? std::min(32 / Pe, 8) : 32));
  const int narrowest = std::min(widest, vec ? 2 : 2 * P);  // 32 bytes: 2 packs, or 2P elements of 16 / P bytes
  for (int W = widest; W >= narrowest; W /= 2) {
    const int64_t threads_needed = round_up(rows_threads * W, kWarpSize);
    int cluster = 0;
    if (threads_needed <= max_threads) cluster = 1;
    else if (clusters && threads_needed <= 8 * max_threads) cluster = static_cast<int>(ceil_div(threads_needed, max_threads));
    if (cluster == 0) continue;
    const int64_t tiles = ceil_div(col_packs, W);
    if (tiles * cluster < sms / 2 && n >= 4 * int64_t(kSplitMinThreads / W) * V) break;  // few tiles: split along n
    const int threads = static_cast<int>(round_up(ceil_div(rows_threads, cluster) * W, kWarpSize));
    return {V, true, vec, threads, W, cluster, 1, 0, tiles * cluster};
  }
  // Split along n, at the widest tile: chunks of H·V rows, enough chunks to give every SM work.
  const int W = widest;
  const int64_t tiles = ceil_div(col_packs, W);
  const int64_t least = ceil_div(n, int64_t(max_threads / W) * V);
  const int64_t most = std::max(least, ceil_div(n, int64_t(std::max(1, kSplitMinThreads / W)) * V));
  const int64_t chunks0 = std::min(most, std::max(least, ceil_div(2 * int64_t(sms), tiles)));
  const int threads = static_cast<int>(round_up(ceil_div(ceil_div(n, chunks0), V) * W, kWarpSize));
  const int64_t chunk_len = int64_t(threads / W) * V;
  const int64_t chunks = ceil_div(n, chunk_len);
  return {V, true, vec, threads, W, 1, chunks, chunk_len, tiles};
}

}  // namespace torch_vjp::cuda
