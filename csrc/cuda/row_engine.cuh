// The row engine: one load / reduce / store skeleton for every op that, per row, reduces the row to a
// statistic and then maps it (softmax, log_softmax, logsumexp, layer_norm, rms_norm, normalize and
// cross_entropy). Each op supplies a small epilogue (the Op below), as ATen's SoftMax.cu does; the engine
// chooses the kernel shape from the row length, the number of rows, the layout and the device.
//
// ## Layout
// The tensor is viewed as (outer, n, inner) around the reduced dim (RowLayout); a row is x[o, 0:n, i].
// Every operand (element inputs, element output) is contiguous with that shape; per-row operands hold
// outer·inner values, row (o, i) at o·inner + i. Data pointers may have any (element) alignment.
//
// ## Paths (plan_rows, plan_columns)
// inner == 1, row_kernel<Op, V>: each thread holds V 16-byte packs of each element input in registers, so a
// row is read once and written once whatever its length. P = 16 / sizeof(T) elements a pack; V is at most
// kRowPacks (8 packs for one float input, 32 elements; else 4 packs: 32 elements of a half type, 8 of
// double, and 4 packs of each of two inputs; 2 with parameter sums). Chosen by the packs a row spans (the
// figures below are for the default block sizes, 1024 threads; an op may set smaller ones, kMaxThreads, and
// on sm_90 kClusterThreads, the block size above which a row takes a cluster):
//   - up to 32 packs: G = 1..32 lanes a row (the fewest that hold it), several rows a warp, shuffles only;
//   - up to 32·kRowPacks packs: a warp a row, V = 2..kRowPacks, shuffles only (float forward: n <= 1024);
//   - up to 1024·kRowPacks packs: a block a row (32..1024 threads), reduced through shared memory (float
//     forward n <= 32768, backward 16384; bf16 both 32768; double both 8192);
//   - sm_90, up to 8·kClusterThreads·kRowPacks packs: a cluster of up to 8 blocks of at most kClusterThreads
//     a row, reduced through distributed shared memory (with the default 512-thread cluster blocks: float
//     forward n <= 131072, backward 65536; passes without a reduction never take one);
//   - split: rows longer still (on sm_80, longer than one block), and very few long rows (fewer blocks
//     than half the SMs, rows of at least 4·128 threads' worth): each row is cut into chunks of 128..1024
//     threads, one block a chunk. Phase 1 writes each chunk's partial statistic to a workspace
//     ([row][chunk], the op's Stat type); phase 2 combines the row's partials (the same order in every
//     block), re-reads its chunk (from L2 when the tensor fits there: the few-rows case) and maps it. No
//     atomics: deterministic. So sm_80 reads a float row of more than 32768 (backward 16384) twice.
// inner > 1, column_kernel<Op, V, kVec>: a block is W column slots × H threads along n (W·H <= 512; 256 for kVec). A slot
//   is a 16-byte pack of P adjacent columns when inner is a multiple of P and every pointer is aligned
//   (kVec), else one column; W · (columns a slot) <= 32 and every row segment a warp reads is at least 32
//   bytes (a sector). A tile of W slots × H·V rows is held in registers and reduced along n through shared
//   memory; longer columns take a cluster of up to 8 blocks (sm_90), narrowing W to fit, or are split along
//   n as above (also when there are too few tiles to fill the GPU).
// Testing the paths: TORCH_VJP_DISABLE_CLUSTERS=1 in the environment (read once per process: launch.cuh's
// has_clusters) plans on every device as on sm_80, never a cluster, so that a Hopper GPU also runs the block
// and split paths that sm_80 takes where sm_90 takes a cluster. torch.ops.torch_vjp_cuda.row_plan(op, outer,
// n, inner, dtype) (cuda/row_plan.cu) returns the plan an op runs with on the current device: the path's name
// (cuda/plan.h's plan_path), threads a block, blocks a cluster, chunks a row; tests assert it.
// No dynamic shared memory anywhere (so no opt-in above 48 KB to get wrong): the reductions' static buffers
// are 32 statistics per block (rows), 32 × 32 (columns), and 2 × that per block in a cluster; ops with
// parameter sums add 8 warps × 32 lanes × P values of S (8 KiB for the half types) to add up a block's groups.
//
// ## Parameter vectors and parameter sums (rows only: layer_norm, rms_norm)
// An op may read parameter vectors (n values of S shared by every row: weight, bias), which reach partial and
// map beside the element values; the engine loads them for each grid pack (16-byte loads when the pack's
// positions are 16-byte aligned in the vector, else one value at a time; L1-resident, as every row reads the
// same n values). And it may produce parameter sums: for each row position j, Σ over all rows of terms the
// op computes per element (param_terms: dweight and dbias of a norm). These are fused into the pass that
// writes the element output: each thread adds its elements' terms to fp32 (S) sums held in registers across
// all the rows it maps, which needs every row at the same grid offset (n % P == 0: then a thread maps the
// same row positions in every row); groups of one block are summed through shared memory, and each row slot
// (a block, or a cluster, along x) writes one partial row ws[c][slot][0:n]. The grid is then one wave of
// resident blocks, so that there are few partial rows. A second launch sums the partial rows in slot order
// (SlotSum through column_kernel): deterministic, no atomics. When rows start at different grid offsets
// (n % P != 0), or no element output is wanted, param_sums_kernel computes the partial rows instead, reading
// the element inputs once more (one element a thread, coalesced).
//
// ## The Op (epilogue) contract
// Ops derive from EpilogueDefaults, which gives the optional members below their defaults (or from
// SumEpilogue<S>, which adds the Stat, pad, identity and combine of a plain sum).
//   using T, S, R;                       storage type, compute type (at::opmath_type<T>), and the storage type
//                                        of per-row inputs and outputs (T, or S for saved statistics)
//   static constexpr int  kIn;           element inputs read per element (x; or dy and y), 1 or 2
//   static constexpr int  kParamIn;      parameter vectors, 0..2 (default 0; rows only)
//   static constexpr int  kRowIn;        per-row inputs (one value per row each), 0..3 (default 0)
//   static constexpr bool kElementOut;   writes an element output (shaped like the inputs)
//   static constexpr int  kRowOut;       per-row outputs, 0..3 (default 0)
//   static constexpr int  kParamSums;    parameter sums, 0..2 (default 0; rows only)
//   static constexpr bool kReduces;      has a row reduction (else only finish + map)
//   static constexpr bool kMasked;       partial sees only the row's elements, not the padding (default false)
//   static constexpr bool kRowsOnly;     inner == 1 only: uses e, parameters or parameter sums (default false)
//   static constexpr bool kAddsInput;    element input 0 is the sum in[0] + addend of two tensors, rounded to T
//                                        (default false; rows only; kIn == 1): the engine loads both, adds them
//                                        pack by pack as soon as they arrive (so the op sees one input, and only
//                                        the sum is held through the reduction), and stores the sum to out_sum in
//                                        the pass that writes the element output (add_*_norm's s = input +
//                                        residual: two reads, two writes, one pass)
//   static constexpr bool kOutAddend;    an element tensor `addend` added to the element output, read only in the
//                                        pass that writes it (not held through the reduction): out =
//                                        add_out(map(...), addend) (default false; rows only; add_*_norm's
//                                        backward: d_input = grad_sum + the norm's dx)
//   static constexpr bool kAsserts;      rows may break a precondition (an out-of-range target; default false):
//                                        bool row_ok(const Row&) const says, and a kernel that finished a row
//                                        that does not fails with a device-side assert (CUDA_KERNEL_ASSERT)
//                                        once its loops are done (rows only)
//   static constexpr int  kMaxThreads;   threads a block at most (the launch bound; default 1024)
//   static constexpr int  kBlockThreads; the bound of the Block instance, which serves blocks up to it; larger
//                                        ones take WideBlock (default 512: 128 registers)
//   static constexpr int  kBlockMinBlocks;  blocks an SM the Block instance's bound asks for (default 1; 2: two
//                                        blocks of 512 threads, 64 registers). With 2, its row group is the whole
//                                        block (as WideBlock's), and its warp-path plans take the Shuffle
//                                        instance at V = kRowPacks (kWholeBlockRows below)
//   static constexpr int  kClusterThreads;  threads a block of a cluster at most on sm_90 (default 512): fewer
//                                        make a long row a cluster of smaller blocks, so that blocks of other
//                                        rows share an SM and load while this one reduces
//   static constexpr int  kClusterBound; the Cluster instance's launch bound when larger than kClusterThreads
//                                        (default 0: kClusterThreads): a tighter register budget (768: 80) for
//                                        ops that ptxas spills at 128 registers and not at 80
//   using Stat;                          the reduction's partial: trivially copyable, size a multiple of 4
//   S pad(int i) const;                  the value element slots outside the row read as, for input i
//   Stat identity() const; Stat combine(Stat, Stat) const;   associative; combine(identity, b) == b
//   template <class Each> Stat partial(const Each& each, const S (&row_in)[kRowInSlots], const RowAt& at) const;
//       this thread's partial: each(f) calls f(const S (&v)[kVals], int e) for every element slot the thread
//       holds for the row (padding too unless kMasked), in a fixed order; v = the element inputs, then the
//       parameters; e = the slot's index in the run (row position at.first + e; row path only, the column
//       kernel passes 0). Call it as often as needed (a two-pass over registers is two calls). Padding slots
//       carry pad(i) and parameters 0, so an unmasked partial must be unchanged by them (softmax: -inf adds
//       nothing to a max or to a sum of exp once the row max is finite; sums: 0).
//   Row finish(Stat, const S (&row_in)[kRowInSlots], const RowAt& at) const;   the row's constants
//   S map(const Row&, const S (&v)[kVals], int e) const;                       element output
//   S row_out(const Row&, int r) const;                                         per-row output r
//   void param_terms(const Row&, const S (&v)[kVals], S (&t)[kParamSums]) const;
//       the element's terms of the parameter sums; 0 for padding slots (pad values, parameters 0) of rows
//       whose row inputs are 0. Must depend only on the Row's part that finish takes from row_in:
//       param_sums_kernel builds its Row as finish(identity(), row_in, at).
// The VJP derivation of a family is written once, atop its backward epilogue.
//
// ## Guarantees the engine gives the Op
//   - finish() sees the statistic of the WHOLE row, with the same bits in every thread that maps an element
//     of that row (every stage of the reduction broadcasts one thread's result; the split path combines
//     the chunk partials in the same order in every block).
//   - Loads and stores are 16-byte packs for any alignment (vec.cuh's pack grid): only packs straddling the
//     ends of a row (or chunk) go element by element. All indexing is 64-bit.
//   - Reads are issued before any reduction: V packs per operand in flight per thread, with the row inputs.
//   - Parameter sums are added in a fixed order (rows of a slot in order, groups and slots in order): the same
//     bits on every run of one shape on one device.
// Two statistics are one Stat struct (mean and M2, merged with Chan's formula; a pair of sums for a norm
// backward); per-row saved values (mean, rstd; cross-entropy's row max and log-sum) are row inputs;
// cross-entropy's (max, Σexp) is its Stat, and its gradient finds the target's element through e.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

