"""Losses: cross_entropy over class-index targets, and fused_linear_cross_entropy = cross_entropy(x Wᵀ + b)
without the (N, V) logits ever held; the kernels' math is csrc/math/cross_entropy.h.

cross_entropy, per row i with target t, C classes, label smoothing ε, p = softmax(x_i), s_i the row's scale
(dy_i for 'none', dy for 'sum', dy / count for 'mean', 0 for an ignored row):
  loss_i = lse_i - (1 - ε) x_it - (ε/C) Σ_j x_ij       the Jacobian of a row's loss is one row:
  dx_i = s_i (p - ε/C - (1 - ε) onehot(t))             the VJP op, one pass from x and the saved statistics
  J·t  = Σ_j dx_ij t_ij at s = 1                        forward mode: the VJP kernel's row, dotted with t
With class weights w (`weight=`, torch's semantics; not differentiable, as torch's), W = Σ_j w_j:
  loss_i = (1 - ε) w_t (lse_i - x_it) + (ε/C) Σ_j w_j (lse_i - x_ij)
  dx_i = s_i (a_i p - (ε/C) w - (1 - ε) w_t onehot(t)),   a_i = (1 - ε) w_t + (ε/C) W
and 'mean' divides by Σ_i w_{t_i} over the rows not ignored (torch's), in the loss and in s_i.
The forward also returns per row (compute type) m = max_j x_ij and log_sum = log Σ_j exp(x_ij - m), so that
p = exp((x - m) - log_sum) as torch's exp(log_softmax(x)) (exp(x - lse) with a rounded lse loses |lse|·ε).
Both are differentiable outputs: ∂m/∂x is torch's amax gradient (ties share it), ∂log_sum/∂x = p - ∂m/∂x.

fused_linear_cross_entropy: logits = x Wᵀ + b chunk by chunk (the matrix products through at::addmm: the CPU
BLAS or cuBLAS), each chunk's loss and dlogits at once, grad_x = dlogits W, grad_W = dlogitsᵀ x, grad_b =
Σ dlogits. With compute_grad the forward also returns the gradients for grad_output = 1 (caches, not
differentiable): where the gradient is not differentiated further (plain backward; not under create_graph
or torch.func), the backward only scales them, so forward + backward is three matrix products. Elsewhere the
VJP op recomputes the logits chunk by chunk. Forward mode: for 'mean' and 'sum', J·t = ⟨∂loss/∂x, t_x⟩ +
⟨∂loss/∂W, t_W⟩ + ⟨∂loss/∂b, t_b⟩ from the VJP op; for 'none' (a tangent per row) the logits and their tangent
are formed whole, and cross_entropy's forward mode is applied to them.

Options (both ops; math/cross_entropy.h): softcap c > 0, the loss of z = c·tanh(x/c) (Gemma 2), with m and
log_sum then z's and dx = dz (1 - (z/c)²); lse_square_scale λ > 0, PaLM's z-loss λ·lse² added to every counted
row's loss, dz += 2 λ lse s p. The CPU kernels apply them in their row passes; on CUDA the frontend applies them
around the row kernels, on logits in the compute type.

The VJP ops' own derivatives (second order, both modes) are those of the VJP written in torch ops below,
taken by torch.func: exact, off the first-order path (the fused one forms the logits whole).

Under vmap each sample's rows are flattened into one call with reduction='none', then reduced per sample in
torch ops (the kernels' 'mean' and 'sum' would reduce across samples); the fused VJP under vmap forms each
sample's logits (a per-sample weight gradient needs each sample's dlogits).

Autocast: torch's CUDA and CPU lists run cross_entropy in float32 (CUDA: its log_softmax and nll_loss;
CPU: cross_entropy_loss): "fp32". fused_linear_cross_entropy is torch's linear ("lower_precision_fp": the
matrix products in the autocast dtype) followed by that cross_entropy, so its loss comes back in float32: the
registered op returns the loss in the compute type, which the public function rounds to the input's dtype
only outside autocast (torch's value both ways: the float32 loss of the low-precision logits, unrounded).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._ops import VJPOp, check_floating, check_same, compute_type, register_fake
from .softmax import SOFTMAX

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: str) -> None:
    """parse_reduction's check (csrc/ops/cross_entropy.h), with torch's ValueError."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")


def _moved(t, bdim, batch_size):
    return t.movedim(bdim, 0) if bdim is not None else t.expand(batch_size, *t.shape)


