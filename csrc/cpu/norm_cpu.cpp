// Normalization family, CPU backend: rows in parallel, each row reduced and mapped in at::vec registers
// (cpu/loops.h); the math and the derivation of the VJP are math/norm.h.
//
// Parameter gradients are column sums over rows. They are deterministic, whatever the thread count: rows
// are cut into blocks by a rule of the shape alone, each block sums its rows into its own opmath partial row
// (in the pass that writes dx), and the partials are then added in block order. No atomics.
#include <ATen/Dispatch.h>

#include <algorithm>
#include <array>
#include <vector>

#include "cpu/loops.h"
#include "ops/norm.h"

namespace torch_vjp {
namespace {

using cpu::add_map_row;
using cpu::map_row;
using cpu::opmath;
using cpu::sum_row;
using cpu::sums_row;

// Blocks of rows for the partial column sums: enough for every core, at most ~8 MiB of partials.
inline int64_t partial_blocks(const NormRows& r, int64_t bytes_per_value) {
  const int64_t by_memory = std::max<int64_t>(1, (int64_t(8) << 20) / (2 * r.n * bytes_per_value));
  return std::clamp<int64_t>(std::min<int64_t>(r.rows, 256), 1, by_memory);
}

// Σ term(x_j) over a row in the order of ATen's CPU sum (aten/src/ATen/native/cpu/SumKernel.cpp, cascade_sum's
// contiguous inner reduction: vectorized_inner_sum, row_sum, multi_row_sum), so that rms_norm's mean square is
// the bits of torch's `x.pow(2).mean(-1)`, which F.rms_norm and the transformers modules compute: then y is
// theirs bit for bit. That sum runs on 32-byte vectors (kLanes: 8 floats, 4 doubles) in every CPU capability,
// AVX512 included (measured on torch 2.14: its bits are reproduced with 8 float lanes, not 16; the tests compare
// against torch's own). Per row of n: vectors of kLanes summed in 4 interleaved accumulators (ILP), each a
// cascade of 4 levels flushed every 2^p vectors, p = max(4, ⌈log2 size⌉ / 4); then the leftover vectors into
// accumulator 0, accumulators 1-3 into 0; the scalar tail summed from 0, then the lanes added to it in order. A
// row shorter than one vector: the same cascade over scalars. The vectors are GCC vector types of 32 bytes
// (lane-wise IEEE adds, as torch's): std::array lanes left the accumulators to the vectorizer, which kept them
// in memory or not from one build to the next (instruction counts moved by ~8% with unrelated edits).
template <class T, class Load>
struct TorchOrderSum {
  static constexpr int64_t kLanes = 32 / int64_t(sizeof(T));
  static constexpr int64_t kIlp = 4, kLevels = 4;
  using Lanes [[gnu::vector_size(32)]] = T;

  template <class Acc>
  static void add(Acc& a, const Acc& b) { a += b; }

  // multi_row_sum: kIlp rows of `size` items each (item(i, k)), cascaded.
  template <class Acc, class Item>
  static std::array<Acc, kIlp> multi_row_sum(int64_t size, const Item& item) {
    const int64_t ceil_log2 = size <= 2 ? 1 : 64 - __builtin_clzll(uint64_t(size - 1));
    const int64_t level_power = std::max<int64_t>(4, ceil_log2 / kLevels);
    const int64_t level_step = int64_t(1) << level_power;
    const int64_t level_mask = level_step - 1;
    Acc acc[kLevels][kIlp] = {};
    int64_t i = 0;
    for (; i + level_step <= size;) {
      for (int64_t j = 0; j < level_step; ++j, ++i)
        for (int64_t k = 0; k < kIlp; ++k) add(acc[0][k], item(i, k));
      for (int64_t j = 1; j < kLevels; ++j) {
        for (int64_t k = 0; k < kIlp; ++k) {
          add(acc[j][k], acc[j - 1][k]);
          acc[j - 1][k] = Acc{};
        }
        if ((i & (level_mask << (j * level_power))) != 0) break;
      }
    }
    for (; i < size; ++i)
      for (int64_t k = 0; k < kIlp; ++k) add(acc[0][k], item(i, k));
    for (int64_t j = 1; j < kLevels; ++j)
      for (int64_t k = 0; k < kIlp; ++k) add(acc[0][k], acc[j][k]);
    return {acc[0][0], acc[0][1], acc[0][2], acc[0][3]};
  }

