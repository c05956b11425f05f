"""The one table of torch_vjp's ops, for tests and benchmarks (as torch keeps its OpInfos in torch.testing).

Every check in tests/ and every benchmark case iterates over OPS, so adding an op to torch_vjp means adding
one OpInfo row here (plus its kernels). Each row pairs the torch_vjp function with its torch counterpart
(same signature), says which family it belongs to (which decides the shapes and dims it is tried on) and
which extra keyword variants to try. MODULES pairs torch_vjp.nn's modules with torch.nn's.

An op is called on a primary input x (the input, or a gate) and, for some ops, other tensors drawn to fit it:
a weight and bias shaped like the normalized dims, an up projection shaped like the gate, class-index targets
for the rows of logits, a head for hidden states. `OpInfo.call(x, ...)` draws them and returns a `Call`,
which calls torch_vjp's op, the reference and the registered op on the same arguments and knows which of
them are differentiated (its `primals`: x first).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import torch_vjp
import torch_vjp.nn
from torch_vjp.rotary import reference as _rope_reference

__all__ = ["OpInfo", "OPS", "OPS_BY_NAME", "ModuleInfo", "MODULES", "Call", "Batch", "SAMPLED", "op_variants",
           "sample", "dim_calls", "sample_shapes", "batch_of_calls", "IGNORE_INDEX"]

SAMPLED = "sampled"  # a variant's value for a tensor argument that is drawn to fit the input (a weight, a bias)
IGNORE_INDEX = -100  # the default ignore_index: drawn targets carry some, so the default variant ignores rows
VOCAB = 7  # classes of the fused loss's head in the tests (the benchmarks choose their own)


@dataclass(frozen=True)
class OpInfo:
    name: str
    op: Callable  # torch_vjp.<name>
    ref: Callable  # the torch reference, same signature
    family: str  # "elementwise" | "softmax" (along dim) | "norm" | "gated" | "loss" | "rope": decides shapes and dims
    variants: tuple[dict, ...] = ({},)  # keyword arguments to try, beyond dim/keepdim (SAMPLED: drawn tensors)
    keepdim: bool = False  # takes keepdim (logsumexp)
    scale: float = 1.0  # spread of the random inputs (randn * scale)
    registered: tuple[str, ...] = field(default=())  # names in torch.ops.torch_vjp this row exercises
    draw: Callable | None = None  # (x, kwargs, generator) -> {name: tensor}: the other tensor arguments
    shared: tuple[str, ...] = ()  # drawn tensors every sample of a batch shares (parameters): unbatched in vmap
    exact_ref: Callable | None = None  # a torch-ops reference where torch's own op has a wrong derivative
    pin: Callable | None = None  # (kwargs, dtype) -> kwargs: defaults that depend on the dtype, made explicit
    # Its backward scales gradients the forward computed for grad_output = 1 (a reduced fused loss): in float16
    # and bfloat16 that rounds once more than torch's own backward, which folds grad_output in before rounding.
    scaled_grads: bool = False
    # A fused op's unfused form on torch_vjp's own ops (same signature): the accuracy baseline of its values
    # test in place of torch's composite. The parts are held to torch's accuracy by their own rows; the
    # fused op must lose no more than they do (measured: the fused loss against torch's linear + cross_entropy
    # in half precision differs by single roundings of logits and dlogits either way).
    unfused: Callable | None = None
    bench: dict = field(default_factory=dict)  # the variant the benchmarks time (a norm's: with its parameters)
    # How many outputs the op returns (rope: q and k). The table's checks see them as one tensor, each output
    # flattened and concatenated (`joined`): every value and every gradient is compared, and autograd splits
    # a gradient of the concatenation back exactly. tests/test_rope.py checks the outputs themselves.
    outputs: int = 1
    # Drawn floating tensors that are not differentiated (class weights, which torch's losses refuse to
    # differentiate): passed by keyword like a target, cast with the primals' dtype.
    constants: tuple[str, ...] = ()

    def joined(self, out):
        """The op's output as the checks see it: itself, or several outputs flattened and concatenated."""
        if self.outputs == 1:
            return out
        with torch.autocast(out[0].device.type, enabled=False):  # torch's CPU autocast refuses cat of float16
            return torch.cat([o.reshape(-1) for o in out])

    @property
    def has_dim(self) -> bool:
        return self.family == "softmax" or self.name == "normalize"

    @property
    def has_normalized_shape(self) -> bool:
        return self.family == "norm" and not self.has_dim

    def raw_params(self, input=None, **kwargs) -> tuple:
        """The non-tensor (and other tensor) arguments of the registered op, positionally, by the names its
        schema gives them (the public function's defaults filling in; input resolves what depends on it)."""
        bound = inspect.signature(self.op).bind(None, **kwargs)
        bound.apply_defaults()
        schema = getattr(torch.ops.torch_vjp, self.name).default._schema
        params = []
        for arg in schema.arguments[1:]:
            if arg.name == "compute_grad":  # the fused loss's: not a public argument
                params.append(False)
            elif arg.name == "eps" and bound.arguments["eps"] is None:  # rms_norm's default, as the public op
                params.append(torch.finfo(input.dtype).eps if input.is_floating_point() else 0.0)
            elif arg.name == "softcap" and bound.arguments["softcap"] is None:  # the losses': None is off (0)
                params.append(0.0)
            else:
                params.append(bound.arguments[arg.name])
        return tuple(params)

    def raw(self, input, **kwargs):
        """The same call on the registered op, torch.ops.torch_vjp.<name>: its public output."""
        out = getattr(torch.ops.torch_vjp, self.name)(input, *self.raw_params(input, **kwargs))
        if self.outputs > 1:
            return self.joined(out[:self.outputs])
        return out[0] if isinstance(out, tuple) else out

    def call_kwargs(self, dim=-1, keepdim=False, **variant):
        """Keyword arguments for one call, shared by op and ref (drawn tensors still SAMPLED)."""
        kwargs = dict(variant)
        if self.has_dim:
            kwargs["dim"] = dim
        if self.keepdim:
            kwargs["keepdim"] = keepdim
        return kwargs

    def call(self, x, seed: int = 0, normalized_dims: int = 1, **call) -> "Call":
        """One call on x: `call` holds dim/keepdim and a variant; normalized_dims, the trailing dims a norm
        normalizes over; the other tensors are drawn with `seed`, in x's dtype and device."""
        kwargs = self.call_kwargs(**call)
        if self.has_normalized_shape:
            kwargs["normalized_shape"] = tuple(x.shape[x.dim() - normalized_dims:])
        drawn = self.draw(x, kwargs, torch.Generator().manual_seed(1000 + seed)) if self.draw else {}
        floating = lambda k, v: (isinstance(v, torch.Tensor) and v.is_floating_point()  # noqa: E731
                                 and k not in self.constants)
        kwargs.update({k: v for k, v in drawn.items() if not floating(k, v)})  # targets; rope's unsqueeze_dim
        names = tuple(k for k, v in drawn.items() if floating(k, v))
        for k in [k for k, v in kwargs.items() if v is SAMPLED]:
            del kwargs[k]
        return Call(self, (x, *(drawn[k] for k in names)), names, kwargs)