#include "cuda/launch.cuh"
#include "cuda/plan.h"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"
#include "ops/softmax.h"  // RowLayout

namespace torch_vjp::cuda {

template <class T>
using Opmath = at::opmath_type<T>;

// kColumnMaxThreads, kColumnVecMaxThreads, kColumnMinBlocks, kSubWarpThreads, kSplitMinThreads: cuda/plan_rows.h
// (the plan uses them).
constexpr int kParamSumThreads = 256;   // param_sums_kernel: row positions a block

enum class Mode : int {
  Full,     // reduce the row (or column) and map it
  Partial,  // split phase 1: reduce this chunk, write its partial statistic to the workspace
  Finish,   // split phase 2: combine the row's partials from the workspace, map this chunk
};

// Where a row (or its chunk) is: the row (segment) index, the row position of the run's element 0 (row path:
// element e of the run is row element first + e), and the row length.
struct RowAt {
  int64_t row, first, n;
};

// The optional members of the Op contract (see the top of this file), for ops to derive from.
struct EpilogueDefaults {
  static constexpr int kParamIn = 0;
  static constexpr int kRowIn = 0;
  static constexpr int kRowOut = 0;
  static constexpr int kParamSums = 0;
  static constexpr bool kMasked = false;
  static constexpr bool kRowsOnly = false;
  static constexpr bool kAddsInput = false;
  static constexpr bool kOutAddend = false;
  static constexpr bool kAsserts = false;
  static constexpr int kMaxThreads = 1024;
  static constexpr int kBlockThreads = 512;
  static constexpr int kBlockMinBlocks = 1;
  static constexpr int kClusterThreads = 512;
  static constexpr int kClusterBound = 0;
};

// The members of an op whose statistic is a plain sum of S, padding 0 (or that reduces nothing).
template <class S>
struct SumEpilogue : EpilogueDefaults {
  using Stat = S;
  __device__ __forceinline__ S pad(int) const { return S(0); }
  __device__ __forceinline__ S identity() const { return S(0); }
  __device__ __forceinline__ S combine(S a, S b) const { return a + b; }
};

template <int N>
inline constexpr int kSlotsFor = N > 0 ? N : 1;  // array length for 0..N things (C++ has no empty arrays)
template <class Op>
inline constexpr int kRowInSlots = kSlotsFor<Op::kRowIn>;
template <class Op>
inline constexpr int kVals = Op::kIn + Op::kParamIn;  // values an element slot hands partial and map

// Tensors a thread loads per element and holds until they are reduced: the element inputs, and the addend of
// an op that adds it to input 0 on load (kAddsInput: both are in flight together). An output addend
// (kOutAddend) is read after the reduction, one pack at a time, and is not counted.
template <class Op>
inline constexpr int kLoads = Op::kIn + (Op::kAddsInput ? 1 : 0);

// Packs per thread per input in the engine's largest kernels: one float input, 8 (32 elements); otherwise 4
// (the half types' 32 elements unpack to 32 floats; double computes in pairs of registers; two inputs, or an
// input and its addend, 4 each). At most 32 registers of data, so 1024-thread blocks fit 64 registers a thread. Ops with parameter
// sums hold their sums too: 2 packs (a bf16 layer_norm backward: 16 registers of data, 32 of sums; 80
// registers in all, so 3 blocks of 256 threads an SM).
template <class Op>
inline constexpr int kRowPacks =
    Op::kParamSums > 0 ? 2 : (kLoads<Op> == 1 && sizeof(typename Op::T) == 4 ? 8 : 4);

template <class Op>
struct EngineArgs {
  using T = typename Op::T;
  using S = typename Op::S;
  using R = typename Op::R;
  Op op;
  const T* in[Op::kIn];
  const S* param[kSlotsFor<Op::kParamIn>];  // parameter vectors (n values each)
  T* out;                                  // element output, or nullptr
  const T* addend;         // kAddsInput: added to input 0 on load; kOutAddend: added to the element output
  T* out_sum;              // kAddsInput: where input 0 + addend is written (the grid pack as loaded and added)
  const R* row_in[kRowInSlots<Op>];        // per-row inputs
  R* row_out[kSlotsFor<Op::kRowOut>];      // per-row outputs
  S* param_ws;             // row path: partial parameter sums [c][slot][n], or nullptr: none this launch
  int64_t outer, n, inner;
  int grid_mis;            // row path: misalignment (elements) of the grid operand's element 0
  int shift[Op::kIn];      // row path: each input's misalignment relative to the grid, mod P
  int addend_shift;        // row path: the addend's, likewise
  bool sum_aligned;        // row path: out_sum has the grid's alignment (else it is stored element by element)
  int lanes;               // row path: threads per row in a block (G); column path: column slots (W)
  int64_t chunks;          // blocks per row (column) along n, blockIdx.y; 1 unless split
  int64_t chunk_len;       // split: packs (row path) or rows (column path) per chunk
  Mode mode;
  typename Op::Stat* ws;   // split: partials, [segment][chunk]
  int64_t tiles;           // column path: tiles of W column slots
  at::cuda::detail::IntDivider<uint32_t> inner_div;  // column path: o, i of a flattened column (outer > 1)
};
// The kernels divide only by compile-time constants and through inner_div: a run-time 64-bit division
// compiles to a call, whose ABI made ptxas spill the kernels' loop invariants around it.

// N values of S at positions [e0, e0 + N) of base (a parameter vector, or a row of parameter sums); positions
// outside [lo, hi) read as 0 (load) or are left alone (store). 16-byte accesses when all N lie inside and
// base + e0 is 16-byte aligned (N·sizeof(S) is a multiple of 16: N = P >= 16 / sizeof(S)), else one at a time.
// No shuffles: lanes may take different paths.
template <class S, int N>
__device__ __forceinline__ void load_values(const S* base, int e0, int lo, int hi, S (&v)[N]) {
  constexpr int kPer = kPackElems<S>;
  static_assert(N % kPer == 0, "whole 16-byte packs of S");
  if (e0 >= lo && e0 + N <= hi && reinterpret_cast<std::uintptr_t>(base + e0) % 16 == 0) {
#pragma unroll
    for (int q = 0; q < N / kPer; ++q) {
      const Pack<S> p = load_pack(base + e0 + q * kPer);
#pragma unroll
      for (int k = 0; k < kPer; ++k) v[q * kPer + k] = pack_elem(p, k);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = (e0 + k >= lo && e0 + k < hi) ? base[e0 + k] : S(0);
  }
}

template <class S, int N>
__device__ __forceinline__ void store_values(S* base, int e0, int lo, int hi, const S (&v)[N]) {
  constexpr int kPer = kPackElems<S>;
  static_assert(N % kPer == 0, "whole 16-byte packs of S");
  if (e0 >= lo && e0 + N <= hi && reinterpret_cast<std::uintptr_t>(base + e0) % 16 == 0) {
#pragma unroll
    for (int q = 0; q < N / kPer; ++q) {
      S part[kPer];
#pragma unroll
      for (int k = 0; k < kPer; ++k) part[k] = v[q * kPer + k];
      store_pack(base + e0 + q * kPer, make_pack<S>(part));
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (e0 + k >= lo && e0 + k < hi) base[e0 + k] = v[k];
  }
}

// Several row groups a block (G < blockDim.x <= kSubWarpThreads: the shuffle-only paths): the threads with
// one t % G hold the same row positions (every row at one grid offset), so their sums are added, in a fixed
// order, into group 0 (threads t < G). A butterfly within the warp, then the warps in order through shared
// memory. Called by every thread of the block (barriers).
template <class S, int kSums, int V, int P>
__device__ __forceinline__ void sum_row_groups(S (&v)[kSums][V][P], int G) {
  constexpr int kMaxWarps = kSubWarpThreads / kWarpSize;
  __shared__ S buf[kMaxWarps][kWarpSize][P];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int c = 0; c < kSums; ++c)
#pragma unroll
    for (int j = 0; j < V; ++j)
#pragma unroll
      for (int k = 0; k < P; ++k)
        for (int offset = G; offset < kWarpSize; offset *= 2) v[c][j][k] += shfl_xor_any(v[c][j][k], offset);
  if (warps == 1) return;
#pragma unroll
  for (int c = 0; c < kSums; ++c) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      __syncthreads();  // the previous round's readers are done with buf
      if (lane < G) {
#pragma unroll
        for (int k = 0; k < P; ++k) buf[warp][lane][k] = v[c][j][k];
      }
      __syncthreads();
      if (warp == 0 && lane < G) {
#pragma unroll
        for (int k = 0; k < P; ++k) {
          S total = buf[0][lane][k];
          for (int w = 1; w < warps; ++w) total += buf[w][lane][k];
          v[c][j][k] = total;
        }
      }
    }
  }
}

