// Normalization family, CUDA: the row engine's epilogues (cuda/row_engine.cuh) for layer_norm and rms_norm
// (rows of the trailing n elements, parameter vectors weight and bias, parameter sums dweight and dbias) and
// normalize (p = 2 along any dim), forward and backward, and their launchers. The math is math/norm.h, in
// at::opmath_type S (float for half and bfloat16, double for double); the saved statistics (mean, rstd,
// norm) and the parameters are S.
//
// Kernel shapes (the engine's plan, by the 16-byte packs a row spans; P = 16 / sizeof(T)):
//   forward   one input, up to 8 packs a thread (float) or 4 (others): several rows a warp, a warp, a block
//             (up to 1024 threads), on sm_90 a cluster of blocks of up to 512 threads (so that two rows'
//             blocks share an SM), split rows beyond; one read of x, one write of y.
//   backward  dy and x, 4 packs each; with parameter sums 2 packs each and at most 768 threads a block
//             (80 registers, so 3 blocks of 256 an SM: 32 of them hold the thread's fp32 dweight and dbias
//             sums; no spill since the WideBlock instance stopped dividing by the run-time group size),
//             clusters of blocks of up to 256 threads on sm_90. Reads dy and x once, writes dx once; the
//             parameter sums add one fp32 partial row per resident row slot (a few MiB) and a small second
//             launch. Rows of up to 8 · 768 · 2 packs (bf16 98304, fp32 49152, fp64 24576 elements) take an
//             sm_90 cluster; on sm_80 one block holds 12288, 6144, 3072; longer rows are split across blocks
//             and dy and x are read twice. When n % P != 0 rows start at different pack offsets, a thread maps
//             different row positions in different rows, and the sums take a second pass over dy and x
//             instead (the engine's param_sums_kernel), as does a backward that wants no dx.
//   add_*     add_layer_norm, add_rms_norm: AddNormForward, the forward with the residual added to x as both
//             are loaded (4 packs of each; s = x + residual rounded to T, written beside y in the same pass),
//             and AddNormBackward, the backward with grad_sum read and added as dx is written; every row path
//             (the engine's kAddsInput, kOutAddend), with block bounds of their own (below).
//
// Special values: a row holding NaN gives NaN (as torch); rows of one value give x̂ = 0 (σ² = 0, rstd =
// 1/√eps). Instruction budget (bf16, ~35 an element at 90% of an H200's bandwidth, 5 tensor-passes forward
// and backward together): forward ~6 an element (the two-pass mean and M2 over registers, then x̂ w + b),
// backward ~14 (g, x̂ and the two sums, then dx and the two parameter terms), plus conversions.
#pragma once

#include <algorithm>
#include <limits>
#include <string_view>
#include <type_traits>

#include "cuda/fast_math.cuh"
#include "cuda/row_engine.cuh"
#include "math/norm.h"

