// Rotary position embedding, CUDA backend: one map over (rows, pairs), cos and sin broadcast over the rows
// of q and k by their RowIndex (ops/rope.h). The math is math/rope.h, in at::opmath_type; the same kernel is
// the forward (M) and the VJP (Mᵀ).
//   forward   reads x, cos, sin (cos and sin once per row of cos: cached across heads), writes y
//   backward  derived (math/rope.h): per pair (x₁, x₂) = (x[i], x[i+h]), y = M x with M = [[c₁, -s₁], [s₂, c₂]],
//             so dx = Mᵀ dy: dx₁ = dy₁c₁ + dy₂s₂, dx₂ = dy₂c₂ - dy₁s₁ (dx = dy ⊙ cos - rotate_half(dy ⊙ sin)),
//             and dx = dy on the passed-through elements; it reads dy, cos, sin (nothing saved by the forward)
// Work: a row is h/V pair units (V pairs: a 16-byte pack from each half of x, cos and sin) then pass/V copy
// units. `tpr` threads share a row (a power of two up to a warp, ≥ its units where possible), so the row's
// offsets (RowIndex: a few 64-bit divisions) are computed once per thread and row; blocks stride over rows.
// V = 16 / sizeof(S) when every pointer and row stride allows 16-byte packs, else 1 (scalar, any layout).
// Indices are 64-bit throughout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "cuda/launch.cuh"
#include "cuda/vec.cuh"
#include "ops/rope.h"

namespace torch_vjp::cuda {
namespace {

constexpr int kRopeThreads = 256;
constexpr int kRopeMinBlocks = 4;  // resident blocks an SM: 64 registers a thread (benchmarks/kernel_resources.py)

// V elements from p (16-byte aligned when V is a pack) in the compute type.
template <class S, int V, class T>
__device__ __forceinline__ void load_elems(const S* p, T (&v)[V]) {
  if constexpr (V == 1) {
    v[0] = static_cast<T>(p[0]);
  } else {
    const Pack<S> pack = load_pack(p);
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = pack_elem(pack, e);
  }
}

template <class S, int V, class T>
__device__ __forceinline__ void store_elems(S* p, const T (&v)[V]) {
  if constexpr (V == 1) p[0] = static_cast<S>(v[0]);
  else store_pack(p, make_pack<S>(v));
}

template <class S, int V, bool Transposed>
__global__ void __launch_bounds__(kRopeThreads, kRopeMinBlocks) rope_kernel(RopeRows r, const S* __restrict__ x,
                                                            const S* __restrict__ cos, const S* __restrict__ sin,
                                                            S* __restrict__ out, int tpr) {
  using T = at::opmath_type<S>;
  const int64_t pair_units = r.half / V, units = pair_units + (r.dim - 2 * r.half) / V;
  const int rows_per_block = kRopeThreads / tpr;
  const int lane = static_cast<int>(threadIdx.x) % tpr;
  for (int64_t row = int64_t(blockIdx.x) * rows_per_block + threadIdx.x / tpr; row < r.rows;
       row += int64_t(gridDim.x) * rows_per_block) {
    const S* xr = x + r.x.offset(row);
    const int64_t cs = r.cs.offset(row);
    const S* cr = cos + cs;
    const S* sr = sin + cs;
    S* yr = out + r.out.offset(row);
    for (int64_t unit = lane; unit < units; unit += tpr) {
      if (unit < pair_units) {
        const int64_t i = unit * V, j = i + r.half;
        T x1[V], x2[V], c1[V], s1[V], c2[V], s2[V], y1[V], y2[V];
        load_elems<S, V>(xr + i, x1);
        load_elems<S, V>(xr + j, x2);
        load_elems<S, V>(cr + i, c1);
        load_elems<S, V>(sr + i, s1);
        load_elems<S, V>(cr + j, c2);
        load_elems<S, V>(sr + j, s2);
#pragma unroll
        for (int e = 0; e < V; ++e) math::rope_map<Transposed>(x1[e], x2[e], c1[e], s1[e], c2[e], s2[e], y1[e], y2[e]);
        store_elems<S, V>(yr + i, y1);
        store_elems<S, V>(yr + j, y2);
      } else {  // passed through: dy = dx there too
        const int64_t i = 2 * r.half + (unit - pair_units) * V;
        T v[V];
        load_elems<S, V>(xr + i, v);
        store_elems<S, V>(yr + i, v);
      }
    }
  }
}

// Every row of `index` starts at a multiple of V elements.
inline bool rows_aligned(const RowIndex& index, int64_t V) {
  for (int d = 0; d < index.ndim; ++d)
    if (index.stride[d] % V != 0) return false;
  return true;
}

struct CudaRope {
  template <bool Transposed>
  static void rope_rows(const RopeRows& r, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_vjp_rope_cuda", [&] {
      using S = scalar_t;
      constexpr int kV = kPackElems<S>;
      const S* xp = x.const_data_ptr<S>();
      const S* cp = cos.const_data_ptr<S>();
      const S* sp = sin.const_data_ptr<S>();
      S* yp = out.mutable_data_ptr<S>();
      const bool packs = r.half % kV == 0 && (r.dim - 2 * r.half) % kV == 0 && misalignment(xp) == 0 &&
                         misalignment(cp) == 0 && misalignment(sp) == 0 && misalignment(yp) == 0 &&
                         rows_aligned(r.x, kV) && rows_aligned(r.cs, kV) && rows_aligned(r.out, kV);
      const int64_t V = packs ? kV : 1;
      const int64_t units = r.half / V + (r.dim - 2 * r.half) / V;
      const int tpr = static_cast<int>(std::min<int64_t>(kWarpSize, pow2_ceil(std::max<int64_t>(units, 1))));
      const int64_t rows_per_block = kRopeThreads / tpr;
      const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      const unsigned blocks = grid_blocks(ceil_div(r.rows, rows_per_block), sms * 8);
      const auto stream = at::cuda::getCurrentCUDAStream();
      if (packs) rope_kernel<S, kV, Transposed><<<blocks, kRopeThreads, 0, stream>>>(r, xp, cp, sp, yp, tpr);
      else rope_kernel<S, 1, Transposed><<<blocks, kRopeThreads, 0, stream>>>(r, xp, cp, sp, yp, tpr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace
}  // namespace torch_vjp::cuda

TORCH_LIBRARY_IMPL(torch_vjp, CUDA, m) { torch_vjp::register_rope<torch_vjp::cuda::CudaRope>(m); }