// =========================================================================================================
// inner == 1. A group of G threads (G <= 32: part of a warp; else the block, times the cluster's blocks)
// handles one row, or one chunk of a row when split. Member m of the group holds grid packs
// q = chunk·chunk_len + m + j·width, j < V, width = the group's threads: for each j the lanes of a warp hold
// consecutive packs, so every warp-wide access is contiguous. Element indices inside the run are 32-bit,
// relative to the run's first grid pack (a run holds at most 8·1024·V·P elements; longer rows are split).
//
// Four kinds of instance, each with launch bounds that match how the host launches it (plan_rows), so that
// ptxas budgets registers for the occupancy the plan assumes instead of for the largest block of any path
// (V = kRowPacks at 1024 threads leaves 64 registers, and spilled):
//   - RowKind::Shuffle (V < kRowPacks): only the shuffle paths reach it (G <= 32 lanes a row, at most
//     kSubWarpThreads threads, never a cluster or a split), so it has no block or cluster reduction, and asks
//     for enough resident blocks to keep kRowBytesInFlight of loads in flight an SM (kRowMinBlocks);
//   - RowKind::Block (V = kRowPacks, no cluster, blocks of at most kBlockThreads, default 512): the shuffle,
//     block and split paths that the benchmark shapes take (one 512-thread block holds 32 KB of loads); an op
//     with kBlockMinBlocks = 2 (kWholeBlockRows) asks for two such blocks an SM, and gives its warp path
//     (32 lanes a row, several rows a block) to a Shuffle instance at V = kRowPacks instead;
//   - RowKind::WideBlock (V = kRowPacks, no cluster, up to kMaxThreads): rows too long for 512 threads where
//     no cluster runs (sm_80, or clusters off): one read of the row at the price of a tight register budget;
//   - RowKind::Cluster (V = kRowPacks): sm_90 clusters of blocks of at most kClusterThreads.
// Only Cluster instances carry the cluster primitives (cluster_info and cluster_sync cost sm_90 code 8-16
// registers).
enum class RowKind : int { Shuffle, Block, WideBlock, Cluster };

// Loads an SM should have in flight to approach an H200's bandwidth (about 30 KB by Little's law: 4.8 TB/s
// × ~0.8 µs latency / 132 SMs; an H100 needs 20-25 KB).
constexpr int kRowBytesInFlight = 32 * 1024;

template <class Op, RowKind K>
inline constexpr int kRowThreads = K == RowKind::Shuffle   ? kSubWarpThreads
                                   : K == RowKind::Block   ? std::min(Op::kBlockThreads, Op::kMaxThreads)
                                   : K == RowKind::Cluster ? std::max(Op::kClusterThreads, Op::kClusterBound)
                                                           : Op::kMaxThreads;

// Resident blocks an SM the launch bound asks for: a Shuffle instance's 256-thread blocks, as many as hold
// kRowBytesInFlight (V packs of kIn inputs a thread), at most 6 (40 registers: at 8, 32 registers, the
// cross-entropy instances spilled; an instance that needs no more than 32 still gets 8 blocks, 32 KB at V = 1);
// one block of the others.
constexpr int kShuffleMaxMinBlocks = 6;
template <class Op, int V, RowKind K>
inline constexpr int kRowMinBlocks =
    K == RowKind::Block     ? Op::kBlockMinBlocks
    : K != RowKind::Shuffle ? 1
                            : std::clamp(kRowBytesInFlight / (kSubWarpThreads * V * kLoads<Op> * 16), 1,
                                         kShuffleMaxMinBlocks);

// Ops whose Block instance serves only whole-block row groups (its block and split paths: lanes = threads > 32),
// so that it compiles without the several-rows-a-block code (the division by G, the shuffle reduction, the sum
// of the block's row groups) and fits two blocks of 512 threads an SM: 64 registers. Their warp path (32 lanes a
// row, at most kSubWarpThreads threads: V = kRowPacks, but a shuffle-only shape) takes row_kernel<Op, kRowPacks,
// RowKind::Shuffle>. The norm backwards with parameter sums: at two blocks a Block instance that kept the
// warp path spilled 16-72 B in float (ptxas -v, CUDA 13.0, sm_80); with whole-block groups alone, 52-64
// registers and none (NormBackward, AddNormBackward: kBlockMinBlocks).
template <class Op>
inline constexpr bool kWholeBlockRows = Op::kBlockMinBlocks > 1;

