"""Normalization family: layer_norm, rms_norm (over the trailing normalized_shape, n elements a row; weight w
and bias b shared by every row) and normalize (p = 2 along one dim); the kernels' math is csrc/math/norm.h.

  layer_norm  y = x̂ ⊙ w + b, x̂ = (x - μ) r, r = 1/√(σ² + eps)       ∂x̂/∂x = r (I - 11ᵀ/n - x̂x̂ᵀ/n)
  rms_norm    y = x̂ ⊙ w,     x̂ = x r,       r = 1/√(mean x² + eps)   ∂x̂/∂x = r (I - x̂x̂ᵀ/n)
  normalize   y = x / max(ρ, eps), ρ = ‖x‖₂                          J = (I - y yᵀ)/ρ, or I/eps where ρ < eps

Every one of these Jacobians is symmetric, so forward mode reuses the VJP kernel: J·t is the VJP op applied to
t (layer_norm and rms_norm: with no weight, giving ∂x̂/∂x·t_x; then J·t = (∂x̂/∂x·t_x) ⊙ w + x̂ ⊙ t_w + t_b).

The forwards also return the per-row statistics the VJP op reads (μ and r; ρ), in the compute type. They are
differentiable outputs, so that a second derivative through them is exact: ∂μ/∂x = 1/n, ∂r/∂x = -r² x̂/n,
∂ρ/∂x = x/ρ (written from the saved y and ρ: y where ρ ≥ eps, y·eps/ρ below, 0 at ρ = 0, torch's choice).
The VJP ops' own derivatives (second order, both modes) are those of the VJP written in torch ops below
(`_norm_backward_ref`, `_normalize_backward_ref`), taken by torch.func: exact, and off the first-order path.

A batch under vmap shares weight and bias across samples when they are not batched: the kernels then run on
all the batch's rows at once, and a parameter's per-sample gradient (a column sum over one sample's rows) is
summed in torch ops. A batched weight or bias (one per sample) is applied in torch ops around the kernels.

Autocast: torch's CUDA list runs layer_norm and rms_norm in float32 ("fp32"), and the norm of F.normalize too
(its division then promotes the output to float32): "fp32" for the three. Its CPU lists hold none of them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._ops import VJPOp, check_floating, check_same, compute_type, register_fake, wrap_dim


def _over_rows(stat: torch.Tensor, k: int) -> torch.Tensor:
    """A per-row statistic viewed to broadcast over a row's k normalized dims."""
    return stat.reshape(*stat.shape, *([1] * k))


def _param(p, x: torch.Tensor, k: int, batched: bool, dtype):
    """A weight or bias as it multiplies x: shape normalized_shape, or (batch, *normalized_shape) under vmap
    with one per sample (then broadcast over the sample's rows)."""
    if p is None:
        return None
    p = p.to(dtype)
    return p.reshape(p.shape[0], *([1] * (x.dim() - 1 - k)), *p.shape[1:]) if batched else p


def _sum_rows(t: torch.Tensor, k: int, keep: int) -> torch.Tensor:
    """Σ over the row dims of t (all but the first `keep` and the last k): a shared parameter's gradient."""
    dims = tuple(range(keep, t.dim() - k))
    return t.sum(dims) if dims else t


def _xhat(x, mean, rstd, k):
    ct = rstd.dtype
    centered = x.to(ct) if mean is None else x.to(ct) - _over_rows(mean, k)
    return centered * _over_rows(rstd, k)


def _norm_backward_ref(dy, x, mean, rstd, w, b, k, mask, batched=(False, False), keep=0):
    """The VJP of layer_norm (mean given) or rms_norm (mean None) in torch ops, as the kernels compute it
    (math/norm.h): g = dy ⊙ w, dx = r (g - mean g - x̂ mean(g x̂)), dw = Σ_rows dy ⊙ x̂, db = Σ_rows dy. `batched`,
    `keep`: w and b one per sample, and the per-sample sums, under vmap."""
    ct = rstd.dtype
    dims = tuple(range(-k, 0))
    xhat = _xhat(x, mean, rstd, k)
    dyc = dy.to(ct)
    dx = dw = db = None
    if mask[0]:
        g = dyc if w is None else dyc * _param(w, x, k, batched[0], ct)
        centered = g - g.mean(dims, keepdim=True) if mean is not None else g
        dx = (_over_rows(rstd, k) * (centered - xhat * (g * xhat).mean(dims, keepdim=True))).to(x.dtype)
    if mask[1] and w is not None:
        dw = _sum_rows(dyc * xhat, k, keep).to(w.dtype)
    if len(mask) > 2 and mask[2] and b is not None:
        db = _sum_rows(dyc, k, keep).to(b.dtype)
    return dx, dw, db


