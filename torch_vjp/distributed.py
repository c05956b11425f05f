"""torch_vjp on torch.distributed: DTensor sharding rules for every op and its VJP op, and vocabulary-parallel
cross_entropy.

**Sharding rules.** DTensor dispatches a custom op only through a sharding rule. Each op and its VJP op get one
here (`torch.distributed.tensor.experimental.register_sharding`, with a RuntimeSchemaInfo that hashes the
non-tensor arguments, so that a different `dim`, `normalized_shape` or `reduction` re-runs propagation). A rule
lists, per mesh dim, the placements under which the local kernel on each rank's shard computes that rank's
shard of the exact result; DTensor picks the cheapest one and redistributes the inputs to it. So a reduced dim
that is sharded is gathered first (never a wrong answer on a shard):

- elementwise ops (exp, sigmoid, tanh, softplus, gelu, silu, mish) and gated ops (swiglu, geglu): any
  `Shard(d)` or `Replicate()` (the gated ops' two inputs alike);
- softmax, log_softmax, logsumexp, normalize: `Shard(d)` for d other than `dim`, `Replicate()`;
- layer_norm, rms_norm: `Shard(d)` for d before the normalized dims (sequence parallelism), the weight and
  bias `Replicate()`; in the VJP op their gradients are then `Partial()` sums, reduced by DTensor. (The VJP
  ops return `Tensor?` first, which DTensor's propagation cannot wrap: they get a DTensor op handler,
  `_norm_backward_handler`, with the same rule.);
- cross_entropy: `Shard(0)` of the rows with the target (loss `Shard(0)` for 'none', `Partial()` for 'sum'),
  `Replicate()`. 'mean' divides by the global count: the op's rule gathers, but `torch_vjp.cross_entropy`
  computes it as the local 'sum' over the all-reduced count (`mean_of_sharded_rows`; a DTensor target sharded
  like the rows). Class-dim sharding (`Shard(-1)`, as `ColwiseParallel` on the head gives) takes the
  vocabulary-parallel algorithm below instead;
- fused_linear_cross_entropy: `Shard(0)` of the rows with the target, the head `Replicate()` ('none' and
  'sum'; its weight and bias gradients `Partial()`; 'mean' as cross_entropy's), `Replicate()`;
- rope: `Replicate()`, or q and k `Shard(d)` alike on a dim before the head dim: cos and sin `Replicate()` where
  they broadcast over d (the heads: tensor parallelism), `Shard(d')` on their own matching dim where they do
  not (the sequence or batch); its VJP op (whose outputs are `Tensor?`) has a DTensor op handler,
  `_rope_backward_handler`, with the same placements, the gradients of cos and sin then `Partial()` or
  `Shard(d')`;
- every VJP op, being linear in grad_output: grad_output `Partial()` with every saved tensor `Replicate()`
  gives `Partial()` gradients.

**Vocabulary-parallel cross_entropy** (`vocab_parallel_cross_entropy`, which `torch_vjp.cross_entropy` takes
for a DTensor sharded along its class dim): per rank, the kernel's row max m_r and log_sum_r of the local
shard, the owned target logit and (label smoothing) the row sum of the shard; all-reduce MAX of m, then one
all-reduce SUM of the per-row (exp(m_r - M) exp(log_sum_r), target logit, row sum): only per-row values cross
ranks, never logits. The backward forms p - ε/C - (1 - ε) onehot on the local shard from the global M and
log_sum: no communication.

**Vocabulary-parallel fused_linear_cross_entropy** (`vocab_parallel_fused_linear_cross_entropy`, taken for a
head weight DTensor sharded by rows, Shard(0), as `ColwiseParallel` gives): the same statistics from each
rank's columns of each row chunk of logits (no rank holds more than a chunk of its own logits); the backward
recomputes the chunks, keeps the weight gradient local and sums the input gradient over the shards.

Not differentiable twice (`once_differentiable`: a clear error). Other layouts get a ValueError that names
them (the class dim sharded together with another mesh dim sharded, strided shards, mismatched meshes).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
from torch.distributed.tensor.experimental import register_sharding

from ._ops import compute_type

ops = torch.ops.torch_vjp
R = Replicate()

__all__ = ["is_class_sharded", "is_vocab_sharded", "mean_of_sharded_rows", "rows_sharded",
           "vocab_parallel_cross_entropy", "vocab_parallel_fused_linear_cross_entropy"]


def _register(name: str, rule):
    """rule(*args) for the op's arguments (tensors as DTensorSpec or None): the acceptable (outputs, inputs)
    placement lists on one mesh dim (None for a non-tensor argument or a None tensor)."""
    overload = getattr(ops, name).default
    register_sharding(overload)(rule)
    args = overload._schema.arguments
    first_static = next((i for i, a in enumerate(args) if str(a.type) not in ("Tensor", "Optional[Tensor]")), 100)
    # register_sharding hashes from the first int argument only: a SymInt[] normalized_shape or a str reduction
    # before it would share a cache entry with a different one.
    DTensor._op_dispatcher.sharding_propagator.op_to_schema_info[overload] = RuntimeSchemaInfo(
        static_argnum=first_static, needs_pytree=True)


def _p(spec, placement):
    """A tensor argument's placement, None for an absent optional tensor."""
    return None if spec is None else placement