template <class Op, int V, RowKind K>
__global__ void __launch_bounds__(kRowThreads<Op, K>, (kRowMinBlocks<Op, V, K>)) row_kernel(const EngineArgs<Op> a) {
  static_assert(Op::kMaxThreads % kWarpSize == 0 && Op::kClusterThreads % kWarpSize == 0 &&
                Op::kClusterThreads <= Op::kMaxThreads && Op::kMaxThreads >= kSubWarpThreads, "block sizes");
  static_assert(K == RowKind::Shuffle ? V < kRowPacks<Op> || (V == kRowPacks<Op> && kWholeBlockRows<Op>)
                                      : V == kRowPacks<Op>,
                "Shuffle instances are those with V < kRowPacks, and kWholeBlockRows ops' warp path");
  static_assert(!Op::kAddsInput || (Op::kIn == 1 && Op::kElementOut), "an added input: one input, and an output pass");
  static_assert(!Op::kOutAddend || Op::kElementOut, "an output addend needs an element output");
  constexpr bool kShuffleOnly = K == RowKind::Shuffle;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  // Code for an architecture without clusters never runs a Cluster instance (launch.cuh's cluster_code): an empty
  // body, not a second copy of the kernel.
  if constexpr (K == RowKind::Cluster) return;
#endif
  using T = typename Op::T;
  using S = typename Op::S;
  using R = typename Op::R;
  using Stat = typename Op::Stat;
  constexpr int P = kPackElems<T>;
  constexpr int kIn = Op::kIn;
  constexpr int kParamIn = Op::kParamIn;
  constexpr int kSums = Op::kParamSums;
  const ClusterInfo cluster = K == RowKind::Cluster ? cluster_info() : ClusterInfo{0, 1};
  // The block's row groups of G threads. The plans give each kind one shape (plan_rows; with_row_kernel asserts
  // them): WideBlock and Cluster, one group, the whole block (their block, cluster and split paths: lanes =
  // threads > 32); Shuffle, G = lanes, a power of two <= 32, so groups by shifts and masks; Block, warps (the
  // warp path) or the whole block (its block and split paths), by G = lanes. At the 40-80 register budgets of
  // the first three, a division by a run-time G kept its quotient and remainder live across the row, and ptxas
  // spilled them. Block keeps the division: shift forms tried there (CUDA 13.0) raised several instances'
  // registers and moved a spill from one instance to another. Except kWholeBlockRows ops' Block, which serves
  // whole-block groups alone (their warp path takes the Shuffle instance).
  constexpr bool kBlockGroup =
      K == RowKind::WideBlock || K == RowKind::Cluster || (K == RowKind::Block && kWholeBlockRows<Op>);
  const int group_shift = kShuffleOnly ? __ffs(a.lanes) - 1 : 0;  // Shuffle: log2 G
  const int G = kBlockGroup ? static_cast<int>(blockDim.x) : kShuffleOnly ? 1 << group_shift : a.lanes;
  const int lane = threadIdx.x % kWarpSize;
  const int member = cluster.rank * G + (kBlockGroup    ? static_cast<int>(threadIdx.x)
                                         : kShuffleOnly ? static_cast<int>(threadIdx.x) & (G - 1)
                                                        : static_cast<int>(threadIdx.x) % G);
  const int width = G * cluster.size;
  const int groups = kBlockGroup ? 1 : kShuffleOnly ? static_cast<int>(blockDim.x >> group_shift) : static_cast<int>(blockDim.x / G);
  const int shuffle_group = kShuffleOnly ? static_cast<int>(threadIdx.x >> group_shift) : 0;  // this thread's
  const bool last_in_run = kShuffleOnly ? ((lane + 1) & (G - 1)) == 0  // G <= 32
                                        : (lane + 1) % (!kBlockGroup && G < kWarpSize ? G : kWarpSize) == 0;
  // Chunks (split rows) along y; phase 2 of an op with neither element output nor parameter sums only
  // combines: one y.
  const bool combine_only = !Op::kElementOut && kSums == 0 && a.mode == Mode::Finish;
  const bool sums_here = kSums > 0 && a.param_ws != nullptr && a.mode != Mode::Partial;
  const int64_t chunks_here = combine_only ? 1 : a.chunks;
  const int64_t stride = int64_t(gridDim.x / cluster.size) * groups;
  const int run_len = (a.chunks > 1 ? static_cast<int>(a.chunk_len) : V * width) * P;  // grid elements a run spans
  const auto e0_of = [&](int j) { return (member + j * width) * P; };
  int parity = 0;
  bool rows_ok = true;  // kAsserts: every row this thread finished met the op's precondition
  // `base` and `chunk` are uniform across the block (and the cluster): every thread runs the same
  // iterations, as the shuffles and barriers inside require; groups past the last row run with an empty row.
  for (int64_t chunk = blockIdx.y; chunk < chunks_here; chunk += gridDim.y) {
    S sums[kSlotsFor<kSums>][V][P] = {};  // parameter sums of this thread's slots over the rows it maps
    for (int64_t base = int64_t(blockIdx.x / cluster.size) * groups; base < a.outer; base += stride, parity ^= 1) {
      const int64_t row_or_end = base + (kBlockGroup ? 0u : kShuffleOnly ? unsigned(shuffle_group) : threadIdx.x / G);
      const bool active = row_or_end < a.outer;
      const int64_t row = active ? row_or_end : 0;
      // The run starts at row element run0 (grid pack chunk·chunk_len); [lo, hi) is the row relative to it,
      // clamped to two packs around the run.
      const int64_t row_start = row * a.n;
      const int64_t run0 = chunk * a.chunk_len * P - (a.grid_mis + row_start) % P;
      const int lo = static_cast<int>(std::max<int64_t>(-run0, -2 * P));
      const int hi = active ? static_cast<int>(std::min<int64_t>(a.n - run0, run_len + 2 * P)) : lo;
      const RowAt at{row, run0, a.n};

      Pack<T> tile[kIn][V];
      if (!combine_only) {
#pragma unroll
        for (int i = 0; i < kIn; ++i) {
          const T* in = a.in[i] + (row_start + run0);
#pragma unroll
          for (int j = 0; j < V; ++j) tile[i][j] = load_grid_pack(in, e0_of(j), lo, hi, a.shift[i], last_in_run, a.op.pad(i));
        }
        if constexpr (Op::kAddsInput) {
          // Input 0 becomes in[0] + addend, rounded to T (as torch's add of two T tensors): every load is issued
          // first, then the sums replace input 0's packs and the addend's are dead. Padding: pad(0) + 0.
          const T* add = a.addend + (row_start + run0);
          Pack<T> addend[V];
#pragma unroll
          for (int j = 0; j < V; ++j) addend[j] = load_grid_pack(add, e0_of(j), lo, hi, a.addend_shift, last_in_run, S(0));
#pragma unroll
          for (int j = 0; j < V; ++j) tile[0][j] = add_packs(tile[0][j], addend[j]);
        }
      }
      S row_in[kRowInSlots<Op>] = {};
#pragma unroll
      for (int r = 0; r < Op::kRowIn; ++r) row_in[r] = active ? static_cast<S>(a.row_in[r][row]) : S(0);

      // The values of grid pack j's element slots: the element inputs, then the parameters (loaded per pack
      // where used; every row reads the same n values, so they come from L1).
      const auto params_of = [&](int j, S (&p)[kSlotsFor<kParamIn>][P]) {
#pragma unroll
        for (int c = 0; c < kParamIn; ++c) load_values(a.param[c] + run0, e0_of(j), lo, hi, p[c]);
      };
      const auto values_of = [&](int j, int k, const S (&p)[kSlotsFor<kParamIn>][P], S (&v)[kVals<Op>]) {
#pragma unroll
        for (int i = 0; i < kIn; ++i) v[i] = pack_elem(tile[i][j], k);
#pragma unroll
        for (int c = 0; c < kParamIn; ++c) v[kIn + c] = p[c][k];
      };

      Stat st[1] = {a.op.identity()};
      if constexpr (Op::kReduces) {
        if (a.mode == Mode::Finish) {
          for (int64_t c = member; active && c < a.chunks; c += width) st[0] = a.op.combine(st[0], a.ws[row * a.chunks + c]);
        } else {
          const auto each = [&](const auto& f) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
              S p[kSlotsFor<kParamIn>][P];
              params_of(j, p);
              const int e0 = e0_of(j);
              if (!Op::kMasked || (e0 >= lo && e0 + P <= hi)) {  // a whole pack of the row: no per-element test
#pragma unroll
                for (int k = 0; k < P; ++k) {
                  S v[kVals<Op>];
                  values_of(j, k, p, v);
                  f(v, e0 + k);
                }
              } else {
#pragma unroll
                for (int k = 0; k < P; ++k) {
                  if (e0 + k >= lo && e0 + k < hi) {
                    S v[kVals<Op>];
                    values_of(j, k, p, v);
                    f(v, e0 + k);
                  }
                }
              }
            }
          };
          st[0] = a.op.partial(each, row_in, at);
        }
        const auto combine = [&](const Stat& x, const Stat& y) { return a.op.combine(x, y); };
        if (kShuffleOnly || (!kBlockGroup && G <= kWarpSize)) {
          st[0] = group_allreduce(st[0], combine, G);
        } else {
          block_allreduce_columns<1>(st, combine, a.op.identity(), 1);
          if constexpr (K == RowKind::Cluster) cluster_allreduce_columns<1>(st, combine, 1, cluster, parity);
        }
        if (a.mode == Mode::Partial) {
          if (active && member == 0) a.ws[row * a.chunks + chunk] = st[0];
          continue;
        }
      }

      const auto rc = a.op.finish(st[0], row_in, at);
      if constexpr (Op::kAsserts) rows_ok = rows_ok && a.op.row_ok(rc);
      if constexpr (Op::kRowOut > 0) {
#pragma unroll
        for (int r = 0; r < Op::kRowOut; ++r) {
          if (active && member == 0 && chunk == 0) a.row_out[r][row] = static_cast<R>(a.op.row_out(rc, r));
        }
      }
      if constexpr (Op::kElementOut || kSums > 0) {
        const bool add = sums_here && active;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          S p[kSlotsFor<kParamIn>][P];
          params_of(j, p);
          S o[P];
          // kOutAddend: its grid pack, loaded here (every lane of the warp reaches this load: the j loop is
          // uniform; rows past the end have lo == hi and load nothing).
          Pack<T> addend;
          if constexpr (Op::kOutAddend)
            addend = load_grid_pack(a.addend + (row_start + run0), e0_of(j), lo, hi, a.addend_shift, last_in_run, S(0));
#pragma unroll
          for (int k = 0; k < P; ++k) {
            S v[kVals<Op>];
            values_of(j, k, p, v);
            if constexpr (Op::kElementOut) o[k] = a.op.map(rc, v, e0_of(j) + k);
            if constexpr (Op::kOutAddend) o[k] = a.op.add_out(o[k], pack_elem(addend, k));
            if constexpr (kSums > 0) {
              if (add) {
                S t[kSlotsFor<kSums>];
                a.op.param_terms(rc, v, t);
#pragma unroll
                for (int c = 0; c < kSums; ++c) sums[c][j][k] += t[c];
              }
            }
          }
          if constexpr (Op::kElementOut) store_grid_pack(a.out + (row_start + run0), e0_of(j), lo, hi, o);
          // The sum, exactly as the op saw it (a whole pack where out_sum shares the grid's alignment).
          if constexpr (Op::kAddsInput) store_grid_pack(a.out_sum + (row_start + run0), e0_of(j), lo, hi, tile[0][j], a.sum_aligned);
        }
      }
    }
    if constexpr (kSums > 0) {
      // This chunk's rows are done. Every row this thread mapped started at one grid offset (the host fuses the
      // sums only when n % P == 0), so its slots are row positions first + e0_of(j) + k in all of them.
      if (sums_here) {
        if (groups > 1) sum_row_groups(sums, G);
        if (static_cast<int>(threadIdx.x) < G) {
          const int64_t first = chunk * a.chunk_len * P - a.grid_mis;
          const int lo = static_cast<int>(std::max<int64_t>(-first, -2 * P));
          const int hi = static_cast<int>(std::min<int64_t>(a.n - first, run_len + 2 * P));
          const int64_t slots = gridDim.x / cluster.size, slot = blockIdx.x / cluster.size;
#pragma unroll
          for (int c = 0; c < kSums; ++c) {
            S* ws = a.param_ws + (c * slots + slot) * a.n + first;
#pragma unroll
            for (int j = 0; j < V; ++j) store_values(ws, e0_of(j), lo, hi, sums[c][j]);
          }
        }
      }
    }
  }
  // After the loops, where little is live: the assert's failure path is a call, which inside the loops made
  // ptxas spill their registers around it.
  if constexpr (Op::kAsserts) CUDA_KERNEL_ASSERT(rows_ok);
  if constexpr (K == RowKind::Cluster) cluster_sync(cluster);  // no block leaves while another reads its shared memory
  (void)parity;
}