def _row_weights(target, weight, ignore_index, dtype):
    """Each row's weight in 'mean': w_{t_i} with class weights, else 1; 0 for an ignored row (compute type)."""
    counted = target != ignore_index
    if weight is None:
        return counted.to(dtype)
    picked = weight.to(dtype)[torch.where(counted, target, 0).long().clamp(0, max(weight.shape[0] - 1, 0))]
    return torch.where(counted, picked, 0)


def _reduce_per_sample(losses, target, ignore_index, reduction, weight=None):
    """Per-row losses (batch, *rows) reduced over each sample's rows, as the kernel reduces one sample's."""
    if reduction == "none":
        return losses
    dims = tuple(range(1, losses.dim()))
    total = losses.to(torch.float64)  # as the kernels' reduce_loss: summed in double, rounded once
    total = total.sum(dims) if dims else total
    if reduction == "mean":
        counted = _row_weights(target, weight, ignore_index, torch.float64)
        divisor = counted.sum(dims) if dims else counted
        total = total / divisor
        if weight is not None:  # reduce_loss's rule: NaN where Σ w_t = 0, as torch's
            total = torch.where(divisor == 0, torch.nan, total)
    return total.to(losses.dtype)


def _row_scale_per_sample(grad_output, target, ignore_index, reduction, dtype, weight=None):
    """The VJP's per-row scale under vmap: grad_output (per sample, or per row for 'none') spread over each
    sample's rows, divided by the sample's count (Σ w_{t_i} with class weights) for 'mean' (the kernel zeroes
    ignored rows, and applies the class weights itself)."""
    g = grad_output.to(compute_type(dtype))
    if reduction == "none":
        return g
    g = g.reshape(g.shape[0], *([1] * (target.dim() - 1))).expand(target.shape)
    if reduction == "mean":
        dims = tuple(range(1, target.dim()))
        counted = _row_weights(target, weight, ignore_index, g.dtype)
        count = counted.sum(dims, keepdim=True) if dims else counted
        g = g / count
    return g



# ---------------------------------------------------------------------------------------------------------
# cross_entropy(input, target, weight?, ignore_index, reduction, label_smoothing) -> (loss, row_max, log_sum)

def _softmax_from_stats(input, row_max, log_sum):
    """p = exp((x - m) - log_sum) in the statistics' dtype, as the kernels form it (math/cross_entropy.h)."""
    ct = log_sum.dtype
    return torch.exp((input.to(ct) - row_max.unsqueeze(-1)) - log_sum.unsqueeze(-1))


def _option_logits(input, softcap):
    """z = c·tanh(x/c) in the compute type (c = 0: x), as the frontend's option_logits forms it."""
    z = input.to(compute_type(input.dtype))
    return torch.tanh(z / softcap) * softcap if softcap > 0 else z


def _softcap_chain(dz, z, softcap):
    """dx from dz through z = c·tanh(x/c): dz (1 - (z/c)²)."""
    if not softcap > 0:
        return dz
    u = z / softcap
    return dz * (1 - u * u)


def _max_weights(z):
    """∂m/∂z for m = max_j z_j: torch's amax gradient, shared evenly between the elements equal to the max. The
    max is z's own, not the kernels' m: with a softcap the kernels' tanh may round z an ulp apart from torch's."""
    if z.shape[-1] == 0:
        return z
    at_max = (z == z.amax(-1, keepdim=True)).to(z.dtype)
    return at_max / at_max.sum(-1, keepdim=True)


