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


def _scale(w, offset, x, k, batched, dtype):
    """What x̂ is multiplied by: offset + w (rms_norm's offset, Gemma's 1 + w), rounded in `dtype` as the kernels'
    (math/norm.h); None for a bare x̂ (no weight, no offset)."""
    if w is None:
        return None if offset == 0 else torch.tensor(1.0 + offset, dtype=dtype, device=x.device)
    w = _param(w, x, k, batched, dtype)
    return w if offset == 0 else w + offset


def _norm_backward_ref(dy, x, mean, rstd, w, b, k, mask, batched=(False, False), keep=0, offset=0.0, grad_sum=None):
    """The VJP of layer_norm (mean given) or rms_norm (mean None) in torch ops, as the kernels compute it
    (math/norm.h): g = dy ⊙ (offset + w), dx = r (g - mean g - x̂ mean(g x̂)) (+ grad_sum: add_*),
    dw = Σ_rows dy ⊙ x̂, db = Σ_rows dy. `batched`, `keep`: w and b one per sample, and the per-sample sums,
    under vmap."""
    ct = rstd.dtype
    dims = tuple(range(-k, 0))
    xhat = _xhat(x, mean, rstd, k)
    dyc = dy.to(ct)
    dx = dw = db = None
    if mask[0]:
        scale = _scale(w, offset, x, k, batched[0], ct)
        g = dyc if scale is None else dyc * scale
        centered = g - g.mean(dims, keepdim=True) if mean is not None else g
        dx = _over_rows(rstd, k) * (centered - xhat * (g * xhat).mean(dims, keepdim=True))
        dx = (dx if grad_sum is None else dx + grad_sum.to(ct)).to(x.dtype)
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


def _rms_norm_decomposition(input, normalized_shape, weight, eps, offset=0.0, casting_mode="torch"):
    """rms_norm in torch ops, with the kernels' rounding: torch's rms_norm (statistics in float32) scaled by
    offset + w formed in the compute type; "llama": x̂ rounded to the input dtype, then scaled."""
    ct = compute_type(input.dtype)
    scale = None if weight is None and offset == 0 else (
        torch.full(list(normalized_shape), 1.0 + offset, dtype=ct, device=input.device) if weight is None
        else weight.to(ct) + offset if offset != 0 else weight)
    if casting_mode != "llama":
        return F.rms_norm(input, normalized_shape, scale, eps)
    y = F.rms_norm(input, normalized_shape, None, eps)
    return y if scale is None else (y.to(ct) * scale.to(ct)).to(torch.promote_types(input.dtype, scale.dtype))


def _decomposition(centered: bool, adds: bool):
    """The public op in torch ops for torch.compile's policy (VJPOp.decomposition): torch's own norms, and for
    add_* the add first (rounded to the input dtype, as the kernels' s), returning (y, s)."""
    norm = F.layer_norm if centered else _rms_norm_decomposition  # torch's: statistics in float32
    if not adds:
        return norm

    def add_norm(input, residual, *args):
        s = input + residual
        return norm(s, *args), s

    return add_norm