// =========================================================================================================
// inner > 1. A block is W column slots × H threads along n (thread t: slot t % W, member t / W). Slot tx
// covers column pack cp = tile·W + tx of the flattened columns (o, i) (kVec: Pe = P adjacent columns of one
// o, a 16-byte pack; else Pe = 1 column); member m holds rows j = chunk·chunk_len + m + v·width, v < V.
template <class Op, int V, bool kVec>
__global__ void __launch_bounds__(column_max_threads(kVec), kColumnMinBlocks) column_kernel(const EngineArgs<Op> a) {
  static_assert(!Op::kRowsOnly, "an op that uses row positions or parameters runs on rows only");
  static_assert(!Op::kAddsInput && !Op::kOutAddend, "addends are row-path operands (such ops are kRowsOnly)");
  using T = typename Op::T;
  using S = typename Op::S;
  using R = typename Op::R;
  using Stat = typename Op::Stat;
  constexpr int kIn = Op::kIn;
  constexpr int Pe = kVec ? kPackElems<T> : 1;
  using Item = std::conditional_t<kVec, Pack<T>, T>;
  const ClusterInfo cluster = cluster_info();
  const int W = a.lanes;
  const int tx = threadIdx.x % W;
  const int member = cluster.rank * static_cast<int>(blockDim.x / W) + static_cast<int>(threadIdx.x / W);
  const int width = static_cast<int>(blockDim.x / W) * cluster.size;
  const int64_t step = int64_t(width) * a.inner;  // elements from one of a thread's rows to its next
  const int64_t col_packs = a.outer * a.inner / Pe;
  const bool combine_only = !Op::kElementOut && a.mode == Mode::Finish;
  const int64_t chunks_here = combine_only ? 1 : a.chunks;
  int parity = 0;
  for (int64_t chunk = blockIdx.y; chunk < chunks_here; chunk += gridDim.y)
  for (int64_t t0 = blockIdx.x / cluster.size; t0 < a.tiles; t0 += gridDim.x / cluster.size, parity ^= 1) {
    const int64_t cp = t0 * W + tx;  // tile t0
    const bool active = cp < col_packs;
    const int64_t col0 = active ? cp * Pe : 0;  // flattened column o·inner + i of this slot's first column
    // outer > 1 only when the host keeps o·inner + i below 2^31 (it splits the launch over outer).
    const int64_t o = a.outer == 1 ? 0 : a.inner_div.divmod(static_cast<uint32_t>(col0)).div;
    const int64_t j0 = chunk * a.chunk_len + member;  // this thread's first row
    const int64_t first = o * a.n * a.inner + (col0 - o * a.inner) + j0 * a.inner;
    // Rows j0 + v·width, v < V, of which the first `rows` exist.
    const int rows = active ? static_cast<int>(std::clamp<int64_t>(a.n - j0, 0, int64_t(V) * width)) : 0;

    Item tile[kIn][V];
    if (!combine_only) {
#pragma unroll
      for (int i = 0; i < kIn; ++i) {
        const T* in = a.in[i] + first;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const bool valid = v * width < rows;
          if constexpr (kVec) tile[i][v] = valid ? load_pack(in + v * step) : filled_pack<T>(a.op.pad(i));
          else tile[i][v] = valid ? in[v * step] : static_cast<T>(a.op.pad(i));
        }
      }
    }
    const auto elem = [&](int i, int v, int k) -> S {
      if constexpr (kVec) return pack_elem(tile[i][v], k);
      else return static_cast<S>(tile[i][v]);
    };
    // Segment col0 + k's row inputs (read where used: not held across the reduction).
    const auto row_in_of = [&](int k, S (&r)[kRowInSlots<Op>]) {
#pragma unroll
      for (int q = 0; q < kRowInSlots<Op>; ++q) r[q] = (q < Op::kRowIn && active) ? static_cast<S>(a.row_in[q][col0 + k]) : S(0);
    };

    Stat st[Pe];
#pragma unroll
    for (int k = 0; k < Pe; ++k) st[k] = a.op.identity();
    if constexpr (Op::kReduces) {
      if (a.mode == Mode::Finish) {
#pragma unroll
        for (int k = 0; k < Pe; ++k)
          for (int64_t c = member; active && c < a.chunks; c += width)
            st[k] = a.op.combine(st[k], a.ws[(col0 + k) * a.chunks + c]);
      } else {
#pragma unroll
        for (int k = 0; k < Pe; ++k) {
          S row_in[kRowInSlots<Op>];
          row_in_of(k, row_in);
          const auto each = [&](const auto& f) {
#pragma unroll
            for (int v = 0; v < V; ++v) {
              if (!Op::kMasked || v * width < rows) {
                S x[kIn];
#pragma unroll
                for (int i = 0; i < kIn; ++i) x[i] = elem(i, v, k);
                f(x, 0);
              }
            }
          };
          st[k] = a.op.partial(each, row_in, RowAt{col0 + k, 0, a.n});
        }
      }
      const auto combine = [&](const Stat& x, const Stat& y) { return a.op.combine(x, y); };
      block_allreduce_columns<kWarpSize>(st, combine, a.op.identity(), W);
      cluster_allreduce_columns<kWarpSize>(st, combine, W, cluster, parity);
      if (a.mode == Mode::Partial) {
        if (active && member == 0) {
#pragma unroll
          for (int k = 0; k < Pe; ++k) a.ws[(col0 + k) * a.chunks + chunk] = st[k];
        }
        continue;
      }
    }

#pragma unroll
    for (int k = 0; k < Pe; ++k) {
      S row_in[kRowInSlots<Op>];
      row_in_of(k, row_in);
      const auto rc = a.op.finish(st[k], row_in, RowAt{col0 + k, 0, a.n});
      if constexpr (Op::kRowOut > 0) {
#pragma unroll
        for (int r = 0; r < Op::kRowOut; ++r) {
          if (active && member == 0 && chunk == 0) a.row_out[r][col0 + k] = static_cast<R>(a.op.row_out(rc, r));
        }
      }
      if constexpr (Op::kElementOut) {
        // Outputs replace input 0 in the tile (column k is done with it), so that they leave as whole packs.
#pragma unroll
        for (int v = 0; v < V; ++v) {
          S x[kIn];
#pragma unroll
          for (int i = 0; i < kIn; ++i) x[i] = elem(i, v, k);
          const S y = a.op.map(rc, x, 0);
          if constexpr (kVec) set_pack_elem(tile[0][v], k, y);
          else tile[0][v] = static_cast<T>(y);
        }
      }
    }
    if constexpr (Op::kElementOut) {
      T* out = a.out + first;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        if (v * width < rows) {
          if constexpr (kVec) store_pack(out + v * step, tile[0][v]);
          else out[v * step] = tile[0][v];
        }
      }
    }
  }
  cluster_sync(cluster);
}

