// Softmax family, CPU backend: rows in parallel, each row reduced and mapped in at::vec registers in its
// storage type (cpu/loops.h); strided rows (a reduced dim that is not the last) are gathered first. The
// math is math/softmax.h.
#include <ATen/Dispatch.h>

#include <array>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/loops.h"
#include "ops/softmax.h"

namespace torch_vjp {
namespace {

using math::SoftmaxKind;
using cpu::map_row;
using cpu::opmath;
using cpu::sum_row;

// One row, x and y of storage type S (the tensor's memory, or opmath buffers for a strided row).
// Returns logsumexp's row value; writes y for the others. `stream`: y is written with streaming stores;
// scratch: n opmath values.
template <SoftmaxKind K, class S>
opmath<S> forward_row(int64_t n, const S* x, S* y, bool stream, opmath<S>* scratch) {
  using T = opmath<S>;
  const T m = cpu::max_row(n, x);
  if constexpr (K == SoftmaxKind::Softmax) {
    // One exp per element: e = softmax_exp(x, m) is summed in the pass that writes it, then scaled into y.
    // For float and double e is y itself, scaled in place while the row is in cache (on the 2-core EPYC this
    // beat a scratch row plus streaming stores of y by 10-20% at rows of 2048 and 32768 floats); half types
    // keep e in the fp32 scratch row (exact), and y is written once.
    T* e = scratch;
    if constexpr (std::is_same_v<S, T>) {
      e = y;
      stream = false;
    }
    const T inv_s = T(1) / cpu::widen_map_sum_row(e, n, [m](auto v) { return math::softmax_exp(v, m); }, x);
    map_row(y, n, stream, [inv_s](auto v) { return math::softmax_scale(v, inv_s); }, static_cast<const T*>(e));
    return T(0);
  } else {
    const T shift = math::shift_for<K>(m);
    const T s = sum_row(n, [shift](auto v) { return math::ExpMinus<T>(shift)(v); }, x);
    if constexpr (K == SoftmaxKind::LogSumExp) {
      return shift + math::log_(s);
    } else {
      const T log_s = math::log_(s);
      // Rows longer than 4096: plain stores (256x32768 fp32 forward 1.94 -> 1.85 ms on the 2-core EPYC).
      map_row(y, n, stream && n <= 4096, [m, log_s](auto v) { return math::log_softmax_out(v, m, log_s); }, x);
    }
    return T(0);
  }
}

// softmax:     J = diag(y) - y yᵀ        c = Σ dy·y,  dx = y ⊙ (dy - c)
// log_softmax: J = I - 1 softmax(x)ᵀ    S = Σ dy,    dx = dy - exp(y) ⊙ S
// (derivations in math/softmax.h). Reads dy and y twice from cache-resident rows, writes dx once.
template <SoftmaxKind K, class S>
void backward_row(int64_t n, const S* dy, const S* y, S* dx, bool stream) {
  if constexpr (K == SoftmaxKind::Softmax) {
    const auto c = sum_row(n, [](auto g, auto v) { return math::softmax_vjp_term(g, v); }, dy, y);
    map_row(dx, n, stream, [c](auto g, auto v) { return math::softmax_vjp(g, v, c); }, dy, y);
  } else {
    const auto sum_dy = sum_row(n, [](auto g) { return g; }, dy);  // Σ log_softmax_vjp_term = Σ dy
    map_row(dx, n, stream, [sum_dy](auto g, auto v) { return math::log_softmax_vjp(g, v, sum_dy); }, dy, y);
  }
}

// logsumexp: out = lse(x), J = softmax(x)ᵀ (one row), dx = dy_row · exp(x - out); no reduction.
template <class S>
void logsumexp_backward_row(int64_t n, opmath<S> dy_row, const S* x, opmath<S> out_row, S* dx, bool stream) {
  map_row(dx, n, stream, [dy_row, out_row](auto v) { return math::logsumexp_vjp(dy_row, v, out_row); }, x);
}

template <class S>
S* mutable_ptr(const at::Tensor& t) {
  return const_cast<S*>(t.const_data_ptr<S>());
}

struct CpuSoftmax {
  template <SoftmaxKind K>
  static void forward(const RowLayout& l, const at::Tensor& input, const at::Tensor& output) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "torch_vjp_softmax_cpu", [&] {
      scalar_t* out = output.mutable_data_ptr<scalar_t>();
      if constexpr (K == SoftmaxKind::LogSumExp) {  // output: one value per row, (outer, inner) row-major
        cpu::for_each_row<scalar_t, 1>(l, {mutable_ptr<scalar_t>(input)}, false, [&](const auto& ctx, const auto* x) {
          using S = std::remove_cv_t<std::remove_pointer_t<decltype(x)>>;
          out[ctx.row] = static_cast<scalar_t>(forward_row<K, S>(l.n, x, nullptr, false, ctx.scratch));
        });
      } else {
        cpu::for_each_row<scalar_t, 2>(l, {mutable_ptr<scalar_t>(input), out}, true,
                                  [&](const auto& ctx, const auto* x, auto* y) {
                                         forward_row<K>(l.n, x, y, ctx.stream, ctx.scratch);
                                       });
      }
    });
  }

  template <SoftmaxKind K>
  static void backward(const RowLayout& l, const at::Tensor& grad_output, const at::Tensor& output,
                       const at::Tensor& input, const at::Tensor& grad_input) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_input.scalar_type(), "torch_vjp_softmax_backward_cpu", [&] {
      using T = opmath<scalar_t>;
      const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
      const scalar_t* y = output.const_data_ptr<scalar_t>();
      scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
      if constexpr (K == SoftmaxKind::LogSumExp) {  // dy and y (the forward's output): one value per row
        cpu::for_each_row<scalar_t, 2>(l, {mutable_ptr<scalar_t>(input), dx}, true, [&](const auto& ctx, const auto* x, auto* d) {
          logsumexp_backward_row(l.n, static_cast<T>(dy[ctx.row]), x, static_cast<T>(y[ctx.row]), d, ctx.stream);
        });
      } else {
        cpu::for_each_row<scalar_t, 3>(l, {const_cast<scalar_t*>(dy), const_cast<scalar_t*>(y), dx}, true,
                                  [&](const auto& ctx, const auto* g, const auto* v, auto* d) {
                                    backward_row<K>(l.n, g, v, d, ctx.stream);
                                  });
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torch_vjp, CPU, m) { register_softmax<CpuSoftmax>(m); }

}  // namespace torch_vjp
