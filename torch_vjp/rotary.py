"""Rotary position embedding (rope): transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim), rotate-half
convention, for q and k in one call, with partial rotary dims (the first R = cos.shape[-1] elements of each row
rotate, the rest pass through). The kernels' math is csrc/math/rope.h.

Per pair (x₁, x₂) = (x[i], x[i+h]), h = R/2, the op is the 2×2 map M = [[c₁, -s₁], [s₂, c₂]] (c, s: cos, sin at
i and i+h), linear in q and k, so
  * the VJP op applies Mᵀ to dq and dk (dx = dy ⊙ cos - rotate_half(dy ⊙ sin), the inverse rotation when cos
    and sin are duplicated over the halves), reading no saved activation; the gradients of cos and sin, sums
    over the dims they broadcast over, are computed only when asked (the forward then saves q and k too);
  * forward mode: M·t by the forward op on the tangents of q and k, plus q ⊙ ṫ_cos + rotate_half(q) ⊙ ṫ_sin
    (torch ops) where cos and sin carry tangents;
  * second order: the VJP op written in torch ops (`_backward_ref`), differentiated by torch.func.
No autocast policy: torch's formula is mul, cat and add, on none of autocast's lists.
"""
from __future__ import annotations

import torch

from ._ops import VJPOp, check_floating, check_same, compute_type, register_fake, transforms_active, wrap_dim

NAME = "rope"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-x₂, x₁) over the last dim, transformers' rotate_half."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _split(x, rotary):
    """(x's first `rotary` elements, the rest) along the last dim, or (x, None) when it is all rotary (a slice of
    the whole dim is an alias, which torch's legacy vmap cannot batch)."""
    if rotary == x.shape[-1]:
        return x, None
    return x[..., :rotary], x[..., rotary:]


def _join(rotated, rest):
    return rotated if rest is None else torch.cat((rotated, rest), dim=-1)


