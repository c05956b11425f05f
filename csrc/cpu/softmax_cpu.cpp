// Softmax family, CPU backend: rows in parallel, each row as a contiguous opmath array (cpu/loops.h),
// reduced and mapped with at::vec. The math is math/softmax.h.
#include <ATen/Dispatch.h>

#include <vector>

#include "cpu/loops.h"
#include "ops/softmax.h"

namespace torch_vjp {
namespace {

using math::SoftmaxKind;

template <class T>
using Vec = at::vec::Vectorized<T>;

template <class T>
T row_max(const T* x, int64_t n) {
  return at::vec::reduce_all<T>([](Vec<T> a, Vec<T> b) { return at::vec::maximum(a, b); }, x, n);
}

// Σ over a row in chunks, chunk partials accumulated in double, so rounding grows with the chunk
// length plus n / chunk rather than with n (long rows; torch's own sums are cascaded too).
template <class T, class PartialFn>
T chunked_sum(int64_t n, const PartialFn& partial) {
  constexpr int64_t kChunk = 256;
  double acc = 0;
  for (int64_t j = 0; j < n; j += kChunk) acc += partial(j, std::min(kChunk, n - j));
  return static_cast<T>(acc);
}

template <class T>
Vec<T> plus(Vec<T> a, Vec<T> b) { return a + b; }

struct CpuSoftmax {
  template <SoftmaxKind K>
  static void forward(const RowLayout& l, const at::Tensor& input, const at::Tensor& output) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "torch_vjp_softmax_cpu", [&] {
      using T = cpu::opmath<scalar_t>;
      const cpu::RowAccess<scalar_t> x_rows(const_cast<scalar_t*>(input.const_data_ptr<scalar_t>()), l);
      scalar_t* out = output.mutable_data_ptr<scalar_t>();
      const cpu::RowAccess<scalar_t> y_rows(out, l);
      at::parallel_for(0, l.outer * l.inner, cpu::rows_grain(l.n), [&](int64_t begin, int64_t end) {
        std::vector<T> x_buf(x_rows.direct() ? 0 : l.n), y_buf(y_rows.direct() ? 0 : l.n);
        for (int64_t row = begin; row < end; ++row) {
          const T* x = x_rows.read(row, x_buf.data());
          const T m = row_max(x, l.n);
          const T shift = math::shift_for<K>(m);
          const auto sum_exp = [&](const T* v) {  // s = Σ exp(v - shift)
            return chunked_sum<T>(l.n, [&](int64_t j, int64_t len) {
              return at::vec::map_reduce_all<T>([shift](Vec<T> e) { return math::exp_(e - Vec<T>(shift)); }, plus<T>,
                                                v + j, len);
            });
          };
          if constexpr (K == SoftmaxKind::LogSumExp) {
            out[row] = static_cast<scalar_t>(shift + math::log_(sum_exp(x)));  // output is (outer, inner)
          } else if constexpr (K == SoftmaxKind::Softmax) {
            // One exp per element: e = softmax_exp(x, m) is written to y and summed, then scaled in place.
            T* y = y_rows.target(row, y_buf.data());
            at::vec::map([m](Vec<T> v) { return math::softmax_exp(v, m); }, y, x, l.n);
            const T inv_s = T(1) / chunked_sum<T>(l.n, [&](int64_t j, int64_t len) {
              return at::vec::reduce_all<T>(plus<T>, y + j, len);
            });
            at::vec::map([inv_s](Vec<T> e) { return math::softmax_scale(e, inv_s); }, y, y, l.n);
            y_rows.commit(row, y);
          } else {
            T* y = y_rows.target(row, y_buf.data());
            const T log_s = math::log_(sum_exp(x));
            at::vec::map([m, log_s](Vec<T> v) { return math::log_softmax_out(v, m, log_s); }, y, x, l.n);
            y_rows.commit(row, y);
          }
        }
      });
    });
  }

  // softmax:     c = Σ dy·y,  dx = y ⊙ (dy - c)          (J = diag(y) - y yᵀ)
  // log_softmax: S = Σ dy,    dx = dy - exp(y) ⊙ S       (J = I - 1 softmax(x)ᵀ)
  // logsumexp:   dx = dy_row · exp(x - out)             (J = softmax(x)ᵀ, one row)
  // Derivations in math/softmax.h.
  template <SoftmaxKind K>
  static void backward(const RowLayout& l, const at::Tensor& grad_output, const at::Tensor& output,
                       const at::Tensor& input, const at::Tensor& grad_input) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_input.scalar_type(), "torch_vjp_softmax_backward_cpu", [&] {
      using T = cpu::opmath<scalar_t>;
      auto* dy_base = const_cast<scalar_t*>(grad_output.const_data_ptr<scalar_t>());
      auto* y_base = const_cast<scalar_t*>(output.const_data_ptr<scalar_t>());
      const cpu::RowAccess<scalar_t> dx_rows(grad_input.mutable_data_ptr<scalar_t>(), l);
      at::parallel_for(0, l.outer * l.inner, cpu::rows_grain(l.n), [&](int64_t begin, int64_t end) {
        std::vector<T> a_buf(l.n), b_buf(l.n), dx_buf(dx_rows.direct() ? 0 : l.n);
        for (int64_t row = begin; row < end; ++row) {
          T* dx = dx_rows.target(row, dx_buf.data());
          if constexpr (K == SoftmaxKind::LogSumExp) {
            const cpu::RowAccess<scalar_t> x_rows(const_cast<scalar_t*>(input.const_data_ptr<scalar_t>()), l);
            const T* x = x_rows.read(row, a_buf.data());
            const T dy_row = static_cast<T>(dy_base[row]), out_row = static_cast<T>(y_base[row]);
            at::vec::map([dy_row, out_row](Vec<T> v) { return math::logsumexp_vjp(dy_row, v, out_row); }, dx, x, l.n);
          } else {
            const T* dy = cpu::RowAccess<scalar_t>(dy_base, l).read(row, a_buf.data());
            const T* y = cpu::RowAccess<scalar_t>(y_base, l).read(row, b_buf.data());
            if constexpr (K == SoftmaxKind::Softmax) {
              const T c = chunked_sum<T>(l.n, [&](int64_t j, int64_t len) {
                return at::vec::map2_reduce_all<T>([](Vec<T> g, Vec<T> v) { return math::softmax_vjp_term(g, v); },
                                                   plus<T>, dy + j, y + j, len);
              });
              at::vec::map2([c](Vec<T> g, Vec<T> v) { return math::softmax_vjp(g, v, c); }, dx, dy, y, l.n);
            } else {
              const T sum_dy = chunked_sum<T>(  // Σ log_softmax_vjp_term = Σ dy
                  l.n, [&](int64_t j, int64_t len) { return at::vec::reduce_all<T>(plus<T>, dy + j, len); });
              at::vec::map2([sum_dy](Vec<T> g, Vec<T> v) { return math::log_softmax_vjp(g, v, sum_dy); }, dx, dy, y,
                            l.n);
            }
          }
          dx_rows.commit(row, dx);
        }
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_vjp, CPU, m) { register_softmax<CpuSoftmax>(m); }

}  // namespace torch_vjp
