// Losses, CPU backend: the two row kernels of ops/cross_entropy.h, rows in parallel, each row reduced and
// mapped in at::vec registers (cpu/loops.h); the math is math/cross_entropy.h, the loss options included.
#include <ATen/Dispatch.h>

#include <array>
#include <cstdint>
#include <vector>

#include "cpu/loops.h"
#include "math/softmax.h"
#include "ops/cross_entropy.h"

namespace torch_vjp {
namespace {

using cpu::map_row;
using cpu::opmath;

// u = tanh(x / c) and z = c u of one logit, through the vector code (its bits, not libm's): the target's z_t
// must be the z_t its row's passes saw.
template <class T>
std::pair<T, T> softcap_one(const math::Softcap<T>& softcap, T x) {
  const auto u = softcap.tanh_of(math::Vec<T>(x));
  T lanes[2][math::Vec<T>::size()];
  u.store(lanes[0]);
  softcap.logit(u).store(lanes[1]);
  return {lanes[0][0], lanes[1][0]};
}

struct CpuCrossEntropy {
  static constexpr bool kFusesOptions = true;

  // Per row: the max m, then Σ exp(z - m) (and Σ(z - m) when smoothing; Σ w_j (z_j - m) with class weights)
  // in one pass over the cache-resident row; loss from the shifted logits (math/cross_entropy.h). z is the
  // row itself, or with a softcap c·tanh(x / c), mapped once into an opmath row that both passes read.
  static void cross_entropy_rows(const at::Tensor& x, const at::Tensor& target, int64_t ignore_index,
                                 double smoothing, const SmoothingWeights& weights, const LossOptions& options,
                                 const at::Tensor& loss, const at::Tensor& row_max, const at::Tensor& log_sum) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_vjp_cross_entropy_cpu", [&] {
      using S = scalar_t;
      using T = opmath<S>;
      const int64_t rows = x.size(0), classes = x.size(1);
      const S* xs = x.const_data_ptr<S>();
      const int64_t* targets = target.const_data_ptr<int64_t>();
      T* losses = loss.mutable_data_ptr<T>();
      T* maxima = row_max.mutable_data_ptr<T>();
      T* log_sums = log_sum.mutable_data_ptr<T>();
      const T* w = weights.defined() ? weights.weight.const_data_ptr<T>() : nullptr;  // class weights, ε > 0
      const T* row_weights = weights.defined() ? weights.row_weight.const_data_ptr<T>() : nullptr;
      const T total = weights.defined() ? weights.total.item<T>() : T(0), eps = T(smoothing);
      const T per_class = eps / T(classes);
      const auto row_loss = [&](int64_t row, const auto* z) {
        const T m = cpu::max_row(classes, z);
        T log_s, shifted = T(0);  // Σ(z - m), or Σ w_j (z_j - m); 0 without smoothing
        if (w != nullptr) {
          const auto sums = cpu::sums_row<2>(
              classes,
              [m](auto v, auto wv) { return std::array{math::softmax_exp(v, m), wv * (v - decltype(v)(m))}; }, z, w);
          log_s = math::log_(sums[0]);
          shifted = sums[1];
        } else if (smoothing > 0) {
          const auto sums = cpu::sums_row<2>(
              classes, [m](auto v) { return std::array{math::softmax_exp(v, m), v - decltype(v)(m)}; }, z);
          log_s = math::log_(sums[0]);
          shifted = sums[1];
        } else {
          log_s = math::log_(cpu::sum_row(classes, [m](auto v) { return math::softmax_exp(v, m); }, z));
        }
        maxima[row] = m;
        log_sums[row] = log_s;
        const int64_t t = targets[row];
        if (t == ignore_index) losses[row] = T(0);
        else if (w != nullptr)
          losses[row] = math::weighted_cross_entropy_loss(log_s, T(z[t]) - m, shifted, row_weights[row], eps,
                                                          per_class, total);
        else losses[row] = math::cross_entropy_loss(log_s, T(z[t]) - m, shifted, T(smoothing), T(classes));
      };
      const math::Softcap<T> softcap{T(options.softcap)};
      at::parallel_for(0, rows, cpu::rows_grain(classes), [&](int64_t begin, int64_t end) {
        if (!(options.softcap > 0.0)) {
          for (int64_t row = begin; row < end; ++row) row_loss(row, xs + row * classes);
          return;
        }
        std::vector<T> z(classes);
        for (int64_t row = begin; row < end; ++row) {
          // (the map's row sum is not needed: one add a vector beside tanh's)
          cpu::widen_map_sum_row(z.data(), classes, [softcap](auto v) { return softcap.logit(softcap.tanh_of(v)); },
                                 xs + row * classes);
          row_loss(row, z.data());
        }
      });
    });
  }

  // dx_i = s_i (exp((x_i - m_i) - log_sum_i) - ε/C), then the target's element alone gets - s_i (1 - ε), from
  // x_t read before the row is written (dx may be x itself). Rows with s_i = 0 (ignored) are zeros.
  // With class weights and ε > 0 (math/cross_entropy.h): dx_ik = (s_i a_i) p_ik - (s_i ε/C) w_k, a_i = (1 - ε) w_t
  // + (ε/C) W, then the target's element gets - s_i (1 - ε) w_t.
  // With the options (math/cross_entropy.h "Options"): the same over z, p's weight times 1 + 2 λ lse_i for the
  // z-loss, and each element times the softcap's 1 - u² (the target's term included, before it).
  static void cross_entropy_grad_rows(const at::Tensor& x, const at::Tensor& target, const at::Tensor& row_max,
                                      const at::Tensor& log_sum, const at::Tensor& scale, int64_t ignore_index,
                                      double smoothing, const SmoothingWeights& weights, const LossOptions& options,
                                      const at::Tensor& dx) {
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
      const T eps = T(smoothing), per_class = eps / T(classes);
      const bool stream = cpu::should_stream(rows * classes * int64_t(sizeof(S)));
      if (weights.defined() || options.active()) {
        const T* w = weights.defined() ? weights.weight.const_data_ptr<T>() : nullptr;
        const T* row_weights = weights.defined() ? weights.row_weight.const_data_ptr<T>() : nullptr;
        const T total = weights.defined() ? weights.total.item<T>() : T(0), lambda = T(options.lse_square_scale);
        const math::Softcap<T> softcap{T(options.softcap)};
        // dz without the target's term: (s a) p - (s ε/C) w_k with class weights (math::WeightedGradRow), s (a p -
        // ε/C) without (a the z-loss's factor, 1 with none); then the softcap's chain rule.
        const auto grad_row = [&](int64_t row, auto has_softcap, auto weighted) {
          constexpr bool kSoftcap = decltype(has_softcap)::value, kWeighted = decltype(weighted)::value;
          const S* xr = xs + row * classes;
          S* dxr = dxs + row * classes;
          const T s = scales[row], m = maxima[row], log_s = log_sums[row];
          const int64_t t = targets[row];
          const T x_t = t == ignore_index ? T(0) : T(xr[t]);
          const auto wr = kWeighted ? math::weighted_grad_row(s, row_weights[row], eps, per_class, total)
                                    : math::WeightedGradRow<T>{};
          const T a = lambda > T(0) ? math::z_loss_softmax_factor(m, log_s, lambda) : T(1);  // unweighted only
          const math::SoftmaxFromStats<T> softmax{m, log_s};
          const auto dz_of = [=](auto z, auto class_weight) {
            if constexpr (kWeighted)
              return math::weighted_cross_entropy_vjp_with(z, class_weight, softmax, wr.scaled_coefficient,
                                                           wr.scaled_per_class);
            else return math::z_loss_cross_entropy_vjp_with(z, softmax, a, s, per_class);
          };
          const auto dx_of = [=](auto v, auto class_weight) {
            if constexpr (kSoftcap) {
              const auto u = softcap.tanh_of(v);
              return dz_of(softcap.logit(u), class_weight) * math::Softcap<T>::slope(u);
            } else {
              return dz_of(v, class_weight);
            }
          };
          if constexpr (kWeighted) map_row(dxr, classes, stream, dx_of, xr, w);
          else map_row(dxr, classes, stream, [dx_of](auto v) { return dx_of(v, decltype(v)(1)); }, xr);
          if (t == ignore_index) return;
          T z_t = x_t, slope_t = T(1);
          if constexpr (kSoftcap) {
            const auto [u_t, z] = softcap_one(softcap, x_t);
            z_t = z;
            slope_t = math::Softcap<T>::slope(u_t);
          }
          const T dz_t = kWeighted ? math::weighted_cross_entropy_target_vjp_with(z_t, w[t], softmax, wr)
                                   : s * (a * softmax(z_t) - per_class - (T(1) - eps));
          dxr[t] = S(dz_t * slope_t);
        };
        const auto grad_rows_with = [&](auto has_softcap, auto weighted) {
          at::parallel_for(0, rows, cpu::rows_grain(classes), [&](int64_t begin, int64_t end) {
            for (int64_t row = begin; row < end; ++row) grad_row(row, has_softcap, weighted);
            cpu::fence();
          });
        };
        const bool has_softcap = options.softcap > 0.0;
        if (w != nullptr) {
          if (has_softcap) grad_rows_with(std::true_type{}, std::true_type{});
          else grad_rows_with(std::false_type{}, std::true_type{});
        } else {
          if (has_softcap) grad_rows_with(std::true_type{}, std::false_type{});
          else grad_rows_with(std::false_type{}, std::false_type{});
        }
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