// =========================================================================================================
// Parameter sums without the row kernel: rows at different grid offsets (n % P != 0), where a thread of
// row_kernel would map different row positions in different rows, or no element output wanted. A thread
// is one row position (a warp reads 32 consecutive elements of a row: coalesced, one element at a time);
// block y is a slot of `rows_per_slot` consecutive rows. Writes ws[c][slot][position] as row_kernel does.
template <class Op>
__global__ void __launch_bounds__(kParamSumThreads) param_sums_kernel(const EngineArgs<Op> a, int64_t rows_per_slot) {
  using S = typename Op::S;
  constexpr int kIn = Op::kIn;
  constexpr int kSums = Op::kParamSums;
  const int64_t pos = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pos >= a.n) return;  // no barriers below
  const int64_t slot = blockIdx.y, slots = gridDim.y;
  const int64_t end = std::min(a.outer, (slot + 1) * rows_per_slot);
  S p[kSlotsFor<Op::kParamIn>];
#pragma unroll
  for (int c = 0; c < Op::kParamIn; ++c) p[c] = a.param[c][pos];
  S sums[kSums] = {};
#pragma unroll 4
  for (int64_t row = slot * rows_per_slot; row < end; ++row) {
    S row_in[kRowInSlots<Op>] = {};
#pragma unroll
    for (int r = 0; r < Op::kRowIn; ++r) row_in[r] = static_cast<S>(a.row_in[r][row]);
    const auto rc = a.op.finish(a.op.identity(), row_in, RowAt{row, 0, a.n});
    S v[kVals<Op>];
#pragma unroll
    for (int i = 0; i < kIn; ++i) v[i] = static_cast<S>(a.in[i][row * a.n + pos]);
#pragma unroll
    for (int c = 0; c < Op::kParamIn; ++c) v[kIn + c] = p[c];
    S t[kSums];
    a.op.param_terms(rc, v, t);
#pragma unroll
    for (int c = 0; c < kSums; ++c) sums[c] += t[c];
  }
#pragma unroll
  for (int c = 0; c < kSums; ++c) a.param_ws[(c * slots + slot) * a.n + pos] = sums[c];
}

// =========================================================================================================
// Host side: the plan (which kernel, which shape) and the launch.

// Pointers of one call.
template <class Op>
struct Operands {
  using T = typename Op::T;
  using S = typename Op::S;
  using R = typename Op::R;
  const T* in[Op::kIn];
  const S* param[kSlotsFor<Op::kParamIn>] = {};
  T* out = nullptr;
  const T* addend = nullptr;  // kAddsInput, kOutAddend: required
  T* out_sum = nullptr;       // kAddsInput: required
  const R* row_in[kRowInSlots<Op>] = {};
  R* row_out[kSlotsFor<Op::kRowOut>] = {};
  S* param_sums[kSlotsFor<Op::kParamSums>] = {};  // outputs, n values each; nullptr: not wanted
};

template <class Op>
void run_rows(const Op& op, const RowLayout& l, const Operands<Op>& ops);

// Σ over slots of the partial parameter sums, for each row position: a column reduction of the [slot][n]
// partial rows (column_kernel; row_kernel when n == 1), which adds the slots in order.
template <class S_>
struct SlotSum : SumEpilogue<S_> {
  using T = S_;
  using S = S_;
  using R = S_;
  static constexpr int kIn = 1;
  static constexpr bool kElementOut = false;
  static constexpr int kRowOut = 1;
  static constexpr bool kReduces = true;
  struct Row {
    S total;
  };
  template <class Each>
  __device__ __forceinline__ S partial(const Each& each, const S (&)[1], const RowAt&) const {
    S total = 0;
    each([&](const S (&v)[1], int) { total += v[0]; });
    return total;
  }
  __device__ __forceinline__ Row finish(S st, const S (&)[1], const RowAt&) const { return {st}; }
  __device__ __forceinline__ S map(const Row&, const S (&)[1], int) const { return S(0); }
  __device__ __forceinline__ S row_out(const Row& r, int) const { return r.total; }
};

// ws: [kSums][slots][n] partial sums; outputs[c]: n values, or nullptr (not wanted).
template <class S, int kSums>
void sum_param_slots(const S* ws, S* const (&outputs)[kSums], int64_t slots, int64_t n) {
  for (int c = 0; c < kSums; ++c) {
    if (outputs[c] == nullptr) continue;
    Operands<SlotSum<S>> ops;
    ops.in[0] = ws + c * slots * n;
    ops.row_out[0] = outputs[c];
    run_rows(SlotSum<S>{}, RowLayout{1, slots, n}, ops);
  }
}

template <class S>
at::Tensor param_workspace(int sums, int64_t slots, int64_t n) {
  return at::empty({sums, slots, n}, at::TensorOptions()
                                         .dtype(c10::CppTypeToScalarType<S>::value)
                                         .device(at::kCUDA, c10::cuda::current_device()));
}