def _ndim(spec) -> int:
    return len(spec.shape)


# ---------------------------------------------------------------------------------------------------------
# Elementwise and gated ops.

def _elementwise_rule(input, *params):
    n = [None] * len(params)
    return [([R], [R, *n])] + [([Shard(d)], [Shard(d), *n]) for d in range(_ndim(input))]


def _elementwise_backward_rule(grad_output, saved, *params):
    n = [None] * len(params)
    rules = [([R], [R, R, *n])] + [([Shard(d)], [Shard(d), Shard(d), *n]) for d in range(_ndim(saved))]
    return rules + [([Partial()], [Partial(), R, *n])]


def _gated_rule(gate, up, *params):
    n = [None] * len(params)
    return [([R], [R, R, *n])] + [([Shard(d)], [Shard(d), Shard(d), *n]) for d in range(_ndim(gate))]


def _gated_backward_rule(grad_output, gate, up, *params):
    n = [None] * len(params)
    rules = [([R, R], [R, R, R, *n])] + [([Shard(d)] * 2, [Shard(d)] * 3 + n) for d in range(_ndim(gate))]
    return rules + [([Partial(), Partial()], [Partial(), R, R, *n])]


# ---------------------------------------------------------------------------------------------------------
# Rowwise ops: local where the reduced dim is not sharded.

def _wrap(dim: int, ndim: int) -> int:
    return dim % max(ndim, 1)


def _softmax_rule(input, dim):
    reduced = _wrap(dim, _ndim(input))
    return [([R], [R, None])] + [([Shard(d)], [Shard(d), None]) for d in range(_ndim(input)) if d != reduced]


def _softmax_backward_rule(grad_output, output, dim):
    reduced = _wrap(dim, _ndim(output))
    rules = [([R], [R, R, None])]
    rules += [([Shard(d)], [Shard(d), Shard(d), None]) for d in range(_ndim(output)) if d != reduced]
    return rules + [([Partial()], [Partial(), R, None])]


def _reduced_dim(d: int, reduced: int, keepdim: bool) -> int:
    return d if keepdim or d < reduced else d - 1


def _logsumexp_rule(input, dim, keepdim):
    reduced = _wrap(dim, _ndim(input))
    return [([R], [R, None, None])] + [([Shard(_reduced_dim(d, reduced, keepdim))], [Shard(d), None, None])
                                      for d in range(_ndim(input)) if d != reduced]


def _logsumexp_backward_rule(grad_output, input, output, dim, keepdim):
    reduced = _wrap(dim, _ndim(input))
    rules = [([R], [R, R, R, None, None])]
    for d in range(_ndim(input)):
        if d != reduced:
            s = Shard(_reduced_dim(d, reduced, keepdim))
            rules.append(([Shard(d)], [s, Shard(d), s, None, None]))
    return rules + [([Partial()], [Partial(), R, R, None, None])]


def _normalize_rule(input, dim, eps):
    reduced = _wrap(dim, _ndim(input))
    return [([R, R], [R, None, None])] + [([Shard(d), Shard(d)], [Shard(d), None, None])
                                         for d in range(_ndim(input)) if d != reduced]


def _normalize_backward_rule(grad_output, output, norm, dim, eps):
    reduced = _wrap(dim, _ndim(output))
    rules = [([R], [R, R, R, None, None])]
    rules += [([Shard(d)], [Shard(d)] * 3 + [None, None]) for d in range(_ndim(output)) if d != reduced]
    return rules + [([Partial()], [Partial(), R, R, None, None])]


def _batch_dims(input, normalized_shape) -> range:
    return range(_ndim(input) - len(normalized_shape))


def _rms_norm_rule(input, normalized_shape, weight, eps, offset=0.0, casting_mode="torch"):
    rules = [([R, R], [R, None, _p(weight, R), None, None, None])]
    return rules + [([Shard(d), Shard(d)], [Shard(d), None, _p(weight, R), None, None, None])
                    for d in _batch_dims(input, normalized_shape)]