namespace torch_vjp::cuda {

// count elements, their mean, and M2 = Σ (x - mean)² over them.
template <class S>
struct MeanM2 {
  S count, mean, m2;
};

// A fixed number of sums reduced together.
template <class S, int N>
struct Sums {
  S s[N];
};

// ---------------------------------------------------------------------------------------------------------
// Forward of layer_norm (kCentered) and rms_norm, per row:
//   μ = mean(x) (0 for rms_norm), σ² = Σ(x - μ)² / n, r = 1/√(σ² + eps), y = x̂ ⊙ w + b with x̂ = (x - μ) r
// Stat: layer_norm (count, mean, M2), each thread's over the ≤ 32 elements it holds: the shifted mean
// c + Σ(x - c)/count (math::shifted_mean) with c the row's first element, then Σ of squared deviations from
// it (no cancellation, whatever the row's mean), merged by Chan's formula. A constant row has every x - c = 0,
// so each thread's mean is the value itself, every merge has δ = 0 and keeps it, and x - μ = 0 exactly: y = b
// however large r is (Σx / count is off by an ulp there, and BERT's eps = 1e-12 makes that |x̂| ≈ 0.4). c is
// one load a row (the same address in every thread: L1), not each thread's first element, which took a
// select a pack and spilled the 8-pack float instance on sm_90.
// rms_norm: Σx², which has no cancellation to avoid. Row outputs: (μ,) r. Parameters: w (, b).
template <bool kCentered, class T_>
struct NormForward : EpilogueDefaults {
  using T = T_;
  using S = Opmath<T>;
  using R = S;
  using Stat = std::conditional_t<kCentered, MeanM2<S>, S>;
  static constexpr int kIn = 1;
  static constexpr int kParamIn = kCentered ? 2 : 1;
  static constexpr bool kElementOut = true;
  static constexpr int kRowOut = kCentered ? 2 : 1;
  static constexpr bool kReduces = true;
  static constexpr bool kMasked = kCentered;  // the count and the mean must not see the padding
  static constexpr bool kRowsOnly = true;
  static constexpr int kMaxThreads = kCentered ? 768 : 1024;  // layer_norm: 80 registers, no spills at 4 packs
  static constexpr int kClusterThreads = 512;
  // Bounds of 768 threads (80 registers) for layer_norm's Block instance and rms_norm's Cluster instance: at
  // 128 registers ptxas spilled 40-56 bytes in those float instances (8 packs), at 80 none; layer_norm's
  // Cluster instance is the other way round (8 bytes at 80, none at 128).
  static constexpr int kBlockThreads = kCentered ? 768 : 512;
  static constexpr int kClusterBound = kCentered ? 0 : 768;
  S eps, inv_n;  // inv_n = 1 / n
  const T* x;    // the input (layer_norm: each row's first element is its mean's shift)
  bool round_xhat = false;  // rms_norm casting_mode="llama": x̂ rounded to T before the weight (math/norm.h);
                            // layer_norm's kernels never read it

  struct Row {
    S mean, rstd;
  };

  __device__ __forceinline__ S pad(int) const { return S(0); }
  __device__ __forceinline__ Stat identity() const { return Stat{}; }

  // Chan, Golub and LeVeque's merge: with δ = mean_b - mean_a and c = count_a + count_b,
  //   mean = mean_a + δ count_b / c,   M2 = M2_a + M2_b + δ² count_a count_b / c.
  __device__ __forceinline__ Stat combine(Stat a, Stat b) const {
    if constexpr (kCentered) {
      if (b.count == S(0)) return a;
      if (a.count == S(0)) return b;
      const S count = a.count + b.count;
      const S share = b.count * reciprocal(count);
      const S delta = b.mean - a.mean;
      return {count, a.mean + delta * share, a.m2 + b.m2 + delta * delta * a.count * share};
    } else {
      return a + b;
    }
  }

  template <class Each>
  __device__ __forceinline__ Stat partial(const Each& each, const S (&)[1], const RowAt& at) const {
    // c: the row's first element, the same for every thread (one load a row, from L1 after the first).
    return partial_shifted(each, kCentered ? static_cast<S>(x[at.row * at.n]) : S(0));
  }

  // The partial with the layer_norm shift c (any element of the row; rms_norm ignores it).
  template <class Each>
  __device__ __forceinline__ Stat partial_shifted(const Each& each, S c) const {
    if constexpr (kCentered) {
      S sum = 0;
      int count = 0;  // an int: a whole pack's adds fold into one
      each([&](const S (&v)[kParamIn + 1], int) {
        ++count;
        sum += v[0] - c;
      });
      if (count == 0) return identity();
      // math::shifted_mean(c, sum, count), with the division as reciprocal(): CUDA's IEEE division calls a
      // subroutine here, whose ABI spills the row held in registers. sum = 0 gives c exactly either way.
      const S mean = c + sum * reciprocal(S(count));
      S m2 = 0;
      each([&](const S (&v)[kParamIn + 1], int) {
        const S d = v[0] - mean;
        m2 += d * d;
      });
      return {S(count), mean, m2};
    } else {
      S sum_sq = 0;
      each([&](const S (&v)[kParamIn + 1], int) { sum_sq += v[0] * v[0]; });
      return sum_sq;
    }
  }

  // r as math::norm_rstd, without IEEE division and square root (cuda/fast_math.cuh).
  __device__ __forceinline__ Row finish(Stat st, const S (&)[1], const RowAt&) const {
    if constexpr (kCentered) return {st.mean, rsqrt_fast(st.m2 * inv_n + eps)};
    else return {S(0), rsqrt_fast(st * inv_n + eps)};
  }