def _stats_tangents(t_x, x, mean, rstd, k):
    """Tangents of μ and r: mean(t), and -r² mean(x̂ t)."""
    dims = tuple(range(-k, 0))
    t = t_x.to(rstd.dtype)
    t_rstd = -rstd * rstd * (_xhat(x, mean, rstd, k) * t).mean(dims)
    return (None if mean is None else t.mean(dims)), t_rstd


def _stats_vjp(g_mean, g_rstd, x, mean, rstd, k):
    """The statistics' contribution to dx: g_μ/n - g_r r² x̂/n."""
    n = math.prod(x.shape[x.dim() - k:])
    xhat = _xhat(x, mean, rstd, k)
    dx = torch.zeros_like(xhat)
    if g_mean is not None:
        dx = dx + _over_rows(g_mean.to(xhat.dtype), k) / n
    if g_rstd is not None:
        dx = dx - _over_rows(g_rstd.to(xhat.dtype) * rstd * rstd, k) * xhat / n
    return dx.to(x.dtype)


def _make_norm(name: str, centered: bool) -> VJPOp:
    """layer_norm (centered: mean and bias) or rms_norm. Their schemas, and the VJP op's:
    layer_norm(input, normalized_shape, weight?, bias?, eps) -> (y, mean, rstd)
    layer_norm_backward(grad_output, input, mean, rstd, weight?, bias?, normalized_shape, output_mask[3])
    rms_norm(input, normalized_shape, weight?, eps) -> (y, rstd)
    rms_norm_backward(grad_output, input, rstd, weight?, normalized_shape, output_mask[2])"""
    op = None

    def unpack(args):  # forward arguments -> (x, normalized_shape, w, b, eps)
        return args if centered else (args[0], args[1], args[2], None, args[3])

    def unpack_saved(saved):  # -> (x, mean, rstd, w, b)
        return saved if centered else (saved[0], None, saved[1], saved[2], None)

    def saves(args, outputs):
        x, _, w, b, _ = unpack(args)
        return (x, outputs[1], outputs[2], w, b) if centered else (x, outputs[1], w)

    def vjp_args(grad_output, saved, params, needs):
        x, mean, rstd, w, b = unpack_saved(saved)
        normalized_shape = params[0]
        if centered:
            mask = [needs[0], needs[1] and w is not None, needs[2] and b is not None]
            return grad_output, x, mean, rstd, w, b, normalized_shape, mask
        return grad_output, x, rstd, w, normalized_shape, [needs[0], needs[1] and w is not None]

    def jvp(tangents, saved, params):
        t_x, t_w, t_b = tangents if centered else (*tangents, None)
        x, mean, rstd, w, b = unpack_saved(saved)
        normalized_shape = params[0]
        k, ct = len(normalized_shape), rstd.dtype
        t_y = t_stats = None
        if t_x is not None:  # ∂x̂/∂x is symmetric: its product with t_x is the VJP kernel's, with no weight
            t_xhat = op.backward(*vjp_args(t_x, (x, mean, rstd, None, None) if centered else (x, rstd, None),
                                           params, (True, False, False)))[0]
            t_y = t_xhat.to(ct) if w is None else t_xhat.to(ct) * w.to(ct)
            t_stats = _stats_tangents(t_x, x, mean, rstd, k)
        if t_w is not None and w is not None:
            term = _xhat(x, mean, rstd, k) * t_w.to(ct)
            t_y = term if t_y is None else t_y + term
        if t_b is not None and b is not None:
            t_y = t_b.to(ct).expand(x.shape) if t_y is None else t_y + t_b.to(ct)
        t_y = None if t_y is None else t_y.to(x.dtype)
        # Zero, not None, where only the parameters have tangents: torch asserts on a None tangent of a
        # differentiable output (autograd_meta.cpp, "Expected both tensor and its forward grad to be floating").
        t_mean, t_rstd = t_stats if t_stats is not None else (
            None if mean is None else torch.zeros_like(mean), torch.zeros_like(rstd))
        return (t_y, t_mean, t_rstd) if centered else (t_y, t_rstd)

    def extras_vjp(grads, saved, params):
        g_mean, g_rstd = grads if centered else (None, grads[0])
        x, mean, rstd, w, b = unpack_saved(saved)
        dx = _stats_vjp(g_mean, g_rstd, x, mean, rstd, len(params[0]))
        return (dx, None, None) if centered else (dx, None)

    def vjp_ref(grad_output, *args):
        if centered:
            x, mean, rstd, w, b, normalized_shape, mask = args
        else:
            (x, rstd, w, normalized_shape, mask), mean, b = args, None, None
        dx, dw, db = _norm_backward_ref(grad_output, x, mean, rstd, w, b, len(normalized_shape), mask)
        return (dx, dw, db) if centered else (dx, dw)

    def moved(t, bdim, batch_size):
        return t.movedim(bdim, 0) if bdim is not None else t.expand(batch_size, *t.shape)

    def vmap(call, info, in_dims, *args):
        x, normalized_shape, w, b, eps = unpack(args)
        x_dim, w_dim, b_dim = (in_dims[0], in_dims[2], in_dims[3] if centered else None)
        x = moved(x, x_dim, info.batch_size)
        if w_dim is None and b_dim is None:  # shared parameters: every row of the batch in one call
            output = call(x, normalized_shape, w, b, eps) if centered else call(x, normalized_shape, w, eps)
            return output, (0,) * len(output)
        # One weight or bias per sample: the kernel normalizes, the affine map is applied per sample.
        w = w if w is None or w_dim is None else w.movedim(w_dim, 0)
        b = b if b is None or b_dim is None else b.movedim(b_dim, 0)
        output = call(x, normalized_shape, None, None, eps) if centered else call(x, normalized_shape, None, eps)
        k = len(normalized_shape)
        stats = output[1:]
        xhat = _xhat(x, stats[0] if centered else None, stats[-1], k)
        y = xhat if w is None else xhat * _param(w, x, k, w_dim is not None, xhat.dtype)
        y = y if b is None else y + _param(b, x, k, b_dim is not None, xhat.dtype)
        return (y.to(x.dtype), *stats), (0,) * len(output)

    def backward_vmap(call, info, in_dims, *args):
        if centered:
            grad_output, x, mean, rstd, w, b, normalized_shape, mask = args
            dims = dict(zip(("dy", "x", "mean", "rstd", "w", "b"), in_dims))
        else:
            (grad_output, x, rstd, w, normalized_shape, mask), mean, b = args, None, None
            dims = dict(zip(("dy", "x", "rstd", "w"), in_dims), mean=None, b=None)
        size = info.batch_size
        grad_output, x, rstd = moved(grad_output, dims["dy"], size), moved(x, dims["x"], size), moved(rstd, dims["rstd"], size)
        mean = None if mean is None else moved(mean, dims["mean"], size)
        w = w if w is None or dims["w"] is None else w.movedim(dims["w"], 0)
        b = b if b is None or dims["b"] is None else b.movedim(dims["b"], 0)
        k = len(normalized_shape)
        dx = None
        if mask[0] and (w is None or dims["w"] is None):  # shared weight: the kernel, on every row at once
            kernel_args = (grad_output, x, mean, rstd, w, None, normalized_shape, [True, False, False]) if centered \
                else (grad_output, x, rstd, w, normalized_shape, [True, False])
            dx = call(*kernel_args)[0]
        # A per-sample weight's dx, and every parameter gradient (a sum over one sample's rows): in torch ops.
        ref_mask = (mask[0] and dx is None, *mask[1:])
        ref_dx, dw, db = _norm_backward_ref(grad_output, x, mean, rstd, w, b, k, ref_mask,
                                            batched=(dims["w"] is not None, dims["b"] is not None), keep=1)
        dx = ref_dx if dx is None else dx
        output = (dx, dw, db) if centered else (dx, dw)
        return output, tuple(None if t is None else 0 for t in output)

    def integer_error(args):
        # torch's layer_norm checks its parameters' dtype against the input's before the kernel's dtype
        # dispatch: an integer input with a weight or bias is its RuntimeError, alone its NotImplementedError.
        x, _, w, b, _ = unpack(args)
        return RuntimeError if centered and (w is not None or b is not None) else NotImplementedError

    op = VJPOp(name, saves=saves, jvp=jvp, vjp_ref=vjp_ref, vjp_args=vjp_args, extras_vjp=extras_vjp, vmap=vmap,
               backward_vmap=backward_vmap, autocast={"cuda": "fp32"}, integer_error=integer_error,
               decomposition=F.layer_norm if centered else F.rms_norm)  # torch's: statistics in float32
    return op