def _add_rms_norm_rule(input, residual, normalized_shape, weight, eps, offset=0.0, casting_mode="torch"):
    """(y, s, rstd): rows sharded alike in input and residual stay local."""
    rules = [([R, R, R], [R, R, None, _p(weight, R), None, None, None])]
    return rules + [([Shard(d)] * 3, [Shard(d), Shard(d), None, _p(weight, R), None, None, None])
                    for d in _batch_dims(input, normalized_shape)]


def _add_layer_norm_rule(input, residual, normalized_shape, weight, bias, eps):
    w, b = _p(weight, R), _p(bias, R)
    rules = [([R] * 4, [R, R, None, w, b, None])]
    return rules + [([Shard(d)] * 4, [Shard(d), Shard(d), None, w, b, None]) for d in _batch_dims(input, normalized_shape)]


def _layer_norm_rule(input, normalized_shape, weight, bias, eps):
    w, b = _p(weight, R), _p(bias, R)
    rules = [([R, R, R], [R, None, w, b, None])]
    return rules + [([Shard(d)] * 3, [Shard(d), None, w, b, None]) for d in _batch_dims(input, normalized_shape)]


# ---------------------------------------------------------------------------------------------------------
# Losses.

# Class weights (cross_entropy's weight, the fused op's class_weight) are replicated: every rank weighs its rows.
# softcap and the z-loss (the last two arguments) act per element and per row: the same placements hold.
def _ce_rule(input, target, weight, ignore_index, reduction, label_smoothing, softcap=0.0, lse_square_scale=0.0):
    w = _p(weight, R)
    n = [None] * 5
    rules = [([R, R, R], [R, R, w, *n])]
    if _ndim(input) == 2 and reduction != "mean":  # rows sharded: local, the loss Shard(0) or a partial sum
        loss = Shard(0) if reduction == "none" else Partial()
        rules.append(([loss, Shard(0), Shard(0)], [Shard(0), Shard(0), w, *n]))
    return rules


def _ce_backward_rule(grad_output, input, target, weight, row_max, log_sum, ignore_index, reduction, label_smoothing,
                      softcap=0.0, lse_square_scale=0.0):
    n = [None] * 5
    w = _p(weight, R)
    rules = [([R], [R, R, R, w, R, R, *n])]
    if _ndim(input) == 2 and reduction != "mean":
        g = Shard(0) if reduction == "none" else R
        rules.append(([Shard(0)], [g, Shard(0), Shard(0), w, Shard(0), Shard(0), *n]))
    return rules + [([Partial()], [Partial(), R, R, w, R, R, *n])]


def _flce_rule(input, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, compute_grad,
               softcap=0.0, lse_square_scale=0.0):
    b, w = _p(bias, R), _p(class_weight, R)
    n = [None] * 6
    grads = bool(compute_grad)
    rules = [([R, R if grads else None, R if grads else None, R if grads and bias is not None else None],
              [R, R, R, b, w, *n])]
    if reduction != "mean":
        loss = Shard(0) if reduction == "none" else Partial()
        out = [loss, Shard(0) if grads else None, Partial() if grads else None,
               Partial() if grads and bias is not None else None]
        rules.append((out, [Shard(0), R, Shard(0), b, w, *n]))
    return rules


def _flce_backward_rule(grad_output, input, weight, target, bias, class_weight, ignore_index, reduction,
                        label_smoothing, softcap=0.0, lse_square_scale=0.0):
    b, w = _p(bias, R), _p(class_weight, R)
    n = [None] * 5
    rules = [([R, R, b], [R, R, R, R, b, w, *n])]
    if reduction != "mean":
        g = Shard(0) if reduction == "none" else R
        rules.append(([Shard(0), Partial(), _p(bias, Partial())], [g, Shard(0), R, Shard(0), b, w, *n]))
    return rules + [([Partial(), Partial(), _p(bias, Partial())], [Partial(), R, R, R, b, w, *n])]


def _mesh_of(op: str, dtensors) -> "object":
    meshes = {t.device_mesh for t in dtensors}
    if len(meshes) != 1:
        raise ValueError(f"torch_vjp.{op}: the DTensor arguments are on different device meshes: "
                         f"{sorted(map(str, meshes))}")
    return meshes.pop()