  __device__ __forceinline__ S map(const Row& r, const S (&v)[kParamIn + 1], int) const {
    if constexpr (kCentered) {
      return math::norm_out(v[0], r.mean, r.rstd, v[1], v[2]);
    } else {
      if (round_xhat) return math::norm_out_rounded(v[0], r.mean, r.rstd, v[1], S(0), [](S t) { return math::as_stored<T>(t); });
      return math::norm_out(v[0], r.mean, r.rstd, v[1], S(0));
    }
  }

  __device__ __forceinline__ S row_out(const Row& r, int i) const { return kCentered && i == 0 ? r.mean : r.rstd; }
};

// add_layer_norm and add_rms_norm forward: the norm above, of s = input + residual rounded to T (torch's add,
// so the statistics are those of the s written). The engine adds the residual to the input as it loads them
// (kAddsInput) and writes s beside y in the same pass: two reads, two writes. The only change to the
// epilogue is layer_norm's shift c, s's first element, formed as the engine forms s.
template <bool kCentered, class T_>
struct AddNormForward : NormForward<kCentered, T_> {
  using Base = NormForward<kCentered, T_>;
  using typename Base::S;
  using typename Base::Stat;
  using typename Base::T;
  static constexpr bool kAddsInput = true;
  // Two loads in flight (4 packs each) change the register budgets that fit (ptxas -v, CUDA 13.0, sm_90).
  // float: layer_norm's 768-thread Block instance spilled 24 B at 80 registers; a Block instance up to 512
  // threads (128) and WideBlock above it (80; rms_norm's 1024: 64) do not. The half types: Block at 512
  // spilled bf16 layer_norm 176 B, WideBlock at 768 or 1024 (80, 64 registers) 36-188 B in every half
  // instance; WideBlock up to 640 (96) none, Block up to 384 threads (168 registers) none on sm_90 but 16 B
  // in bf16 layer_norm on sm_80, up to 256 (255: 126-216) none. So a block holds rows of 640 · 4 packs (20480
  // elements); longer ones take a cluster (sm_90) or are split (sm_80).
  static constexpr bool kHalf = sizeof(T) == 2;
  static constexpr int kMaxThreads = kHalf ? 640 : Base::kMaxThreads;
  static constexpr int kBlockThreads = kHalf ? 256 : 512;
  const T* residual;  // layer_norm: c = x[0] + residual[0] of the row