LAYER_NORM = _make_norm("layer_norm", centered=True)
RMS_NORM = _make_norm("rms_norm", centered=False)


def _unit(y, norm, eps):
    """x/ρ, the gradient of ρ = ‖x‖₂, from y = x / max(ρ, eps) and ρ: 0 at x = 0 (torch's choice for the norm)."""
    ct = norm.dtype
    denominator = torch.where(_clamped(norm, eps, y.dtype), eps, norm)  # the forward's (math::normalize_denominator)
    scale = torch.where(norm > 0, denominator / torch.where(norm > 0, norm, 1), 0)
    return y.to(ct) * scale


def _clamped(norm, eps, dtype):
    """math::normalize_clamped: ρ ≤ eps, as torch decides it in the input's dtype (both rounded to it)."""
    return norm.to(dtype) <= torch.tensor(eps, dtype=dtype, device=norm.device)


def _normalize_backward_ref(grad_output, y, norm, dim, eps):
    """normalize's VJP in torch ops, as the kernel computes it: (dy - y⟨y, dy⟩)/ρ, or dy/eps where ρ ≤ eps."""
    ct = norm.dtype
    dyc, yc = grad_output.to(ct), y.to(ct)
    clamped = _clamped(norm, eps, y.dtype)
    dot = torch.where(clamped, 0, (yc * dyc).sum(dim, keepdim=True))
    return ((dyc - yc * dot) / torch.where(clamped, eps, norm)).to(y.dtype)