def _ce_backward_ref(grad_output, input, target, weight, row_max, log_sum, ignore_index, reduction, label_smoothing,
                     softcap=0.0, lse_square_scale=0.0):
    """cross_entropy's VJP in torch ops, as the kernel computes it: s (p - ε/C - (1 - ε) onehot(t)); with class
    weights s (a p - (ε/C) w - (1 - ε) w_t onehot(t)), a = (1 - ε) w_t + (ε/C) Σ w (math/cross_entropy.h); the
    options over z: + 2 λ lse s p, then the softcap's chain rule."""
    ct = log_sum.dtype
    x_dtype = input.dtype
    if softcap > 0 or lse_square_scale > 0:
        input = _option_logits(input, softcap)
    classes = input.shape[-1]
    counted = target != ignore_index
    g = grad_output.to(ct)
    if reduction == "mean":
        g = g / _row_weights(target, weight, ignore_index, ct).sum()
    scale = torch.where(counted, g, 0)
    onehot = F.one_hot(torch.where(counted, target, 0).long(), classes).to(ct)
    p = _softmax_from_stats(input, row_max, log_sum)
    if weight is None:
        dx = scale.unsqueeze(-1) * (p - label_smoothing / classes - (1 - label_smoothing) * onehot)
    else:
        w = weight.to(ct)
        w_t = _row_weights(target, weight, ignore_index, ct)
        a = (1 - label_smoothing) * w_t + label_smoothing / classes * w.sum()
        dx = scale.unsqueeze(-1) * (a.unsqueeze(-1) * p - label_smoothing / classes * w
                                    - ((1 - label_smoothing) * w_t).unsqueeze(-1) * onehot)
    if lse_square_scale > 0:
        dx = dx + (2 * lse_square_scale * (row_max + log_sum) * scale).unsqueeze(-1) * p
    return _softcap_chain(dx, input, softcap).to(x_dtype)


def _ce_tangent(G, t, target, ignore_index, reduction, ct, weight=None):
    """The loss tangent from G, the VJP kernel's rows at scale 1 ('none') or for the sum: per row for 'none',
    else summed (and divided by the count, Σ w_{t_i} with class weights, for 'mean': NaN where every target is
    ignored, as torch's)."""
    dot = G.to(ct) * t.to(ct)
    if reduction == "none":
        return dot.sum(-1)
    total = dot.sum()
    return total / _row_weights(target, weight, ignore_index, ct).sum() if reduction == "mean" else total


def _ce_jvp(tangents, saved, params):
    (t_x, *_), (x, target, weight, row_max, log_sum) = tangents, saved
    ignore_index, reduction, label_smoothing, softcap, lse_square_scale = params
    if t_x is None:
        return None, None, None
    ct = log_sum.dtype
    per_row = reduction == "none"
    ones = torch.ones(target.shape if per_row else (), dtype=x.dtype, device=x.device)
    G = CROSS_ENTROPY.backward(ones, x, target, weight, row_max, log_sum, ignore_index, "none" if per_row else "sum",
                               label_smoothing, softcap, lse_square_scale)
    t_loss = _ce_tangent(G, t_x, target, ignore_index, reduction, ct, weight).to(x.dtype)
    z = _option_logits(x, softcap)  # the statistics are z's: their tangents from t_z = t (1 - (z/c)²)
    t = _softcap_chain(t_x.to(ct), z, softcap)
    t_max = (_max_weights(z) * t).sum(-1)
    t_log_sum = (_softmax_from_stats(z, row_max, log_sum) * t).sum(-1) - t_max
    return t_loss, t_max, t_log_sum


def _ce_extras_vjp(grads, saved, params):
    """The statistics' gradients: g_m ∂m/∂z + g_log_sum (p - ∂m/∂z), through z's softcap."""
    (g_max, g_log_sum), (x, target, weight, row_max, log_sum) = grads, saved
    softcap = params[3]
    ct = log_sum.dtype
    z = _option_logits(x, softcap)
    dx = 0
    if g_log_sum is not None:
        dx = g_log_sum.to(ct).unsqueeze(-1) * _softmax_from_stats(z, row_max, log_sum)
    g_at_max = (0 if g_max is None else g_max.to(ct)) - (0 if g_log_sum is None else g_log_sum.to(ct))
    dx = dx + torch.as_tensor(g_at_max, dtype=ct, device=x.device).unsqueeze(-1) * _max_weights(z)
    return _softcap_chain(dx, z, softcap).to(x.dtype), None, None


def _per_sample(call, info, in_dims, args):
    """A vmap rule's fallback for class weights batched too (a weight vector per sample, which the kernels'
    one (C,) vector cannot hold): one call per sample, the outputs stacked along 0."""
    outs = []
    for b in range(info.batch_size):
        outs.append(call(*[a.select(d, b) if isinstance(a, torch.Tensor) and d is not None else a
                           for a, d in zip(args, tuple(in_dims) + (None,) * (len(args) - len(in_dims)))]))
    if isinstance(outs[0], tuple):
        stacked = tuple(None if o is None else torch.stack([s[k] for s in outs]) for k, o in enumerate(outs[0]))
        return stacked, tuple(None if o is None else 0 for o in stacked)
    return torch.stack(outs), 0


