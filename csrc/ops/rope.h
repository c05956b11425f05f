// Rotary position embedding: op schemas' implementations for one backend (math in math/rope.h).
//
// rope(q, k, cos, sin, unsqueeze_dim) is transformers' apply_rotary_pos_emb: cos and sin, unsqueezed at
// unsqueeze_dim, broadcast over the leading dims of q and of k (heads, and batch where they lack it); the
// rotation covers the first R = cos.size(-1) elements of each row (R even, R ≤ the head dim) and the rest
// passes through. q and k may differ in their leading dims (grouped-query attention: fewer key heads).
//
// A backend supplies, for one tensor's rows (RopeRows: rows·D > 0; x and out with a unit last stride):
//   Backend::rope_rows<Transposed>(RopeRows, x, cos, sin, out)
// the forward (Transposed = false) or the VJP (true, the same rows with Mᵀ; math/rope.h). Each row's offset in
// x, cos, sin and out comes from a RowIndex of that tensor's leading sizes and strides (cos and sin expanded
// over the rows, stride 0 where broadcast), so a transposed q (transformers' (B, S, H, D) view read as
// (B, H, S, D)) is read in place, without a copy. Checks, layout, allocation and the device guard are here,
// once; cos and sin's own gradients (when asked: they are reductions over the broadcast dims) are torch ops
// here too, shared by the backends.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/WrapDimUtils.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "math/rope.h"

namespace torch_vjp {

// A row's element offset from its index, for the leading dims of a tensor (the last dim excluded),
// adjacent dims merged where their strides allow. Passed by value to CUDA kernels.
struct RowIndex {
  static constexpr int kMaxDims = 8;
  int ndim = 0;
  int64_t size[kMaxDims] = {};
  int64_t stride[kMaxDims] = {};

  TVJP_HD int64_t offset(int64_t row) const {
    int64_t off = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      const int64_t i = row % size[d];
      row /= size[d];
      off += i * stride[d];
    }
    return off;
  }
};

// The RowIndex of t's leading dims, or nullopt if they do not merge into kMaxDims.
inline std::optional<RowIndex> row_index(const at::Tensor& t) {
  RowIndex index;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    const int64_t size = t.size(d), stride = t.stride(d);
    if (size == 1) continue;  // its stride never counts
    if (index.ndim > 0 && index.stride[index.ndim - 1] == stride * size) {  // merges with the previous dim
      index.size[index.ndim - 1] *= size;
      index.stride[index.ndim - 1] = stride;
      continue;
    }
    if (index.ndim == RowIndex::kMaxDims) return std::nullopt;
    index.size[index.ndim] = size;
    index.stride[index.ndim] = stride;
    ++index.ndim;
  }
  return index;
}

struct RopeRows {
  int64_t rows;  // product of the leading dims
  int64_t dim;   // D, the row length
  int64_t half;  // h = R / 2
  RowIndex x, cs, out;  // cs: cos and sin alike (same shape, expanded; both made contiguous)
};

// x with a unit last stride and leading dims that fit a RowIndex (else a contiguous copy).
inline at::Tensor rows_readable(const at::Tensor& x) {
  if (x.dim() == 0 || (x.stride(-1) == 1 && row_index(x).has_value())) return x;
  return x.contiguous();
}

// unsqueeze_dim wrapped as Tensor.unsqueeze wraps it (against cos.dim() + 1), with torch's IndexError.
inline int64_t rope_unsqueeze_dim(const at::Tensor& cos, int64_t unsqueeze_dim, const char* op) {
  const int64_t rank = cos.dim() + 1;
  TORCH_CHECK_INDEX(-rank <= unsqueeze_dim && unsqueeze_dim < rank, "torch_vjp.", op,
                    ": Dimension out of range (expected to be in range of [", -rank, ", ", rank - 1, "], but got ",
                    unsqueeze_dim, ")");
  const int64_t u = unsqueeze_dim < 0 ? unsqueeze_dim + rank : unsqueeze_dim;
  TORCH_CHECK(u < cos.dim(), "torch_vjp.", op, ": unsqueeze_dim ", unsqueeze_dim,
              " would make the last dim of cos and sin 1; it must leave their last dim, the rotary dim, last");
  return u;
}