template <class Op>
EngineArgs<Op> engine_args(const Op& op, const RowLayout& l, const Operands<Op>& ops) {
  EngineArgs<Op> args{op};
  for (int i = 0; i < Op::kIn; ++i) args.in[i] = ops.in[i];
  for (int c = 0; c < kSlotsFor<Op::kParamIn>; ++c) args.param[c] = ops.param[c];
  args.out = ops.out;
  args.addend = ops.addend;
  args.out_sum = ops.out_sum;
  for (int r = 0; r < kRowInSlots<Op>; ++r) args.row_in[r] = ops.row_in[r];
  for (int r = 0; r < kSlotsFor<Op::kRowOut>; ++r) args.row_out[r] = ops.row_out[r];
  args.outer = l.outer;
  args.n = l.n;
  args.inner = l.inner;
  return args;
}

template <class Op, class Kernel>
void launch_plan(Kernel kernel, const Plan& plan, EngineArgs<Op> args) {
  const int64_t x = std::clamp<int64_t>(plan.blocks, 1, INT_MAX / plan.cluster * plan.cluster);
  const dim3 grid(static_cast<unsigned>(round_up(x, plan.cluster)), static_cast<unsigned>(std::min<int64_t>(plan.chunks, 65535)));
  args.chunks = plan.chunks;
  if (Op::kReduces && plan.chunks > 1) {
    // Split: partials into a workspace (stream-ordered by the caching allocator), then the finish; an op
    // with neither element output nor parameter sums finishes a row in one block (grid y = 1).
    const int64_t segments = args.outer * args.inner;
    const at::Tensor ws = at::empty({segments * plan.chunks * int64_t(sizeof(typename Op::Stat))},
                                    at::TensorOptions().dtype(at::kByte).device(at::kCUDA, c10::cuda::current_device()));
    args.ws = reinterpret_cast<typename Op::Stat*>(ws.mutable_data_ptr());
    args.mode = Mode::Partial;
    launch_kernel(kernel, grid, plan.threads, plan.cluster, args);
    args.mode = Mode::Finish;
    launch_kernel(kernel, Op::kElementOut || Op::kParamSums > 0 ? grid : dim3(grid.x), plan.threads, plan.cluster, args);
    return;
  }
  args.mode = plan.chunks > 1 ? Mode::Finish : Mode::Full;  // a split op without reduction only maps
  launch_kernel(kernel, grid, plan.threads, plan.cluster, args);
}

// row_kernel with parameter sums fused (every row at one grid offset): a grid of at most one wave of
// resident row slots (blocks, or clusters, along x), each mapping rows base, base + slots, ...; so there
// are few partial rows to write and sum. Then their sum over slots into the outputs.
template <class Op, class Kernel>
void launch_with_param_sums(Kernel kernel, Plan plan, EngineArgs<Op> args, typename Op::S* const (&outputs)[Op::kParamSums]) {
  using S = typename Op::S;
  const int64_t y = std::min<int64_t>(plan.chunks, 65535);
  const int64_t wave = std::max<int64_t>(1, resident_blocks(kernel, plan.threads, plan.cluster) / plan.cluster / y);
  const int64_t wanted = ceil_div(plan.blocks, plan.cluster);  // row slots that have rows to map
  const int64_t per_slot = ceil_div(wanted, std::min(wanted, wave));
  const int64_t slots = ceil_div(wanted, per_slot);  // as few as keep per_slot: balanced
  plan.blocks = slots * plan.cluster;
  const at::Tensor ws = param_workspace<S>(Op::kParamSums, slots, args.n);
  args.param_ws = ws.mutable_data_ptr<S>();
  launch_plan<Op>(kernel, plan, args);
  sum_param_slots<S, Op::kParamSums>(args.param_ws, outputs, slots, args.n);
}

// Parameter sums alone (param_sums_kernel, then the sum over slots): for rows at different grid offsets, or
// when no element output is wanted. Enough slots of rows to give every SM several blocks.
template <class Op>
void run_param_sums(const Op& op, const RowLayout& l, const Operands<Op>& ops) {
  using S = typename Op::S;
  static_assert(Op::kParamSums > 0, "an op with parameter sums");
  TORCH_INTERNAL_ASSERT(l.inner == 1 && l.outer > 0 && l.n > 0);
  EngineArgs<Op> args = engine_args(op, l, ops);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks_x = ceil_div(l.n, kParamSumThreads);
  TORCH_CHECK(blocks_x <= INT_MAX, "torch_vjp: rows of ", l.n, " elements are too long");
  const int64_t wanted = std::clamp<int64_t>(ceil_div(8 * int64_t(sms), blocks_x), 1, std::min<int64_t>(l.outer, 65535));
  const int64_t per_slot = ceil_div(l.outer, wanted);
  const int64_t slots = ceil_div(l.outer, per_slot);
  const at::Tensor ws = param_workspace<S>(Op::kParamSums, slots, l.n);
  args.param_ws = ws.mutable_data_ptr<S>();
  param_sums_kernel<Op><<<dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>(slots)), kParamSumThreads, 0,
                          at::cuda::getCurrentCUDAStream()>>>(args, per_slot);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_param_slots<S, Op::kParamSums>(args.param_ws, ops.param_sums, slots, l.n);
}

// Whether run_rows fuses Op's parameter sums into the row kernel over layout l: every row at one grid offset.
template <class Op>
bool fuses_param_sums(const RowLayout& l) {
  return l.inner == 1 && l.n % kPackElems<typename Op::T> == 0;
}

// The row_kernel instance of a plan (plan_rows: V = 1, 2, 4 or kRowPacks), checked against the instance's
// launch bound: V < kRowPacks only on the shuffle paths, a cluster's blocks within kClusterThreads.
template <class Op, class Go>
void with_row_kernel(const Plan& plan, const Go& go) {
  constexpr int Vmax = kRowPacks<Op>;
  const bool shuffle = plan.lanes <= kWarpSize && plan.cluster == 1 && plan.chunks == 1;
  TORCH_INTERNAL_ASSERT(plan.V == Vmax || (shuffle && plan.threads <= kSubWarpThreads),
                        "torch_vjp: a row plan with ", plan.V, " packs a thread off the shuffle paths");
  TORCH_INTERNAL_ASSERT(plan.threads <= (plan.cluster > 1 ? Op::kClusterThreads : Op::kMaxThreads),
                        "torch_vjp: a row plan of ", plan.threads, " threads a block above its kernel's launch bound");
  if (plan.V == Vmax) {
    // The row groups of plan_rows: Cluster and WideBlock (row_kernel's kBlockGroup), the whole block; Block,
    // warps or the whole block (kWholeBlockRows: the whole block, and warps take a Shuffle instance).
    const bool block_group = plan.lanes == plan.threads && plan.lanes > kWarpSize;
    TORCH_INTERNAL_ASSERT(block_group || plan.lanes == kWarpSize, "torch_vjp: a row plan of ", plan.lanes,
                          " lanes a row in blocks of ", plan.threads);
    if constexpr (kWholeBlockRows<Op>) {
      if (!block_group) {
        TORCH_INTERNAL_ASSERT(shuffle && plan.threads <= kSubWarpThreads, "torch_vjp: a warp-path plan of ",
                              plan.threads, " threads, ", plan.cluster, " blocks a cluster, ", plan.chunks, " chunks");
        return go(row_kernel<Op, Vmax, RowKind::Shuffle>);
      }
    }
    if (plan.cluster > 1) {
      TORCH_INTERNAL_ASSERT(block_group, "torch_vjp: a cluster plan of ", plan.lanes, " lanes in blocks of ", plan.threads);
      return go(row_kernel<Op, Vmax, RowKind::Cluster>);
    }
    if (plan.threads <= kRowThreads<Op, RowKind::Block>) return go(row_kernel<Op, Vmax, RowKind::Block>);
    if constexpr (Op::kMaxThreads > Op::kBlockThreads) {
      TORCH_INTERNAL_ASSERT(block_group, "torch_vjp: a wide-block plan of ", plan.lanes, " lanes in blocks of ", plan.threads);
      return go(row_kernel<Op, Vmax, RowKind::WideBlock>);
    }
  }
  // Shuffle: groups of a power of two lanes, at most a warp.
  TORCH_INTERNAL_ASSERT(plan.lanes <= kWarpSize && (plan.lanes & (plan.lanes - 1)) == 0 && plan.lanes > 0,
                        "torch_vjp: a shuffle plan of ", plan.lanes, " lanes a row");
  switch (plan.V) {
    case 1: return go(row_kernel<Op, 1, RowKind::Shuffle>);
    case 2:
      if constexpr (Vmax > 2) return go(row_kernel<Op, 2, RowKind::Shuffle>);
      break;
    case 4:
      if constexpr (Vmax > 4) return go(row_kernel<Op, 4, RowKind::Shuffle>);
      break;
  }
  TORCH_INTERNAL_ASSERT(false, "torch_vjp: no row kernel with ", plan.V, " packs per thread and ", plan.threads,
                        " threads");
}

