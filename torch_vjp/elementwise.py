"""Elementwise family: y = f(x) per element; the kernels' math is csrc/math/elementwise.h.

The Jacobian is diagonal, diag(f'(x)), so:
  * the VJP op is b(dy, s) = dy ⊙ g(s), with g = f' written in the saved tensor s (x or y);
  * forward mode is the same product, J·t = t ⊙ g(s): the jvp calls the VJP op;
  * the VJP op's own gradients (second order) are (ḡ ⊙ g(s), ḡ ⊙ dy ⊙ g'(s)); the first is the VJP
    op again, the second needs g' (below, the only derivative math in Python);
  * its forward mode (forward-over-reverse) is ṫ_dy ⊙ g(s) + dy ⊙ g'(s) ⊙ ṫ_s, the same two terms;
  * the output keeps the input's memory format (channels-last stays channels-last).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._ops import VJPOp, check_floating, check_same, compute_type, register_fake

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_KAPPA = 0.044715


def _dg_gelu(x, approximate):
    if approximate == "tanh":  # g = (1+t)/2 + (x/2)(1-t²)u',  u = √(2/π)(x + κx³)
        du = _SQRT_2_OVER_PI * (1 + 3 * _KAPPA * x * x)
        t = torch.tanh(_SQRT_2_OVER_PI * (x + _KAPPA * x * x * x))
        return (1 - t * t) * (du + 0.5 * x * (6 * _SQRT_2_OVER_PI * _KAPPA * x - 2 * t * du * du))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)  # g = Φ + xφ  ⇒  g' = φ (2 - x²)
    return pdf * (2 - x * x)


def _dg_softplus(x, beta, threshold):
    s = torch.sigmoid(beta * x)  # g = σ(βx)  ⇒  g' = β σ (1 - σ); 0 in the linear region
    return torch.where(beta * x > threshold, torch.zeros_like(x), beta * s * (1 - s))


def _dg_silu(x):
    s = torch.sigmoid(x)  # g = σ (1 + x(1 - σ))  ⇒  g' = σ(1-σ)(2 + x(1 - 2σ))
    return s * (1 - s) * (2 + x * (1 - 2 * s))


def _dg_mish(x):
    s = torch.sigmoid(x)  # g = t + xσ(1-t²), t = tanh(softplus x)  ⇒  g' = σ(1-t²)(2 + x(1 - σ - 2tσ))
    t = torch.tanh(torch.nn.functional.softplus(x))
    return s * (1 - t * t) * (2 + x * (1 - s - 2 * t * s))


def _check_approximate(approximate: str, name: str = "gelu") -> None:
    """The fake kernel's copy of the C++ check (gelu_is_tanh)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"torch_vjp.{name}: approximate must be 'none' or 'tanh', got '{approximate}'")


def _no_check(*params) -> None:
    pass


# name -> (saved tensor, g'(s, *params), check of the non-tensor params for fake kernels, autocast policy);
# g' is d/ds of the VJP's f' written in s. The policies are torch's for the counterpart (ATen/autocast_mode.h:
# exp and softplus are on the CUDA "fp32" list; the others on no list; torch's CPU lists hold none of them).
_FAMILY = {
    "exp": ("output", lambda y: torch.ones_like(y), _no_check, {"cuda": "fp32"}),  # g = y
    "sigmoid": ("output", lambda y: 1 - 2 * y, _no_check, {}),  # g = y(1-y)
    "tanh": ("output", lambda y: -2 * y, _no_check, {}),  # g = 1 - y²
    "softplus": ("input", _dg_softplus, _no_check, {"cuda": "fp32"}),
    "gelu": ("input", _dg_gelu, _check_approximate, {}),
    "silu": ("input", _dg_silu, _no_check, {}),
    "mish": ("input", _dg_mish, _no_check, {}),
}

def gelu_form(x, approximate):
    """GELU in torch ops, with the formulas of csrc/math/elementwise.h: x Φ(x) with Φ(x) = erfc(-x/√2)/2, and the
    tanh form's (1 + tanh u)/2 as σ(2u) = 1/(1 + e) for u > 0, e/(1 + e) otherwise, e = exp(-2|u|). Neither
    cancels: 1 + erf and 1 + tanh do for negative x, and σ's autograd σ(1 - σ) does for large u (the forms AOT
    autograd gives F.gelu and its backward: up to 7x torch's own error in float32). In the compute type,
    rounded once."""
    xc = x.to(compute_type(x.dtype))
    if approximate == "tanh":
        u = _SQRT_2_OVER_PI * (xc + _KAPPA * xc * xc * xc)
        positive = u > 0
        e = torch.exp(torch.where(positive, -2 * u, 2 * u))  # not abs: its derivative at u = 0 would be 0
        r = 1 / (1 + e)
        y = xc * torch.where(positive, r, e * r)
    else:
        y = xc * (0.5 * torch.special.erfc(xc * -math.sqrt(0.5)))
    return y.to(x.dtype)


# The torch-ops form of each (torch.compile, where compile_policy.py picks it): torch's own op, which computes
# a half-type input in float32 and rounds once, as the kernels do; GELU as the kernels compute it.
TORCH_FORMS = {
    "exp": torch.exp, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "silu": F.silu, "mish": F.mish,
    "softplus": F.softplus, "gelu": gelu_form,
}


def _make(name, saved, dg, check_params, autocast):
    # torch promotes integer input to float for exp, sigmoid and tanh; its activation kernels refuse it.
    integers = "promote" if name in ("exp", "sigmoid", "tanh") else "error"
    op = None

    def jvp(tangents, saved_tensors, params):
        return op.backward(tangents[0], *saved_tensors, *params)

    def vjp_grads(g, grad_output, saved_tensors, params):
        (s,) = saved_tensors
        return op.backward(g, s, *params), g * grad_output * dg(s, *params)

    def backward_jvp(t_grad_output, t_saved, grad_output, saved_tensors, params):
        # b(dy, s) = dy ⊙ g(s)  ⇒  ḃ = ṫ_dy ⊙ g(s) + dy ⊙ g'(s) ⊙ ṫ_s: the same two terms as vjp_grads,
        # as each block of the VJP op's Jacobian is diagonal.
        (s,), (t_s,) = saved_tensors, t_saved
        out = op.backward(t_grad_output, s, *params) if t_grad_output is not None else torch.zeros_like(s)
        return out if t_s is None else out + grad_output * dg(s, *params) * t_s

    op = VJPOp(name, saves=(saved,), jvp=jvp, vjp_grads=vjp_grads, backward_jvp=backward_jvp, elementwise=True,
               autocast=autocast, integers=integers, decomposition=TORCH_FORMS[name])

    @register_fake(name)
    def _(input, *params):
        check_floating(input, name, "input")
        check_params(*params)
        return torch.empty_like(input, memory_format=torch.contiguous_format)

    @register_fake(name + "_backward")
    def _(grad_output, s, *params):
        check_floating(s, name + "_backward", saved)
        check_params(*params)
        check_same(grad_output, "grad_output", s, saved, name + "_backward")
        return torch.empty_like(s, memory_format=torch.contiguous_format)

    return op


OPS = {name: _make(name, *row) for name, row in _FAMILY.items()}
