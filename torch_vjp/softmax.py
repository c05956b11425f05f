"""Softmax family: row maps over one dim; the kernels' math is csrc/math/softmax.h.

  softmax      J = diag(y) - y yᵀ          symmetric, so J·t is the VJP op itself
  log_softmax  J = I - 1 pᵀ, p = exp(y)    J·t = t - 1 (pᵀ t)
  logsumexp    J = pᵀ, p = softmax(x)      J·t = pᵀ t

The VJP ops' own gradients (second order, reverse and forward mode) are composite below, differentiable
again. logsumexp's weights p are the softmax kernel on the input, never exp(x - out) from the rounded
output: where log n is below out's rounding step (large |x|, or half precision), exp(x - out) is off by
the factor exp(lse - out), and sums to n instead of 1. (Its first-order VJP kernel takes out, as torch's.)
Autocast: torch's CUDA lists run logsumexp in float32 ("fp32") and softmax and log_softmax in float32 unless
a dtype is given ("fp32_set_opt_dtype"; the dtype is the public functions' business, the registered ops
have none); torch's CPU lists hold none of them.
"""
from __future__ import annotations

import torch

from ._ops import VJPOp, check_floating, check_same, register_fake, wrap_dim


def _row_dot(a, b, dim):
    return (a * b).sum(dim, keepdim=True)


def _softmax_grads(g, dy, saved, params):
    # b(dy, y) = y ⊙ (dy - Σ dy·y):  ∂/∂dy is softmax's J again (symmetric);
    # ∂/∂y: ḡ ⊙ (dy - Σ dy·y) - dy (Σ ḡ·y)
    (y,), (dim,) = saved, params
    d_dy = SOFTMAX.backward(g, y, dim)
    d_y = g * (dy - _row_dot(dy, y, dim)) - dy * _row_dot(g, y, dim)
    return d_dy, d_y


def _softmax_backward_jvp(t_dy, t_saved, dy, saved, params):
    # ḃ = y ⊙ (ṫ_dy - Σ ṫ_dy·y) + ṫ_y ⊙ (dy - Σ dy·y) - y (Σ dy·ṫ_y)
    (y,), (t_y,), (dim,) = saved, t_saved, params
    out = SOFTMAX.backward(t_dy, y, dim) if t_dy is not None else torch.zeros_like(y)
    if t_y is not None:
        out = out + t_y * (dy - _row_dot(dy, y, dim)) - y * _row_dot(dy, t_y, dim)
    return out


def _log_softmax_jvp(tangents, saved, params):
    (t,), (y,), (dim,) = tangents, saved, params
    return t - _row_dot(t, y.exp(), dim)


def _log_softmax_grads(g, dy, saved, params):
    # b(dy, y) = dy - p Σ dy, p = exp(y):  ∂/∂dy: ḡ - Σ ḡ·p;  ∂/∂y: -ḡ ⊙ p Σ dy
    (y,), (dim,) = saved, params
    p = y.exp()
    return g - _row_dot(g, p, dim), -g * p * dy.sum(dim, keepdim=True)


def _log_softmax_backward_jvp(t_dy, t_saved, dy, saved, params):
    # ḃ = ṫ_dy - p Σ ṫ_dy - p ⊙ ṫ_y Σ dy
    (y,), (t_y,), (dim,) = saved, t_saved, params
    p = y.exp()
    out = t_dy - p * t_dy.sum(dim, keepdim=True) if t_dy is not None else torch.zeros_like(y)
    return out if t_y is None else out - p * t_y * dy.sum(dim, keepdim=True)


def _row_view(t, x, dim, keepdim):
    """A logsumexp-shaped tensor (output, grad_output) viewed so it broadcasts against x."""
    return t if keepdim or x.dim() == 0 else t.unsqueeze(dim)


def _row_sum(t, x, dim, keepdim):
    return t if x.dim() == 0 else t.sum(dim, keepdim=keepdim)


def _logsumexp_weights(x, params):
    """p = softmax(x) along dim, stably from the input (the module docstring says why), and the wrapped dim."""
    dim, keepdim = params
    dim = wrap_dim(dim, x.dim(), "logsumexp")
    return SOFTMAX(x, dim), dim, keepdim


def _logsumexp_jvp(tangents, saved, params):
    (t,), (x, _out) = tangents, saved
    p, dim, keepdim = _logsumexp_weights(x, params)
    return _row_sum(p * t, x, dim, keepdim)