@dataclass
class Call:
    """One call of a row's op: the differentiated tensors (`primals`: x, then drawn ones passed by `names`) and
    every other argument (`kwargs`, a target among them)."""
    info: OpInfo
    primals: tuple
    names: tuple
    kwargs: dict

    def _kwargs(self, primals):
        return {**self.kwargs, **dict(zip(self.names, primals[1:]))}

    def op(self, *primals):
        return self.info.joined(self.info.op(primals[0], **self._kwargs(primals)))

    def ref(self, *primals):
        return self.info.joined(self.info.ref(primals[0], **self._kwargs(primals)))

    def exact(self, *primals):
        """The reference for derivatives: exact_ref where torch's own op is wrong in one, else ref."""
        return self.info.joined((self.info.exact_ref or self.info.ref)(primals[0], **self._kwargs(primals)))

    def raw(self, *primals):
        return self.info.raw(primals[0], **self._kwargs(primals))

    def raw_args(self, **overrides) -> tuple:
        """The registered op's arguments for this call, in its schema's order (overrides by argument name)."""
        params = self.info.raw_params(self.x, **self._kwargs(self.primals))
        names = [a.name for a in getattr(torch.ops.torch_vjp, self.info.name).default._schema.arguments[1:]]
        return (self.x, *(overrides.get(n, p) for n, p in zip(names, params)))

    def baseline(self, *primals):
        """The accuracy baseline in the op's own dtype: the unfused form on torch_vjp's ops, else torch's."""
        return self.info.joined((self.info.unfused or self.info.ref)(primals[0], **self._kwargs(primals)))

    @property
    def x(self):
        return self.primals[0]

    def shared(self, name: str) -> bool:
        return name in self.info.shared

    def with_primals(self, *primals) -> "Call":
        return Call(self.info, tuple(primals), self.names, self.kwargs)

    def cast(self, dtype=None, requires_grad=None) -> "Call":
        """The same call with the primals in another dtype and/or requiring grad (fresh leaves). A default that
        depends on the dtype (rms_norm's eps) keeps the value it had: the reference computes the same function."""
        def convert(t):
            t = t.detach().to(dtype) if dtype is not None else t.detach()
            return t.requires_grad_() if requires_grad else t
        kwargs = self.info.pin(self.kwargs, self.x.dtype) if self.info.pin and dtype is not None else self.kwargs
        if dtype is not None and self.info.constants:  # class weights follow the input's dtype
            kwargs = {k: v.to(dtype) if k in self.info.constants and isinstance(v, torch.Tensor) else v
                      for k, v in kwargs.items()}
        return Call(self.info, tuple(convert(t) for t in self.primals), self.names, kwargs)

    def __repr__(self):
        shapes = ", ".join(f"{n}{list(t.shape)}" for n, t in zip(("x", *self.names), self.primals))
        return f"{self.info.name}({shapes}, {self.kwargs})"