  // row_sum: `size` items seen as (size / kIlp, kIlp), their kIlp partial sums, the leftovers, then the partials.
  template <class Acc, class Item>
  static Acc row_sum(int64_t size, const Item& item) {
    const int64_t size_ilp = size / kIlp;
    auto partial = multi_row_sum<Acc>(size_ilp, [&](int64_t i, int64_t k) { return item(i * kIlp + k); });
    for (int64_t i = size_ilp * kIlp; i < size; ++i) add(partial[0], item(i));
    for (int64_t k = 1; k < kIlp; ++k) add(partial[0], partial[k]);
    return partial[0];
  }

  // load(j): the row's j-th term, in T.
  static T sum(int64_t n, const Load& load) {
    if (n < kLanes) return row_sum<T>(n, load);
    const int64_t vectors = n / kLanes;
    const Lanes lanes = row_sum<Lanes>(vectors, [&](int64_t v) {
      Lanes out;
      for (int64_t l = 0; l < kLanes; ++l) out[l] = load(v * kLanes + l);
      return out;
    });
    T total = T(0);
    for (int64_t j = vectors * kLanes; j < n; ++j) total += load(j);
    for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
    return total;
  }
};

template <class T, class Load>
inline T torch_order_sum(int64_t n, const Load& load) {
  return TorchOrderSum<T, Load>::sum(n, load);
}

// v rounded to the storage type S and widened back (casting_mode="llama"); no change when S is its opmath.
template <class S, class V>
inline V rounded_to(const V& v) {
  if constexpr (std::is_same_v<S, opmath<S>>) {
    return v;
  } else if constexpr (std::is_same_v<V, opmath<S>>) {
    return static_cast<V>(static_cast<S>(v));
  } else {
    return std::get<0>(at::vec::convert_to_float<S>(at::vec::convert_from_float<S>(v, v)));
  }
}

struct CpuNorm {
  // Per row: μ (layer_norm, shifted by the row's first element: exact on constant rows), then Σ(x - μ)² over
  // the cache-resident row (two passes, no cancellation), r = 1/√(σ² + eps); then y = x̂ ⊙ w + b in one pass.
  // add_*: the row's s = x + residual is written first (rounded to S, as torch's add) and the norm reads it
  // back from cache: one read of each input from memory.
  template <bool kCentered>
  static void norm_forward(const NormRows& r, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           double eps, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd,
                           const NormOptions& options) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_vjp_norm_cpu", [&] {
      using S = scalar_t;
      using T = opmath<S>;
      const S* xs = x.const_data_ptr<S>();
      const T* w = weight.const_data_ptr<T>();
      const T* b = bias.const_data_ptr<T>();
      S* ys = y.mutable_data_ptr<S>();
      T* means = kCentered ? mean.mutable_data_ptr<T>() : nullptr;
      T* rstds = rstd.mutable_data_ptr<T>();
      const S* residuals = options.residual.defined() ? options.residual.const_data_ptr<S>() : nullptr;
      S* sums = options.sum.defined() ? options.sum.mutable_data_ptr<S>() : nullptr;
      const bool round_xhat = options.round_xhat;
      const int64_t n = r.n;
      const bool stream = cpu::should_stream(r.rows * n * int64_t(sizeof(S)));
      at::parallel_for(0, r.rows, cpu::rows_grain(n), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const S* xr = xs + row * n;
          if (sums != nullptr) {  // s = x + residual, a cached store: read back at once
            map_row(sums + row * n, n, false, [](auto a, auto b) { return a + b; }, xr, residuals + row * n);
            xr = sums + row * n;
          }
          const T c = T(xr[0]);
          const T mu = kCentered ? math::shifted_mean(c, sum_row(n, [c](auto v) { return v - decltype(v)(c); }, xr), T(n))
                                 : T(0);
          // rms_norm: Σx² in torch's order (torch_order_sum: F.rms_norm's and the eager modules' bits);
          // layer_norm: Σ(x - μ)² with the at::vec row sum.
          const T sum_sq = kCentered
              ? sum_row(n, [mu](auto v) { const auto d = v - decltype(v)(mu); return d * d; }, xr)
              : torch_order_sum<T>(n, [xr](int64_t j) { const T v = T(xr[j]); return v * v; });
          const T rs = math::norm_rstd(sum_sq, T(n), T(eps));
          if (kCentered) means[row] = mu;
          rstds[row] = rs;
          if (round_xhat) {
            map_row(ys + row * n, n, stream, [mu, rs](auto v, auto wv, auto bv) {
              return math::norm_out_rounded(v, mu, rs, wv, bv, [](auto t) { return rounded_to<S>(t); });
            }, xr, w, b);
          } else {
            map_row(ys + row * n, n, stream, [mu, rs](auto v, auto wv, auto bv) { return math::norm_out(v, mu, rs, wv, bv); },
                    xr, w, b);
          }
        }
        cpu::fence();
      });
    });
  }

  // Per row: the two reductions Σg, Σg x̂ (g = dy ⊙ w) in one pass, then dx in a second; the same block of
  // rows adds dy ⊙ x̂ and dy into its partial rows. Then the partials are summed in block order.
  // add_* (grad_sum defined; x is s = input + residual): d_input = d_residual = grad_sum + the norm's dx at s
  // (math::add_norm_vjp), added in the dx pass and rounded once.
  template <bool kCentered>
  static void norm_backward(const NormRows& r, const at::Tensor& grad_output, const at::Tensor& x,
                            const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                            const at::Tensor& grad_input, const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                            const at::Tensor& grad_sum) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_vjp_norm_backward_cpu", [&] {
      using S = scalar_t;
      using T = opmath<S>;
      const S* dys = grad_output.const_data_ptr<S>();
      const S* xs = x.const_data_ptr<S>();
      const T* means = kCentered ? mean.const_data_ptr<T>() : nullptr;
      const T* rstds = rstd.const_data_ptr<T>();
      const T* w = weight.const_data_ptr<T>();
      S* dxs = grad_input.defined() ? grad_input.mutable_data_ptr<S>() : nullptr;
      const S* grad_sums = grad_sum.defined() ? grad_sum.const_data_ptr<S>() : nullptr;  // add_*
      const int64_t n = r.n;
      const bool stream = cpu::should_stream(r.rows * n * int64_t(sizeof(S)));
      const bool want_dw = grad_weight.defined(), want_db = grad_bias.defined();
      const int64_t blocks = (want_dw || want_db) ? partial_blocks(r, sizeof(T)) : 1;
      const int64_t rows_per_block = (r.rows + blocks - 1) / blocks;
      std::vector<T> partial_w(want_dw ? blocks * n : 0), partial_b(want_db ? blocks * n : 0);
      at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
        for (int64_t block = block_begin; block < block_end; ++block) {
          T* pw = want_dw ? partial_w.data() + block * n : nullptr;
          T* pb = want_db ? partial_b.data() + block * n : nullptr;
          const int64_t row_end = std::min(r.rows, (block + 1) * rows_per_block);
          for (int64_t row = block * rows_per_block; row < row_end; ++row) {
            const S* dyr = dys + row * n;
            const S* xr = xs + row * n;
            const T mu = kCentered ? means[row] : T(0);
            const T rs = rstds[row];
            if (dxs != nullptr) {
              const auto [sum_g, sum_g_xhat] = sums_row<2>(
                  n,
                  [mu, rs](auto dy, auto v, auto wv) {
                    const auto g = dy * wv;
                    return std::array{g, g * math::norm_xhat(v, mu, rs)};
                  },
                  dyr, xr, w);
              const T mean_g = kCentered ? sum_g / T(n) : T(0);
              const T mean_g_xhat = sum_g_xhat / T(n);
              const auto vjp = [mu, rs, mean_g, mean_g_xhat](auto dy, auto v, auto wv) {
                return math::norm_vjp(dy * wv, math::norm_xhat(v, mu, rs), mean_g, mean_g_xhat, rs);
              };
              if (grad_sums != nullptr) {
                map_row(dxs + row * n, n, stream,
                        [vjp](auto dy, auto v, auto wv, auto gs) { return math::add_norm_vjp(vjp(dy, v, wv), gs); },
                        dyr, xr, w, grad_sums + row * n);
              } else {
                map_row(dxs + row * n, n, stream, vjp, dyr, xr, w);
              }
            }
            const auto dw_term = [mu, rs](auto dy, auto v) { return dy * math::norm_xhat(v, mu, rs); };
            if (pw != nullptr && pb != nullptr) {
              add_map_row<S>(std::array{pw, pb}, n, [&](auto dy, auto v) { return std::array{dw_term(dy, v), dy}; }, dyr, xr);
            } else if (pw != nullptr) {
              add_map_row<S>(pw, n, dw_term, dyr, xr);
            } else if (pb != nullptr) {
              add_map_row<S>(pb, n, [](auto dy) { return dy; }, dyr);
            }
          }
        }
        cpu::fence();
      });
      // Column sums of the partial rows, pairwise (block b += block b + step, step = 1, 2, 4, ...): the same
      // order on every run, and a rounding error that grows with log2(blocks), not with blocks.
      const auto sum_blocks = [&](std::vector<T>& partials, const at::Tensor& out) {
        T* total = out.template mutable_data_ptr<T>();
        at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
          for (int64_t step = 1; step < blocks; step *= 2)
            for (int64_t block = 0; block + step < blocks; block += 2 * step)
              add_map_row<T>(partials.data() + block * n + begin, end - begin, [](auto v) { return v; },
                             partials.data() + (block + step) * n + begin);
          add_map_row<T>(total + begin, end - begin, [](auto v) { return v; }, partials.data() + begin);
        });
      };
      if (want_dw) sum_blocks(partial_w, grad_weight);
      if (want_db) sum_blocks(partial_b, grad_bias);
    });
  }

  // normalize: ρ = √Σx² (|x| for one element), y = x / max(ρ, eps) (math/norm.h).
  static void normalize_forward(const RowLayout& l, const at::Tensor& x, double eps, const at::Tensor& y,
                                const at::Tensor& norm) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_vjp_normalize_cpu", [&] {
      using T = opmath<scalar_t>;
      T* norms = norm.mutable_data_ptr<T>();
      const math::NormalizeClamp<scalar_t, T> clamp{T(eps)};
      cpu::for_each_row<scalar_t, 2>(l, {const_cast<scalar_t*>(x.const_data_ptr<scalar_t>()), y.mutable_data_ptr<scalar_t>()},
                                     true, [&](const auto& ctx, const auto* xr, auto* yr) {
        const T rho = l.n == 1 ? math::abs_(T(xr[0])) : math::sqrt_(sum_row(l.n, [](auto v) { return v * v; }, xr));
        const T denominator = clamp.denominator(rho);
        norms[ctx.row] = rho;
        // x · (1/ρ): a vector division costs more than the pass on half types. A row of one element, where
        // x · (1/|x|) can miss ±1 by an ulp, is divided, as torch does.
        if (l.n == 1) {
          yr[0] = static_cast<scalar_t>(T(xr[0]) / denominator);
        } else {
          const T inverse = T(1) / denominator;
          map_row(yr, l.n, ctx.stream, [inverse](auto v) { return v * decltype(v)(inverse); }, xr);
        }
      });
    });
  }

  // dx = (dy - y ⟨y, dy⟩) / ρ, or dy / eps where ρ ≤ eps (math/norm.h).
  static void normalize_backward(const RowLayout& l, const at::Tensor& grad_output, const at::Tensor& y,
                                 const at::Tensor& norm, double eps, const at::Tensor& grad_input) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "torch_vjp_normalize_backward_cpu", [&] {
      using T = opmath<scalar_t>;
      const T* norms = norm.const_data_ptr<T>();
      const math::NormalizeClamp<scalar_t, T> clamp{T(eps)};
      auto* dy = const_cast<scalar_t*>(grad_output.const_data_ptr<scalar_t>());
      auto* ys = const_cast<scalar_t*>(y.const_data_ptr<scalar_t>());
      cpu::for_each_row<scalar_t, 3>(l, {dy, ys, grad_input.mutable_data_ptr<scalar_t>()}, true,
                                     [&](const auto& ctx, const auto* g, const auto* v, auto* d) {
        const bool clamped = clamp.clamped(norms[ctx.row]);
        const T dot = clamped ? T(0) : sum_row(l.n, [](auto a, auto b) { return a * b; }, g, v);
        const T scale = T(1) / (clamped ? clamp.eps : norms[ctx.row]);
        map_row(d, l.n, ctx.stream, [dot, scale](auto a, auto b) { return math::normalize_vjp(a, b, dot, scale); }, g, v);
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_vjp, CPU, m) { register_norm<CpuNorm>(m); }

}  // namespace torch_vjp