  template <class Each>
  __device__ __forceinline__ Stat partial(const Each& each, const S (&)[1], const RowAt& at) const {
    S c = S(0);
    if constexpr (kCentered) {
      const int64_t first = at.row * at.n;
      c = math::as_stored<T>(static_cast<S>(this->x[first]) + static_cast<S>(residual[first]));
    }
    return this->partial_shifted(each, c);
  }
};

// ---------------------------------------------------------------------------------------------------------
// Backward of layer_norm and rms_norm: the VJP, derived once here for every kernel shape.
//   forward  μ = mean(x) (0 for rms_norm), r = 1/√(mean((x - μ)²) + eps), x̂ = (x - μ) r, y = x̂ ⊙ w + b
//   saved    x, and per row μ and r (row inputs 0, 1; rms_norm: r alone)
//   dx       with g = dy ⊙ w: ∂x̂ᵢ/∂xⱼ = r (δᵢⱼ - 1/n - x̂ᵢ x̂ⱼ / n) (rms_norm: without the 1/n), a symmetric
//            matrix, so dx = Jᵀ (dy ⊙ w) = r (g - mean(g) - x̂ ⊙ mean(g ⊙ x̂))         (math::norm_vjp)
//            term 1 mean(g) = Stat.s[0] / n (layer_norm only), term 2 mean(g ⊙ x̂) = Stat.s[last] / n: two
//            row reductions in one pass over the registers (x̂ from the saved μ and r, so no cancellation),
//            then one pass that writes dx.
//   dw, db   Σ_rows dy ⊙ x̂ and Σ_rows dy: the gradient of a parameter that every row shares is the sum of
//            the rows' gradients. They are the engine's parameter sums (param_terms), added in fp32 per row
//            slot in the pass that writes dx, then summed over the slots in a fixed order.
// add_layer_norm / add_rms_norm (AddNormBackward below): x is s = input + residual; ∂s/∂input = ∂s/∂residual
//   = I, and s also reaches the loss directly (grad_sum: the gradient of the s output), so
//            d_input = d_residual = grad_sum + dx                                  (math::add_norm_vjp)
//            added to dx as it is written (the engine's kOutAddend: grad_sum read in that pass alone, not held
//            through the reductions), rounded once; dw, db are the norm's at s.
// kSums: with the parameter sums (dweight and, for layer_norm, dbias), else dx alone.
template <bool kCentered, class T_, bool kSums>
struct NormBackward : EpilogueDefaults {
  using T = T_;
  using S = Opmath<T>;
  using R = S;
  static constexpr int kTerms = kCentered ? 2 : 1;  // (Σg,) Σg x̂; and (dw, db) or dw
  using Stat = Sums<S, kTerms>;
  static constexpr int kIn = 2;  // dy, x
  static constexpr int kParamIn = 1;  // w
  static constexpr int kRowIn = kCentered ? 2 : 1;
  static constexpr bool kElementOut = true;
  static constexpr bool kReduces = true;
  static constexpr int kParamSums = kSums ? kTerms : 0;
  static constexpr bool kRowsOnly = true;
  static constexpr int kMaxThreads = 768;  // 80 registers
  // dx alone: at a 512-thread bound (128 registers) ptxas kept the 4 packs of dy and x unpacked and spilled 200+
  // bytes a thread. float: one instance for every block size (768, 80 registers). The half types: a Block
  // instance bound at 640 (96 registers: 92-96, no spill; at 768 layer_norm's kept 4 bytes on the stack on
  // sm_90), and WideBlock (768, 80 registers: 77-80, no spill) for blocks of 641-768 threads.
  static constexpr int kBlockThreads = kSums ? 512 : sizeof(T) == 2 ? 640 : 768;
  // With the sums: two blocks of 512 an SM where ptxas fits the Block instance in 64 registers without a spill
  // (kWholeBlockRows: the whole block its row group), so that one block loads while the other reduces. One
  // 512-thread block an SM (fp32 n = 4096, bf16 n = 8192) alternated the two: a row's loads, then two barriers.
  // float: 52-62 registers (sm_80, sm_90); the half types' rms_norm: 63-64. bf16 layer_norm spilled 32 B there
  // (sm_80: 16 registers of packed dy and x beside 32 of dweight and dbias sums): the half types' layer_norm keeps
  // one block (128 registers). (benchmarks/README.md, issue 16 item 5.)
  static constexpr int kBlockMinBlocks = kSums && (sizeof(T) == 4 || (sizeof(T) == 2 && !kCentered)) ? 2 : 1;
  static constexpr int kClusterBound = kSums ? 0 : 768;  // the same for its Cluster instance (200+ B at 128)
  // A cluster's blocks hold at most 512 threads (the Cluster instance's bound: 128 registers), and 8 of them
  // hold a row of 8·512·kRowPacks packs: with the parameter sums, fp32 n = 32768 in one read.
  static constexpr int kClusterThreads = 512;
  S inv_n;

  struct Row {
    S mean, rstd, mean_g, mean_g_xhat;
  };

  __device__ __forceinline__ static S mean_of(const S (&row_in)[kRowIn]) { return kCentered ? row_in[0] : S(0); }
  __device__ __forceinline__ static S rstd_of(const S (&row_in)[kRowIn]) { return row_in[kRowIn - 1]; }

  __device__ __forceinline__ S pad(int) const { return S(0); }
  __device__ __forceinline__ Stat identity() const { return Stat{}; }
  __device__ __forceinline__ Stat combine(Stat a, Stat b) const {
#pragma unroll
    for (int t = 0; t < kTerms; ++t) a.s[t] += b.s[t];
    return a;
  }

  // Padding: dy = 0 and w = 0, so g = 0 adds nothing.
  template <class Each>
  __device__ __forceinline__ Stat partial(const Each& each, const S (&row_in)[kRowIn], const RowAt&) const {
    const S mean = mean_of(row_in), rstd = rstd_of(row_in);
    Stat st{};
    each([&](const S (&v)[3], int) {
      const S g = v[0] * v[2];
      if constexpr (kCentered) st.s[0] += g;
      st.s[kTerms - 1] += g * math::norm_xhat(v[1], mean, rstd);
    });
    return st;
  }

