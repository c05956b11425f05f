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

struct CpuNorm {
  // Per row: μ (layer_norm, shifted by the row's first element: exact on constant rows), then Σ(x - μ)² over
  // the cache-resident row (two passes, no cancellation), r = 1/√(σ² + eps); then y = x̂ ⊙ w + b in one pass.
  template <bool kCentered>
  static void norm_forward(const NormRows& r, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           double eps, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_vjp_norm_cpu", [&] {
      using S = scalar_t;
      using T = opmath<S>;
      const S* xs = x.const_data_ptr<S>();
      const T* w = weight.const_data_ptr<T>();
      const T* b = bias.const_data_ptr<T>();
      S* ys = y.mutable_data_ptr<S>();
      T* means = kCentered ? mean.mutable_data_ptr<T>() : nullptr;
      T* rstds = rstd.mutable_data_ptr<T>();
      const int64_t n = r.n;
      const bool stream = cpu::should_stream(r.rows * n * int64_t(sizeof(S)));
      at::parallel_for(0, r.rows, cpu::rows_grain(n), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const S* xr = xs + row * n;
          const T c = T(xr[0]);
          const T mu = kCentered ? math::shifted_mean(c, sum_row(n, [c](auto v) { return v - decltype(v)(c); }, xr), T(n))
                                 : T(0);
          const T sum_sq = sum_row(n, [mu](auto v) { const auto d = v - decltype(v)(mu); return d * d; }, xr);
          const T rs = math::norm_rstd(sum_sq, T(n), T(eps));
          if (kCentered) means[row] = mu;
          rstds[row] = rs;
          map_row(ys + row * n, n, stream, [mu, rs](auto v, auto wv, auto bv) { return math::norm_out(v, mu, rs, wv, bv); },
                  xr, w, b);
        }
        cpu::fence();
      });
    });
  }

  // Per row: the two reductions Σg, Σg x̂ (g = dy ⊙ w) in one pass, then dx in a second; the same block of
  // rows adds dy ⊙ x̂ and dy into its partial rows. Then the partials are summed in block order.
  template <bool kCentered>
  static void norm_backward(const NormRows& r, const at::Tensor& grad_output, const at::Tensor& x,
                            const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                            const at::Tensor& grad_input, const at::Tensor& grad_weight, const at::Tensor& grad_bias) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_vjp_norm_backward_cpu", [&] {
      using S = scalar_t;
      using T = opmath<S>;
      const S* dys = grad_output.const_data_ptr<S>();
      const S* xs = x.const_data_ptr<S>();
      const T* means = kCentered ? mean.const_data_ptr<T>() : nullptr;
      const T* rstds = rstd.const_data_ptr<T>();
      const T* w = weight.const_data_ptr<T>();
      S* dxs = grad_input.defined() ? grad_input.mutable_data_ptr<S>() : nullptr;
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
              map_row(dxs + row * n, n, stream,
                      [mu, rs, mean_g, mean_g_xhat](auto dy, auto v, auto wv) {
                        return math::norm_vjp(dy * wv, math::norm_xhat(v, mu, rs), mean_g, mean_g_xhat, rs);
                      },
                      dyr, xr, w);
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
      cpu::for_each_row<scalar_t, 2>(l, {const_cast<scalar_t*>(x.const_data_ptr<scalar_t>()), y.mutable_data_ptr<scalar_t>()},
                                     true, [&](const auto& ctx, const auto* xr, auto* yr) {
        const T rho = l.n == 1 ? math::abs_(T(xr[0])) : math::sqrt_(sum_row(l.n, [](auto v) { return v * v; }, xr));
        const T denominator = math::normalize_denominator<scalar_t>(rho, T(eps));
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
      auto* dy = const_cast<scalar_t*>(grad_output.const_data_ptr<scalar_t>());
      auto* ys = const_cast<scalar_t*>(y.const_data_ptr<scalar_t>());
      cpu::for_each_row<scalar_t, 3>(l, {dy, ys, grad_input.mutable_data_ptr<scalar_t>()}, true,
                                     [&](const auto& ctx, const auto* g, const auto* v, auto* d) {
        const bool clamped = math::normalize_clamped<scalar_t>(norms[ctx.row], T(eps));
        const T dot = clamped ? T(0) : sum_row(l.n, [](auto a, auto b) { return a * b; }, g, v);
        const T scale = T(1) / (clamped ? T(eps) : norms[ctx.row]);
        map_row(d, l.n, ctx.stream, [dot, scale](auto a, auto b) { return math::normalize_vjp(a, b, dot, scale); }, g, v);
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_vjp, CPU, m) { register_norm<CpuNorm>(m); }

}  // namespace torch_vjp