def reference(q, k, cos, sin, unsqueeze_dim=1):
    """The op in torch ops: transformers' apply_rotary_pos_emb, with the partial rotary dims of its partial-rotary
    models (rotate the first cos.shape[-1] elements, pass the rest)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rotary = cos.shape[-1]

    def one(x):
        x_rot, x_pass = _split(x, rotary)
        return _join((x_rot * cos) + (rotate_half(x_rot) * sin), x_pass)

    return one(q), one(k)


def _table_tangent(x, t_cos, t_sin, unsqueeze_dim):
    """∂y/∂(cos, sin)·(ṫ_cos, ṫ_sin) = x ⊙ ṫ_cos + rotate_half(x) ⊙ ṫ_sin on the rotary elements, 0 elsewhere."""
    rotary = (t_cos if t_cos is not None else t_sin).shape[-1]
    x_rot, x_pass = _split(x, rotary)
    term = 0
    if t_cos is not None:
        term = term + x_rot * t_cos.unsqueeze(unsqueeze_dim)
    if t_sin is not None:
        term = term + rotate_half(x_rot) * t_sin.unsqueeze(unsqueeze_dim)
    term = term.expand(x_rot.shape)
    return _join(term, None if x_pass is None else torch.zeros_like(x_pass))


def _backward_ref(grad_q, grad_k, cos, sin, q, k, unsqueeze_dim):
    """The VJP op in torch ops (second order, and torch's legacy vmap): Mᵀ on each gradient; with q and k, the
    gradients of cos and sin."""
    c, s = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rotary = cos.shape[-1]

    def transposed(g):
        if g is None:
            return None
        g_rot, g_pass = _split(g, rotary)
        return _join(g_rot * c - rotate_half(g_rot * s), g_pass)

    dq, dk = transposed(grad_q), transposed(grad_k)
    if q is None:
        return dq, dk, None, None
    dcos = dsin = None
    for g, x in ((grad_q, q), (grad_k, k)):
        if g is None:
            continue
        g_rot, x_rot = _split(g, rotary)[0], _split(x, rotary)[0]
        shape = c.shape
        gc = (g_rot * x_rot).sum_to_size(shape).squeeze(unsqueeze_dim)
        gs = (g_rot * rotate_half(x_rot)).sum_to_size(shape).squeeze(unsqueeze_dim)
        dcos = gc if dcos is None else dcos + gc
        dsin = gs if dsin is None else dsin + gs
    return dq, dk, dcos, dsin


def _saves(args, outputs):
    """cos and sin; q and k only when cos or sin may be differentiated (requires grad, or a torch.func transform or
    forward-AD level is active: their gradient or tangent then needs them)."""
    q, k, cos, sin, _ = args
    tables = cos.requires_grad or sin.requires_grad or transforms_active()
    return (cos, sin, q, k) if tables else (cos, sin, None, None)


def _vjp_args(grad_output, saved, params, needs):
    grad_q, grad_k = grad_output
    cos, sin, q, k = saved
    # q and k are saved exactly when autograd can ask for the tables' gradients (_saves): cos or sin required
    # grad in the forward, or a transform is active. Without them (a direct call of vjp_call_args) none is asked.
    tables = (needs[2] or needs[3]) and q is not None
    return (grad_q, grad_k, cos, sin, q if tables else None, k if tables else None, *params)


def _jvp(tangents, saved, params):
    t_q, t_k, t_cos, t_sin = tangents
    cos, sin, q, k = saved
    (unsqueeze_dim,) = params
    zero = torch.zeros_like
    outs = OP(zero(q) if t_q is None else t_q, zero(k) if t_k is None else t_k, cos, sin, unsqueeze_dim) \
        if t_q is not None or t_k is not None else (None, None)
    outs = list(outs)
    if t_cos is not None or t_sin is not None:
        for i, x in enumerate((q, k)):
            term = _table_tangent(x, t_cos, t_sin, unsqueeze_dim)
            outs[i] = term if outs[i] is None else outs[i] + term
    return tuple(outs)


def _batched(t, bdim, size):
    return t.movedim(bdim, 0) if bdim is not None else t.expand(size, *t.shape)


def _padded(t, rank):
    """t (batch first) with singleton dims after the batch dim up to a per-sample rank: broadcasting right-aligns
    the per-sample dims, so this changes no value."""
    return t.reshape(t.shape[0], *([1] * (rank - (t.dim() - 1))), *t.shape[1:])


def _vmap_rule(is_vjp):
    """The batch dim of every tensor to the front, then one call. Per sample, cos.unsqueeze(u) broadcasts to q and
    k right-aligned, so the per-sample ranks are first made equal (singleton dims after the batch dim) and u is
    moved past the batch dim and the padding."""

    def rule(call, info, in_dims, *args):
        size = info.batch_size
        *tensors, unsqueeze_dim = args
        if is_vjp:
            grad_q, grad_k, cos, sin, q, k = tensors
            rows = (grad_q, grad_k, q, k)
            row_dims = (in_dims[0], in_dims[1], in_dims[4], in_dims[5])
            table_dims = in_dims[2:4]
        else:
            q, k, cos, sin = tensors
            rows, row_dims, table_dims = (q, k), in_dims[:2], in_dims[2:4]
        tables = [_batched(t, d, size) for t, d in zip((cos, sin), table_dims)]
        sample_rank = tables[0].dim() - 1
        u = wrap_dim(unsqueeze_dim, sample_rank + 1, "rope_backward" if is_vjp else "rope")
        rows = [None if t is None else _batched(t, d, size) for t, d in zip(rows, row_dims)]
        rank = max([sample_rank + 1] + [t.dim() - 1 for t in rows if t is not None])
        shapes = [None if t is None else t.shape for t in rows]
        rows = [None if t is None else _padded(t, rank) for t in rows]
        pad = rank - (sample_rank + 1)
        tables = [_padded(t, rank - 1) for t in tables]
        u = 1 + pad + u
        if is_vjp:
            outs = call(rows[0], rows[1], *tables, rows[2], rows[3], u)
            table_shape = (size, *tables[0].shape[1 + pad:])
            like = (shapes[0], shapes[1], table_shape, table_shape)
        else:
            outs = call(rows[0], rows[1], *tables, u)
            like = tuple(shapes)
        outs = tuple(None if o is None else o.reshape(s) for o, s in zip(outs, like))
        return outs, tuple(None if o is None else 0 for o in outs)

    return rule


def _decomposition(q, k, cos, sin, unsqueeze_dim):
    """The op in torch ops for torch.compile's policy (VJPOp.decomposition), with the kernels' precision rule:
    each output in the dtype q (k) and cos promote to, computed in its compute type and rounded once."""
    q_dtype, k_dtype = torch.promote_types(q.dtype, cos.dtype), torch.promote_types(k.dtype, cos.dtype)
    ct = compute_type(torch.promote_types(q_dtype, k_dtype))
    q_embed, k_embed = reference(q.to(ct), k.to(ct), cos.to(ct), sin.to(ct), unsqueeze_dim)
    return q_embed.to(q_dtype), k_embed.to(k_dtype)


OP = VJPOp(NAME, saves=_saves, jvp=_jvp, vjp_ref=_backward_ref, vjp_args=_vjp_args, public_outputs=2,
           vmap=_vmap_rule(False), backward_vmap=_vmap_rule(True), decomposition=_decomposition)


def _like_kernel(x):
    """The kernels' output layout for rows x: x's strides when its last stride is 1 (empty_like keeps a dense
    layout), else contiguous (csrc/ops/rope.h, rope_apply)."""
    if x.dim() > 0 and x.stride(-1) != 1:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    out = torch.empty_like(x)
    return out if out.dim() == 0 or out.stride(-1) == 1 else torch.empty_like(x, memory_format=torch.contiguous_format)


def _check(x, x_name, cos, sin, unsqueeze_dim, op):
    """Mirrors csrc/ops/rope.h for fake tensors."""
    check_floating(x, op, x_name)
    check_floating(cos, op, "cos")
    check_same(cos, "cos", x, x_name, op, shape=False)
    check_same(sin, "sin", x, x_name, op, shape=False)
    if cos.shape != sin.shape:
        raise RuntimeError(f"torch_vjp.{op}: expected cos and sin of one shape, got {list(cos.shape)} and {list(sin.shape)}")
    if cos.dim() == 0 or x.dim() == 0:
        raise RuntimeError(f"torch_vjp.{op}: expected {x_name}, cos and sin with a last dim, got 0-d tensors")
    if cos.shape[-1] % 2 != 0 or cos.shape[-1] > x.shape[-1]:
        raise RuntimeError(f"torch_vjp.{op}: bad rotary dim {cos.shape[-1]} for {x_name} of shape {list(x.shape)}")
    u = wrap_dim(unsqueeze_dim, cos.dim() + 1, op)
    if u == cos.dim():
        raise RuntimeError(f"torch_vjp.{op}: unsqueeze_dim {unsqueeze_dim} would make the last dim of cos and sin 1")
    torch.broadcast_shapes(cos.unsqueeze(u).shape[:-1], x.shape[:-1])


@register_fake(NAME)
def _(q, k, cos, sin, unsqueeze_dim):
    _check(q, "q", cos, sin, unsqueeze_dim, NAME)
    _check(k, "k", cos, sin, unsqueeze_dim, NAME)
    return _like_kernel(q), _like_kernel(k)


@register_fake(NAME + "_backward")
def _(grad_q, grad_k, cos, sin, q, k, unsqueeze_dim):
    backward = NAME + "_backward"
    for g, name in ((grad_q, "grad_q"), (grad_k, "grad_k")):
        if g is not None:
            _check(g, name, cos, sin, unsqueeze_dim, backward)
    contiguous = torch.contiguous_format  # the VJP's gradients (csrc/ops/rope.h)
    dq = None if grad_q is None else torch.empty_like(grad_q, memory_format=contiguous)
    dk = None if grad_k is None else torch.empty_like(grad_k, memory_format=contiguous)
    if q is None or (grad_q is None and grad_k is None):
        return dq, dk, None, None
    return dq, dk, torch.empty_like(cos, memory_format=torch.contiguous_format), \
        torch.empty_like(sin, memory_format=torch.contiguous_format)


OPS = {NAME: OP}
