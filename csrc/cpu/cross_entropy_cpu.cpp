// Losses, CPU backend: the two row kernels of ops/cross_entropy.h, rows in parallel, each row reduced and
// mapped in at::vec registers (cpu/loops.h); the math is math/cross_entropy.h.
#include <ATen/Dispatch.h>

#include <array>
#include <cstdint>

#include "cpu/loops.h"
#include "math/softmax.h"
#include "ops/cross_entropy.h"

namespace torch_vjp {
namespace {

using cpu::map_row;
using cpu::opmath;

struct CpuCrossEntropy {
  // Per row: the max m, then Σ exp(x - m) (and Σ(x - m) when smoothing; Σ w_j (x_j - m) with class weights)
  // in one pass over the cache-resident row; loss from the shifted logits (math/cross_entropy.h).
  static void cross_entropy_rows(const at::Tensor& x, const at::Tensor& target, int64_t ignore_index,
                                 double smoothing, const SmoothingWeights& weights, const at::Tensor& loss,
                                 const at::Tensor& row_max, const at::Tensor& log_sum) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_vjp_cross_entropy_cpu", [&] {
      using S = scalar_t;
      using T = opmath<S>;
      const int64_t rows = x.size(0), classes = x.size(1);
      const S* xs = x.const_data_ptr<S>();
      const int64_t* targets = target.const_data_ptr<int64_t>();
      T* losses = loss.mutable_data_ptr<T>();
      T* maxima = row_max.mutable_data_ptr<T>();
      T* log_sums = log_sum.mutable_data_ptr<T>();
      if (weights.defined()) {  // class weights with smoothing (ε > 0)
        const T* w = weights.weight.const_data_ptr<T>();
        const T* row_weights = weights.row_weight.const_data_ptr<T>();
        const T total = weights.total.item<T>(), eps = T(smoothing), per_class = T(smoothing) / T(classes);
        at::parallel_for(0, rows, cpu::rows_grain(classes), [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            const S* xr = xs + row * classes;
            const T m = cpu::max_row(classes, xr);
            const auto sums = cpu::sums_row<2>(
                classes,
                [m](auto v, auto wv) {
                  return std::array{math::softmax_exp(v, m), wv * (v - decltype(v)(m))};
                },
                xr, w);
            const T log_s = math::log_(sums[0]);
            maxima[row] = m;
            log_sums[row] = log_s;
            const int64_t t = targets[row];
            losses[row] = t == ignore_index ? T(0)
                                            : math::weighted_cross_entropy_loss(log_s, T(xr[t]) - m, sums[1],
                                                                                row_weights[row], eps, per_class, total);
          }
        });
        return;
      }
      at::parallel_for(0, rows, cpu::rows_grain(classes), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const S* xr = xs + row * classes;
          const T m = cpu::max_row(classes, xr);
          T sum_exp, sum_shifted = T(0);
          if (smoothing > 0) {
            const auto sums = cpu::sums_row<2>(
                classes, [m](auto v) { return std::array{math::softmax_exp(v, m), v - decltype(v)(m)}; }, xr);
            sum_exp = sums[0];
            sum_shifted = sums[1];
          } else {
            sum_exp = cpu::sum_row(classes, [m](auto v) { return math::softmax_exp(v, m); }, xr);
          }
          const T log_s = math::log_(sum_exp);
          maxima[row] = m;
          log_sums[row] = log_s;
          const int64_t t = targets[row];
          losses[row] = t == ignore_index ? T(0)
                                          : math::cross_entropy_loss(log_s, T(xr[t]) - m, sum_shifted, T(smoothing),
                                                                     T(classes));
        }
      });
    });
  }

  // dx_i = s_i (exp((x_i - m_i) - log_sum_i) - ε/C), then the target's element alone gets - s_i (1 - ε), from
  // x_t read before the row is written (dx may be x itself). Rows with s_i = 0 (ignored) are zeros.
  // With class weights and ε > 0 (math/cross_entropy.h): dx_ik = (s_i a_i) p_ik - (s_i ε/C) w_k, a_i = (1 - ε) w_t
  // + (ε/C) W, then the target's element gets - s_i (1 - ε) w_t.
  static void cross_entropy_grad_rows(const at::Tensor& x, const at::Tensor& target, const at::Tensor& row_max,
                                      const at::Tensor& log_sum, const at::Tensor& scale, int64_t ignore_index,
                                      double smoothing, const SmoothingWeights& weights, const at::Tensor& dx) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_vjp_cross_entropy_backward_cpu", [&] {
      using S = scalar_t;
      using T = opmath<S>;
      const int64_t rows = x.size(0), classes = x.size(1);
      const S* xs = x.const_data_ptr<S>();
      S* dxs = dx.mutable_data_ptr<S>();
      const int64_t* targets = target.const_data_ptr<int64_t>();
      const T* maxima = row_max.const_data_ptr<T>();
      const T* log_sums = log_sum.const_data_ptr<T>();
      const T* scales = scale.const_data_ptr<T>();
      const T per_class = T(smoothing) / T(classes);
      const bool stream = cpu::should_stream(rows * classes * int64_t(sizeof(S)));
      if (weights.defined()) {
        const T* w = weights.weight.const_data_ptr<T>();
        const T* row_weights = weights.row_weight.const_data_ptr<T>();
        const T total = weights.total.item<T>(), eps = T(smoothing);
        at::parallel_for(0, rows, cpu::rows_grain(classes), [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            const S* xr = xs + row * classes;
            S* dxr = dxs + row * classes;
            const T s = scales[row], m = maxima[row], log_s = log_sums[row], w_t = row_weights[row];
            const T sa = s * math::weighted_softmax_coefficient(w_t, eps, per_class, total), sc = s * per_class;
            const int64_t t = targets[row];
            const T x_t = t == ignore_index ? T(0) : T(xr[t]);
            const math::SoftmaxFromStats<T> softmax{m, log_s};
            map_row(dxr, classes, stream,
                    [sa, sc, softmax](auto v, auto wv) {
                      return math::weighted_cross_entropy_vjp_with(v, wv, softmax, sa, sc);
                    },
                    xr, w);
            if (t != ignore_index)
              dxr[t] = S(math::weighted_cross_entropy_vjp_with(x_t, w[t], softmax, sa, sc) - s * (T(1) - eps) * w_t);
          }
          cpu::fence();
        });
        return;
      }
      at::parallel_for(0, rows, cpu::rows_grain(classes), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const S* xr = xs + row * classes;
          S* dxr = dxs + row * classes;
          const T s = scales[row], m = maxima[row], log_s = log_sums[row];
          const int64_t t = targets[row];
          const T x_t = t == ignore_index ? T(0) : T(xr[t]);
          if (per_class > T(0))
            map_row(dxr, classes, stream,
                    [s, m, log_s, per_class](auto v) { return math::cross_entropy_vjp(v, m, log_s, s, per_class); }, xr);
          else
            map_row(dxr, classes, stream,
                    [s, m, log_s](auto v) { return math::cross_entropy_vjp_unsmoothed(v, m, log_s, s); }, xr);
          if (t != ignore_index)
            dxr[t] = S(s * (math::SoftmaxFromStats<T>{m, log_s}(x_t) - per_class - (T(1) - T(smoothing))));
        }
        cpu::fence();
      });
    });
  }

  static constexpr int64_t kChunkBytes = int64_t(64) << 20;  // of logits: L2/L3-sized products, little memory
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_vjp, CPU, m) { register_cross_entropy<CpuCrossEntropy>(m); }

}  // namespace torch_vjp
