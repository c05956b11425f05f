// Gated family (swiglu, geglu), CUDA backend: each direction one pass of the elementwise map kernel
// (cuda/elementwise.cuh: 16-byte packs at any alignment of every operand). The math is math/gated.h (the
// activation's value and slope from math/elementwise.h), in at::opmath_type.
//   forward   y = f(a) ⊙ b: reads a and b, writes y (3 tensor-passes); saves nothing but the inputs
//   backward  the Jacobian is two diagonal blocks, ∂y/∂a = diag(f'(a) ⊙ b) and ∂y/∂b = diag(f(a)), so
//             da = dy ⊙ b ⊙ f'(a), db = dy ⊙ f(a) (math::Gated::backward, f and f' recomputed from a): reads
//             dy, a, b and writes da, db in one pass (5 tensor-passes)
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/elementwise.cuh"
#include "ops/gated.h"

namespace torch_vjp::cuda {
namespace {

template <class Op>
struct GatedForward {
  Op op;
  template <class S>
  __device__ __forceinline__ void operator()(const S (&x)[2], S (&y)[1]) const { y[0] = op.forward(x[0], x[1]); }
  template <class T>  // the math T's kernel evaluates (MathFor: exact GELU's in the half types)
  auto for_storage() const { return GatedForward<decltype(MathFor<T, Op>::of(op))>{MathFor<T, Op>::of(op)}; }
};

template <class Op>
struct GatedBackward {
  Op op;
  template <class S>
  __device__ __forceinline__ void operator()(const S (&x)[3], S (&y)[2]) const { op.backward(x[0], x[1], x[2], y[0], y[1]); }
  template <class T>
  auto for_storage() const { return GatedBackward<decltype(MathFor<T, Op>::of(op))>{MathFor<T, Op>::of(op)}; }
};

struct CudaGated {
  template <class Op>
  static void gated_forward(Op op, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& output) {
    launch_map<2, 1>(GatedForward<Op>{op}, {gate, up}, {output});
  }
  template <class Op>
  static void gated_backward(Op op, const at::Tensor& grad_output, const at::Tensor& gate, const at::Tensor& up,
                             const at::Tensor& grad_gate, const at::Tensor& grad_up) {
    launch_map<3, 2>(GatedBackward<Op>{op}, {grad_output, gate, up}, {grad_gate, grad_up});
  }
};

}  // namespace
}  // namespace torch_vjp::cuda

TORCH_LIBRARY_IMPL(torch_vjp, CUDA, m) { torch_vjp::register_gated<torch_vjp::cuda::CudaGated>(m); }