def _norm_backward_handler(op_call, args, kwargs):
    """layer_norm_backward and rms_norm_backward (and the add_* ones) under DTensor. Their first output is an
    optional tensor, which
    DTensor's sharding propagation cannot wrap (it takes a first return of type Tensor? for a single output),
    so they are dispatched here with the same rule as a registered one: per mesh dim, rows sharded (Shard(d),
    d before the normalized dims) stay local, the weight and bias gradients then Partial(); any other
    placement (the normalized dims sharded, a Partial grad_output) is redistributed to Replicate()."""
    name = op_call._schema.name.split("::")[-1]
    layer, adds = "layer_norm" in name, name.startswith("add_")
    n_params = 2 if layer else 1  # weight (, bias): the last tensors
    n_tensors = (6 if layer else 4) + adds  # add_*: grad_sum after grad_output, and s in place of the input
    tensors, normalized_shape = list(args[:n_tensors]), args[n_tensors]
    row_tensors, params = tensors[:n_tensors - n_params], tensors[n_tensors - n_params:]
    input = row_tensors[1 + adds]
    dtensors = [t for t in tensors if t is not None]
    if not all(isinstance(t, DTensor) for t in dtensors):
        raise TypeError(f"torch_vjp.{name}: mixed DTensor and torch.Tensor arguments; make every tensor a DTensor "
                        f"(a norm's weight and bias Replicate())")
    mesh = _mesh_of(name, dtensors)
    batch = input.dim() - len(normalized_shape)
    rows = []
    for i, p in enumerate(input.placements):
        rows.append(p if isinstance(p, Shard) and p.dim < batch else R)
    local = [None if t is None else t.redistribute(mesh, rows).to_local() for t in row_tensors]
    local += [None if t is None else t.redistribute(mesh, [R] * mesh.ndim).to_local() for t in params]
    outputs = op_call(*local, *args[n_tensors:])
    param_placements = [Partial() if isinstance(p, Shard) else R for p in rows]
    wrapped = []
    for k, out in enumerate(outputs):
        if out is None:
            wrapped.append(None)
            continue
        like = input if k == 0 else params[k - 1]
        placements = rows if k == 0 else param_placements
        wrapped.append(DTensor.from_local(out, mesh, placements, run_check=False, shape=like.shape,
                                          stride=like.stride()))
    return tuple(wrapped)


# ---------------------------------------------------------------------------------------------------------
# rope: rows of q and k are independent; cos and sin are read by every row they broadcast over.

def _rope_table_dim(q, k, cos, unsqueeze_dim, d):
    """For q and k sharded alike on dim d (before the head dim): cos and sin's matching dim (they are sharded
    there too), None where they broadcast over d (Replicate()), or False where d cannot be sharded (ranks differ,
    or q and k disagree in d's size)."""
    q_shape, k_shape, c_shape = tuple(q.shape), tuple(k.shape), tuple(cos.shape)
    if not (len(q_shape) == len(k_shape) == len(c_shape) + 1) or q_shape[d] != k_shape[d]:
        return False
    u = unsqueeze_dim % (len(c_shape) + 1)
    if d == u:
        return None
    table = d if d < u else d - 1
    if c_shape[table] == 1:
        return None
    return table if c_shape[table] == q_shape[d] else False


def _rope_rule(q, k, cos, sin, unsqueeze_dim):
    rules = [([R, R], [R, R, R, R, None])]
    for d in range(_ndim(q) - 1):
        table = _rope_table_dim(q, k, cos, unsqueeze_dim, d)
        if table is not False:
            placed = R if table is None else Shard(table)
            rules.append(([Shard(d)] * 2, [Shard(d), Shard(d), placed, placed, None]))
    return rules


def _rope_backward_handler(op_call, args, kwargs):
    """rope_backward under DTensor (its outputs are Tensor?, which DTensor's propagation cannot wrap): per mesh
    dim, a gradient sharded on a dim before the head dim stays local (q, k and their gradients alike; cos and
    sin as in _rope_rule, their gradients then Shard(d') or Partial()); any other placement is redistributed to
    Replicate()."""
    grad_q, grad_k, cos, sin, q, k, unsqueeze_dim = args
    name = "rope_backward"
    rows_like = [t for t in (grad_q, grad_k, q, k) if t is not None]
    if not all(isinstance(t, DTensor) for t in (*rows_like, cos, sin)):
        raise TypeError(f"torch_vjp.{name}: mixed DTensor and torch.Tensor arguments; make every tensor a DTensor")
    mesh = _mesh_of(name, [*rows_like, cos, sin])
    shape_q = grad_q if grad_q is not None else q
    shape_k = grad_k if grad_k is not None else k
    lead = rows_like[0]
    rows, tables, table_grads = [], [], []
    for p in lead.placements:
        table = False
        if (isinstance(p, Shard) and p.dim < lead.dim() - 1 and shape_q is not None and shape_k is not None):
            table = _rope_table_dim(shape_q, shape_k, cos, unsqueeze_dim, p.dim)
        if table is False:
            rows.append(R), tables.append(R), table_grads.append(R)
        else:
            rows.append(p)
            tables.append(R if table is None else Shard(table))
            table_grads.append(Partial() if table is None else Shard(table))
    local = [None if t is None else t.redistribute(mesh, rows).to_local() for t in (grad_q, grad_k)]
    local += [t.redistribute(mesh, tables).to_local() for t in (cos, sin)]
    local += [None if t is None else t.redistribute(mesh, rows).to_local() for t in (q, k)]
    outputs = op_call(*local, unsqueeze_dim)
    wrapped = []
    for out, like, placements in zip(outputs, (grad_q, grad_k, cos, sin), (rows, rows, table_grads, table_grads)):
        if out is None:
            wrapped.append(None)
            continue
        stride = like.stride() if placements is rows else torch.empty(like.shape, device="meta").stride()
        wrapped.append(DTensor.from_local(out, mesh, placements, run_check=False, shape=like.shape, stride=stride))
    return tuple(wrapped)


