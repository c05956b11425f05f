// Rotary position embedding, CPU backend: rows in parallel, each row's rotary pairs one vectorised map
// (cpu::map_row: half types widened to float, a lane-counted tail) and the rest copied. The math is
// math/rope.h; the same kernel is the forward (M) and the VJP (Mᵀ).
//
// Backward, derived (math/rope.h): per pair (x₁, x₂) = (x[i], x[i+h]) the forward is the 2×2 map
//   y₁ = x₁c₁ - x₂s₁,  y₂ = x₂c₂ + x₁s₂,   so   ∂y/∂x = M = [[c₁, -s₁], [s₂, c₂]]
// and the VJP is dx = Mᵀ dy:  dx₁ = dy₁c₁ + dy₂s₂,  dx₂ = dy₂c₂ - dy₁s₁  (dx = dy ⊙ cos - rotate_half(dy ⊙ sin));
// the passed-through elements have dx = dy. It reads dy, cos and sin and nothing the forward saved.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>

#include "cpu/loops.h"
#include "ops/rope.h"

namespace torch_vjp {
namespace {

struct CpuRope {
  template <bool Transposed>
  static void rope_rows(const RopeRows& r, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_vjp_rope_cpu", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* cp = cos.const_data_ptr<scalar_t>();
      const scalar_t* sp = sin.const_data_ptr<scalar_t>();
      scalar_t* yp = out.mutable_data_ptr<scalar_t>();
      const int64_t h = r.half, pass = r.dim - 2 * h;
      // A row is D elements; aim for ~32K elements a task.
      const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(r.dim, 1));
      at::parallel_for(0, r.rows, grain, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const scalar_t* xr = xp + r.x.offset(row);
          const scalar_t* cr = cp + r.cs.offset(row);
          const scalar_t* sr = sp + r.cs.offset(row);
          scalar_t* yr = yp + r.out.offset(row);
          if (h > 0) {
            // Scalar math: y[i], y[i+h] = rope_map(x[i], x[i+h], cos[i], sin[i], cos[i+h], sin[i+h]).
            cpu::map_row(std::array<scalar_t*, 2>{yr, yr + h}, h, /*stream=*/false,
                         [](auto x1, auto x2, auto c1, auto s1, auto c2, auto s2) {
                           decltype(x1) y1, y2;
                           math::rope_map<Transposed>(x1, x2, c1, s1, c2, s2, y1, y2);
                           return std::array{y1, y2};
                         },
                         xr, xr + h, cr, sr, cr + h, sr + h);
          }
          if (pass > 0) std::copy(xr + 2 * h, xr + r.dim, yr + 2 * h);
        }
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_vjp, CPU, m) { register_rope<CpuRope>(m); }

}  // namespace torch_vjp
