// Elementwise family, CUDA backend: forward y = f(x) and backward dx = op.backward(dy, saved), each one pass
// of the elementwise map kernel (cuda/elementwise.cuh: 16-byte packs at any alignment). The math is
// math/elementwise.h, evaluated in at::opmath_type.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/elementwise.cuh"
#include "ops/elementwise.h"

namespace torch_vjp::cuda {
namespace {

// Forward: out = op.forward(x). Backward: the Jacobian of an elementwise f is diag(f'(x)), so
// dx = Jᵀ dy = dy ⊙ f'(x), which op.backward(dy, saved) computes from saved = y or x (per Op::kSavesOutput).
// Each reads its inputs once and writes out once.
// for_storage<T>: the functor with the math T's kernel evaluates (MathFor: exact GELU's in the half types).
template <class Op>
struct Forward {
  Op op;
  template <class S>
  __device__ __forceinline__ void operator()(const S (&x)[1], S (&y)[1]) const { y[0] = op.forward(x[0]); }
  template <class T>
  auto for_storage() const { return Forward<decltype(MathFor<T, Op>::of(op))>{MathFor<T, Op>::of(op)}; }
};

template <class Op>
struct Backward {
  Op op;
  template <class S>
  __device__ __forceinline__ void operator()(const S (&x)[2], S (&y)[1]) const { y[0] = op.backward(x[0], x[1]); }
  template <class T>
  auto for_storage() const { return Backward<decltype(MathFor<T, Op>::of(op))>{MathFor<T, Op>::of(op)}; }
};

struct CudaElementwise {
  template <class Op>
  static void forward(Op op, const at::Tensor& input, const at::Tensor& output) {
    launch_map<1, 1>(Forward<Op>{op}, {input}, {output});
  }
  template <class Op>
  static void backward(Op op, const at::Tensor& grad_output, const at::Tensor& saved, const at::Tensor& grad_input) {
    launch_map<2, 1>(Backward<Op>{op}, {grad_output, saved}, {grad_input});
  }
};

}  // namespace
}  // namespace torch_vjp::cuda

TORCH_LIBRARY_IMPL(torch_vjp, CUDA, m) { torch_vjp::register_elementwise<torch_vjp::cuda::CudaElementwise>(m); }