def _make_norm(name: str, centered: bool, adds: bool = False) -> VJPOp:
    """layer_norm (centered: mean and bias) or rms_norm (offset and casting_mode); with `adds`, add_layer_norm or
    add_rms_norm, which normalize s = input + residual and return s too. Their schemas, and the VJP ops':
    layer_norm(input, normalized_shape, weight?, bias?, eps) -> (y, mean, rstd)
    layer_norm_backward(grad_output, input, mean, rstd, weight?, bias?, normalized_shape, output_mask[3])
    rms_norm(input, normalized_shape, weight?, eps, offset, casting_mode) -> (y, rstd)
    rms_norm_backward(grad_output, input, rstd, weight?, normalized_shape, output_mask[2], offset)
    add_layer_norm(input, residual, normalized_shape, weight?, bias?, eps) -> (y, s, mean, rstd)
    add_layer_norm_backward(grad_output, grad_sum?, s, mean, rstd, weight?, bias?, normalized_shape, output_mask[3])
    add_rms_norm(input, residual, normalized_shape, weight?, eps, offset, casting_mode) -> (y, s, rstd)
    add_rms_norm_backward(grad_output, grad_sum?, s, rstd, weight?, normalized_shape, output_mask[2], offset)
    The add_* VJP op returns the gradient of s (that of input and of residual, the same tensor, as torch's add
    gives it) and the parameters'; grad_sum, the gradient reaching s from its other uses, is added in its dx
    pass (y and s are both public outputs: VJPOp.public_outputs gives their gradients together)."""
    op = None
    head = 2 if adds else 1  # tensors before normalized_shape

    def unpack(args):  # forward arguments -> (u the input, residual, normalized_shape, w, b, eps, offset, casting)
        x, residual = args[0], (args[1] if adds else None)
        rest = args[head:]
        if centered:
            return x, residual, rest[0], rest[1], rest[2], rest[3], 0.0, "torch"
        return x, residual, rest[0], rest[1], None, rest[2], rest[3], rest[4]

    def stats_of(outputs):  # -> (s or None, mean, rstd)
        s = outputs[1] if adds else None
        stats = outputs[2:] if adds else outputs[1:]
        return s, (stats[0] if centered else None), stats[-1]

    def saves(args, outputs):
        x, _, _, w, b, _, _, _ = unpack(args)
        s, mean, rstd = stats_of(outputs)
        u = s if adds else x
        return (u, mean, rstd, w, b) if centered else (u, rstd, w)

    def unpack_saved(saved):  # -> (u, mean, rstd, w, b): u the tensor normalized (x, or s)
        return saved if centered else (saved[0], None, saved[1], saved[2], None)

    def offset_of(params):  # the forward's params -> offset
        return 0.0 if centered else params[-2]

    def backward_args(grad_output, grad_sum, u, mean, rstd, w, b, normalized_shape, mask, offset):
        """The VJP op's arguments, in its schema's order."""
        front = (grad_output, grad_sum) if adds else (grad_output,)
        if centered:
            return (*front, u, mean, rstd, w, b, normalized_shape, mask)
        return (*front, u, rstd, w, normalized_shape, mask, offset)

    def vjp_args(grad_output, saved, params, needs):
        u, mean, rstd, w, b = unpack_saved(saved)
        grad_sum = None
        if adds:  # the gradients of y and of s (or of y alone); y unused (s alone reaches the loss): zero
            grad_output, grad_sum = grad_output if isinstance(grad_output, tuple) else (grad_output, None)
            grad_output = torch.zeros_like(u) if grad_output is None else grad_output
        needs_x = needs[0] or (adds and needs[1])
        needs = needs[head - 1:]  # (x or s, w, b)
        mask = [needs_x, needs[1] and w is not None] + ([needs[2] and b is not None] if centered else [])
        return backward_args(grad_output, grad_sum, u, mean, rstd, w, b, params[0], mask, offset_of(params))

    def vjp_results(result):  # the VJP op's outputs -> a gradient per differentiable tensor argument
        return (result[0], *result) if adds else result

    def parts(args):
        """The VJP op's arguments -> (grad_output, grad_sum, u, mean, rstd, w, b, normalized_shape, mask, offset)."""
        grad_output, args = args[0], args[1:]
        grad_sum, args = (args[0], args[1:]) if adds else (None, args)
        if centered:
            u, mean, rstd, w, b, normalized_shape, mask = args
            return grad_output, grad_sum, u, mean, rstd, w, b, normalized_shape, mask, 0.0
        u, rstd, w, normalized_shape, mask, offset = args
        return grad_output, grad_sum, u, None, rstd, w, None, normalized_shape, mask, offset

    def jvp(tangents, saved, params):
        if adds:
            t_in, t_res, *t_params = tangents
            t_x = t_in if t_res is None else t_res if t_in is None else t_in + t_res
        else:
            t_x, *t_params = tangents
        t_w, t_b = (t_params if centered else (*t_params, None))
        u, mean, rstd, w, b = unpack_saved(saved)
        normalized_shape, offset = params[0], offset_of(params)
        k, ct = len(normalized_shape), rstd.dtype
        t_y = t_stats = None
        if t_x is not None:  # ∂x̂/∂x is symmetric: its product with t_x is the VJP kernel's, with no weight
            t_xhat = op.backward(*backward_args(t_x, None, u, mean, rstd, None, None, normalized_shape,
                                                [True, False, False][:3 if centered else 2], 0.0))[0]
            scale = _scale(w, offset, u, k, False, ct)
            t_y = t_xhat.to(ct) if scale is None else t_xhat.to(ct) * scale
            t_stats = _stats_tangents(t_x, u, mean, rstd, k)
        if t_w is not None and w is not None:
            term = _xhat(u, mean, rstd, k) * t_w.to(ct)
            t_y = term if t_y is None else t_y + term
        if t_b is not None and b is not None:
            t_y = t_b.to(ct).expand(u.shape) if t_y is None else t_y + t_b.to(ct)
        t_y = None if t_y is None else t_y.to(u.dtype)
        # Zero, not None, where only the parameters have tangents: torch asserts on a None tangent of a
        # differentiable output (autograd_meta.cpp, "Expected both tensor and its forward grad to be floating").
        t_mean, t_rstd = t_stats if t_stats is not None else (
            None if mean is None else torch.zeros_like(mean), torch.zeros_like(rstd))
        t_s = () if not adds else ((torch.zeros_like(u) if t_x is None else t_x.to(u.dtype)),)
        return (t_y, *t_s, t_mean, t_rstd) if centered else (t_y, *t_s, t_rstd)

    def extras_vjp(grads, saved, params):  # the statistics' gradients (s is public: vjp_args takes its own)
        g_mean, g_rstd = grads if centered else (None, grads[0])
        u, mean, rstd, w, b = unpack_saved(saved)
        dx = _stats_vjp(g_mean, g_rstd, u, mean, rstd, len(params[0])) \
            if g_mean is not None or g_rstd is not None else None
        none = (None, None) if centered else (None,)
        return (dx, dx, *none) if adds else (dx, *none)

    def vjp_ref(grad_output, *args):
        _, grad_sum, u, mean, rstd, w, b, normalized_shape, mask, offset = parts((grad_output, *args))
        dx, dw, db = _norm_backward_ref(grad_output, u, mean, rstd, w, b, len(normalized_shape), mask, offset=offset,
                                        grad_sum=grad_sum)
        return (dx, dw, db) if centered else (dx, dw)

    def moved(t, bdim, batch_size):
        return t.movedim(bdim, 0) if bdim is not None else t.expand(batch_size, *t.shape)

    def vmap(call, info, in_dims, *args):
        x, residual, normalized_shape, w, b, eps, offset, casting = unpack(args)
        x_dim, r_dim = in_dims[0], (in_dims[1] if adds else None)
        w_dim, b_dim = in_dims[head + 1], (in_dims[head + 2] if centered else None)
        x = moved(x, x_dim, info.batch_size)
        residual = None if residual is None else moved(residual, r_dim, info.batch_size)
        front = (x, residual) if adds else (x,)

        def forward(w, b, offset):
            if centered:
                return call(*front, normalized_shape, w, b, eps)
            return call(*front, normalized_shape, w, eps, offset, casting)

        if w_dim is None and b_dim is None:  # shared parameters: every row of the batch in one call
            output = forward(w, b, offset)
            return output, (0,) * len(output)
        # One weight or bias per sample: the kernel normalizes, the affine map is applied per sample.
        w = w if w is None or w_dim is None else w.movedim(w_dim, 0)
        b = b if b is None or b_dim is None else b.movedim(b_dim, 0)
        output = forward(None, None, 0.0)
        k = len(normalized_shape)
        s, mean, rstd = stats_of(output)
        u = s if adds else x
        xhat = _xhat(u, mean, rstd, k)
        if casting == "llama":  # x̂ rounded to the input dtype before the weight (math::norm_out_rounded)
            xhat = xhat.to(u.dtype).to(xhat.dtype)
        scale = _scale(w, offset, u, k, w_dim is not None, xhat.dtype)
        y = xhat if scale is None else xhat * scale
        y = y if b is None else y + _param(b, u, k, b_dim is not None, xhat.dtype)
        return (y.to(u.dtype), *output[1:]), (0,) * len(output)

    def backward_vmap(call, info, in_dims, *args):
        grad_output, grad_sum, u, mean, rstd, w, b, normalized_shape, mask, offset = parts(args)
        names = ("dy", "gs", "u", "mean", "rstd", "w", "b") if centered else ("dy", "gs", "u", "rstd", "w")
        names = names if adds else tuple(n for n in names if n != "gs")
        dims = dict(zip(names, in_dims), **{n: None for n in ("gs", "mean", "b") if n not in names})
        size = info.batch_size
        grad_output, u, rstd = moved(grad_output, dims["dy"], size), moved(u, dims["u"], size), moved(rstd, dims["rstd"], size)
        mean = None if mean is None else moved(mean, dims["mean"], size)
        grad_sum = None if grad_sum is None else moved(grad_sum, dims["gs"], size)
        w = w if w is None or dims["w"] is None else w.movedim(dims["w"], 0)
        b = b if b is None or dims["b"] is None else b.movedim(dims["b"], 0)
        k = len(normalized_shape)
        dx = None
        if mask[0] and (w is None or dims["w"] is None):  # shared weight: the kernel, on every row at once
            dx = call(*backward_args(grad_output, grad_sum, u, mean, rstd, w, None, normalized_shape,
                                     [True, False, False][:len(mask)], offset))[0]
        # A per-sample weight's dx, and every parameter gradient (a sum over one sample's rows): in torch ops.
        ref_mask = (mask[0] and dx is None, *mask[1:])
        ref_dx, dw, db = _norm_backward_ref(grad_output, u, mean, rstd, w, b, k, ref_mask,
                                            batched=(dims["w"] is not None, dims["b"] is not None), keep=1,
                                            offset=offset, grad_sum=grad_sum)
        dx = ref_dx if dx is None else dx
        output = (dx, dw, db) if centered else (dx, dw)
        return output, tuple(None if t is None else 0 for t in output)

    def integer_error(args):
        # torch's layer_norm checks its parameters' dtype against the input's before the kernel's dtype
        # dispatch: an integer input with a weight or bias is its RuntimeError, alone its NotImplementedError.
        x, _, _, w, b, _, _, _ = unpack(args)
        return RuntimeError if centered and (w is not None or b is not None) else NotImplementedError

    # add_*: torch's autocast lists hold no add, so the eager module's s keeps the input dtype; the fused op
    # runs in its inputs' dtype (no autocast policy) rather than give a float32 s.
    op = VJPOp(name, saves=saves, jvp=jvp, vjp_ref=vjp_ref, vjp_args=vjp_args, extras_vjp=extras_vjp, vmap=vmap,
               backward_vmap=backward_vmap, autocast={} if adds else {"cuda": "fp32"}, integer_error=integer_error,
               public_outputs=2 if adds else 1, vjp_results=vjp_results,
               decomposition=_decomposition(centered, adds))
    return op