_RULES = {
    "swiglu": (_gated_rule, _gated_backward_rule),
    "geglu": (_gated_rule, _gated_backward_rule),
    "softmax": (_softmax_rule, _softmax_backward_rule),
    "log_softmax": (_softmax_rule, _softmax_backward_rule),
    "logsumexp": (_logsumexp_rule, _logsumexp_backward_rule),
    "normalize": (_normalize_rule, _normalize_backward_rule),
    "rms_norm": (_rms_norm_rule, None),
    "layer_norm": (_layer_norm_rule, None),
    "add_rms_norm": (_add_rms_norm_rule, None),
    "add_layer_norm": (_add_layer_norm_rule, None),
    "cross_entropy": (_ce_rule, _ce_backward_rule),
    "fused_linear_cross_entropy": (_flce_rule, _flce_backward_rule),
    "rope": (_rope_rule, None),
}
for _name in ("exp", "sigmoid", "tanh", "softplus", "gelu", "silu", "mish"):
    _RULES[_name] = (_elementwise_rule, _elementwise_backward_rule)

for _name, (_forward_rule, _backward_rule) in _RULES.items():
    _register(_name, _forward_rule)
    if _backward_rule is not None:
        _register(_name + "_backward", _backward_rule)
    else:
        handler = _rope_backward_handler if _name == "rope" else _norm_backward_handler
        DTensor._op_dispatcher._custom_op_handlers[getattr(ops, _name + "_backward").default] = handler


# ---------------------------------------------------------------------------------------------------------
# Vocabulary-parallel cross_entropy.

def is_class_sharded(input) -> bool:
    """A DTensor of logits whose class dim (the last; dim 0 of a 1-D input) is sharded on some mesh dim."""
    if not isinstance(input, DTensor) or input.dim() not in (1, 2):
        return False
    class_dim = input.dim() - 1
    return any(p.is_shard(class_dim) for p in input.placements)