// cos and sin: floating, like x (device, dtype), one shape, an even last dim R, unsqueezed at u.
inline void check_rope_tables(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const char* op) {
  check_floating(cos, op, "cos");
  check_like(cos, "cos", x, "q", op);
  check_like(sin, "sin", x, "q", op);
  TORCH_CHECK(cos.sizes() == sin.sizes(), "torch_vjp.", op, ": expected cos and sin of one shape, got ", cos.sizes(),
              " and ", sin.sizes());
  TORCH_CHECK(cos.dim() >= 1, "torch_vjp.", op, ": expected cos and sin with a last (rotary) dim, got 0-d tensors");
  TORCH_CHECK(cos.size(-1) % 2 == 0, "torch_vjp.", op,
              ": expected an even rotary dim (the last dim of cos and sin, rotated half against half), got ",
              cos.size(-1));
}

// The rows of x (q or k) and the layout of cos and sin over them: cos.unsqueeze(u) must broadcast to x's
// leading dims, and R ≤ D.
inline at::Tensor rope_table_for(const at::Tensor& x, const at::Tensor& table, int64_t u, const char* op,
                                 const char* x_name) {
  TORCH_CHECK(x.dim() >= 1, "torch_vjp.", op, ": expected ", x_name, " with a last (head) dim, got a 0-d tensor");
  check_floating(x, op, x_name);
  const int64_t rotary = table.size(-1);
  TORCH_CHECK(rotary <= x.size(-1), "torch_vjp.", op, ": the rotary dim ", rotary, " (the last dim of cos and sin) ",
              "exceeds the last dim of ", x_name, ", ", x.size(-1));
  const auto unsqueezed = table.unsqueeze(u);
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  const auto table_lead = unsqueezed.sizes().slice(0, unsqueezed.dim() - 1);
  TORCH_CHECK(at::is_expandable_to(table_lead, lead), "torch_vjp.", op, ": cos and sin of shape ", table.sizes(),
              " unsqueezed at ", u, " do not broadcast to the leading dims of ", x_name, " of shape ", x.sizes(),
              " (the output must have ", x_name, "'s shape)");
  std::vector<int64_t> shape(lead.begin(), lead.end());
  shape.push_back(rotary);
  auto expanded = unsqueezed.expand(shape);
  return row_index(expanded).has_value() ? expanded : expanded.contiguous();
}

// One tensor's rows through the backend: the forward (x = q or k) or the VJP (x = its gradient).
template <class Backend, bool Transposed>
at::Tensor rope_apply(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, int64_t u, const char* op,
                      const char* x_name) {
  const auto cos_rows = rope_table_for(x_in, cos, u, op, x_name);
  const auto sin_rows = rope_table_for(x_in, sin, u, op, x_name);
  const auto x = rows_readable(x_in);
  // The forward keeps x's layout (a transposed q stays transposed, as torch's formula's output does); the VJP's
  // gradients are contiguous, as autograd's sum of the formula's branches gives them (a norm before rope then
  // reduces its weight gradient over the same layout, in the same order, as with stock transformers).
  auto out = Transposed ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::empty_like(x);
  if (out.stride(-1) != 1 || !row_index(out).has_value()) out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
  RopeRows rows{x.numel() / x.size(-1), x.size(-1), cos.size(-1) / 2, *row_index(x), *row_index(cos_rows),
                *row_index(out)};
  // cos and sin share one RowIndex: sin's expanded layout must equal cos's (both are, unless one came strided).
  if (!(sin_rows.strides() == cos_rows.strides() && sin_rows.stride(-1) == 1 && cos_rows.stride(-1) == 1)) {
    const auto c = cos_rows.contiguous(), s = sin_rows.contiguous();
    rows.cs = *row_index(c);
    Backend::template rope_rows<Transposed>(rows, x, c, s, out);
    return out;
  }
  Backend::template rope_rows<Transposed>(rows, x, cos_rows, sin_rows, out);
  return out;
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> rope_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                const at::Tensor& sin, int64_t unsqueeze_dim) {
  const char* op = "rope";
  check_floating(q, op, "q");
  check_rope_tables(q, cos, sin, op);
  check_like(k, "k", q, "q", op);
  const int64_t u = rope_unsqueeze_dim(cos, unsqueeze_dim, op);
  const c10::OptionalDeviceGuard guard(q.device());
  return {rope_apply<Backend, false>(q, cos, sin, u, op, "q"), rope_apply<Backend, false>(k, cos, sin, u, op, "k")};
}