def _logsumexp_grads(g, dy, saved, params):
    # b(dy, x, out) = dy·p, p = exp(x - out) (= softmax(x)):
    #   ∂/∂dy: Σ ḡ·p;  ∂/∂x: ḡ ⊙ dy·p;  ∂/∂out: -Σ ḡ ⊙ dy·p = -dy Σ ḡ·p
    (x, _out) = saved
    p, dim, keepdim = _logsumexp_weights(x, params)
    d_dy = _row_sum(g * p, x, dim, keepdim)
    return d_dy, g * _row_view(dy, x, dim, keepdim) * p, -dy * d_dy


def _logsumexp_backward_jvp(t_dy, t_saved, dy, saved, params):
    # ḃ = ṫ_dy·p + dy·p ⊙ (ṫ_x - ṫ_out)
    (x, _out), (t_x, t_out) = saved, t_saved
    p, dim, keepdim = _logsumexp_weights(x, params)
    out = _row_view(t_dy, x, dim, keepdim) * p if t_dy is not None else torch.zeros_like(x)
    t_arg = t_x  # ṫ_x - ṫ_out, either possibly absent (zero)
    if t_out is not None:
        t_out = _row_view(t_out, x, dim, keepdim)
        t_arg = -t_out if t_arg is None else t_arg - t_out
    return out if t_arg is None else out + _row_view(dy, x, dim, keepdim) * p * t_arg


SOFTMAX = VJPOp(
    "softmax",
    saves=("output",),
    jvp=lambda tangents, saved, params: SOFTMAX.backward(tangents[0], *saved, *params),
    vjp_grads=_softmax_grads,
    backward_jvp=_softmax_backward_jvp,
    decomposition=torch.softmax,
    dim_param=0,
    autocast={"cuda": "fp32"},
)
LOG_SOFTMAX = VJPOp(
    "log_softmax", saves=("output",), jvp=_log_softmax_jvp, vjp_grads=_log_softmax_grads,
    backward_jvp=_log_softmax_backward_jvp, dim_param=0, autocast={"cuda": "fp32"}, decomposition=torch.log_softmax,
)
LOGSUMEXP = VJPOp(
    "logsumexp", saves=("input", "output"), jvp=_logsumexp_jvp, vjp_grads=_logsumexp_grads,
    backward_jvp=_logsumexp_backward_jvp, dim_param=0, keepdim_param=1, autocast={"cuda": "fp32"},
    decomposition=torch.logsumexp,
    integers="promote",  # as torch.logsumexp; torch's softmax kernels refuse integers
)
OPS = {op.name: op for op in (SOFTMAX, LOG_SOFTMAX, LOGSUMEXP)}


def _reduced_shape(x, dim, keepdim):
    if x.dim() == 0:
        return []
    shape = list(x.shape)
    if keepdim:
        shape[dim] = 1
    else:
        del shape[dim]
    return shape


for _name in ("softmax", "log_softmax"):

    def _fake_forward(input, dim, _name=_name):
        check_floating(input, _name, "input")
        wrap_dim(dim, input.dim(), _name)
        return torch.empty_like(input, memory_format=torch.contiguous_format)

    def _fake_backward(grad_output, output, dim, _name=_name + "_backward"):
        check_floating(output, _name, "output")
        check_same(grad_output, "grad_output", output, "output", _name)
        wrap_dim(dim, output.dim(), _name)
        return torch.empty_like(output, memory_format=torch.contiguous_format)

    register_fake(_name)(_fake_forward)
    register_fake(_name + "_backward")(_fake_backward)


@register_fake("logsumexp")
def _(input, dim, keepdim):
    check_floating(input, "logsumexp", "input")
    dim = wrap_dim(dim, input.dim(), "logsumexp")
    return input.new_empty(_reduced_shape(input, dim, keepdim))


@register_fake("logsumexp_backward")
def _(grad_output, input, output, dim, keepdim):
    name = "logsumexp_backward"
    check_floating(input, name, "input")
    dim = wrap_dim(dim, input.dim(), name)
    expected = _reduced_shape(input, dim, keepdim)
    if list(output.shape) != expected:
        raise RuntimeError(
            f"torch_vjp.{name}: expected output of shape {expected} for input of shape {list(input.shape)}, "
            f"dim={dim}, keepdim={keepdim}, got {list(output.shape)}"
        )
    check_same(output, "output", input, "input", name, shape=False)
    check_same(grad_output, "grad_output", output, "output", name)
    return torch.empty_like(input, memory_format=torch.contiguous_format)