def _draw_like(x, gen, scale=1.0, shape=None):
    """randn · scale in x's dtype (the default float dtype beside an integer x, whose op then refuses it)."""
    dtype = x.dtype if x.is_floating_point() or x.is_complex() else torch.get_default_dtype()
    return (torch.randn(x.shape if shape is None else shape, generator=gen, dtype=torch.float64) * scale).to(
        dtype=dtype, device=x.device)


def _draw_params(names):
    """weight and bias, where the variant asks for them: randn around 1 (weight) and 0 (bias), shaped like the
    normalized dims."""
    def draw(x, kwargs, gen):
        shape = kwargs["normalized_shape"]
        out = {}
        for name in names:
            if kwargs.get(name) is SAMPLED:
                out[name] = _draw_like(x, gen, 0.5, shape) + (1 if name == "weight" else 0)
        return out

    return draw


def _draw_up(x, kwargs, gen):
    return {"up": _draw_like(x, gen, 2.0)}


def _targets(rows_shape, classes, kwargs, gen, device):
    """Class indices for rows of logits, with about a quarter of them the ignore_index (a class, when the
    variant ignores one) so that every default call also ignores rows."""
    t = torch.randint(0, max(classes, 1), rows_shape, generator=gen)
    ignored = torch.rand(rows_shape, generator=gen) < 0.25
    if classes > 0 and t.numel() > 1:
        t = torch.where(ignored, kwargs.get("ignore_index", IGNORE_INDEX), t)
    return t.to(device)


def _class_weights(x, classes, gen):
    """Class weights for a loss: uniform in [0.25, 2), in x's dtype. None is 0 here: a sample of few rows whose
    counted targets all weigh 0 has a 'mean' of 0/0 (NaN, as torch's); tests/test_loss_options.py holds a class
    of weight 0 and that case."""
    w = torch.rand((classes,), generator=gen, dtype=torch.float64) * 1.75 + 0.25
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    return w.to(dtype=dtype, device=x.device)


def _draw_target(x, kwargs, gen):
    classes = x.shape[1] if x.dim() > 2 else x.shape[-1] if x.dim() else 0
    if x.dim() > 2:  # (N, C, d1, ...): a target per position
        rows = (x.shape[0], *x.shape[2:])
    else:
        rows = x.shape[:-1]
    out = {"target": _targets(rows, classes, kwargs, gen, x.device)}
    if kwargs.get("weight") is SAMPLED:
        out["weight"] = _class_weights(x, classes, gen)
    return out


def _draw_head(x, kwargs, gen):
    """The fused loss's head (VOCAB × hidden), its bias where asked, and targets for x's rows."""
    out = {"weight": _draw_like(x, gen, 1.0 / math.sqrt(max(x.shape[-1], 1)), (VOCAB, x.shape[-1]))}
    if kwargs.get("bias") is SAMPLED:
        out["bias"] = _draw_like(x, gen, 0.5, (VOCAB,))
    out["target"] = _targets(x.shape[:-1], VOCAB, kwargs, gen, x.device)
    if kwargs.get("class_weight") is SAMPLED:
        out["class_weight"] = _class_weights(x, VOCAB, gen)
    return out