// The gradient of a table (cos or sin) from one tensor: Σ over the broadcast dims of dy ⊙ x (cos) or
// dy ⊙ rotate_half(x) (sin), over the rotary elements, in the compute type, back to the table's shape.
inline at::Tensor rope_table_grad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& table, int64_t u,
                                  bool is_sin) {
  const int64_t rotary = table.size(-1), half = rotary / 2;
  const auto ct = at::toOpMathType(x.scalar_type());
  auto xr = x.narrow(-1, 0, rotary).to(ct);
  if (is_sin) xr = at::cat({-xr.narrow(-1, half, half), xr.narrow(-1, 0, half)}, -1);
  const auto product = dy.narrow(-1, 0, rotary).to(ct) * xr;
  return at::sum_to(product, table.unsqueeze(u).sizes()).squeeze(u);
}

// grad_q or grad_k None: that output took no part (its input's gradient is None too). q and k, given together
// (the forward saves them only when cos or sin require grad), ask for the gradients of cos and sin.
template <class Backend>
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
rope_backward(const std::optional<at::Tensor>& grad_q, const std::optional<at::Tensor>& grad_k, const at::Tensor& cos,
              const at::Tensor& sin, const std::optional<at::Tensor>& q, const std::optional<at::Tensor>& k,
              int64_t unsqueeze_dim) {
  const char* op = "rope_backward";
  const bool has_dq = grad_q.has_value() && grad_q->defined(), has_dk = grad_k.has_value() && grad_k->defined();
  const bool tables = q.has_value() && q->defined();
  TORCH_CHECK(tables == (k.has_value() && k->defined()), "torch_vjp.", op,
              ": give q and k together (for the gradients of cos and sin), or neither");
  const at::Tensor& like = has_dq ? *grad_q : has_dk ? *grad_k : cos;
  check_floating(like, op, has_dq ? "grad_q" : has_dk ? "grad_k" : "cos");
  check_rope_tables(like, cos, sin, op);
  if (has_dq && has_dk) check_like(*grad_k, "grad_k", *grad_q, "grad_q", op);
  const int64_t u = rope_unsqueeze_dim(cos, unsqueeze_dim, op);
  const c10::OptionalDeviceGuard guard(cos.device());
  std::optional<at::Tensor> dq, dk, dcos, dsin;
  if (has_dq) dq = rope_apply<Backend, true>(*grad_q, cos, sin, u, op, "grad_q");
  if (has_dk) dk = rope_apply<Backend, true>(*grad_k, cos, sin, u, op, "grad_k");
  if (!tables || (!has_dq && !has_dk)) return {dq, dk, dcos, dsin};
  // dcos = Σ dy ⊙ x, dsin = Σ dy ⊙ rotate_half(x), over q's and k's broadcast dims, in the compute type.
  at::Tensor gc, gs;
  for (const auto& [g, x, x_name, g_name] : {std::tuple{grad_q, q, "q", "grad_q"}, std::tuple{grad_k, k, "k", "grad_k"}}) {
    if (!g.has_value() || !g->defined()) continue;
    check_same(*x, x_name, *g, g_name, op);
    const auto c = rope_table_grad(*g, *x, cos, u, false), s = rope_table_grad(*g, *x, sin, u, true);
    gc = gc.defined() ? gc + c : c;
    gs = gs.defined() ? gs + s : s;
  }
  return {dq, dk, gc.to(cos.scalar_type()).contiguous(), gs.to(sin.scalar_type()).contiguous()};
}

template <class Backend>
void register_rope(torch::Library& m) {
  m.impl("rope", &rope_forward<Backend>);
  m.impl("rope_backward", &rope_backward<Backend>);
}

}  // namespace torch_vjp