  __device__ __forceinline__ Row finish(Stat st, const S (&row_in)[kRowIn], const RowAt&) const {
    return {mean_of(row_in), rstd_of(row_in), kCentered ? st.s[0] * inv_n : S(0), st.s[kTerms - 1] * inv_n};
  }

  __device__ __forceinline__ S map(const Row& r, const S (&v)[3], int) const {
    return math::norm_vjp(v[0] * v[2], math::norm_xhat(v[1], r.mean, r.rstd), r.mean_g, r.mean_g_xhat, r.rstd);
  }

  // dw term dy ⊙ x̂ and db term dy: from the saved μ, r only (as param_sums_kernel requires). 0 on padding and
  // on rows past the end (dy = 0, and x = μ = r = 0 there).
  __device__ __forceinline__ void param_terms(const Row& r, const S (&v)[3], S (&t)[kTerms]) const {
    t[0] = v[0] * math::norm_xhat(v[1], r.mean, r.rstd);
    if constexpr (kCentered) t[1] = v[0];
  }
};

// add_*_norm's backward (the derivation is NormBackward's, its last lines): dx + grad_sum, grad_sum the
// engine's output addend.
template <bool kCentered, class T_, bool kSums>
struct AddNormBackward : NormBackward<kCentered, T_, kSums> {
  using Base = NormBackward<kCentered, T_, kSums>;
  using typename Base::S;
  static constexpr bool kOutAddend = true;
  // grad_sum's pack beside dx's in the output pass changes the register budgets that fit (ptxas -v, CUDA 13.0,
  // sm_90). float, dx alone: Block spilled 48-56 B bound at 768 threads (80 registers) and 208 B at 512 (128:
  // the packs of dy and x kept unpacked, as NormBackward's), none at 640 (96), nor WideBlock (80) above it.
  // The half types, dx alone: Block spilled 8 B at 640 and 150-320 B at 384-512, none at 256 (up to 255
  // registers: 221-226), WideBlock (768, 80) none; Cluster 56 B at 768 and 40-56 B at 512, none at 384
  // (168). With the sums: layer_norm's WideBlock spilled 8 B at 768 (80), none at 640 (95); Block and
  // Cluster at NormBackward's 512 none.
  static constexpr bool kHalf = sizeof(T_) == 2;
  static constexpr int kMaxThreads = kSums && kHalf ? 640 : Base::kMaxThreads;
  static constexpr int kBlockThreads = kSums ? 512 : kHalf ? 256 : 640;
  // Two blocks of 512 (64 registers) with the sums in float: 63-64 registers, no spill; the half types'
  // rms_norm spilled 8 B there (sm_80), so they keep one.
  static constexpr int kBlockMinBlocks = kSums && sizeof(T_) == 4 ? 2 : 1;
  static constexpr int kClusterThreads = !kSums && kHalf ? 384 : Base::kClusterThreads;
  static constexpr int kClusterBound = !kSums && kHalf ? 0 : Base::kClusterBound;
  __device__ __forceinline__ S add_out(S dx, S grad_sum) const { return math::add_norm_vjp(dx, grad_sum); }
};

// ---------------------------------------------------------------------------------------------------------
// normalize forward (p = 2), per row along dim: ρ = ‖x‖₂ = √Σx² (|x| for a row of one element, as torch's
// norm: no square to overflow or underflow), y = x / max(ρ, eps), the clamp decided in the input's dtype as
// torch's (math::normalize_clamped). Stat: Σx² or Σ|x| (padding 0). Row output: ρ (saved for the backward).
// Special values as torch's x / clamp_min(ρ, eps): NaN stays NaN
// (math::normalize_denominator), and an infinite ρ (an inf element, or Σx² overflowing: bf16 or fp32 rows
// with |x| above ~1.8e19) gives x · (1/inf) = x · 0, so 0 for finite x and NaN for inf (reciprocal_ieee: the
// Newton-refined reciprocal() would make the whole row NaN).
template <class T_>
struct NormalizeForward : SumEpilogue<Opmath<T_>> {
  using T = T_;
  using S = Opmath<T>;
  using R = S;
  static constexpr int kIn = 1;
  static constexpr bool kElementOut = true;
  static constexpr int kRowOut = 1;
  static constexpr bool kReduces = true;
  S eps;
  bool single;  // n == 1: ρ = |x|