def _normalize_jvp(tangents, saved, params):
    (t,), (y, norm), (dim, eps) = tangents, saved, params
    if t is None:
        return None, None
    t_y = NORMALIZE.backward(t, y, norm, dim, eps)  # J is symmetric: J·t is the VJP kernel's
    t_norm = (_unit(y, norm, eps) * t.to(norm.dtype)).sum(dim, keepdim=True)
    return t_y, t_norm


def _normalize_extras_vjp(grads, saved, params):
    (g_norm,), (y, norm), (dim, eps) = grads, saved, params
    return ((g_norm.to(norm.dtype) * _unit(y, norm, eps)).to(y.dtype),)


NORMALIZE = VJPOp(
    "normalize", saves=lambda args, outputs: outputs, jvp=_normalize_jvp, vjp_ref=_normalize_backward_ref,
    extras_vjp=_normalize_extras_vjp, dim_param=0, autocast={"cuda": "fp32"},
    integer_error=RuntimeError,  # as F.normalize's linalg.vector_norm
)
OPS = {op.name: op for op in (LAYER_NORM, RMS_NORM, NORMALIZE)}


# ---------------------------------------------------------------------------------------------------------
# Fake kernels: the C++ frontend's checks (csrc/ops/norm.h) and shapes, for torch.compile and meta tensors.