def _check_layout(input, target):
    mesh, class_dim = input.device_mesh, input.dim() - 1
    if isinstance(target, DTensor) and target.device_mesh != mesh:
        raise ValueError(f"torch_vjp.cross_entropy: the input and the target are DTensors on different meshes "
                         f"({input.device_mesh} and {target.device_mesh})")
    tp = [i for i, p in enumerate(input.placements) if p.is_shard(class_dim)]
    if len(tp) != 1:
        raise ValueError(f"torch_vjp.cross_entropy: vocabulary parallelism shards the class dim on one mesh dim, "
                         f"got placements {input.placements}")
    for i, p in enumerate(input.placements):
        if i != tp[0] and not p.is_replicate():
            raise ValueError(
                f"torch_vjp.cross_entropy: with the class dim sharded on mesh dim {tp[0]}, the other mesh dims "
                f"must be Replicate(), got placements {input.placements}; redistribute the logits first")
    return tp[0]


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, ignore_index, reduction, label_smoothing, mesh_dim):
        mesh, placements = input.device_mesh, input.placements
        group = mesh.get_group(mesh_dim)
        x = input.to_local()
        classes = input.shape[-1]
        offset = _shard_offset(classes, mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim))
        t = target.full_tensor() if isinstance(target, DTensor) else target
        x2, t1 = x.reshape(-1, x.shape[-1]), t.reshape(-1).long()
        ct = compute_type(x.dtype)
        # The kernel's per-row statistics of the local shard (every row ignored: statistics only).
        _, m_local, log_sum_local = ops.cross_entropy(
            x2, torch.full_like(t1, -1), None, -1, "none", 0.0)
        row_max = m_local.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        counted = t1 != ignore_index
        local_t = t1 - offset
        owned = counted & (local_t >= 0) & (local_t < x2.shape[-1])
        rows = torch.arange(x2.shape[0], device=x.device)
        picked = x2[rows, torch.where(owned, local_t, 0)].to(ct)
        stats = torch.stack([torch.exp(m_local - row_max + log_sum_local), torch.where(owned, picked, 0)], 0)
        if label_smoothing > 0:
            stats = torch.cat([stats, x2.to(ct).sum(-1, dtype=torch.float64).to(ct).unsqueeze(0)])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        log_sum = torch.log(stats[0])
        lse = row_max + log_sum
        loss = lse - (1 - label_smoothing) * stats[1] if label_smoothing > 0 else lse - stats[1]
        if label_smoothing > 0:
            loss = loss - (label_smoothing / classes) * stats[2]
        loss = torch.where(counted, loss, 0)
        count = counted.sum()
        if reduction == "none":
            out = loss.reshape(t.shape).to(x.dtype)
        else:
            total = loss.to(torch.float64).sum()
            out = (total / count if reduction == "mean" else total).to(x.dtype)
        ctx.save_for_backward(x2, t1, row_max, log_sum)
        ctx.meta = (ignore_index, reduction, label_smoothing, classes, offset, x.shape, mesh, placements, count,
                    input.shape, input.stride())
        return DTensor.from_local(out, mesh, [R] * mesh.ndim, run_check=False)

    @staticmethod
    @once_differentiable  # the local gradient is not differentiated again: a clear error, never a silent zero
    def backward(ctx, grad_output):
        x2, t1, row_max, log_sum = ctx.saved_tensors
        (ignore_index, reduction, label_smoothing, classes, offset, shape, mesh, placements, count,
         global_shape, global_stride) = ctx.meta
        ct = log_sum.dtype
        counted, scale = _row_scale(grad_output, t1, ignore_index, reduction, count, ct)
        # one (N, V_local) buffer, worked in place: the gradient itself
        p = torch.sub(x2.to(ct), row_max.unsqueeze(-1)).sub_(log_sum.unsqueeze(-1)).exp_()
        if label_smoothing > 0:
            p.sub_(label_smoothing / classes)
        local_t = t1 - offset
        owned = counted & (local_t >= 0) & (local_t < x2.shape[-1])
        rows = torch.nonzero(owned).squeeze(-1)
        p[rows, local_t[rows]] -= 1 - label_smoothing
        dx = p.mul_(scale.unsqueeze(-1)).to(x2.dtype).reshape(shape)
        dx = DTensor.from_local(dx, mesh, placements, run_check=False, shape=global_shape, stride=global_stride)
        return dx, None, None, None, None, None


def _plain_shards(op: str, placements) -> None:
    """The shard offsets below are Shard()'s (torch.chunk's); a strided shard (FSDP over TP) is not one."""
    if any(p.is_shard() and type(p) is not Shard for p in placements):
        raise ValueError(f"torch_vjp.{op}: vocabulary parallelism takes plain Shard() placements, got {placements}; "
                         f"redistribute first")


def _row_scale(grad_output, target, ignore_index, reduction, count, ct):
    """The VJP's per-row scale (ops/cross_entropy.h's row_scale) on a rank: the replicated grad_output, over the
    all-reduced count for 'mean', 0 on ignored rows; and which rows count."""
    g = _replicated(grad_output).to(ct).reshape(-1)
    if reduction == "mean":
        g = g / count.to(ct)
    counted = target != ignore_index
    return counted, torch.where(counted, g.expand(target.shape), 0)


def _replicated(t):
    """A loss gradient as the same full tensor on every rank."""
    if not isinstance(t, DTensor):
        return t
    if not all(p.is_replicate() for p in t.placements):
        t = t.redistribute(t.device_mesh, [R] * t.device_mesh.ndim)
    return t.to_local()