LAYER_NORM = _make_norm("layer_norm", centered=True)
RMS_NORM = _make_norm("rms_norm", centered=False)
ADD_LAYER_NORM = _make_norm("add_layer_norm", centered=True, adds=True)
ADD_RMS_NORM = _make_norm("add_rms_norm", centered=False, adds=True)


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
OPS = {op.name: op for op in (LAYER_NORM, RMS_NORM, NORMALIZE, ADD_LAYER_NORM, ADD_RMS_NORM)}


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
    if "layer_norm" in name and any(p.dtype != input.dtype for p in present):  # check_layer_norm_dtypes
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


_CASTING_MODES = ("torch", "gemma", "llama")


def _check_casting_mode(casting_mode, name):
    """Mirrors ops/norm.h's rounds_xhat."""
    if casting_mode not in _CASTING_MODES:
        raise ValueError(f"torch_vjp.{name}: casting_mode must be 'torch', 'gemma' or 'llama', got '{casting_mode}'")


@register_fake("rms_norm")
def _(input, normalized_shape, weight, eps, offset=0.0, casting_mode="torch"):
    rows = _check_norm("rms_norm", input, normalized_shape, {"weight": weight})
    _check_casting_mode(casting_mode, "rms_norm")
    return torch.empty_like(input, memory_format=torch.contiguous_format), _stats_like(input, rows)


