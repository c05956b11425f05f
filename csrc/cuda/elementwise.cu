// Elementwise family, CUDA backend: one grid-stride kernel for forward (y = f(x)) and backward
// (dx = op.backward(dy, saved)). The math is math/elementwise.h, evaluated in at::opmath_type.
//
// Memory-bound: each thread moves kUnroll 16-byte packs per operand per iteration (all loads issued before
// any math), the grid is one full wave of resident blocks, and elements past the last whole pack are
// done one by one. When any pointer is not 16-byte aligned the whole tensor takes the scalar loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "cuda/vec.cuh"
#include "ops/elementwise.h"

namespace torch_vjp::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;

template <bool kBackward, class Op, class S>
__device__ __forceinline__ S apply(const Op& op, S a, S b) {
  if constexpr (kBackward) return op.backward(a, b);
  else return op.forward(a);
}

// Forward: out = op.forward(a), a = x. Backward: the Jacobian of an elementwise f is diag(f'(x)), so
// dx = Jᵀ dy = dy ⊙ f'(x), which op.backward(dy, saved) computes from `b` = saved (y or x, per
// Op::kSavesOutput). Each reads its inputs once and writes out once.
template <bool kBackward, class Op, class T>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(Op op, const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int64_t numel,
                       bool vec) {
  using S = at::opmath_type<T>;
  constexpr int P = kPackElems<T>;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t num_threads = int64_t(gridDim.x) * blockDim.x;
  int64_t scalar_begin = 0;
  if (vec) {
    const int64_t num_packs = numel / P;
    for (int64_t base = tid; base < num_packs; base += kUnroll * num_threads) {
      Pack<T> pa[kUnroll], pb[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t p = base + u * num_threads;
        if (p < num_packs) {
          pa[u] = load_pack(a + p * P);
          if constexpr (kBackward) pb[u] = load_pack(b + p * P);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t p = base + u * num_threads;
        if (p < num_packs) {
          Pack<T> r;
#pragma unroll
          for (int k = 0; k < P; ++k) {
            const S sb = kBackward ? S(pb[u].v[k]) : S(0);
            r.v[k] = T(apply<kBackward>(op, S(pa[u].v[k]), sb));
          }
          store_pack(out + p * P, r);
        }
      }
    }
    scalar_begin = num_packs * P;  // the tail, fewer than P elements
  }
  for (int64_t i = scalar_begin + tid; i < numel; i += num_threads) {
    const S sb = kBackward ? S(b[i]) : S(0);
    out[i] = T(apply<kBackward>(op, S(a[i]), sb));
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
    const bool vec = can_vectorize(pa, po) && (!kBackward || can_vectorize(pb));
    const int64_t per_thread = vec ? int64_t(P) * kUnroll : 1;  // elements one thread takes per iteration
    const unsigned blocks =
        grid_blocks(ceil_div(numel, per_thread * kThreads), one_wave_blocks<kernel, kThreads>());
    kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(op, pa, pb, po, numel, vec);
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