// The row kernel's plan for Op over layout l (inner == 1) whose grid operand starts grid_mis elements past a
// 16-byte boundary: as plan_rows, then without clusters if the planned one cannot run on this device (the
// kernel's code predates sm_90, or the GPU is partitioned). The fallback keeps V (both plan Vmax packs).
template <class Op>
Plan plan_row_kernel(const RowLayout& l, int grid_mis) {
  constexpr int P = kPackElems<typename Op::T>;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int max_off = l.n % P == 0 ? grid_mis : P - 1;
  const auto plan_for = [&](bool clusters) {
    return plan_rows(l.outer, l.n, P, kRowPacks<Op>, Op::kMaxThreads, Op::kClusterThreads, sms, clusters, max_off);
  };
  // A pass without a row reduction (the cross-entropy gradient, logsumexp's backward) gains nothing from a
  // cluster: long rows are cut into independent chunks (the split path, which then only maps: one read).
  Plan plan = plan_for(Op::kReduces && has_clusters());
  if (plan.cluster > 1) {
    with_row_kernel<Op>(plan, [&](auto kernel) {
      if (!cluster_fits(kernel, plan.threads, plan.cluster)) plan = plan_for(false);
    });
  }
  return plan;
}

// The column kernel's for Op over layout l (inner > 1), over at most outer_part outer indices a launch; vec:
// inner % P == 0 and every pointer 16-byte aligned.
template <class Op>
Plan plan_column_kernel(const RowLayout& l, int64_t outer_part, bool vec) {
  constexpr int P = kPackElems<typename Op::T>;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  Plan plan = plan_columns(outer_part, l.n, l.inner, P, kRowPacks<Op>, vec, sms, Op::kReduces && has_clusters());
  const auto kernel = vec ? column_kernel<Op, kRowPacks<Op>, true> : column_kernel<Op, kRowPacks<Op>, false>;
  if (plan.cluster > 1 && !cluster_fits(kernel, plan.threads, plan.cluster))
    plan = plan_columns(outer_part, l.n, l.inner, P, kRowPacks<Op>, vec, sms, false);
  return plan;
}

// One launch of the column kernel covers fewer than 2^31 flattened columns (o, i) when outer > 1, so that the
// kernel finds o with a 32-bit magic-number division; a larger tensor takes several launches over ranges of
// outer, this many outer indices each.
inline int64_t column_outer_part(const RowLayout& l) {
  return std::max<int64_t>(1, std::min<int64_t>(l.outer, (int64_t(INT_MAX) / l.inner)));
}

// The plan run_rows launches Op with over layout l, for 16-byte aligned operands (a freshly allocated tensor):
// what the path queries of cuda/plan.h report.
template <class Op>
Plan engine_plan(const RowLayout& l) {
  if (l.inner == 1) return plan_row_kernel<Op>(l, 0);
  if constexpr (Op::kRowsOnly) {
    TORCH_CHECK(false, "torch_vjp: a rows-only op over a dim that is not the last");
    return Plan{};
  } else {
    return plan_column_kernel<Op>(l, column_outer_part(l), l.inner % kPackElems<typename Op::T> == 0);
  }
}

// Runs Op over a tensor of layout l: plans (plan_row_kernel, plan_column_kernel), launches on the current
// stream. Parameter sums (ops.param_sums) are fused into the row kernel when n % P == 0, else computed by
// run_param_sums after it.
template <class Op>
void run_rows(const Op& op, const RowLayout& l, const Operands<Op>& ops) {
  using T = typename Op::T;
  constexpr int P = kPackElems<T>;
  EngineArgs<Op> args = engine_args(op, l, ops);
  if (l.inner == 1) {
    // The grid is aligned for the element output where there is one, else for input 0.
    args.grid_mis = Op::kElementOut ? misalignment(ops.out) : misalignment(ops.in[0]);
    for (int i = 0; i < Op::kIn; ++i) args.shift[i] = (misalignment(ops.in[i]) - args.grid_mis + P) % P;
    if constexpr (Op::kAddsInput || Op::kOutAddend) {
      TORCH_INTERNAL_ASSERT(ops.addend != nullptr && ops.out != nullptr, "torch_vjp: an addend op without its operands");
      args.addend_shift = (misalignment(ops.addend) - args.grid_mis + P) % P;
    }
    if constexpr (Op::kAddsInput) {
      TORCH_INTERNAL_ASSERT(ops.out_sum != nullptr, "torch_vjp: an added input without out_sum");
      args.sum_aligned = misalignment(ops.out_sum) == args.grid_mis;
    }
    bool want_sums = false;
    for (int c = 0; c < Op::kParamSums; ++c) want_sums = want_sums || ops.param_sums[c] != nullptr;
    const bool fused_sums = want_sums && fuses_param_sums<Op>(l);
    const Plan plan = plan_row_kernel<Op>(l, args.grid_mis);
    args.lanes = plan.lanes;
    args.chunk_len = plan.chunk_len;
    with_row_kernel<Op>(plan, [&](auto kernel) {
      if constexpr (Op::kParamSums > 0) {
        if (fused_sums) return launch_with_param_sums(kernel, plan, args, ops.param_sums);
      }
      launch_plan<Op>(kernel, plan, args);
    });
    if constexpr (Op::kParamSums > 0) {
      if (want_sums && !fused_sums) run_param_sums(op, l, ops);
    }
    return;
  }
  if constexpr (Op::kRowsOnly) {
    TORCH_INTERNAL_ASSERT(false, "torch_vjp: a rows-only op over a dim that is not the last");
  } else {
    bool vec = l.inner % P == 0 && misalignment(ops.out ? ops.out : ops.in[0]) == 0;
    for (int i = 0; i < Op::kIn; ++i) vec = vec && misalignment(ops.in[i]) == 0;
    const int Pe = vec ? P : 1;
    const int64_t outer_part = column_outer_part(l);
    const Plan plan = plan_column_kernel<Op>(l, outer_part, vec);
    const auto go = [&](auto kernel) {
      args.lanes = plan.lanes;
      args.chunk_len = plan.chunk_len;
      args.inner_div = at::cuda::detail::IntDivider<uint32_t>(static_cast<uint32_t>(std::min<int64_t>(l.inner, INT32_MAX)));
      for (int64_t o0 = 0; o0 < l.outer; o0 += outer_part) {
        EngineArgs<Op> part = args;
        part.outer = std::min(outer_part, l.outer - o0);
        const int64_t elems = o0 * l.n * l.inner, segs = o0 * l.inner;
        for (int i = 0; i < Op::kIn; ++i) part.in[i] += elems;
        if (part.out) part.out += elems;
        for (int r = 0; r < Op::kRowIn; ++r) part.row_in[r] += segs;
        for (int r = 0; r < Op::kRowOut; ++r) part.row_out[r] += segs;
        part.tiles = ceil_div(part.outer * l.inner / Pe, plan.lanes);
        Plan launch = plan;
        launch.blocks = part.tiles * plan.cluster;
        launch_plan<Op>(kernel, launch, part);
      }
    };
    if (vec) go(column_kernel<Op, kRowPacks<Op>, true>);
    else go(column_kernel<Op, kRowPacks<Op>, false>);
  }
}

}  // namespace torch_vjp::cuda