  struct Row {
    S inv, norm;
    bool sign;  // a row of one element whose |x| is the (finite, nonzero) denominator: y = x / |x| = ±1
  };

  template <class Each>
  __device__ __forceinline__ S partial(const Each& each, const S (&)[1], const RowAt&) const {
    S sum = 0;
    if (single) each([&](const S (&v)[1], int) { sum += math::abs_(v[0]); });
    else each([&](const S (&v)[1], int) { sum += v[0] * v[0]; });
    return sum;
  }
  __device__ __forceinline__ Row finish(S st, const S (&)[1], const RowAt&) const {
    const S norm = single ? st : sqrt_fast(st);
    const S denominator = math::normalize_denominator<T>(norm, eps);
    return {reciprocal_ieee(denominator), norm, single && denominator == norm && norm > S(0) && norm < S(INFINITY)};
  }
  // x · (1/ρ) can miss x / ρ = ±1 by an ulp on a row of one element, where torch divides: there the output is
  // the sign, exactly (one select an element).
  __device__ __forceinline__ S map(const Row& r, const S (&v)[1], int) const {
    return r.sign ? copysign(S(1), v[0]) : v[0] * r.inv;
  }
  __device__ __forceinline__ S row_out(const Row& r, int) const { return r.norm; }
};

// Backward of normalize: the VJP, derived once here for every kernel shape.
//   forward  y = x / max(ρ, eps), ρ = ‖x‖₂; saved: y, and ρ per row (row input 0)
//   ρ > eps  ∂y/∂x = (I - y yᵀ) / ρ, symmetric, so dx = (dy - y ⟨y, dy⟩) / ρ      (math::normalize_vjp)
//   ρ ≤ eps  y = x / eps, so dx = dy / eps (torch's clamp_min passes no gradient to ρ, at the tie ρ = eps
//            too: math::normalize_clamped)
// Stat: ⟨y, dy⟩ (padding 0). Reads dy and y once, writes dx once. ρ = inf gives scale 1/inf = 0
// (reciprocal_ieee) and NaN through ⟨y, dy⟩, as torch; ρ = NaN gives NaN.
template <class T_>
struct NormalizeBackward : SumEpilogue<Opmath<T_>> {
  using T = T_;
  using S = Opmath<T>;
  using R = S;
  static constexpr int kIn = 2;  // dy, y
  static constexpr int kRowIn = 1;
  static constexpr bool kElementOut = true;
  static constexpr bool kReduces = true;
  S eps;

  struct Row {
    S dot, scale;
  };