def _layer_norm_composite(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """layer_norm in elementary torch ops. torch's F.layer_norm has a wrong forward-over-reverse block: the
    Hessian's ∂²/∂w∂x is wrong when input, weight and bias all carry tangents (torch 2.14, float64; this
    composite and reverse-over-reverse of F.layer_norm agree on it)."""
    dims = tuple(range(-len(normalized_shape), 0))
    mean = input.mean(dims, keepdim=True)
    var = ((input - mean) ** 2).mean(dims, keepdim=True)
    y = (input - mean) / torch.sqrt(var + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def _rms_norm_ref(input, normalized_shape, weight=None, eps=None, offset=0.0, casting_mode="torch"):
    """torch's rms_norm with torch_vjp's options: x̂ scaled by offset + weight; "llama" rounds x̂ to the input dtype
    before the weight multiplies it (transformers' LlamaRMSNorm), "torch" and "gemma" do not."""
    if casting_mode != "llama":
        scale = weight if offset == 0 else (weight + offset if weight is not None else None)
        y = F.rms_norm(input, normalized_shape, scale, eps)
        return y if weight is not None or offset == 0 else y * (1 + offset)
    y = F.rms_norm(input, normalized_shape, None, eps)
    scale = weight if offset == 0 else (weight + offset if weight is not None else 1 + offset)
    return y if scale is None else scale * y


def _add_rms_norm_ref(input, residual, normalized_shape, weight=None, eps=None, offset=0.0, casting_mode="torch"):
    return _rms_norm_ref(residual + input, normalized_shape, weight, eps, offset, casting_mode)


def _add_layer_norm_ref(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(residual + input, normalized_shape, weight, bias, eps)


def _add_layer_norm_exact(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    return _layer_norm_composite(residual + input, normalized_shape, weight, bias, eps)


# The add_* rows compare the normalized output (the registered op's first); s = input + residual and its
# gradient path (grad_sum, fused into the VJP kernel) are tested in tests/test_add_norms.py.
def add_rms_norm_normed(input, residual, normalized_shape, weight=None, eps=None, offset=0.0, casting_mode="torch"):
    return torch_vjp.add_rms_norm(input, residual, normalized_shape, weight, eps, offset, casting_mode)[0]


def add_layer_norm_normed(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    return torch_vjp.add_layer_norm(input, residual, normalized_shape, weight, bias, eps)[0]


def _normed_doc(fn):
    """The row's docstring: the public op's, its first line naming the first output."""
    first, rest = fn.__doc__.strip().split("\n", 1)
    return first.replace(" -> (Tensor, Tensor)", "[0] -> Tensor") + "\n" + rest


add_rms_norm_normed.__doc__ = _normed_doc(torch_vjp.add_rms_norm)
add_layer_norm_normed.__doc__ = _normed_doc(torch_vjp.add_layer_norm)


def _draw_residual(names):
    """The residual, then the parameters the variant asks for. The op rounds s = input + residual to the input
    dtype, as the eager `residual + x` does, and the float64 reference cannot: the residual is x itself, so that
    s = 2x is exact in every dtype and the values test holds the op to the norm's own accuracy (x̂ is then the
    rms_norm and layer_norm rows' on x). tests/test_norm_options.py checks the rounding of s with independent
    residuals, bit for bit against torch's `residual + x`, and the gradients with independent ones in float64."""
    params = _draw_params(names)

    def draw(x, kwargs, gen):
        return {"residual": x.detach().clone(), **params(x, kwargs, gen)}

    return draw


def _swiglu_ref(gate, up):
    return F.silu(gate) * up


def _geglu_ref(gate, up, approximate="tanh"):
    return F.gelu(gate, approximate=approximate) * up


def _cross_entropy_ref(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                       reduction="mean", label_smoothing=0.0, *, softcap=None, lse_square_scale=0.0,
                       return_z_loss=False, token_weight=None, return_token_accuracy=False):
    """The loss options in torch ops over torch's own F.cross_entropy: the loss of softcap·tanh(x/softcap) (in
    the input's dtype, as a user writes it), plus λ·logsumexp² per counted row reduced as the loss; token weights
    multiply the 'none' losses, and 'mean' divides by Σ token_weight·w_t over the rows not ignored; the token
    accuracy is whether argmax(x) is the target, reduced over the rows not ignored, unweighted and detached."""
    if return_token_accuracy and input.is_floating_point():
        out = _cross_entropy_ref(input, target, weight, size_average, ignore_index, reduce, reduction,
                                 label_smoothing, softcap=softcap, lse_square_scale=lse_square_scale,
                                 return_z_loss=return_z_loss, token_weight=token_weight)
        loss = out[0] if return_z_loss else out
        counted = target != ignore_index
        hit = ((input.argmax(0 if input.dim() == 1 else 1) == target) & counted).to(loss.dtype)
        accuracy = hit if reduction == "none" else hit.sum() / counted.sum() if reduction == "mean" else hit.sum()
        return (*out, accuracy) if return_z_loss else (out, accuracy)
    if token_weight is not None and input.is_floating_point():
        per_row = _cross_entropy_ref(input, target, weight, size_average, ignore_index, reduce, "none",
                                     label_smoothing, softcap=softcap, lse_square_scale=lse_square_scale,
                                     return_z_loss=return_z_loss)
        per_row, z = per_row if return_z_loss else (per_row, None)

        def reduced(values):
            v = token_weight.reshape(values.shape)
            weighted = values * v
            if reduction == "none":
                return weighted
            if reduction == "sum":
                return weighted.sum()
            counted = (target != ignore_index).reshape(values.shape)
            row_w = counted.to(values.dtype) if weight is None else torch.where(
                counted, weight.to(values.dtype)[torch.where(counted, target.reshape(values.shape), 0)], 0)
            return weighted.sum() / (row_w * v).sum()
        return (reduced(per_row), reduced(z).detach()) if return_z_loss else reduced(per_row)
    if (softcap or lse_square_scale or return_z_loss) and input.is_floating_point():  # else F.cross_entropy's error
        device_type = input.device.type
        if torch.is_autocast_enabled(device_type):  # the options are part of the loss, which autocast runs in float32
            widen = lambda t: t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t  # noqa
            with torch.autocast(device_type, enabled=False):
                return _cross_entropy_ref(widen(input), target, widen(weight), size_average, ignore_index, reduce,
                                          reduction, label_smoothing, softcap=softcap,
                                          lse_square_scale=lse_square_scale, return_z_loss=return_z_loss)
        class_dim = 0 if input.dim() == 1 else 1
        if softcap:
            input = softcap * torch.tanh(input / softcap)
        loss = _cross_entropy_ref(input, target, weight, size_average, ignore_index, reduce, reduction,
                                  label_smoothing)
        counted = target != ignore_index
        lse = torch.logsumexp(input, class_dim)
        z = torch.where(counted, lse_square_scale * lse * lse, 0).to(loss.dtype)
        if reduction == "mean":
            z = z.sum() / counted.sum()
        elif reduction == "sum":
            z = z.sum()
        loss = loss + z if lse_square_scale else loss
        return (loss, z.detach()) if return_z_loss else loss
    return _cross_entropy_torch(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)


def _cross_entropy_torch(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                         reduction="mean", label_smoothing=0.0):
    """F.cross_entropy; with class weights and label smoothing, torch's own formula for that case
    (cross_entropy_loss_label_smoothing in ATen's LossNLL.cpp) in the same torch ops, but for the masked_select
    of its 'mean' divisor, which vmap refuses: (1 - ε) nll_loss(log_softmax(x), w) + (ε/C) Σ_j -w_j log p_j,
    the latter reduced like the former ('mean': divided by Σ w_t over the rows not ignored).
    tests/test_loss_options.py holds torch_vjp to F.cross_entropy itself outside vmap."""
    if weight is None or not label_smoothing > 0 or size_average is not None or reduce is not None:
        return F.cross_entropy(input, target, weight=weight, size_average=size_average, ignore_index=ignore_index,
                               reduce=reduce, reduction=reduction, label_smoothing=label_smoothing)
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):  # torch's cross_entropy is on autocast's float32 lists
        widen = lambda t: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t  # noqa: E731
        with torch.autocast(device_type, enabled=False):
            return _cross_entropy_torch(widen(input), target, widen(weight), ignore_index=ignore_index,
                                        reduction=reduction, label_smoothing=label_smoothing)
    class_dim = 0 if input.dim() == 1 else 1
    log_p = F.log_softmax(input, class_dim)
    nll = F.nll_loss(log_p, target, weight, ignore_index=ignore_index, reduction=reduction)
    shape = [1] * input.dim()
    shape[class_dim] = weight.shape[0]
    ignored = target == ignore_index
    smooth = (-(log_p * weight.view(shape)).sum(class_dim)).masked_fill(ignored, 0.0)
    if reduction == "mean":
        picked = weight.gather(0, target.masked_fill(ignored, 0).flatten()).view(target.shape)
        smooth = smooth.sum() / picked.masked_fill(ignored, 0).sum()
    elif reduction == "sum":
        smooth = smooth.sum()
    return (1 - label_smoothing) * nll + smooth * (label_smoothing / input.shape[class_dim])


def _fused_ref(input, weight, target, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
               class_weight=None, softcap=None, lse_square_scale=0.0, return_z_loss=False, token_weight=None,
               return_token_accuracy=False):
    return _cross_entropy_ref(F.linear(input, weight, bias), target, weight=class_weight, ignore_index=ignore_index,
                              reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
                              lse_square_scale=lse_square_scale, return_z_loss=return_z_loss,
                              token_weight=token_weight, return_token_accuracy=return_token_accuracy)


def _fused_unfused(input, weight, target, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                   class_weight=None, softcap=None, lse_square_scale=0.0, return_z_loss=False, token_weight=None,
                   return_token_accuracy=False):
    return torch_vjp.cross_entropy(F.linear(input, weight, bias), target, weight=class_weight, ignore_index=ignore_index,
                                   reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
                                   lse_square_scale=lse_square_scale, return_z_loss=return_z_loss,
                                   token_weight=token_weight, return_token_accuracy=return_token_accuracy)


def _draw_rope(x, kwargs, gen):
    """k, cos and sin for queries x (..., D), and unsqueeze_dim where the variant's does not fit x's rank (a 2-D x
    takes 0). Rotary dim R = D rounded down to even: odd head dims (33, 1025, 7) pass their last element
    through (partial rotary), even ones rotate whole. cos and sin are drawn freely (the op is defined for any
    tables, not only duplicated cos θ, sin θ). From rank 3, k has one head where x has several (the dim cos
    and sin broadcast over: multi-query attention); from rank 4, cos and sin are shared by the batch (size 1
    at dim 0)."""
    rank = x.dim()
    u = kwargs.get("unsqueeze_dim", 1)
    drawn = {}
    if not (rank >= 2 and -rank <= u < rank and u % rank != rank - 1):
        u = drawn["unsqueeze_dim"] = 0
    u %= rank
    rotary = x.shape[-1] - x.shape[-1] % 2 if rank else 0
    lead = [n for d, n in enumerate(x.shape[:-1]) if d != u]
    if rank >= 4 and u != 0:
        lead[0] = 1
    k_shape = list(x.shape)
    if rank >= 3:
        k_shape[u] = 1
    drawn.update(k=_draw_like(x, gen, 1.0, k_shape), cos=_draw_like(x, gen, 1.0, (*lead, rotary)),
                 sin=_draw_like(x, gen, 1.0, (*lead, rotary)))
    return drawn


def _row(name, op, ref, family, **kw):
    return OpInfo(name, op, ref, family, registered=(name, name + "_backward"), **kw)


def _pin_eps(kwargs, dtype):
    """rms_norm's default eps depends on the dtype: made explicit, so that a cast call computes the same function."""
    return {"eps": torch.finfo(dtype).eps, **{k: v for k, v in kwargs.items() if v is not None}}


_AFFINE = ({}, {"weight": SAMPLED}, {"weight": SAMPLED, "bias": SAMPLED}, {"bias": SAMPLED, "eps": 1e-3})

OPS = [
    _row("exp", torch_vjp.exp, torch.exp, "elementwise"),
    _row("sigmoid", torch_vjp.sigmoid, torch.sigmoid, "elementwise", scale=4.0),
    _row("tanh", torch_vjp.tanh, torch.tanh, "elementwise", scale=2.0),
    _row("softplus", torch_vjp.softplus, F.softplus, "elementwise", scale=4.0,
         variants=({}, {"beta": 2.0, "threshold": 5.0}, {"beta": 0.5})),
    _row("gelu", torch_vjp.gelu, F.gelu, "elementwise", scale=3.0,
         variants=({}, {"approximate": "tanh"})),
    _row("silu", torch_vjp.silu, F.silu, "elementwise", scale=4.0),
    _row("mish", torch_vjp.mish, F.mish, "elementwise", scale=4.0),
    _row("softmax", torch_vjp.softmax, F.softmax, "softmax", scale=3.0),
    _row("log_softmax", torch_vjp.log_softmax, F.log_softmax, "softmax", scale=3.0),
    _row("logsumexp", torch_vjp.logsumexp, torch.logsumexp, "softmax", scale=3.0, keepdim=True),
    # Normalization: with and without weight and bias (the bias alone with another eps). Inputs of mean 0
    # and spread 2; tests/test_accuracy.py holds the mean-1e4 case.
    _row("layer_norm", torch_vjp.layer_norm, F.layer_norm, "norm", scale=2.0, variants=_AFFINE,
         draw=_draw_params(("weight", "bias")), shared=("weight", "bias"), exact_ref=_layer_norm_composite,
         bench=_AFFINE[2]),
    # rms_norm's options: Gemma's offset (scale by 1 + w), Llama's casting (x̂ rounded before the weight), and an
    # offset with no weight (scale 1 + offset).
    _row("rms_norm", torch_vjp.rms_norm, _rms_norm_ref, "norm", scale=2.0,
         variants=({}, {"weight": SAMPLED}, {"weight": SAMPLED, "eps": 1e-3}, {"weight": SAMPLED, "offset": 1.0},
                   {"weight": SAMPLED, "casting_mode": "llama"}, {"offset": 0.5, "casting_mode": "gemma"}),
         draw=_draw_params(("weight",)), shared=("weight",), bench={"weight": SAMPLED}, pin=_pin_eps),
    # residual + input, then the norm: the rows' output is the normalized one (add_*_normed).
    _row("add_layer_norm", add_layer_norm_normed, _add_layer_norm_ref, "norm", scale=2.0,
         variants=({}, {"weight": SAMPLED, "bias": SAMPLED}), draw=_draw_residual(("weight", "bias")),
         shared=("weight", "bias"), exact_ref=_add_layer_norm_exact, bench={"weight": SAMPLED, "bias": SAMPLED}),
    _row("add_rms_norm", add_rms_norm_normed, _add_rms_norm_ref, "norm", scale=2.0,
         variants=({}, {"weight": SAMPLED}, {"weight": SAMPLED, "offset": 1.0},
                   {"weight": SAMPLED, "casting_mode": "llama"}),
         draw=_draw_residual(("weight",)), shared=("weight",), bench={"weight": SAMPLED}, pin=_pin_eps),
    _row("normalize", torch_vjp.normalize, F.normalize, "norm", scale=2.0, variants=({}, {"eps": 0.5})),
    # Gated: the gate's spread reaches silu's and gelu's tails; up is drawn like the gate.
    _row("swiglu", torch_vjp.swiglu, _swiglu_ref, "gated", scale=3.0, draw=_draw_up,
         unfused=lambda gate, up: torch_vjp.silu(gate) * up),
    _row("geglu", torch_vjp.geglu, _geglu_ref, "gated", scale=3.0, variants=({}, {"approximate": "none"}),
         draw=_draw_up, unfused=lambda gate, up, approximate="tanh": torch_vjp.gelu(gate, approximate) * up),
    # Losses: every reduction, label smoothing with each, and a class that is ignored (drawn targets carry
    # ignore_index in a quarter of the rows, so the defaults ignore rows too). Class weights (one class of
    # weight 0) with each reduction, with and without smoothing: without it the kernels run unweighted and the
    # frontend scales rows by w_t; with it the kernels' weighted variants run.
    _row("cross_entropy", torch_vjp.cross_entropy, _cross_entropy_ref, "loss", scale=3.0,
         variants=({}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.1},
                   {"reduction": "none", "label_smoothing": 0.3}, {"ignore_index": 1, "reduction": "sum"},
                   {"weight": SAMPLED}, {"weight": SAMPLED, "reduction": "none"},
                   {"weight": SAMPLED, "label_smoothing": 0.2},
                   {"weight": SAMPLED, "reduction": "sum", "label_smoothing": 0.1},
                   {"softcap": 4.0}, {"softcap": 2.5, "reduction": "none", "label_smoothing": 0.1},
                   {"weight": SAMPLED, "softcap": 3.0, "label_smoothing": 0.2}, {"lse_square_scale": 0.01},
                   {"lse_square_scale": 0.1, "softcap": 3.0, "reduction": "none"}),
         draw=_draw_target, shared=("weight",), constants=("weight",)),
    _row("fused_linear_cross_entropy", torch_vjp.fused_linear_cross_entropy, _fused_ref, "loss", scale=3.0,
         variants=({}, {"bias": SAMPLED}, {"reduction": "sum", "label_smoothing": 0.1},
                   {"reduction": "none", "bias": SAMPLED}, {"reduction": "none", "label_smoothing": 0.2},
                   {"ignore_index": 1}, {"class_weight": SAMPLED},
                   {"class_weight": SAMPLED, "reduction": "none", "label_smoothing": 0.2},
                   {"class_weight": SAMPLED, "bias": SAMPLED, "label_smoothing": 0.1},
                   {"softcap": 4.0, "bias": SAMPLED}, {"softcap": 2.5, "reduction": "none"},
                   {"lse_square_scale": 0.01, "label_smoothing": 0.1},
                   {"lse_square_scale": 0.1, "softcap": 3.0, "reduction": "sum"},
                   {"class_weight": SAMPLED, "softcap": 3.0, "label_smoothing": 0.1}),
         draw=_draw_head, shared=("weight", "bias", "class_weight"), scaled_grads=True, unfused=_fused_unfused,
         constants=("class_weight",)),
    # Rotary embedding of q and k: transformers' layouts (B, H, S, D) with unsqueeze_dim 1 and (B, S, H, D) with 2,
    # and a broadcast over the dim before last; partial rotary on odd head dims; cos and sin shared by samples.
    _row("rope", torch_vjp.rope, _rope_reference, "rope", draw=_draw_rope, shared=("cos", "sin"),
         variants=({}, {"unsqueeze_dim": 2}, {"unsqueeze_dim": -2}), outputs=2),
]
OPS_BY_NAME = {info.name: info for info in OPS}
FAMILIES = ("elementwise", "softmax", "norm", "gated", "loss", "rope")


def dim_calls(info: OpInfo, ndim: int, **variant) -> list[dict]:
    """The calls an input of rank ndim is tried with: every dim (and keepdim) along which a softmax-family op
    or normalize runs, every count of trailing dims a norm normalizes over, else the one call."""
    keepdims = [False, True] if info.keepdim else [False]
    if info.has_dim:
        return [dict(dim=d, keepdim=k, **variant) for d in range(-max(ndim, 1), max(ndim, 1)) for k in keepdims]
    if info.has_normalized_shape:
        return [dict(normalized_dims=k, **variant) for k in range(1, ndim + 1)]
    return [dict(variant)]


def sample_shapes(info: OpInfo) -> list[tuple]:
    """Per-sample shapes a row's op is batched over by vmap: ranks 0-3 (a norm: 1-3; cross_entropy: (C,) and
    (N, C), as the registered op takes them; the fused loss: (N, H))."""
    if info.name == "fused_linear_cross_entropy":
        return [(3, 4)]
    if info.family == "loss":
        return [(5,), (3, 4)]
    if info.family == "rope":  # rows of a head dim and a dim for cos and sin to broadcast over, at least
        return [(3, 4), (2, 3, 6), (2, 2, 3, 5)]
    if info.has_normalized_shape:
        return [(5,), (3, 4), (2, 3, 4)]
    return [(), (5,), (3, 4), (2, 3, 4)]


@dataclass
class Batch:
    """`size` calls of a row's op on samples of one shape, as vmap sees them: `args` (the primals, then the
    non-floating tensors such as targets), each stacked along its `in_dims` entry (None: shared by every
    sample, a parameter), and `fn(kind)`, the per-sample function of those args ("op", "ref", "raw", "exact")."""
    calls: list
    args: tuple
    in_dims: tuple
    keys: tuple  # the keyword of each arg after x; None: a primal passed positionally by its Call

    def fn(self, kind: str) -> Callable:
        template = self.calls[0]
        n = len(template.primals)

        def per_sample(*args):
            kwargs = dict(template.kwargs, **{k: a for k, a in zip(self.keys[n:], args[n:])})
            return getattr(Call(template.info, args[:n], template.names, kwargs), kind)(*args[:n])

        return per_sample


def batch_of_calls(info: OpInfo, sample_shape, size: int, dtype, device, in_dim: int = 0, seed: int = 0,
                   batch_shared: bool = False, **call) -> Batch:
    """`size` samples of sample_shape, each with its own drawn tensors, stacked for vmap: x (and tensors
    shaped like it, an up projection) along in_dim, other per-sample tensors (targets) along 0, a shared
    parameter not at all (unless batch_shared: one per sample, along 0)."""
    calls = [info.call(sample(info, sample_shape, dtype, device, seed + i), seed=seed + i, **call) for i in range(size)]
    c0 = calls[0]
    tensor_kwargs = [k for k, v in c0.kwargs.items() if isinstance(v, torch.Tensor)]
    keys = (None, *c0.names, *tensor_kwargs)
    args, in_dims = [], []
    for slot, key in enumerate(keys):
        per = [c.primals[slot] if slot < len(c0.primals) else c.kwargs[key] for c in calls]
        if key in info.shared and not batch_shared:
            args.append(per[0])
            in_dims.append(None)
            continue
        dim = in_dim if per[0].shape == c0.x.shape else 0
        args.append(torch.stack(per, dim))
        in_dims.append(dim)
    return Batch(calls, tuple(args), tuple(in_dims), keys)


@dataclass(frozen=True)
class ModuleInfo:
    module: type  # torch_vjp.nn.<Name>
    ref: type  # torch.nn.<Name>, which it subclasses
    op: str  # the OPS row it calls
    constructions: tuple[dict, ...] = ({},)  # constructor keyword arguments to try


MODULES = [
    ModuleInfo(torch_vjp.nn.Softmax, torch.nn.Softmax, "softmax", ({"dim": -1}, {"dim": 0}, {})),
    ModuleInfo(torch_vjp.nn.LogSoftmax, torch.nn.LogSoftmax, "log_softmax", ({"dim": 1}, {})),
    ModuleInfo(torch_vjp.nn.GELU, torch.nn.GELU, "gelu", ({}, {"approximate": "tanh"})),
    ModuleInfo(torch_vjp.nn.SiLU, torch.nn.SiLU, "silu", ({}, {"inplace": True})),
    ModuleInfo(torch_vjp.nn.Mish, torch.nn.Mish, "mish", ({}, {"inplace": True})),
    ModuleInfo(torch_vjp.nn.Softplus, torch.nn.Softplus, "softplus", ({}, {"beta": 2.0, "threshold": 5.0})),
    ModuleInfo(torch_vjp.nn.Tanh, torch.nn.Tanh, "tanh"),
    ModuleInfo(torch_vjp.nn.Sigmoid, torch.nn.Sigmoid, "sigmoid"),
    ModuleInfo(torch_vjp.nn.LayerNorm, torch.nn.LayerNorm, "layer_norm",
               ({"normalized_shape": 5}, {"normalized_shape": (4, 5), "eps": 1e-3},
                {"normalized_shape": [5], "elementwise_affine": False}, {"normalized_shape": 5, "bias": False})),
    ModuleInfo(torch_vjp.nn.RMSNorm, torch.nn.RMSNorm, "rms_norm",
               ({"normalized_shape": 5}, {"normalized_shape": (4, 5), "eps": 1e-3},
                {"normalized_shape": 5, "elementwise_affine": False})),
    ModuleInfo(torch_vjp.nn.CrossEntropyLoss, torch.nn.CrossEntropyLoss, "cross_entropy",
               ({}, {"reduction": "sum", "label_smoothing": 0.1}, {"reduction": "none", "ignore_index": 1},
                {"weight": torch.tensor([0.5, 1.5, 2.0])}, {"weight": torch.tensor([0.5, 1.5, 2.0]), "label_smoothing": 0.2})),
]


def op_variants(families=FAMILIES):
    """(OpInfo, variant kwargs) pairs as pytest params with readable ids. pytest is imported here, not at
    the top: the benchmarks import this table and must not need the test dependencies."""
    import pytest

    cases = []
    for info in OPS:
        if info.family not in families:
            continue
        for variant in info.variants:
            suffix = "-".join(f"{k}={v}" for k, v in variant.items())
            cases.append(pytest.param(info, variant, id=f"{info.name}{'-' + suffix if suffix else ''}"))
    return cases


def sample(info: OpInfo, shape, dtype, device="cpu", generator_seed=0):
    """Fresh random input: randn · scale, never all zeros."""
    g = torch.Generator().manual_seed(generator_seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * info.scale).to(dtype=dtype, device=device)