def _ce_vmap(call, info, in_dims, input, target, weight, ignore_index, reduction, label_smoothing, softcap=0.0,
             lse_square_scale=0.0):
    check_reduction(reduction)
    if weight is not None and in_dims[2] is not None:
        return _per_sample(call, info, in_dims, (input, target, weight, ignore_index, reduction, label_smoothing,
                                                 softcap, lse_square_scale))
    input, target = _moved(input, in_dims[0], info.batch_size), _moved(target, in_dims[1], info.batch_size)
    loss, row_max, log_sum = call(input.reshape(-1, input.shape[-1]), target.reshape(-1), weight, ignore_index,
                                  "none", label_smoothing, softcap, lse_square_scale)
    loss, row_max, log_sum = (t.reshape(target.shape) for t in (loss, row_max, log_sum))
    return (_reduce_per_sample(loss, target, ignore_index, reduction, weight), row_max, log_sum), (0, 0, 0)


def _ce_backward_vmap(call, info, in_dims, grad_output, input, target, weight, row_max, log_sum, ignore_index,
                      reduction, label_smoothing, softcap=0.0, lse_square_scale=0.0):
    check_reduction(reduction)
    size = info.batch_size
    if weight is not None and in_dims[3] is not None:
        return _per_sample(call, info, in_dims, (grad_output, input, target, weight, row_max, log_sum, ignore_index,
                                                 reduction, label_smoothing, softcap, lse_square_scale))
    grad_output, input, target, row_max, log_sum = (
        _moved(t, d, size) for t, d in zip((grad_output, input, target, row_max, log_sum),
                                           (*in_dims[:3], *in_dims[4:])))
    g = _row_scale_per_sample(grad_output, target, ignore_index, reduction, input.dtype, weight)
    dx = call(g.reshape(-1), input.reshape(-1, input.shape[-1]), target.reshape(-1), weight, row_max.reshape(-1),
              log_sum.reshape(-1), ignore_index, "none", label_smoothing, softcap, lse_square_scale)
    return dx.reshape(input.shape), 0