  template <class Each>
  __device__ __forceinline__ S partial(const Each& each, const S (&)[1], const RowAt&) const {
    S dot = 0;
    each([&](const S (&v)[2], int) { dot += v[0] * v[1]; });
    return dot;
  }
  __device__ __forceinline__ Row finish(S st, const S (&row_in)[1], const RowAt&) const {
    const bool clamped = math::normalize_clamped<T>(row_in[0], eps);
    return {clamped ? S(0) : st, reciprocal_ieee(clamped ? eps : row_in[0])};
  }
  __device__ __forceinline__ S map(const Row& r, const S (&v)[2], int) const {
    return math::normalize_vjp(v[0], v[1], r.dot, r.scale);
  }
};

// ---------------------------------------------------------------------------------------------------------
// Launchers (declared in cuda/norm_launch.h, instantiated once per dtype in norm_<dtype>.cu).

template <bool kCentered, class T>
void norm_forward_cuda(int64_t rows, int64_t n, const T* x, const Opmath<T>* weight, const Opmath<T>* bias, double eps,
                       T* y, Opmath<T>* mean, Opmath<T>* rstd, bool round_xhat, const T* residual, T* sum) {
  using S = Opmath<T>;
  const auto go = [&](auto op) {
    using Op = decltype(op);
    op.round_xhat = round_xhat;
    op.eps = static_cast<S>(eps);
    op.inv_n = static_cast<S>(1.0 / static_cast<double>(n));
    op.x = x;
    Operands<Op> ops;
    ops.in[0] = x;
    ops.param[0] = weight;
    if constexpr (kCentered) ops.param[1] = bias;
    ops.out = y;
    if constexpr (kCentered) ops.row_out[0] = mean;
    ops.row_out[kCentered ? 1 : 0] = rstd;
    if constexpr (Op::kAddsInput) {
      op.residual = residual;
      ops.addend = residual;
      ops.out_sum = sum;
    }
    run_rows(op, RowLayout{rows, n, 1}, ops);
  };
  TORCH_INTERNAL_ASSERT((residual == nullptr) == (sum == nullptr), "torch_vjp: add_*_norm needs residual and sum");
  if (residual != nullptr) go(AddNormForward<kCentered, T>{});
  else go(NormForward<kCentered, T>{});
}

template <bool kCentered, class T>
void norm_backward_cuda(int64_t rows, int64_t n, const T* dy, const T* x, const Opmath<T>* mean,
                        const Opmath<T>* rstd, const Opmath<T>* weight, T* dx, Opmath<T>* dweight,
                        Opmath<T>* dbias, const T* grad_sum) {
  using S = Opmath<T>;
  const RowLayout layout{rows, n, 1};
  const auto operands = [&](auto op) {
    using Op = decltype(op);
    Operands<Op> ops;
    ops.in[0] = dy;
    ops.in[1] = x;
    ops.param[0] = weight;
    if constexpr (kCentered) ops.row_in[0] = mean;
    ops.row_in[kCentered ? 1 : 0] = rstd;
    ops.out = dx;
    if constexpr (Op::kOutAddend) ops.addend = grad_sum;
    if constexpr (Op::kParamSums > 0) {
      ops.param_sums[0] = dweight;
      if constexpr (kCentered) ops.param_sums[1] = dbias;
    }
    return ops;
  };
  const S inv_n = static_cast<S>(1.0 / static_cast<double>(n));
  // The kernel that writes dx: with the sums fused where it can (rows at one grid offset), and with grad_sum
  // added as dx is written (add_*_norm: the AddNormBackward instances) when there is one.
  const auto run_dx = [&](auto with_sums, auto dx_only, bool sums) {
    with_sums.inv_n = dx_only.inv_n = inv_n;
    if (sums && fuses_param_sums<decltype(with_sums)>(layout)) {
      run_rows(with_sums, layout, operands(with_sums));  // dx and the sums in one pass
      return true;
    }
    run_rows(dx_only, layout, operands(dx_only));
    return false;
  };
  const bool sums = dweight != nullptr || dbias != nullptr;
  bool summed = false;
  if (dx != nullptr && grad_sum != nullptr)
    summed = run_dx(AddNormBackward<kCentered, T, true>{}, AddNormBackward<kCentered, T, false>{}, sums);
  else if (dx != nullptr)
    summed = run_dx(NormBackward<kCentered, T, true>{}, NormBackward<kCentered, T, false>{}, sums);
  if (sums && !summed) {
    // The sums alone (rows at different grid offsets, or no dx): they do not involve grad_sum.
    NormBackward<kCentered, T, true> with_sums;
    with_sums.inv_n = inv_n;
    run_param_sums(with_sums, layout, operands(with_sums));
  }
}

// eps in the compute type, at least the smallest normal float: reciprocal() flushes a denormal eps to 0
// (1/0 then NaN on rows of zeros, where torch gives 0). Norms below it are 0 in float anyway (Σx² underflows),
// but for one-element rows (ρ = |x|): with eps < FLT_MIN, a denormal x gives x / FLT_MIN, not torch's ±1 (the
// reciprocal of a denormal overflows float, so no multiply by it could).
template <class T>
Opmath<T> normalize_eps(double eps) {
  using S = Opmath<T>;
  if constexpr (std::is_same_v<S, float>) return std::max(static_cast<float>(eps), std::numeric_limits<float>::min());
  else return static_cast<S>(eps);
}

template <class T>
void normalize_forward_cuda(const RowLayout& l, const T* x, double eps, T* y, Opmath<T>* norm) {
  NormalizeForward<T> op;
  op.eps = normalize_eps<T>(eps);
  op.single = l.n == 1;
  Operands<NormalizeForward<T>> ops;
  ops.in[0] = x;
  ops.out = y;
  ops.row_out[0] = norm;
  run_rows(op, l, ops);
}

template <class T>
void normalize_backward_cuda(const RowLayout& l, const T* dy, const T* y, const Opmath<T>* norm, double eps, T* dx) {
  NormalizeBackward<T> op;
  op.eps = normalize_eps<T>(eps);
  Operands<NormalizeBackward<T>> ops;
  ops.in[0] = dy;
  ops.in[1] = y;
  ops.row_in[0] = norm;
  ops.out = dx;
  run_rows(op, l, ops);
}

// The plan of each kernel (cuda/plan.h). A norm's backward: the kernel that writes dx when the parameter
// gradients are wanted too (with them fused where n % P == 0, else dx alone, the sums after it).
template <class T>
bool norm_plan(std::string_view op, const RowLayout& l, Plan& plan) {
  const auto backward = [&](auto with_sums, auto dx_only) {
    return fuses_param_sums<decltype(with_sums)>(l) ? engine_plan<decltype(with_sums)>(l) : engine_plan<decltype(dx_only)>(l);
  };
  if (op == "layer_norm") plan = engine_plan<NormForward<true, T>>(l);
  else if (op == "rms_norm") plan = engine_plan<NormForward<false, T>>(l);
  else if (op == "add_layer_norm") plan = engine_plan<AddNormForward<true, T>>(l);
  else if (op == "add_rms_norm") plan = engine_plan<AddNormForward<false, T>>(l);
  else if (op == "layer_norm_backward") plan = backward(NormBackward<true, T, true>{}, NormBackward<true, T, false>{});
  else if (op == "rms_norm_backward") plan = backward(NormBackward<false, T, true>{}, NormBackward<false, T, false>{});
  // add_*_norm_backward with grad_sum defined (without it, the norm's backward runs)
  else if (op == "add_layer_norm_backward") plan = backward(AddNormBackward<true, T, true>{}, AddNormBackward<true, T, false>{});
  else if (op == "add_rms_norm_backward") plan = backward(AddNormBackward<false, T, true>{}, AddNormBackward<false, T, false>{});
  else if (op == "normalize") plan = engine_plan<NormalizeForward<T>>(l);
  else if (op == "normalize_backward") plan = engine_plan<NormalizeBackward<T>>(l);
  else return false;
  return true;
}

}  // namespace torch_vjp::cuda