def _shard_offset(size: int, n: int, rank: int) -> int:
    """The first index of rank's Shard() chunk (torch.chunk's split: ceil(size / n) each, the last ones shorter)."""
    chunk = -(-size // n)
    return min(chunk * rank, size)


def vocab_parallel_cross_entropy(input: DTensor, target, ignore_index: int = -100, reduction: str = "mean",
                                 label_smoothing: float = 0.0) -> DTensor:
    """cross_entropy of logits (N, C) or (C,) sharded along the class dim on one mesh dim (Replicate elsewhere),
    with a target of class indices (a tensor, or a DTensor on the same mesh): a Replicate() DTensor loss."""
    mesh_dim = _check_layout(input, target)
    _plain_shards("cross_entropy", input.placements)
    return _VocabParallelCE.apply(input, target, ignore_index, reduction, label_smoothing, mesh_dim)


# ---------------------------------------------------------------------------------------------------------
# Vocabulary-parallel fused_linear_cross_entropy: the head's weight (V, H) sharded by rows (Shard(0), as
# ColwiseParallel gives), each rank forming only its columns of each chunk of logits.

_CHUNK_ELEMENTS = 1 << 22  # logits per chunk (rows x local vocabulary), 16 MiB in float32


def is_vocab_sharded(weight) -> bool:
    """A DTensor head weight (V, H) sharded along V on some mesh dim."""
    return isinstance(weight, DTensor) and weight.dim() == 2 and any(p.is_shard(0) for p in weight.placements)


def _check_head_layout(input, weight, target, bias):
    mesh = weight.device_mesh
    for name, t in (("input", input), ("target", target), ("bias", bias)):
        if isinstance(t, DTensor) and t.device_mesh != mesh:
            raise ValueError(f"torch_vjp.fused_linear_cross_entropy: the {name} and the weight are DTensors on "
                             f"different meshes ({t.device_mesh} and {mesh})")
    tp = [i for i, p in enumerate(weight.placements) if p.is_shard(0)]
    if len(tp) != 1 or any(i != tp[0] and not p.is_replicate() for i, p in enumerate(weight.placements)):
        raise ValueError(f"torch_vjp.fused_linear_cross_entropy: a vocabulary-parallel head weight is Shard(0) on one "
                         f"mesh dim and Replicate() on the others, got {weight.placements}")
    if bias is not None and (not isinstance(bias, DTensor) or tuple(bias.placements) != tuple(weight.placements)):
        raise ValueError("torch_vjp.fused_linear_cross_entropy: with a vocabulary-parallel weight the bias must be a "
                         f"DTensor of the same placements {weight.placements}")
    return tp[0]


def _chunks(rows: int, local_vocab: int):
    step = max(1, _CHUNK_ELEMENTS // max(local_vocab, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


class _VocabParallelFLCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, target, bias, ignore_index, reduction, label_smoothing, mesh_dim):
        mesh = weight.device_mesh
        group = mesh.get_group(mesh_dim)
        x = input.to_local() if isinstance(input, DTensor) else input
        w = weight.to_local()
        b = None if bias is None else bias.to_local()
        t = (target.full_tensor() if isinstance(target, DTensor) else target).reshape(-1).long()
        classes = weight.shape[0]
        offset = _shard_offset(classes, mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim))
        ct = compute_type(x.dtype)
        counted = t != ignore_index
        local_t = t - offset
        owned = counted & (local_t >= 0) & (local_t < w.shape[0])
        n = x.shape[0]
        m_local = torch.empty(n, dtype=ct, device=x.device)
        log_sum_local = torch.empty_like(m_local)
        picked = torch.zeros_like(m_local)
        row_sum = torch.zeros_like(m_local)
        for rows in _chunks(n, w.shape[0]):
            logits = _logits(x[rows], w, b, ct)
            _, m_local[rows], log_sum_local[rows] = ops.cross_entropy(
                logits, torch.full((logits.shape[0],), -1, dtype=torch.long, device=x.device), None, -1, "none", 0.0)
            index = torch.arange(logits.shape[0], device=x.device)
            o = owned[rows]
            picked[rows] = torch.where(o, logits[index, torch.where(o, local_t[rows], 0)], 0)
            if label_smoothing > 0:
                row_sum[rows] = logits.sum(-1, dtype=torch.float64).to(ct)
        row_max = m_local.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        stats = torch.stack([torch.exp(m_local - row_max + log_sum_local), picked, row_sum])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        log_sum = torch.log(stats[0])
        loss = row_max + log_sum - (1 - label_smoothing) * stats[1] - (label_smoothing / classes) * stats[2]
        loss = torch.where(counted, loss, 0)
        count = counted.sum()
        if reduction == "none":
            out = loss
        else:
            total = loss.to(torch.float64).sum()
            out = (total / count if reduction == "mean" else total).to(ct)
        ctx.save_for_backward(x, w, b, t, row_max, log_sum)
        input_meta = (input.shape, input.stride()) if isinstance(input, DTensor) else None
        weight_meta = (tuple(weight.placements), weight.shape, weight.stride())
        ctx.meta = (ignore_index, reduction, label_smoothing, classes, offset, count, mesh, mesh_dim, group,
                    input_meta, weight_meta, bias is not None)
        return DTensor.from_local(out, mesh, [R] * mesh.ndim, run_check=False)

    @staticmethod
    @once_differentiable  # the local gradient is not differentiated again: a clear error, never a silent zero
    def backward(ctx, grad_output):
        x, w, b, t, row_max, log_sum = ctx.saved_tensors
        (ignore_index, reduction, label_smoothing, classes, offset, count, mesh, mesh_dim, group,
         input_meta, (weight_placements, weight_shape, weight_stride), has_bias) = ctx.meta
        ct = log_sum.dtype
        counted, scale = _row_scale(grad_output, t, ignore_index, reduction, count, ct)
        local_t = t - offset
        owned = counted & (local_t >= 0) & (local_t < w.shape[0])
        wc = w.to(ct)
        grad_x = torch.empty(x.shape, dtype=ct, device=x.device)
        grad_w = torch.zeros(w.shape, dtype=ct, device=x.device)
        grad_b = torch.zeros(w.shape[0], dtype=ct, device=x.device) if has_bias else None
        for rows in _chunks(x.shape[0], w.shape[0]):
            logits = _logits(x[rows], w, b, ct)
            p = logits.sub_(row_max[rows].unsqueeze(-1)).sub_(log_sum[rows].unsqueeze(-1)).exp_()
            if label_smoothing > 0:
                p.sub_(label_smoothing / classes)
            mine = torch.nonzero(owned[rows]).squeeze(-1)
            p[mine, local_t[rows][mine]] -= 1 - label_smoothing
            d = p.mul_(scale[rows].unsqueeze(-1))
            grad_x[rows] = d @ wc
            grad_w.addmm_(d.t(), x[rows].to(ct))
            if has_bias:
                grad_b += d.sum(0)
        # the input gradient is the sum over the vocabulary shards of the local products
        grad_x = grad_x.to(x.dtype)
        if input_meta is not None:
            placements = [Partial() if i == mesh_dim else R for i in range(mesh.ndim)]
            grad_x = DTensor.from_local(grad_x, mesh, placements, run_check=False, shape=input_meta[0],
                                        stride=input_meta[1])
        else:
            dist.all_reduce(grad_x, group=group)
        grad_w = DTensor.from_local(grad_w.to(w.dtype), mesh, weight_placements, run_check=False,
                                    shape=weight_shape, stride=weight_stride)
        if has_bias:
            grad_b = DTensor.from_local(grad_b.to(w.dtype), mesh, weight_placements, run_check=False,
                                        shape=(weight_shape[0],), stride=(1,))
        return grad_x, grad_w, None, grad_b, None, None, None, None


