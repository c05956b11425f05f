// Elementwise family, CUDA backend: one grid-stride kernel for forward (y = f(x)) and backward
// (dx = op.backward(dy, saved)). The math is math/elementwise.h, evaluated in at::opmath_type.
//
// Memory-bound: the tensor is one run of vec.cuh's pack grid, aligned for the output, so every full pack is
// one 128-bit load per input and one 128-bit store whatever the inputs' alignment (an input off the output's
// alignment, such as x[1:], is realigned in registers); only the first and last pack go element by element.
// Each warp takes kUnroll · 32 consecutive packs per iteration, all loads issued before any math; the grid
// is one full wave of resident blocks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/launch.cuh"
#include "cuda/vec.cuh"
#include "ops/elementwise.h"

namespace torch_vjp::cuda {
namespace {

constexpr int kThreads = 256;

// Packs in flight per thread and input: 4 × 16 bytes forward, 2 × 2 × 16 backward.
template <bool kBackward>
inline constexpr int kUnroll = kBackward ? 2 : 4;

template <bool kBackward, class Op, class S>
__device__ __forceinline__ S apply(const Op& op, S a, S b) {
  if constexpr (kBackward) return op.backward(a, b);
  else return op.forward(a);
}

// Forward: out = op.forward(a), a = x. Backward: the Jacobian of an elementwise f is diag(f'(x)), so
// dx = Jᵀ dy = dy ⊙ f'(x), which op.backward(dy, saved) computes from `b` = saved (y or x, per
// Op::kSavesOutput). Each reads its inputs once and writes out once.
// off: the output's misalignment in elements; shift_a, shift_b: the inputs' relative to it (vec.cuh).
// At most 64 registers (4 blocks an SM, 64 bytes a thread in flight): uncapped, the half-type forwards took
// 96-100 and ran 2 blocks an SM; capped, only the double exp and gelu and the half gelu backward spill.
template <bool kBackward, class Op, class T>
__global__ void __launch_bounds__(kThreads, 4)
    elementwise_kernel(Op op, const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int64_t numel,
                       int off, int shift_a, int shift_b) {
  using S = at::opmath_type<T>;
  constexpr int P = kPackElems<T>;
  constexpr int U = kUnroll<kBackward>;
  constexpr int kRun = kWarpSize * U;  // packs a warp takes per iteration
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int64_t num_warps = int64_t(gridDim.x) * blockDim.x / kWarpSize;
  const int64_t packs = ceil_div(numel + off, P);
  // q0 is uniform across the warp: load_grid_pack's shuffle needs every lane.
  for (int64_t q0 = warp * kRun; q0 < packs; q0 += num_warps * kRun) {
    // Indices relative to the run's first grid pack (element run0 of the tensor), [lo, hi) the tensor clamped
    // to two packs around the run.
    const int64_t run0 = q0 * P - off;
    const int lo = static_cast<int>(std::max<int64_t>(-run0, -2 * P));
    const int hi = static_cast<int>(std::min<int64_t>(numel - run0, (kRun + 2) * P));
    Pack<T> pa[U], pb[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int e0 = (u * kWarpSize + lane) * P;
      pa[u] = load_grid_pack(a + run0, e0, lo, hi, shift_a, lane == kWarpSize - 1, S(0));
      if constexpr (kBackward) pb[u] = load_grid_pack(b + run0, e0, lo, hi, shift_b, lane == kWarpSize - 1, S(0));
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      S r[P];
#pragma unroll
      for (int k = 0; k < P; ++k) r[k] = apply<kBackward>(op, pack_elem(pa[u], k), kBackward ? pack_elem(pb[u], k) : S(0));
      store_grid_pack(out + run0, (u * kWarpSize + lane) * P, lo, hi, r);
    }
  }
}

template <bool kBackward, class Op>
void launch(const Op& op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "torch_vjp_elementwise_cuda", [&] {
    using T = scalar_t;
    constexpr int P = kPackElems<T>;
    constexpr auto kernel = elementwise_kernel<kBackward, Op, T>;
    const T* pa = a.const_data_ptr<T>();
    const T* pb = kBackward ? b.const_data_ptr<T>() : nullptr;
    T* po = out.mutable_data_ptr<T>();
    const int64_t numel = out.numel();
    const int off = misalignment(po);
    const int shift_a = (misalignment(pa) - off + P) % P;
    const int shift_b = kBackward ? (misalignment(pb) - off + P) % P : 0;
    const int64_t packs_per_block = int64_t(kUnroll<kBackward>) * kThreads;
    const unsigned blocks =
        grid_blocks(ceil_div(ceil_div(numel + off, P), packs_per_block), one_wave_blocks<kernel, kThreads>());
    kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(op, pa, pb, po, numel, off, shift_a, shift_b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

struct CudaElementwise {
  template <class Op>
  static void forward(Op op, const at::Tensor& input, const at::Tensor& output) {
    launch<false>(op, input, input, output);
  }
  template <class Op>
  static void backward(Op op, const at::Tensor& grad_output, const at::Tensor& saved, const at::Tensor& grad_input) {
    launch<true>(op, grad_output, saved, grad_input);
  }
};

}  // namespace
}  // namespace torch_vjp::cuda

TORCH_LIBRARY_IMPL(torch_vjp, CUDA, m) { torch_vjp::register_elementwise<torch_vjp::cuda::CudaElementwise>(m); }