def _ce_decomposition(input, target, weight, ignore_index, reduction, label_smoothing, softcap=0.0,
                      lse_square_scale=0.0):
    """The public op in torch ops; with an option, over z in the compute type, rounded once, as the kernels."""
    if not (softcap > 0 or lse_square_scale > 0):
        return F.cross_entropy(input, target.long(), weight=weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    z = _option_logits(input, softcap)
    loss = F.cross_entropy(z, target.long(), weight=None if weight is None else weight.to(z.dtype),
                           ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    if lse_square_scale > 0:
        loss = loss + z_loss_of(torch.logsumexp(z, -1), target, ignore_index, reduction, lse_square_scale)
    return loss.to(input.dtype)


def z_loss_of(lse, target, ignore_index, reduction, lse_square_scale):
    """λ lse² per counted row (0 where ignored), reduced as the loss ('mean': over the counted rows)."""
    counted = target != ignore_index
    z = torch.where(counted, lse_square_scale * lse * lse, 0)
    if reduction == "none":
        return z
    return z.sum() / counted.sum() if reduction == "mean" else z.sum()


CROSS_ENTROPY = VJPOp(
    "cross_entropy", saves=lambda args, outputs: (*args[:3], outputs[1], outputs[2]), jvp=_ce_jvp,
    vjp_ref=_ce_backward_ref, nondifferentiable=("target", "weight"), extras_vjp=_ce_extras_vjp, vmap=_ce_vmap,
    backward_vmap=_ce_backward_vmap, autocast={"cuda": "fp32", "cpu": "fp32"}, decomposition=_ce_decomposition,
)


# ---------------------------------------------------------------------------------------------------------
# fused_linear_cross_entropy(input, weight, target, bias?, class_weight?, ignore_index, reduction, label_smoothing,
#                            compute_grad) -> (loss, grad_input?, grad_weight?, grad_bias?)

def _cross_entropy_for(call):
    """cross_entropy's forward and VJP op for a vmap rule calling `call`: the registered ops under the
    registered op's rule (no Function may run there), the differentiable paths under a Function's."""
    if isinstance(call, torch._ops.OpOverloadPacket):
        return torch.ops.torch_vjp.cross_entropy, torch.ops.torch_vjp.cross_entropy_backward
    return CROSS_ENTROPY.forward, CROSS_ENTROPY.backward


def _logits(input, weight, bias, batched_weight=False):
    logits = torch.matmul(input, weight.transpose(-1, -2) if batched_weight else weight.t())
    return logits if bias is None else logits + (bias.unsqueeze(-2) if batched_weight else bias)


def _fused_backward_ref(grad_output, input, weight, target, bias, class_weight, ignore_index, reduction,
                        label_smoothing, softcap=0.0, lse_square_scale=0.0):
    """The fused VJP in torch ops, the logits formed whole: dlogits by _ce_backward_ref, then the products."""
    ct = compute_type(input.dtype)
    logits = _logits(input.to(ct), weight.to(ct), None if bias is None else bias.to(ct))
    z = _option_logits(logits, softcap)
    row_max = z.amax(-1)
    log_sum = torch.logsumexp(z - row_max.unsqueeze(-1), -1)
    dlogits = _ce_backward_ref(grad_output, logits, target, None if class_weight is None else class_weight.to(ct),
                               row_max, log_sum, ignore_index, reduction, label_smoothing, softcap, lse_square_scale)
    grad_bias = None if bias is None else dlogits.sum(0).to(bias.dtype)
    return (dlogits @ weight.to(ct)).to(input.dtype), (dlogits.t() @ input.to(ct)).to(weight.dtype), grad_bias


def _fused_option_logits(logits, class_weight, softcap, lse_square_scale):
    """Logits (and class weights) as the fused op's options see them: with an option the op forms z in the compute
    type, so its loss is z's unrounded; without, unchanged."""
    if softcap > 0 or lse_square_scale > 0:
        logits = logits.to(compute_type(logits.dtype))
        class_weight = None if class_weight is None else class_weight.to(logits.dtype)
    return logits, class_weight


def _fused_forward_ref(input, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing,
                       compute_grad, softcap=0.0, lse_square_scale=0.0):
    """The fused forward in torch ops and cross_entropy's kernels, the logits formed whole, the loss in the
    compute type as the op's; no cached gradients (the VJP op then computes them)."""
    logits = _logits(input, weight, bias)
    if class_weight is not None and class_weight.dtype != logits.dtype:  # float32 beside half types: widen those
        logits = logits.to(class_weight.dtype)
    logits, class_weight = _fused_option_logits(logits, class_weight, softcap, lse_square_scale)
    loss = CROSS_ENTROPY(logits, target, class_weight, ignore_index, reduction, label_smoothing, softcap,
                         lse_square_scale)
    return loss.to(compute_type(input.dtype)), None, None, None


def _fused_saves(args, outputs):
    # input, weight, target, bias, class_weight; the cached gradients (None without compute_grad)
    return (*args[:5], *outputs[1:])


def _fused_vjp_args(grad_output, saved, params, needs):
    return (grad_output, *saved[:5], *params[:3], *params[4:6])


def _fused_cached_vjp(grad_output, saved, params):
    """The forward's gradients (for grad_output = 1) scaled by grad_output: only for a reduced loss. With
    reduction='none' they are the gradients of Σ loss_i, which a per-row grad_output cannot scale."""
    grad_input, grad_weight, grad_bias = saved[5:]
    if grad_input is None or params[1] == "none":
        return None
    return (grad_output * grad_input, grad_output * grad_weight, None,
            None if grad_bias is None else grad_output * grad_bias, None)


def _fused_jvp(tangents, saved, params):
    (t_input, t_weight, _, t_bias, _), (input, weight, target, bias, class_weight) = tangents, saved[:5]
    ignore_index, reduction, label_smoothing, _, softcap, lse_square_scale = params
    options = (softcap, lse_square_scale)
    if t_input is None and t_weight is None and t_bias is None:
        return None, None, None, None
    ct = compute_type(input.dtype)
    if reduction != "none":  # J·t = Σ ⟨∂(Σ loss)/∂θ, t_θ⟩, the gradients from the VJP op (chunked)
        ones = torch.ones((), dtype=input.dtype, device=input.device)
        grads = FUSED_LINEAR_CROSS_ENTROPY.backward(ones, input, weight, target, bias, class_weight, ignore_index,
                                                    "sum", label_smoothing, *options)
        total = sum((g.to(ct) * t.to(ct)).sum() for g, t in zip(grads, (t_input, t_weight, t_bias)) if t is not None)
        if reduction == "mean":
            total = total / _row_weights(target, class_weight, ignore_index, ct).sum()
        return total.to(input.dtype), None, None, None
    # A tangent per row: cross_entropy's forward mode on the logits, formed whole.
    logits = _logits(input, weight, bias)
    t_logits = 0
    if t_input is not None:
        t_logits = t_logits + _logits(t_input, weight, None)
    if t_weight is not None:
        t_logits = t_logits + _logits(input, t_weight, None)
    if t_bias is not None:
        t_logits = t_logits + t_bias
    loss, row_max, log_sum = CROSS_ENTROPY.forward(logits, target, class_weight, ignore_index, "none",
                                                   label_smoothing, *options)
    G = CROSS_ENTROPY.backward(torch.ones_like(loss), logits, target, class_weight, row_max, log_sum, ignore_index,
                               "none", label_smoothing, *options)
    return _ce_tangent(G, t_logits, target, ignore_index, "none", ct).to(input.dtype), None, None, None


def _fused_vmap(call, info, in_dims, input, weight, target, bias, class_weight, ignore_index, reduction,
                label_smoothing, compute_grad, softcap=0.0, lse_square_scale=0.0):
    check_reduction(reduction)
    size = info.batch_size
    options = (softcap, lse_square_scale)
    if class_weight is not None and in_dims[4] is not None:
        (loss, *_), _ = _per_sample(call, info, in_dims, (input, weight, target, bias, class_weight, ignore_index,
                                                          reduction, label_smoothing, False, *options))
        return (loss, None, None, None), (0, None, None, None)
    input, target = _moved(input, in_dims[0], size), _moved(target, in_dims[2], size)
    rows = target.shape
    if in_dims[1] is None and in_dims[3] is None:  # one head for every sample: every row in one call
        loss = call(input.reshape(-1, input.shape[-1]), weight, target.reshape(-1), bias, class_weight, ignore_index,
                    "none", label_smoothing, False, *options)[0]
    else:  # a head per sample: its logits, then cross_entropy's kernels
        weight = _moved(weight, in_dims[1], size)
        bias = None if bias is None else _moved(bias, in_dims[3], size)
        logits = _logits(input, weight, bias, batched_weight=True)
        logits, class_weight = _fused_option_logits(logits, class_weight, *options)
        loss = _cross_entropy_for(call)[0](logits.reshape(-1, logits.shape[-1]), target.reshape(-1), class_weight,
                                           ignore_index, "none", label_smoothing, *options)[0]
    return (_reduce_per_sample(loss.reshape(rows), target, ignore_index, reduction, class_weight), None, None, None), \
        (0, None, None, None)


def _fused_backward_vmap(call, info, in_dims, grad_output, input, weight, target, bias, class_weight, ignore_index,
                         reduction, label_smoothing, softcap=0.0, lse_square_scale=0.0):
    """Per-sample gradients of a shared head (each sample's own dlogitsᵀ x): each sample's logits, their
    dlogits by cross_entropy's kernels, then the products."""
    check_reduction(reduction)
    size = info.batch_size
    if class_weight is not None and in_dims[5] is not None:
        return _per_sample(call, info, in_dims, (grad_output, input, weight, target, bias, class_weight, ignore_index,
                                                 reduction, label_smoothing, softcap, lse_square_scale))
    grad_output, input, target = (_moved(t, in_dims[i], size) for i, t in ((0, grad_output), (1, input), (3, target)))
    batched_weight = in_dims[2] is not None or (bias is not None and in_dims[4] is not None)
    if batched_weight:
        weight = _moved(weight, in_dims[2], size)
        bias = None if bias is None else _moved(bias, in_dims[4], size)
    logits = _logits(input, weight, bias, batched_weight=True if batched_weight else False)
    classes = logits.shape[-1]
    flat_logits, flat_target = logits.reshape(-1, classes), target.reshape(-1)
    forward, backward = _cross_entropy_for(call)
    options = (softcap, lse_square_scale)
    _, row_max, log_sum = forward(flat_logits, flat_target, class_weight, ignore_index, "none", label_smoothing,
                                  *options)
    g = _row_scale_per_sample(grad_output, target, ignore_index, reduction, input.dtype, class_weight)
    dlogits = backward(g.reshape(-1), flat_logits, flat_target, class_weight, row_max, log_sum, ignore_index, "none",
                       label_smoothing, *options).reshape(logits.shape)
    grad_input = torch.matmul(dlogits, weight)
    grad_weight = torch.matmul(dlogits.transpose(-1, -2), input)
    grad_bias = None if bias is None else dlogits.sum(-2)
    return (grad_input, grad_weight, grad_bias), (0, 0, None if grad_bias is None else 0)


FUSED_LINEAR_CROSS_ENTROPY = VJPOp(
    "fused_linear_cross_entropy", saves=_fused_saves, jvp=_fused_jvp, vjp_ref=_fused_backward_ref,
    forward_ref=_fused_forward_ref,
    vjp_args=_fused_vjp_args, nondifferentiable=("target", "class_weight"), cached_vjp=_fused_cached_vjp,
    vmap=_fused_vmap,
    backward_vmap=_fused_backward_vmap, autocast={"cuda": "lower_precision_fp", "cpu": "lower_precision_fp"},
    autocast_output="fp32", autocast_keep=("class_weight",),
    integer_error=RuntimeError,  # as torch's linear, whose product refuses an integer input beside a float head
)
OPS = {op.name: op for op in (CROSS_ENTROPY, FUSED_LINEAR_CROSS_ENTROPY)}


# ---------------------------------------------------------------------------------------------------------
# Fake kernels: the C++ frontend's checks (csrc/ops/cross_entropy.h) and shapes, for torch.compile and meta
# tensors. Out-of-range targets are a data check: the kernels make it.

def _check_label_smoothing(label_smoothing):
    """label_smoothing_of's check (csrc/ops/cross_entropy.h): torch's, which takes ε ≤ 0 and NaN as no smoothing."""
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")


def _check_options(softcap, lse_square_scale, class_weights, name):
    """loss_options_of's checks (csrc/ops/cross_entropy.h)."""
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"torch_vjp.{name}: softcap must be a positive finite number (or 0 for none), got {softcap}")
    if not (math.isfinite(lse_square_scale) and lse_square_scale >= 0):
        raise ValueError(f"torch_vjp.{name}: lse_square_scale must be a non-negative finite number, got "
                         f"{lse_square_scale}")
    if class_weights and lse_square_scale > 0:
        raise NotImplementedError(f"torch_vjp.{name}: class weights with the z-loss (lse_square_scale > 0) are not "
                                  "implemented")


def _check_target(target, rows, batched, device, name):
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"torch_vjp.{name}: expected target dtype to be Long or Byte, but got {target.dtype}")
    if target.device != device:
        raise RuntimeError(f"torch_vjp.{name}: expected target on the input's device {device}, got {target.device}")
    if batched and target.dim() != 1:
        raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    if batched and target.shape[0] != rows:
        raise ValueError(f"Expected input batch_size ({rows}) to match target batch_size ({target.shape[0]}).")
    if not batched and target.dim() != 0:
        raise RuntimeError(f"torch_vjp.{name}: expected a 0-d target for input of shape (C,), got target of shape "
                           f"{list(target.shape)}")