def _logits(x, w, b, ct):
    logits = x @ w.t() if b is None else torch.addmm(b, x, w.t())
    return logits.to(ct)


def vocab_parallel_fused_linear_cross_entropy(input, weight: DTensor, target, bias=None, ignore_index: int = -100,
                                              reduction: str = "mean", label_smoothing: float = 0.0) -> DTensor:
    """fused_linear_cross_entropy with the head's weight (V, H) a DTensor sharded by rows on one mesh dim
    (Replicate elsewhere; the bias, if any, alike): each rank forms only its columns of each chunk of logits,
    per-row statistics are all-reduced (no rank holds full logits); the weight gradient stays local, the input
    gradient is the sum over the vocabulary shards (a Partial DTensor for a DTensor input, all-reduced for a
    plain tensor). The input: a tensor, the same on every rank, or a DTensor (gathered to Replicate, as
    ColwiseParallel does). A Replicate() DTensor loss, in the compute type."""
    mesh_dim = _check_head_layout(input, weight, target, bias)
    _plain_shards("fused_linear_cross_entropy", weight.placements)
    if isinstance(input, DTensor) and not all(p.is_replicate() for p in input.placements):
        input = input.redistribute(input.device_mesh, [R] * input.device_mesh.ndim)
    return _VocabParallelFLCE.apply(input, weight, target, bias, ignore_index, reduction, label_smoothing, mesh_dim)


# ---------------------------------------------------------------------------------------------------------
# 'mean' over rows sharded across ranks: the sum (a Partial, computed locally) over the global count of the
# targets counted, both reduced as scalars, instead of gathering the logits.

def rows_sharded(input, target) -> bool:
    """Logits (N, C) and a target (N,), DTensors on one mesh, rows sharded (Shard(0)) on some mesh dim, the
    class dim nowhere: the 'sum' of the losses is local, a 'mean' needs only the global count."""
    if not (isinstance(input, DTensor) and isinstance(target, DTensor) and input.dim() == 2):
        return False
    if input.device_mesh != target.device_mesh or tuple(input.placements) != tuple(target.placements):
        return False
    return (any(type(p) is Shard and p.dim == 0 for p in input.placements)
            and all(p.is_replicate() or (type(p) is Shard and p.dim == 0) for p in input.placements))


def mean_of_sharded_rows(sum_loss, target, ignore_index: int):
    """sum_loss: the 'sum' loss (a DTensor, Partial over the row-sharded mesh dims); the mean, Replicate()."""
    mesh = target.device_mesh
    replicate = [R] * mesh.ndim
    count = (target != ignore_index).sum().redistribute(mesh, replicate)
    return (sum_loss / count.to(sum_loss.dtype)).redistribute(mesh, replicate)