def _check_residual(input, residual, name):
    check_floating(input, name, "input")
    check_same(residual, "residual", input, "input", name)


@register_fake("add_rms_norm")
def _(input, residual, normalized_shape, weight, eps, offset=0.0, casting_mode="torch"):
    _check_residual(input, residual, "add_rms_norm")
    rows = _check_norm("add_rms_norm", input, normalized_shape, {"weight": weight})
    _check_casting_mode(casting_mode, "add_rms_norm")
    like = torch.empty_like(input, memory_format=torch.contiguous_format)
    return like, torch.empty_like(like), _stats_like(input, rows)


@register_fake("add_layer_norm")
def _(input, residual, normalized_shape, weight, bias, eps):
    _check_residual(input, residual, "add_layer_norm")
    rows = _check_norm("add_layer_norm", input, normalized_shape, {"weight": weight, "bias": bias})
    like = torch.empty_like(input, memory_format=torch.contiguous_format)
    return like, torch.empty_like(like), _stats_like(input, rows), _stats_like(input, rows)


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
def _(grad_output, input, rstd, weight, normalized_shape, output_mask, offset=0.0):
    return _fake_norm_backward("rms_norm_backward", grad_output, input, {"rstd": rstd}, weight, None,
                               normalized_shape, output_mask)[:2]


def _check_grad_sum(grad_sum, sum, name):
    if grad_sum is not None:
        check_same(grad_sum, "grad_sum", sum, "sum", name)


@register_fake("add_rms_norm_backward")
def _(grad_output, grad_sum, sum, rstd, weight, normalized_shape, output_mask, offset=0.0):
    name = "add_rms_norm_backward"
    out = _fake_norm_backward(name, grad_output, sum, {"rstd": rstd}, weight, None, normalized_shape, output_mask)[:2]
    _check_grad_sum(grad_sum, sum, name)
    return out


@register_fake("add_layer_norm_backward")
def _(grad_output, grad_sum, sum, mean, rstd, weight, bias, normalized_shape, output_mask):
    name = "add_layer_norm_backward"
    out = _fake_norm_backward(name, grad_output, sum, {"mean": mean, "rstd": rstd}, weight, bias, normalized_shape,
                              output_mask)
    _check_grad_sum(grad_sum, sum, name)
    return out


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