def _check_logits(input, target, name):
    check_floating(input, name, "input")
    if input.dim() not in (1, 2):
        raise RuntimeError(f"torch_vjp.{name}: expected input of shape (N, C) or (C,) (class-index targets), got "
                           f"{list(input.shape)}")
    _check_target(target, input.shape[0] if input.dim() == 2 else 1, input.dim() == 2, input.device, name)


def _check_class_weight(weight, input, classes, compute_dtype_too=False):
    """class_weights_of's checks (csrc/ops/cross_entropy.h), with torch's messages."""
    if weight is None:
        return
    if weight.dim() != 1 or weight.numel() != classes:
        raise RuntimeError(f"weight tensor should be defined either for all {classes} classes or no classes but got "
                           f"weight tensor of shape: {list(weight.shape)}")
    if weight.dtype != input.dtype and not (compute_dtype_too and weight.dtype == compute_type(input.dtype)):
        raise RuntimeError(f"expected scalar type {_scalar_name(input.dtype)} but found {_scalar_name(weight.dtype)}")
    if weight.device != input.device:
        raise RuntimeError(f"Tensor on device {weight.device} is not on the expected device {input.device}!")


def _scalar_name(dtype):
    """c10's ScalarType name (as TORCH_CHECK prints it): Float, Double, Half, BFloat16."""
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
            torch.bfloat16: "BFloat16"}.get(dtype, str(dtype))