// Explicit instantiation of every launcher for one dtype (one per norm_<dtype>.cu, so that the dtypes compile
// in parallel).
#define TORCH_VJP_NORM_INSTANTIATE(T)                                                                          \
  namespace torch_vjp::cuda {                                                                                \
  template void norm_forward_cuda<true, T>(int64_t, int64_t, const T*, const Opmath<T>*, const Opmath<T>*,     \
                                           double, T*, Opmath<T>*, Opmath<T>*, bool, const T*, T*);            \
  template void norm_forward_cuda<false, T>(int64_t, int64_t, const T*, const Opmath<T>*, const Opmath<T>*,    \
                                            double, T*, Opmath<T>*, Opmath<T>*, bool, const T*, T*);           \
  template void norm_backward_cuda<true, T>(int64_t, int64_t, const T*, const T*, const Opmath<T>*,           \
                                            const Opmath<T>*, const Opmath<T>*, T*, Opmath<T>*, Opmath<T>*,    \
                                            const T*);                                                         \
  template void norm_backward_cuda<false, T>(int64_t, int64_t, const T*, const T*, const Opmath<T>*,          \
                                             const Opmath<T>*, const Opmath<T>*, T*, Opmath<T>*, Opmath<T>*,   \
                                             const T*);                                                        \
  template void normalize_forward_cuda<T>(const RowLayout&, const T*, double, T*, Opmath<T>*);               \
  template void normalize_backward_cuda<T>(const RowLayout&, const T*, const T*, const Opmath<T>*, double, T*); \
  template bool norm_plan<T>(std::string_view, const RowLayout&, Plan&);                                     \
  }
