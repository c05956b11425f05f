// Gated activations: y = f(a) ⊙ b, with f an activation of math/elementwise.h (swiglu: silu; geglu: gelu),
// a the gate and b the up projection, elementwise over tensors of one shape.
//
// Jacobian: two diagonal blocks, ∂y/∂a = diag(f'(a) ⊙ b), ∂y/∂b = diag(f(a)). So the VJP is
//   da = dy ⊙ b ⊙ f'(a),   db = dy ⊙ f(a)
// one pass that reads dy, a, b and writes da, db. Nothing is saved but the inputs: f(a) and f'(a) are
// recomputed from a by the activation's value_and_slope (its derivative math, not written again here).
#pragma once

#include "math/elementwise.h"

namespace torch_vjp::math {

template <class Op>
struct Gated {
  Op op;
  template <class T> TVJP_HD T forward(T a, T b) const { return op.forward(a) * b; }
  template <class T> TVJP_HD void backward(T dy, T a, T b, T& da, T& db) const {
    T f, df;
    op.value_and_slope(a, f, df);
    da = dy * b * df;
    db = dy * f;
  }
};

}  // namespace torch_vjp::math
