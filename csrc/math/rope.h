// Rotary position embedding, rotate-half convention (transformers' apply_rotary_pos_emb):
//   y = x ⊙ cos + rotate_half(x) ⊙ sin,   rotate_half(x) = cat(-x₂, x₁)
// over the first R = cos.shape[-1] elements of each row of length D (R even, h = R/2); elements R..D-1
// pass through unchanged (partial rotary models: Phi, GPT-NeoX's rotary_ndims, GLM).
//
// Each pair (x₁, x₂) = (x[i], x[i+h]), i < h, is mapped by one 2×2 matrix, with c₁ = cos[i], c₂ = cos[i+h],
// s₁ = sin[i], s₂ = sin[i+h]:
//   [y₁]   [c₁  -s₁] [x₁]
//   [y₂] = [s₂   c₂] [x₂]
// The op is linear in x, so its Jacobian is this block-diagonal matrix M and the VJP is Mᵀ:
//   dx₁ = dy₁ c₁ + dy₂ s₂,   dx₂ = dy₂ c₂ - dy₁ s₁
// i.e. dx = dy ⊙ cos - rotate_half(dy ⊙ sin); with cos, sin duplicated over the halves (c₁ = c₂, s₁ = s₂, as
// every rotary embedding makes them) the rotation by -θ. Mᵀ is M with (s₁, s₂) ← (-s₂, -s₁): one kernel
// serves both directions. The forward-mode tangent w.r.t. x is M·t, the forward kernel on t.
//
// Products are formed and rounded one by one, then added, as torch's q * cos + rotate_half(q) * sin does:
// in the input's type that is the same float32 result bit for bit (the CPU build has -ffp-contract=off).
#pragma once

#include "math/common.h"

namespace torch_vjp::math {

template <class T>
TVJP_HD void rope_pair(T x1, T x2, T c1, T s1, T c2, T s2, T& y1, T& y2) {
  y1 = x1 * c1 - x2 * s1;
  y2 = x2 * c2 + x1 * s2;
}

// Transposed = true: the VJP (Mᵀ). The sines are swapped and negated, the rest is the forward.
template <bool Transposed, class T>
TVJP_HD void rope_map(T x1, T x2, T c1, T s1, T c2, T s2, T& y1, T& y2) {
  if constexpr (Transposed) {
    y1 = x1 * c1 + x2 * s2;
    y2 = x2 * c2 - x1 * s1;
  } else {
    rope_pair(x1, x2, c1, s1, c2, s2, y1, y2);
  }
}

}  // namespace torch_vjp::math
