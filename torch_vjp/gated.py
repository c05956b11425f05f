"""Gated family: y = f(a) ⊙ b, with a the gate and b the up projection of one shape; swiglu: f = silu, geglu:
f = gelu (exact or tanh). The kernels' math is csrc/math/gated.h, on the activations' own derivative math
(csrc/math/elementwise.h): nothing is written twice.

The Jacobian is two diagonal blocks, ∂y/∂a = diag(b ⊙ f'(a)) and ∂y/∂b = diag(f(a)), so
  * the VJP op is b(dy, a, b) = (dy ⊙ b ⊙ f'(a), dy ⊙ f(a)), one pass (the forward saves only a and b);
  * forward mode is J·t = t_a ⊙ b ⊙ f'(a) + t_b ⊙ f(a): the first output of the VJP op at dy = t_a plus the
    second at dy = t_b (each block is diagonal, hence symmetric);
  * the VJP op's own derivatives (second order, both modes) are those of the VJP of f(a) ⊙ b written in torch
    ops (F.silu, F.gelu), taken by torch.func: exact, off the first-order path.
No autocast policy: torch runs silu, gelu and mul in their input's dtype under autocast (they are on none of
its lists).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._ops import VJPOp, check_floating, check_same, compute_type, register_fake
from .elementwise import _check_approximate, gelu_form


def _activation(name):
    if name == "swiglu":
        return lambda a: F.silu(a)
    return gelu_form


def _make(name: str) -> VJPOp:
    f = _activation(name)
    op = None

    def jvp(tangents, saved, params):
        (t_a, t_b), (a, b) = tangents, saved
        t = None if t_a is None else op.backward(t_a, a, b, *params)[0]
        if t_b is not None:
            term = op.backward(t_b, a, b, *params)[1]
            t = term if t is None else t + term
        return t

    def vjp_ref(grad_output, a, b, *params):
        ct = compute_type(a.dtype)
        _, pull = torch.func.vjp(lambda a_, b_: f(a_, *params) * b_, a.to(ct), b.to(ct))
        da, db = pull(grad_output.to(ct))
        return da.to(a.dtype), db.to(b.dtype)

    def decomposition(gate, up, *params):  # in the compute type, rounded once, as the kernel
        ct = compute_type(gate.dtype)
        return (f(gate.to(ct), *params) * up.to(ct)).to(gate.dtype)

    op = VJPOp(name, saves=lambda args, outputs: args[:2], jvp=jvp, vjp_ref=vjp_ref, decomposition=decomposition)

    @register_fake(name)
    def _(gate, up, *params):
        check_floating(gate, name, "gate")
        check_same(up, "up", gate, "gate", name)
        if params:
            _check_approximate(*params, name=name)
        return torch.empty_like(gate, memory_format=torch.contiguous_format)

    @register_fake(name + "_backward")
    def _(grad_output, gate, up, *params):
        backward = name + "_backward"
        check_floating(gate, backward, "gate")
        check_same(up, "up", gate, "gate", backward)
        check_same(grad_output, "grad_output", gate, "gate", backward)
        if params:
            _check_approximate(*params, name=backward)
        return (torch.empty_like(gate, memory_format=torch.contiguous_format),
                torch.empty_like(gate, memory_format=torch.contiguous_format))

    return op


OPS = {name: _make(name) for name in ("swiglu", "geglu")}
