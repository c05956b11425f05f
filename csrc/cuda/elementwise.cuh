// The elementwise map kernel: kOut outputs from kIn inputs, element by element, over contiguous tensors of
// one numel: the elementwise family (y = f(x); dx = f'·dy from dy and the saved tensor) and the gated one
// (y = f(a) ⊙ b; da, db from dy, a, b). The functor F computes, in at::opmath_type S,
//   void operator()(const S (&in)[kIn], S (&out)[kOut]) const
//
// Memory-bound: the tensor is one run of vec.cuh's pack grid, aligned for output 0, so every full pack is one
// 128-bit load per input and one 128-bit store per output whatever the inputs' alignment (an input off the
// output's alignment, such as x[1:], is realigned in registers); only the first and last pack go element by
// element. A second output shares output 0's alignment when the frontend allocates both (always, today);
// otherwise it is stored element by element. Each warp takes U · 32 consecutive packs per iteration, all
// loads issued before any math (U = 4 packs of one input, 2 of each of two or three: 64 or 96 bytes in flight a
// thread); the grid is one full wave of resident blocks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <array>

#include "cuda/fast_math.cuh"
#include "cuda/launch.cuh"
#include "cuda/vec.cuh"
#include "math/elementwise.h"
#include "math/gated.h"
#include "math/gelu_fast.h"

namespace torch_vjp::cuda {

// ex2.approx and rcp.approx (MUFU.EX2, MUFU.RCP), for math/gelu_fast.h.
struct MufuApprox {
  __device__ __forceinline__ static float exp2(float x) { return ex2_approx(x); }
  __device__ __forceinline__ static float rcp(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
  }
};

// Exact GELU for the half types: Φ and φ from one MUFU.EX2 and one MUFU.RCP (math/gelu_fast.h; checked
// against float64 for every bf16 and fp16 input) instead of erfcf, expf and an IEEE division.
using GeluHalf = math::GeluFast<MufuApprox>;

// The math a map kernel over storage type T evaluates for activation Op: Op, except exact GELU (alone or
// gated) in the half types. float and double keep the IEEE functions.
template <class T, class Op>
struct MathFor {
  static Op of(const Op& op) { return op; }
};
template <class T>
  requires(sizeof(T) == 2)
struct MathFor<T, math::Gelu> {
  static GeluHalf of(const math::Gelu&) { return {}; }
};
template <class T>
  requires(sizeof(T) == 2)
struct MathFor<T, math::Gated<math::Gelu>> {
  static math::Gated<GeluHalf> of(const math::Gated<math::Gelu>&) { return {}; }
};

// The functor launch_map runs for storage type T: f.for_storage<T>() where the functor has one (the map
// families' functors, through MathFor), else f.
template <class T, class F>
auto functor_for(const F& f) {
  if constexpr (requires { f.template for_storage<T>(); }) return f.template for_storage<T>();
  else return f;
}

constexpr int kMapThreads = 256;

template <int kIn>
inline constexpr int kMapUnroll = kIn == 1 ? 4 : 2;

// Register cap: 64 a thread (4 blocks an SM) for one input, 80 for two (3 blocks), 128 for three (2 blocks):
// exact GELU's backward (erfc, exp and a division) spilled 16 bytes in half types at 64 and the gated one 8 at
// 80 (sm_90). Each still keeps at least 48 KB of loads in flight an SM (blocks × 256 threads × U packs × kIn).
template <int kIn>
inline constexpr int kMapMinBlocks = kIn <= 1 ? 4 : kIn == 2 ? 3 : 2;

template <class F, int kIn, int kOut, class T>
struct MapArgs {
  F f;
  const T* in[kIn];
  T* out[kOut];
  int64_t numel;
  int off;              // output 0's misalignment in elements: the grid's
  int shift[kIn];       // each input's misalignment relative to the grid, mod P
  bool out_aligned[kOut];  // shares the grid's alignment (output 0 always)
};

template <class F, int kIn, int kOut, class T>
__global__ void __launch_bounds__(kMapThreads, kMapMinBlocks<kIn>) map_kernel(const MapArgs<F, kIn, kOut, T> a) {
  using S = at::opmath_type<T>;
  constexpr int P = kPackElems<T>;
  constexpr int U = kMapUnroll<kIn>;
  constexpr int kRun = kWarpSize * U;  // packs a warp takes per iteration
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int64_t num_warps = int64_t(gridDim.x) * blockDim.x / kWarpSize;
  const int64_t packs = ceil_div(a.numel + a.off, P);
  // q0 is uniform across the warp: load_grid_pack's shuffle needs every lane.
  for (int64_t q0 = warp * kRun; q0 < packs; q0 += num_warps * kRun) {
    // Indices relative to the run's first grid pack (element run0 of the tensor), [lo, hi) the tensor clamped
    // to two packs around the run.
    const int64_t run0 = q0 * P - a.off;
    const int lo = static_cast<int>(std::max<int64_t>(-run0, -2 * P));
    const int hi = static_cast<int>(std::min<int64_t>(a.numel - run0, (kRun + 2) * P));
    Pack<T> tile[kIn][U];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < kIn; ++i)
        tile[i][u] = load_grid_pack(a.in[i] + run0, (u * kWarpSize + lane) * P, lo, hi, a.shift[i], lane == kWarpSize - 1, S(0));
#pragma unroll
    for (int u = 0; u < U; ++u) {
      S r[kOut][P];
#pragma unroll
      for (int k = 0; k < P; ++k) {
        S x[kIn], y[kOut];
#pragma unroll
        for (int i = 0; i < kIn; ++i) x[i] = pack_elem(tile[i][u], k);
        a.f(x, y);
#pragma unroll
        for (int o = 0; o < kOut; ++o) r[o][k] = y[o];
      }
#pragma unroll
      for (int o = 0; o < kOut; ++o)
        store_grid_pack(a.out[o] + run0, (u * kWarpSize + lane) * P, lo, hi, r[o], a.out_aligned[o]);
    }
  }
}

// f over contiguous tensors of one numel > 0 and one dtype (out[0]'s), on the current stream.
template <int kIn, int kOut, class F>
void launch_map(const F& f, const std::array<at::Tensor, kIn>& in, const std::array<at::Tensor, kOut>& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out[0].scalar_type(), "torch_vjp_map_cuda", [&] {
    using T = scalar_t;
    using G = decltype(functor_for<T>(f));
    constexpr int P = kPackElems<T>;
    constexpr auto kernel = map_kernel<G, kIn, kOut, T>;
    MapArgs<G, kIn, kOut, T> args{functor_for<T>(f)};
    args.numel = out[0].numel();
    for (int o = 0; o < kOut; ++o) {
      args.out[o] = out[o].template mutable_data_ptr<T>();
      args.out_aligned[o] = misalignment(args.out[o]) == misalignment(args.out[0]);
    }
    args.off = misalignment(args.out[0]);
    for (int i = 0; i < kIn; ++i) {
      args.in[i] = in[i].template const_data_ptr<T>();
      args.shift[i] = (misalignment(args.in[i]) - args.off + P) % P;
    }
    const int64_t packs_per_block = int64_t(kMapUnroll<kIn>) * kMapThreads;
    const unsigned blocks =
        grid_blocks(ceil_div(ceil_div(args.numel + args.off, P), packs_per_block), one_wave_blocks<kernel, kMapThreads>());
    kernel<<<blocks, kMapThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace torch_vjp::cuda