@register_fake("cross_entropy")
def _(input, target, weight, ignore_index, reduction, label_smoothing, softcap=0.0, lse_square_scale=0.0):
    check_reduction(reduction)
    _check_options(softcap, lse_square_scale, weight is not None, "cross_entropy")
    _check_logits(input, target, "cross_entropy")
    _check_class_weight(weight, input, input.shape[-1])
    _check_label_smoothing(label_smoothing)
    loss = input.new_empty(target.shape if reduction == "none" else ())
    stat = input.new_empty(target.shape, dtype=compute_type(input.dtype))
    return loss, stat, torch.empty_like(stat)


def _check_grad_output(grad_output, target, reduction, device, name):
    if grad_output.device != device:
        raise RuntimeError(f"torch_vjp.{name}: expected grad_output on {device}")
    if reduction == "none" and grad_output.shape != target.shape:
        raise RuntimeError(f"torch_vjp.{name}: expected grad_output of shape {list(target.shape)} for "
                           f"reduction='none', got {list(grad_output.shape)}")
    if reduction != "none" and grad_output.dim() != 0:
        raise RuntimeError(f"torch_vjp.{name}: expected a 0-d grad_output, got {list(grad_output.shape)}")


@register_fake("cross_entropy_backward")
def _(grad_output, input, target, weight, row_max, log_sum, ignore_index, reduction, label_smoothing, softcap=0.0,
      lse_square_scale=0.0):
    name = "cross_entropy_backward"
    check_reduction(reduction)
    _check_options(softcap, lse_square_scale, weight is not None, name)
    _check_logits(input, target, name)
    _check_class_weight(weight, input, input.shape[-1])
    for stat, stat_name in ((row_max, "row_max"), (log_sum, "log_sum")):
        if stat.shape != target.shape or stat.dtype != compute_type(input.dtype) or stat.device != input.device:
            raise RuntimeError(f"torch_vjp.{name}: expected {stat_name} of shape {list(target.shape)} and dtype "
                               f"{compute_type(input.dtype)} on {input.device}, got {list(stat.shape)} {stat.dtype} "
                               f"on {stat.device}")
    _check_grad_output(grad_output, target, reduction, input.device, name)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _check_fused(input, weight, target, bias, class_weight, reduction, label_smoothing, name):
    check_reduction(reduction)
    check_floating(input, name, "input")
    if input.dim() != 2:
        raise RuntimeError(f"torch_vjp.{name}: expected input of shape (N, H), got {list(input.shape)}")
    if weight.dim() != 2:
        raise RuntimeError(f"torch_vjp.{name}: expected weight of shape (V, H), got {list(weight.shape)}")
    if weight.shape[1] != input.shape[1]:
        raise RuntimeError(f"torch_vjp.{name}: the hidden sizes differ: input {list(input.shape)} and weight "
                           f"{list(weight.shape)} (expected weight of shape (V, {input.shape[1]}))")
    check_same(weight, "weight", input, "input", name, shape=False)
    if bias is not None:
        check_same(bias, "bias", input, "input", name, shape=False)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise RuntimeError(f"torch_vjp.{name}: expected bias of shape ({weight.shape[0]},), got {list(bias.shape)}")
    _check_label_smoothing(label_smoothing)
    _check_target(target, input.shape[0], True, input.device, name)
    _check_class_weight(class_weight, input, weight.shape[0], compute_dtype_too=True)


def _empty(t):
    return None if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)


@register_fake("fused_linear_cross_entropy")
def _(input, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, compute_grad, softcap=0.0,
      lse_square_scale=0.0):
    _check_fused(input, weight, target, bias, class_weight, reduction, label_smoothing, "fused_linear_cross_entropy")
    _check_options(softcap, lse_square_scale, class_weight is not None, "fused_linear_cross_entropy")
    loss = input.new_empty(target.shape if reduction == "none" else (), dtype=compute_type(input.dtype))
    if not compute_grad:
        return loss, None, None, None
    return loss, _empty(input), _empty(weight), _empty(bias)


@register_fake("fused_linear_cross_entropy_backward")
def _(grad_output, input, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, softcap=0.0,
      lse_square_scale=0.0):
    name = "fused_linear_cross_entropy_backward"
    _check_fused(input, weight, target, bias, class_weight, reduction, label_smoothing, name)
    _check_options(softcap, lse_square_scale, class_weight is not None, name)
    _check_grad_output(grad_output, target, reduction, input.device, name)
    return _empty(input), _empty(weight), _empty(bias)