def _check_norm(name, input, normalized_shape, params):
    check_floating(input, name, "input")
    k = len(normalized_shape)
    if k < 1:
        raise RuntimeError(f"torch_vjp.{name}: expected normalized_shape to be at least 1-dimensional, i.e., "
                           f"containing at least one element, but got normalized_shape = {list(normalized_shape)}")
    if input.dim() < k or list(input.shape[input.dim() - k:]) != list(normalized_shape):
        raise RuntimeError(f"torch_vjp.{name}: given normalized_shape={list(normalized_shape)}, expected input with "
                           f"shape [*, {', '.join(map(str, normalized_shape))}], but got input of size{list(input.shape)}")
    present = [p for p in params.values() if p is not None]
    if name.startswith("layer_norm") and any(p.dtype != input.dtype for p in present):  # check_layer_norm_dtypes
        if input.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"torch_vjp.layer_norm: mixed dtype: all inputs must share same datatype (float32 "
                               f"parameters are taken only beside float16 or bfloat16 input, as torch's), got input "
                               f"{input.dtype}")
        if any(p.dtype != torch.float32 for p in present):
            raise RuntimeError(f"torch_vjp.layer_norm: mixed dtype: expect parameter to have scalar type of Float "
                               f"beside {input.dtype} input, as torch's")
    for arg, p in params.items():
        if p is None:
            continue
        check_floating(p, name, arg)
        if p.device != input.device:
            raise RuntimeError(f"torch_vjp.{name}: expected {arg} on the input's device {input.device}, got {p.device}")
        if list(p.shape) != list(normalized_shape):
            raise RuntimeError(f"torch_vjp.{name}: expected {arg} to be of same shape as normalized_shape, but got "
                               f"{arg} of shape {list(p.shape)} and normalized_shape = {list(normalized_shape)}")
    return input.shape[: input.dim() - k]


def _stats_like(input, shape):
    return input.new_empty(shape, dtype=compute_type(input.dtype))


@register_fake("layer_norm")
def _(input, normalized_shape, weight, bias, eps):
    rows = _check_norm("layer_norm", input, normalized_shape, {"weight": weight, "bias": bias})
    return torch.empty_like(input, memory_format=torch.contiguous_format), _stats_like(input, rows), _stats_like(input, rows)


@register_fake("rms_norm")
def _(input, normalized_shape, weight, eps):
    rows = _check_norm("rms_norm", input, normalized_shape, {"weight": weight})
    return torch.empty_like(input, memory_format=torch.contiguous_format), _stats_like(input, rows)


def _fake_norm_backward(name, grad_output, input, stats, weight, bias, normalized_shape, mask):
    rows = _check_norm(name, input, normalized_shape, {"weight": weight, "bias": bias})
    check_same(grad_output, "grad_output", input, "input", name)
    for stat_name, stat in stats.items():
        if list(stat.shape) != list(rows) or stat.dtype != compute_type(input.dtype) or stat.device != input.device:
            raise RuntimeError(f"torch_vjp.{name}: expected {stat_name} of shape {list(rows)} and dtype "
                               f"{compute_type(input.dtype)} on {input.device}, got {list(stat.shape)} {stat.dtype} on {stat.device}")
    dx = torch.empty_like(input, memory_format=torch.contiguous_format) if mask[0] else None
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if mask[1] and weight is not None else None
    db = torch.empty_like(bias, memory_format=torch.contiguous_format) if len(mask) > 2 and mask[2] and bias is not None else None
    return dx, dw, db


@register_fake("layer_norm_backward")
def _(grad_output, input, mean, rstd, weight, bias, normalized_shape, output_mask):
    return _fake_norm_backward("layer_norm_backward", grad_output, input, {"mean": mean, "rstd": rstd}, weight, bias,
                               normalized_shape, output_mask)


@register_fake("rms_norm_backward")
def _(grad_output, input, rstd, weight, normalized_shape, output_mask):
    return _fake_norm_backward("rms_norm_backward", grad_output, input, {"rstd": rstd}, weight, None,
                               normalized_shape, output_mask)[:2]


def _reduced_keepdim(t, dim):
    shape = list(t.shape)
    if shape:
        shape[dim] = 1
    return shape


@register_fake("normalize")
def _(input, dim, eps):
    check_floating(input, "normalize", "input")
    dim = wrap_dim(dim, input.dim(), "normalize")
    return (torch.empty_like(input, memory_format=torch.contiguous_format),
            _stats_like(input, _reduced_keepdim(input, dim)))


@register_fake("normalize_backward")
def _(grad_output, output, norm, dim, eps):
    name = "normalize_backward"
    check_floating(output, name, "output")
    check_same(grad_output, "grad_output", output, "output", name)
    dim = wrap_dim(dim, output.dim(), name)
    expected = _reduced_keepdim(output, dim)
    if list(norm.shape) != expected or norm.dtype != compute_type(output.dtype):
        raise RuntimeError(f"torch_vjp.{name}: expected norm of shape {expected} and dtype "
                           f"{compute_type(output.dtype)}, got {list(norm.shape)} {norm.dtype}")
    return torch.empty_like(output, memory_format=torch.contiguous_format)
