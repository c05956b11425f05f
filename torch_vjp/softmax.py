"""Softmax family: row maps over one dim; the kernels' math is csrc/math/softmax.h.

  softmax      J = diag(y) - y yᵀ          symmetric, so J·t is the VJP op itself
  log_softmax  J = I - 1 pᵀ, p = exp(y)    J·t = t - 1 (pᵀ t)
  logsumexp    J = pᵀ, p = exp(x - out)    J·t = pᵀ t

The VJP ops' own gradients (second order) are composite below, differentiable again.
"""
from __future__ import annotations

import torch

from ._ops import VJPOp, check_floating, check_same, register_fake, wrap_dim


def _softmax_grads(g, dy, saved, params):
    # b(dy, y) = y ⊙ (dy - Σ dy·y):  ∂/∂dy is softmax's J again (symmetric);
    # ∂/∂y: ḡ ⊙ (dy - Σ dy·y) - dy (Σ ḡ·y)
    (y,), (dim,) = saved, params
    d_dy = SOFTMAX.backward(g, y, dim)
    d_y = g * (dy - (dy * y).sum(dim, keepdim=True)) - dy * (g * y).sum(dim, keepdim=True)
    return d_dy, d_y


def _log_softmax_jvp(t, saved, params):
    (y,), (dim,) = saved, params
    return t - (t * y.exp()).sum(dim, keepdim=True)


def _log_softmax_grads(g, dy, saved, params):
    # b(dy, y) = dy - p Σ dy, p = exp(y):  ∂/∂dy: ḡ - Σ ḡ·p;  ∂/∂y: -ḡ ⊙ p Σ dy
    (y,), (dim,) = saved, params
    p = y.exp()
    return g - (g * p).sum(dim, keepdim=True), -g * p * dy.sum(dim, keepdim=True)


def _row_view(t, x, dim, keepdim):
    """A logsumexp-shaped tensor (output, grad_output) viewed so it broadcasts against x."""
    return t if keepdim or x.dim() == 0 else t.unsqueeze(dim)


def _row_sum(t, x, dim, keepdim):
    return t if x.dim() == 0 else t.sum(dim, keepdim=keepdim)


def _logsumexp_jvp(t, saved, params):
    (x, out), (dim, keepdim) = saved, params
    dim = wrap_dim(dim, x.dim(), "logsumexp")
    return _row_sum(t * (x - _row_view(out, x, dim, keepdim)).exp(), x, dim, keepdim)


def _logsumexp_grads(g, dy, saved, params):
    # b(dy, x, out) = dy·p, p = exp(x - out):  ∂/∂dy: Σ ḡ·p;  ∂/∂x: ḡ ⊙ dy·p;  ∂/∂out: -Σ ḡ ⊙ dy·p
    (x, out), (dim, keepdim) = saved, params
    dim = wrap_dim(dim, x.dim(), "logsumexp_backward")
    p = (x - _row_view(out, x, dim, keepdim)).exp()
    d_dy = _row_sum(g * p, x, dim, keepdim)
    return d_dy, g * _row_view(dy, x, dim, keepdim) * p, -dy * d_dy


SOFTMAX = VJPOp(
    "softmax",
    saves=("output",),
    jvp=lambda t, saved, params: SOFTMAX.backward(t, *saved, *params),
    vjp_grads=_softmax_grads,
    dim_param=0,
)
LOG_SOFTMAX = VJPOp(
    "log_softmax", saves=("output",), jvp=_log_softmax_jvp, vjp_grads=_log_softmax_grads, dim_param=0
)
LOGSUMEXP = VJPOp(
    "logsumexp", saves=("input", "output"), jvp=_logsumexp_jvp, vjp_grads=_logsumexp_grads, dim_param=0
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
