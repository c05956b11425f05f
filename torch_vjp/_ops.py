"""The autograd glue every op shares: how a call reaches the kernels, and how autograd differentiates it.

Each op is two registered C++ ops, `torch_vjp::<name>` and `torch_vjp::<name>_backward` (the VJP). A
family module describes the op once (`VJPOp`: what the VJP op needs saved and how it is called, the
forward-mode formula, the second-order formulas); everything else is made here, the same way for every op
and for its VJP op.

An op takes one or several tensor arguments (anywhere in its schema; optional ones may be None; some, such
as a class-index target, are not differentiable) and returns one public output (or several: rope's q and k,
`VJPOp.public_outputs`), optionally followed by
extra outputs the public function does not return: statistics its VJP reuses (a norm's mean and rstd: they
are differentiable outputs, so that the second derivative through them is exact) or caches (gradients
computed in the forward pass: not differentiable). The Functions take the registered op's arguments in its
schema's order and return all its outputs.

A call takes the cheapest path that is exact for what is active (`VJPOp.call`, `_Paths.__call__`):

1. **direct**: nothing needs a graph (grad mode off, or no input requires grad) and no torch.func
   transform or forward-AD level is active: the op below autograd, one pybind11 call
   (`torch_vjp._direct`, csrc/python/direct.cpp).
2. **eager**: a graph is recorded, no transform is active: a lean old-style `autograd.Function` (a
   new-style one pays ~12 µs a call binding default arguments for `setup_context`). Its backward calls
   the VJP op directly, or, under `create_graph`, differentiably (the VJP op's own Function).
3. **transforms** (torch.func, forward AD): a new-style Function with `setup_context`, `jvp` and `vmap`,
   which torch.func requires. The VJP op's Function has a `jvp` too, so forward-over-reverse
   (`torch.func.hessian`, `jvp(grad(f))`) is exact.
4. **torch.compile, torch.export, torch.jit.trace**: the registered op itself: one opaque node with a fake kernel for
   Dynamo (which refuses a Function that has a `jvp`), one recorded op for the tracer. AOTAutograd and a
   loaded trace differentiate it through the op's Autograd kernel (below). Except under torch.compile where
   the compile policy (torch_vjp/compile_policy.py, measured per op and backend) gives the op to inductor as
   its torch-ops form (`VJPOp.decomposition`), which inductor fuses with the op's neighbours.

The Functions are also the registered ops' Autograd kernels, so `torch.ops.torch_vjp.*` is differentiable
by itself (and passes `torch.library.opcheck`). Every op and its Functions get a vmap rule
(`torch.library.register_vmap`), so `vmap` and `jacrev` run one batched call, not a per-sample loop.
Autocast follows torch's policy for the op's counterpart (`VJPOp.autocast`), registered at the Autocast
key for the registered op and applied before the Functions for the public call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.autograd.forward_ad as _forward_ad
from torch.autograd import Function

from . import _direct, compile_policy
from ._extension import backends, cuda_missing_error  # loading the libraries registers torch.ops.torch_vjp.*

LIB = torch.library.Library("torch_vjp", "IMPL")
ops = torch.ops.torch_vjp
REGISTRY: dict[str, "VJPOp"] = {}  # name -> VJPOp, every op of the library

_below_autograd = torch._C._AutoDispatchBelowAutograd
_functorch_active = torch._C._are_functorch_transforms_active
_is_compiling = torch.compiler.is_compiling
_tracing_state = torch._C._get_tracing_state
_grad_enabled = torch.is_grad_enabled
_any_autocast = torch._C._is_any_autocast_enabled
_Tensor = torch.Tensor


def transforms_active() -> bool:
    """A torch.func transform or a forward-AD level (torch.autograd.forward_ad.dual_level) is active."""
    return _functorch_active() or _forward_ad._current_level >= 0


def wrap_dim(dim: int, ndim: int, op: str) -> int:
    """torch's dim rule (a 0-d tensor accepts -1 and 0), with torch's IndexError."""
    rank = max(ndim, 1)
    if not -rank <= dim < rank:
        raise IndexError(
            f"torch_vjp.{op}: Dimension out of range (expected to be in range of [{-rank}, {rank - 1}], "
            f"but got {dim})"
        )
    return dim % rank


_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def compute_type(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation type (at::opmath_type): float32 for half types."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_floating(t: torch.Tensor, op: str, arg: str) -> None:
    """Mirrors csrc/common/checks.h, for fake tensors (torch.compile, meta)."""
    if t.dtype not in _FLOATING:
        raise TypeError(f"torch_vjp.{op}: expected {arg} to be float32, float64, float16 or bfloat16, got {t.dtype}")


def check_same(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str, op: str, shape: bool = True) -> None:
    """Mirrors csrc/common/checks.h (check_like / check_same), for fake tensors."""
    if a.device != b.device:
        raise RuntimeError(f"torch_vjp.{op}: expected {a_name} and {b_name} on the same device, got {a.device} and {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"torch_vjp.{op}: expected {a_name} and {b_name} to have the same dtype, got {a.dtype} and {b.dtype}")
    if shape and a.shape != b.shape:
        raise RuntimeError(f"torch_vjp.{op}: expected {a_name} of shape {list(b.shape)} (the shape of {b_name}), got {list(a.shape)}")


# ---------------------------------------------------------------------------------------------------------
# Calling a registered op below autograd.

_ARG_CODES = {"Tensor": "T", "float": "f", "int": "i", "bool": "b", "str": "s"}


def _below(op_name: str, n_tensors: int, keep_layout: bool) -> Callable:
    """torch_vjp::<op_name> called below autograd: the direct binding for its signature, else torch.ops
    under the guard (a schema the binding does not list). keep_layout: see _keep_layout."""
    overload = getattr(ops, op_name).default
    codes = [_ARG_CODES.get(str(arg.type)) for arg in overload._schema.arguments]
    fn = None if None in codes else _direct.make(op_name, "".join(codes), keep_layout)
    if fn is not None:
        return fn

    def call(*args):
        with _below_autograd():
            return overload(*args)

    return _keep_layout(call, n_tensors) if keep_layout else call


def _stride_order(t: torch.Tensor):
    """The permutation that sorts t's dims by decreasing stride (the order TensorIterator gives an
    elementwise op's output), or None where it is the identity."""
    if t.is_contiguous():
        return None
    perm = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return None if perm == list(range(t.dim())) else perm


def _keep_layout(call: Callable, n_tensors: int) -> Callable:
    """An elementwise op's call made to keep the memory format of its last tensor argument (the input, or
    the VJP op's saved tensor): channels-last stays channels-last, a transpose stays transposed, as torch's
    elementwise ops do. The kernels work on contiguous memory: the tensors are permuted so that it is
    (made) contiguous, and back. (The direct binding does the same in C++: csrc/python/direct.cpp.)"""
    like = n_tensors - 1

    def keeping(*args):
        perm = _stride_order(args[like])
        if perm is None:
            return call(*args)
        inverse = sorted(range(len(perm)), key=perm.__getitem__)
        permuted = [a.permute(perm) for a in args[:n_tensors]]
        return call(*permuted, *args[n_tensors:]).permute(inverse)

    return keeping


# ---------------------------------------------------------------------------------------------------------
# The op description a family gives.

def _is_tensor(arg) -> bool:
    """A schema argument of type Tensor or Tensor?."""
    return str(arg.type) in ("Tensor", "Optional[Tensor]")


# What the VJP op takes after grad_output, for an op of one tensor input and one output.
_SAVED = {
    ("input",): lambda x, y: (x,),
    ("output",): lambda x, y: (y,),
    ("input", "output"): lambda x, y: (x, y),
}


def _default_vjp_args(grad_output, saved, params, needs):
    return (grad_output, *saved, *params)


@dataclass(frozen=True, eq=False)
class VJPOp:
    """One op of the library, as its family describes it.

    Arguments are always in the registered op's schema order. `saved` is what `saves` returned, `params` the
    forward's non-tensor arguments, in order.

    name:          the registered forward op; `name + "_backward"` is its VJP op, b(grad_output, *tensors, *params).
    saves:         for an op of one tensor input and one output: ("input",), ("output",) or ("input", "output"),
                   what its VJP op takes after grad_output. Otherwise (args, outputs) -> the tensors (None
                   allowed) the VJP needs, from the forward's arguments and all its outputs.
    jvp:           (tangents, saved, params) -> the output tangent J·t (forward mode); tangents: one per tensor
                   argument, None where zero. With extra outputs, a tuple: one per output, None where zero.
    vjp_grads:     (g, grad_output, saved, params) -> the VJP op's gradients w.r.t. its tensor arguments
                   (grad_output, *saved), for the cotangent g of its output (a tuple for several): second
                   derivative, reverse mode. None: derived from vjp_ref.
    backward_jvp:  (t_grad_output, t_saved, grad_output, saved, params) -> the VJP op's output tangent,
                   ∂b/∂dy·ṫ_dy + Σ ∂b/∂s·ṫ_s, a tangent None where it is zero: forward-over-reverse. None:
                   derived from vjp_ref.
    vjp_ref:       the VJP op written in torch ops (its arguments, its outputs): vjp_grads and backward_jvp
                   are then its derivatives, taken by torch.func (exact; used for second order only).
    forward_ref:   the forward op written in torch ops, for an op with an optional output (see _Paths.register).
    vjp_args:      (grad_output, saved, params, needs) -> the VJP op's arguments; default
                   (grad_output, *saved, *params). needs: per tensor argument, whether its gradient is wanted.
                   The VJP op returns the gradients of the differentiable tensor arguments, in order.
    nondifferentiable: names of tensor arguments that get no gradient (a class-index target).
    extras_vjp:    an op whose extra outputs are statistics: (their gradients, None where absent, saved,
                   params) -> the contributions to the gradients of the tensor arguments (None where zero).
    cached_vjp:    an op whose extra outputs are caches (not differentiable): (grad_output, saved, params) ->
                   the gradients of the tensor arguments from what the forward cached, or None when it cached
                   nothing. Used where the gradient is not differentiated further; elsewhere the VJP op runs.
    vmap, backward_vmap: (call, info, in_dims, *args) -> (output, out_dims): the batching rule of the
                   forward / VJP op, calling `call` (the registered op or a Function's apply), where the
                   default (every tensor's batch dim moved to the front, one call) would mix samples.
    dim_param:     index into params of a `dim` argument (the default vmap rule moves it); None if absent.
    keepdim_param: index into params of a `keepdim` argument; None if absent.
    elementwise:   the output keeps the input's memory format (the kernels are layout-free maps).
    autocast:      {device type: torch's autocast policy for the op's counterpart}, from torch's lists
                   (ATen/autocast_mode.h): "fp32" casts float16/bfloat16 tensors to float32,
                   "lower_precision_fp" casts float32 tensors to the autocast dtype. Devices absent run the op
                   in its input's dtype, as torch does for counterparts on none of its lists.
    autocast_output: under autocast, the public output's dtype, where the counterpart's differs from the
                   kernel's ("fp32": the counterpart ends in an op of the "fp32" list).
    autocast_keep: names of tensor arguments autocast leaves as they are (the fused loss's class weights, which
                   torch's linear + cross_entropy apply in float32 after the lower-precision product).
    decomposition: the public op in torch ops (the registered op's arguments -> its public output(s)), with the
                   kernels' precision rules: what torch.compile traces where compile_policy.py says inductor's
                   fusion of it with its neighbours beats the opaque kernel. None: always the kernel.
    public_outputs: how many leading outputs the public op returns (a tuple when more than one: rope's q and k,
                   add_rms_norm's y and s). The VJP op then gets their gradients as a tuple in vjp_args'
                   grad_output, None where an output took no part in the loss, and jvp returns one tangent per
                   output.
    vjp_results:   the VJP op's outputs -> one gradient per differentiable tensor argument, where they are not
                   the same list (add_rms_norm: the gradient of s is that of input and of residual).
    integers:      what the public op does with an integer or bool input, as its counterpart does:
                   "promote" (to the default float dtype) or "error": integer_error (NotImplementedError), or
                   a function of the arguments giving the error type where torch's depends on them.
    """

    name: str
    saves: tuple[str, ...] | Callable
    jvp: Callable
    vjp_grads: Callable | None = None
    backward_jvp: Callable | None = None
    vjp_ref: Callable | None = None
    forward_ref: Callable | None = None
    vjp_args: Callable = _default_vjp_args
    nondifferentiable: tuple[str, ...] = ()
    extras_vjp: Callable | None = None
    cached_vjp: Callable | None = None
    vmap: Callable | None = None
    backward_vmap: Callable | None = None
    dim_param: int | None = None
    keepdim_param: int | None = None
    elementwise: bool = False
    autocast: dict = field(default_factory=dict)
    autocast_output: str | None = None
    autocast_keep: tuple[str, ...] = ()
    public_outputs: int = 1
    integers: str = "error"
    integer_error: type | Callable = NotImplementedError
    decomposition: Callable | None = None
    vjp_results: Callable | None = None

    def __post_init__(self):
        if self.vjp_ref is not None:
            grads, tangent = _derived_from(self.vjp_ref)
            object.__setattr__(self, "vjp_grads", self.vjp_grads or grads)
            object.__setattr__(self, "backward_jvp", self.backward_jvp or tangent)
        if self.vjp_grads is None or self.backward_jvp is None:
            raise ValueError(f"torch_vjp.{self.name}: give vjp_grads and backward_jvp, or vjp_ref")
        forward = _Paths(self, self.name)
        backward = _Paths(self, self.name + "_backward")
        forward.make_functions(backward)
        backward.make_functions(None)
        object.__setattr__(self, "_forward", forward)
        object.__setattr__(self, "backward", backward)  # the VJP op, called differentiably
        object.__setattr__(self, "call", self._make_call())
        REGISTRY[self.name] = self
        for paths in (forward, backward):
            paths.register()
        for device_type, policy in self.autocast.items():
            _register_autocast(self.name, device_type, policy, self.autocast_output, self._autocast_kept())

    def __call__(self, *args):
        """The public op: the registered op's arguments, positionally (checked by the caller); its public output."""
        return self.call(*args)

    @property
    def forward(self) -> "_Paths":
        """The forward op's paths (`forward.lean`, `forward.func`, `forward.below`: all of its outputs)."""
        return self._forward

    def vjp_call_args(self, args, outputs, grad_output, needs=None) -> tuple:
        """The VJP op's arguments for the forward call `args` (schema order) that gave `outputs` (all of
        them), and grad_output; needs: per tensor argument, default every differentiable one."""
        forward = self._forward
        if needs is None:
            needs = tuple(args[i] is not None and i not in forward.nondiff for i in forward.tensors)
        saved = forward.save(tuple(args), outputs if isinstance(outputs, tuple) else (outputs,))
        return tuple(self.vjp_args(grad_output, tuple(saved), tuple(args[i] for i in forward.params_at), needs))

    def _make_call(self):
        """`call`, the public op's per-call path choice (module docstring), with what it needs bound as locals:
        it runs on every call."""
        forward, name, casts = self._forward, self.name, bool(self.autocast)
        traceable, func_apply, lean_apply, below = forward.traceable, forward.func.apply, forward.lean.apply, forward.below
        integral_input, autocast_args = self.integral_input, self.autocast_args
        compiled = self._compiled_call()

        if forward.simple:  # one tensor input, one output: the hot path of most ops, written out
            def call(input, *params):
                if not isinstance(input, _Tensor):
                    raise TypeError(f"torch_vjp.{name}(): argument 'input' must be Tensor, not {type(input).__name__}")
                if not input.is_floating_point():
                    input = integral_input(input)
                if _is_compiling():
                    return compiled(input, *params)
                if _tracing_state() is not None:
                    return traceable(input, *params)
                if casts and _any_autocast():
                    input = autocast_args((input, *params))[0]
                if _functorch_active() or _forward_ad._current_level >= 0:
                    return func_apply(input, *params)
                if input.requires_grad and _grad_enabled():
                    return lean_apply(input, *params)
                return below(input, *params)

            return call

        tensors, first = forward.tensors, forward.arg_names[0]
        n_public = self.public_outputs
        public = self._public()
        cast_output = self.cast_output
        optional_outputs = any(str(ret.type) != "Tensor" for ret in forward.overload._schema.returns)

        def call(*args):
            input = args[0]
            if not isinstance(input, _Tensor):
                raise TypeError(f"torch_vjp.{name}(): argument '{first}' must be Tensor, not {type(input).__name__}")
            if not input.is_floating_point():
                args = (integral_input(input, args), *args[1:])
            if optional_outputs and _tracing_state() is not None:
                raise RuntimeError(
                    f"torch.jit.trace cannot record torch_vjp.{name}: its registered op returns optional tensors, "
                    f"which TorchScript does not support; use torch.export or torch.compile")
            if _is_compiling():
                return compiled(*args)
            if _tracing_state() is not None:
                return public(traceable(*args))
            if casts and _any_autocast():
                output = public(_dispatch(autocast_args(args)))
                if n_public > 1:
                    return tuple(cast_output(o, input.device.type) for o in output)
                return cast_output(output, input.device.type)
            return public(_dispatch(args))

        refuse = forward.refuse_constant_gradients

        def _dispatch(args):
            if _functorch_active() or _forward_ad._current_level >= 0:
                refuse(args)
                return func_apply(*args)
            if _grad_enabled() and any(args[i] is not None and args[i].requires_grad for i in tensors):
                refuse(args)
                return lean_apply(*args)
            return below(*args)

        return call

    def _public(self) -> Callable:
        """The registered op's outputs -> the public op's: all of one output, the first, or the first
        `public_outputs` as a tuple."""
        n_public = self.public_outputs
        if self._forward.n_outputs == 1:
            return lambda output: output
        return (lambda outputs: outputs[0]) if n_public == 1 else (lambda outputs: tuple(outputs[:n_public]))

    def _compiled_call(self):
        """The call under torch.compile (traced by Dynamo, so this runs once per compiled graph): the
        decomposition where the compile policy picks it for the input's device, else the registered op. Never
        under torch.export: an exported program keeps the op (and its kernels)."""
        traceable, decomposition, name = self._forward.traceable, self.decomposition, self.name
        public = self._public()

        def compiled(*args):
            if (decomposition is not None and not torch.compiler.is_exporting()
                    and compile_policy.decomposes(name, args[0].device.type)):
                return decomposition(*args)
            return public(traceable(*args))

        return compiled

    def integral_input(self, input: torch.Tensor, args: tuple = ()) -> torch.Tensor:
        """torch's rule for an integer or bool input (see `integers`). A complex input goes on to the kernels'
        TypeError: torch_vjp has no complex kernels."""
        if input.is_complex():
            return input
        if self.integers == "promote":
            return input.to(torch.get_default_dtype())
        error = self.integer_error if isinstance(self.integer_error, type) else self.integer_error(args)
        raise error(
            f"torch_vjp.{self.name}: not implemented for {input.dtype} input (as torch's counterpart, which only "
            f"computes it for floating types); cast the input to a floating dtype first")

    def _autocast_kept(self) -> frozenset:
        """Positions of the arguments autocast leaves as they are (autocast_keep)."""
        names = [a.name for a in getattr(ops, self.name).default._schema.arguments]
        return frozenset(names.index(n) for n in self.autocast_keep)

    def autocast_args(self, args: tuple) -> tuple:
        """The arguments as torch's autocast policy for this op would give them to the kernel."""
        input = args[0]
        device_type = input.device.type
        policy = self.autocast.get(device_type)
        if policy is None or not torch.is_autocast_enabled(device_type):
            return args
        cast = _autocast_cast(policy, device_type)
        if self.autocast_keep:
            kept = self._autocast_kept()
            return tuple(a if i in kept else cast(a) for i, a in enumerate(args))
        return tuple(cast(a) for a in args)

    def cast_output(self, output, device_type: str):
        """The public output as torch's counterpart gives it under the device's autocast (`autocast_output`)."""
        if (self.autocast_output == "fp32" and output.dtype in (torch.float16, torch.bfloat16)
                and device_type in self.autocast and torch.is_autocast_enabled(device_type)):
            return output.float()
        return output


def _derived_from(ref: Callable):
    """vjp_grads and backward_jvp of a VJP op from `ref`, the same op written in torch ops: its derivatives by
    torch.func, w.r.t. its floating tensor arguments (exact; a gradient or tangent None where zero)."""

    def restricted(tensors, params):
        """ref as a function of its floating tensor arguments alone, returning its non-None outputs; `layout`
        records which outputs are None (once called)."""
        at = [i for i, t in enumerate(tensors) if t is not None and t.is_floating_point()]
        layout = []

        def f(*primals):
            args = list(tensors)
            for i, p in zip(at, primals):
                args[i] = p
            out = ref(*args, *params)
            out = out if isinstance(out, tuple) else (out,)
            layout[:] = [o is None for o in out]
            return tuple(o for o in out if o is not None)

        return f, at, layout

    def vjp_grads(g, grad_output, saved, params):
        tensors = (grad_output, *saved)
        f, at, layout = restricted(tensors, params)
        outs, pull = torch.func.vjp(f, *[tensors[i] for i in at])
        gs = [c for c, none in zip(g if isinstance(g, tuple) else (g,), layout) if not none]
        grads = pull(tuple(torch.zeros_like(o) if c is None else c for o, c in zip(outs, gs)))
        result = [None] * len(tensors)
        for i, grad in zip(at, grads):
            result[i] = grad
        return tuple(result)

    def backward_jvp(t_grad_output, t_saved, grad_output, saved, params):
        tensors, tangents = (grad_output, *saved), (t_grad_output, *t_saved)
        f, at, layout = restricted(tensors, params)
        outs, pull = torch.func.vjp(f, *[tensors[i] for i in at])
        # J·t as the VJP, in u, of the linear map u -> Jᵀu. Reverse mode only, which nests under any level:
        # torch.func.jvp here would be forward AD nested in forward AD, which torch refuses.
        _, pull_of_pull = torch.func.vjp(pull, tuple(torch.zeros_like(o) for o in outs))
        (t_outs,) = pull_of_pull(tuple(torch.zeros_like(tensors[i]) if tangents[i] is None else tangents[i] for i in at))
        t_outs = iter(t_outs)
        result = tuple(None if none else next(t_outs) for none in layout)
        return result if len(result) > 1 else result[0]

    return vjp_grads, backward_jvp


class _Paths:
    """Every way to call one registered op (a forward op or a VJP op): below autograd, through the lean
    or the torch.func Function, or as the registered op (see the module docstring)."""

    def __init__(self, spec: VJPOp, op_name: str):
        self.spec, self.op_name = spec, op_name
        self.packet = getattr(ops, op_name)
        self.overload = self.packet.default
        schema = self.overload._schema
        self.arg_names = tuple(arg.name for arg in schema.arguments)
        self.tensors = tuple(i for i, arg in enumerate(schema.arguments) if _is_tensor(arg))
        self.params_at = tuple(i for i in range(len(schema.arguments)) if i not in self.tensors)
        self.nondiff = frozenset(i for i in self.tensors if self.arg_names[i] in spec.nondifferentiable)
        self.constants = tuple(sorted(self.nondiff))
        self.n_tensors = len(self.tensors)
        self.n_outputs = len(schema.returns)
        self.is_vjp = op_name.endswith("_backward")
        # One tensor input, one output, the saved tensors named: the per-call hot path is written out for it.
        self.simple = not self.is_vjp and self.tensors == (0,) and self.n_outputs == 1 and isinstance(spec.saves, tuple)
        if not self.is_vjp:
            self.save = (lambda args, outputs, select=_SAVED[spec.saves]: select(args[0], outputs[0])) \
                if isinstance(spec.saves, tuple) else spec.saves
        self.nones = (None,) * (len(schema.arguments) - self.n_tensors)  # gradients of the non-tensor arguments
        self.below = _below(op_name, self.n_tensors, spec.elementwise)
        self.traceable = _keep_layout(self.packet, self.n_tensors) if spec.elementwise else self.packet
        title = "".join(part.title() for part in spec.name.split("_"))
        self.title = title + ("Backward" if self.is_vjp else "")

    def __call__(self, *args):
        """Differentiable call, the cheapest exact path (as VJPOp.call, for the VJP op's arguments)."""
        if _is_compiling() or _tracing_state() is not None:
            return self.traceable(*args)
        if _functorch_active() or _forward_ad._current_level >= 0:
            return self.func.apply(*args)
        if _grad_enabled() and any(t is not None and t.requires_grad for t in args[: self.n_tensors]):
            return self.lean.apply(*args)
        return self.below(*args)

    def make_functions(self, vjp: "_Paths | None"):
        """The lean and the torch.func Function. `vjp`: the VJP op's paths (for a forward op), or None for
        a VJP op, whose gradients are the family's second-order formulas."""
        if vjp is None:
            lean_forward, save, gradients, tangent = self._vjp_op_functions()
        elif self.simple:
            lean_forward, save, gradients, tangent = self._simple_functions(vjp)
        else:
            lean_forward, save, gradients, tangent = self._general_functions(vjp)
        below, params_at, extras = self.below, self.params_at, self.n_outputs > 1 and not self.is_vjp
        caches = extras and self.spec.cached_vjp is not None

        def func_forward(*args):
            return below(*args)

        def setup_context(ctx, inputs, output):
            saved = save(ctx, inputs, output)
            ctx.save_for_backward(*saved)
            ctx.save_for_forward(*saved)
            ctx.params = tuple(inputs[i] for i in params_at)
            if extras:
                ctx.set_materialize_grads(False)
            if caches:
                ctx.mark_non_differentiable(*[o for o in output[1:] if o is not None])

        def jvp(ctx, *tangents):
            return tangent(ctx, tangents)

        # Named <Title> so that autograd's node is <Title>Backward (profiler, anomaly mode, grad_fn), as
        # torch names its own; the class name is read when the class is made.
        Lean = type(self.title, (Function,), {
            "__module__": __name__, "forward": staticmethod(lean_forward), "backward": staticmethod(gradients)})
        Func = type(self.title, (Function,), {
            "__module__": __name__, "forward": staticmethod(func_forward), "setup_context": staticmethod(setup_context),
            "backward": staticmethod(gradients), "jvp": staticmethod(jvp)})
        # Batching calls the Function once on the batched tensors (generate_vmap_rule would instead vmap
        # the staticmethods, which torch.func cannot do for a jvp over a backward).
        Func.vmap = staticmethod(self.vmap_rule(Func.apply))
        self.lean, self.func = Lean, Func

    def _simple_functions(self, vjp: "_Paths"):
        """One tensor input, one output. The eager path's forward and backward are the per-call hot path:
        written out for ops with and without non-tensor arguments. Under create_graph (grad mode on in
        backward) the VJP op is called differentiably; otherwise directly."""
        spec, below, nones = self.spec, self.below, self.nones
        select = _SAVED[spec.saves]
        vjp_below = vjp.below

        def save(ctx, inputs, output):
            return select(inputs[0], output)

        if nones:
            def lean_forward(ctx, input, *params):
                output = below(input, *params)
                ctx.save_for_backward(*select(input, output))
                ctx.params = params
                return output

            def gradients(ctx, grad_output):
                call = vjp if _grad_enabled() else vjp_below
                return (call(grad_output, *ctx.saved_tensors, *ctx.params), *nones)
        else:
            def lean_forward(ctx, input):
                output = below(input)
                ctx.save_for_backward(*select(input, output))
                return output

            def gradients(ctx, grad_output):
                return (vjp if _grad_enabled() else vjp_below)(grad_output, *ctx.saved_tensors)

        def tangent(ctx, tangents):
            return spec.jvp(tangents[:1], ctx.saved_tensors, ctx.params)

        return lean_forward, save, gradients, tangent

    def _general_functions(self, vjp: "_Paths"):
        """Several tensor arguments (optional ones None, some not differentiable), extra outputs."""
        spec, below, save_tensors = self.spec, self.below, self.save
        vjp_below, vjp_args, extras_vjp, cached_vjp = vjp.below, spec.vjp_args, spec.extras_vjp, spec.cached_vjp
        vjp_results = spec.vjp_results
        tensors, params_at, n_args, n_outputs = self.tensors, self.params_at, len(self.arg_names), self.n_outputs
        differentiable = [k for k, i in enumerate(tensors) if i not in self.nondiff]  # where the VJP op's results go
        caches = n_outputs > 1 and cached_vjp is not None
        n_public = spec.public_outputs

        def save(ctx, inputs, output):
            return save_tensors(inputs, output if n_outputs > 1 else (output,))

        def lean_forward(ctx, *args):
            outputs = below(*args)
            ctx.save_for_backward(*save_tensors(args, outputs if n_outputs > 1 else (outputs,)))
            ctx.params = tuple(args[i] for i in params_at)
            if n_outputs > 1:
                ctx.set_materialize_grads(False)
                if caches:
                    ctx.mark_non_differentiable(*[o for o in outputs[1:] if o is not None])
            return outputs

        def gradients(ctx, *grad_outputs):
            saved, params = ctx.saved_tensors, ctx.params
            needs = tuple(ctx.needs_input_grad[i] for i in tensors)
            grads = None
            if n_public == 1:
                grad_output, used = grad_outputs[0], grad_outputs[0] is not None
            else:  # several public outputs: their gradients together, None where an output is unused
                grad_output = grad_outputs[:n_public]
                used = any(g is not None for g in grad_output)
            if used:
                differentiated = _grad_enabled()  # create_graph, or a torch.func transform
                if caches and not differentiated:
                    grads = cached_vjp(grad_output, saved, params)
                if grads is None:
                    result = (vjp if differentiated else vjp_below)(*vjp_args(grad_output, saved, params, needs))
                    result = result if isinstance(result, tuple) else (result,)
                    if vjp_results is not None:
                        result = vjp_results(result)
                    grads = [None] * len(tensors)
                    for k, grad in zip(differentiable, result):
                        grads[k] = grad
            if extras_vjp is not None and any(g is not None for g in grad_outputs[n_public:]):
                extra = extras_vjp(grad_outputs[n_public:], saved, params)
                grads = extra if grads is None else [a if b is None else b if a is None else a + b
                                                     for a, b in zip(grads, extra)]
            out = [None] * n_args
            for i, grad in zip(tensors, grads or ()):
                out[i] = grad
            return tuple(out)

        def tangent(ctx, tangents):
            return spec.jvp(tuple(tangents[i] for i in tensors), ctx.saved_tensors, ctx.params)

        return lean_forward, save, gradients, tangent

    def _vjp_op_functions(self):
        """The VJP op's Functions: its gradients are the family's second-order formulas."""
        spec, below, nones, n_tensors, n_outputs = self.spec, self.below, self.nones, self.n_tensors, self.n_outputs

        def save(ctx, inputs, output):
            return inputs[:n_tensors]

        def lean_forward(ctx, *args):
            output = below(*args)
            ctx.save_for_backward(*args[:n_tensors])
            ctx.params = args[n_tensors:]
            return output

        def gradients(ctx, *gs):
            grad_output, *saved = ctx.saved_tensors
            g = gs[0] if n_outputs == 1 else gs
            return (*spec.vjp_grads(g, grad_output, tuple(saved), ctx.params), *nones)

        def tangent(ctx, tangents):
            grad_output, *saved = ctx.saved_tensors
            return spec.backward_jvp(tangents[0], tangents[1:n_tensors], grad_output, tuple(saved), ctx.params)

        return lean_forward, save, gradients, tangent

    def vmap_rule(self, call: Callable) -> Callable:
        """A vmap rule for `call` (the registered op or a Function's apply): the family's, or every batched
        tensor's vmap dim moved to the front (an unbatched one expanded), then one call. A `dim` is wrapped
        against the per-sample rank, then shifted past the batch dim. A 0-d sample (its own row of one
        element) is given a length-1 dim to reduce over, then loses it again."""
        spec = self.spec
        own = spec.backward_vmap if self.is_vjp else spec.vmap
        if own is not None:
            return lambda info, in_dims, *args: own(call, info, in_dims, *args)
        tensors, op_name, n_outputs = self.tensors, self.op_name, self.n_outputs
        if spec.dim_param is None:
            dim_at = keepdim_at = None
        else:
            dim_at = self.params_at[spec.dim_param]
            keepdim_at = None if spec.keepdim_param is None else self.params_at[spec.keepdim_param]
        rank_of = tensors[1] if self.is_vjp else tensors[0]  # a VJP op's first saved tensor is shaped like the input

        def out_dims(output):
            return 0 if n_outputs == 1 else tuple(None if o is None else 0 for o in output)

        def squeezed(output):
            return output.squeeze(1) if n_outputs == 1 else tuple(None if o is None else o.squeeze(1) for o in output)

        def rule(info, in_dims, *args):
            args = list(args)
            for i in tensors:
                if args[i] is None:
                    continue
                bdim = in_dims[i]
                args[i] = args[i].movedim(bdim, 0) if bdim is not None else args[i].expand(info.batch_size, *args[i].shape)
            if dim_at is None:
                output = call(*args)
                return output, out_dims(output)
            rank = args[rank_of].dim() - 1
            dim = wrap_dim(args[dim_at], rank, op_name)
            if rank == 0:
                for i in tensors:
                    if args[i] is not None:
                        args[i] = args[i].unsqueeze(1)
                args[dim_at] = 1
                if keepdim_at is not None:
                    args[keepdim_at] = True
                output = squeezed(call(*args))
                return output, out_dims(output)
            args[dim_at] = dim + 1
            output = call(*args)
            return output, out_dims(output)

        return rule

    def with_defaults(self, fn: Callable, lead: int = 0) -> Callable:
        """fn called with every schema argument: the dispatcher hands a Python kernel its arguments without the
        trailing ones left at their schema defaults (rms_norm's offset, casting_mode). `lead`: arguments fn
        takes before the schema's (a vmap rule's info and in_dims)."""
        defaults = [arg.default_value for arg in self.overload._schema.arguments]
        n = len(defaults)
        if not any(arg.has_default_value() for arg in self.overload._schema.arguments):
            return fn

        def full(*args):
            given = len(args) - lead
            return fn(*args, *defaults[given:]) if given < n else fn(*args)

        return full

    def register(self):
        LIB.impl(self.op_name, self.with_defaults(self.autograd_kernel()), "Autograd")
        rule = self.vmap_rule(self.packet)
        torch.library.register_vmap(f"torch_vjp::{self.op_name}", self.with_defaults(
            lambda info, in_dims, *args: rule(info, in_dims + (None,) * (len(args) - len(in_dims)), *args), lead=2))
        # torch's legacy vmap (torch._vmap_internals: gradcheck's batched checks, autograd.grad with
        # is_grads_batched=True) has no rule for our ops and loops over the samples, which it can do only for
        # an op whose returns are all tensors. An op with an optional output is computed there by its torch-ops
        # form (exact), whose ops legacy vmap batches.
        if any(str(ret.type) != "Tensor" for ret in self.overload._schema.returns):
            composite = self.spec.vjp_ref if self.is_vjp else self.spec.forward_ref
            if composite is None:
                raise ValueError(f"torch_vjp.{self.op_name} returns an optional tensor: give its torch-ops form "
                                 f"({'vjp_ref' if self.is_vjp else 'forward_ref'}) for torch's legacy vmap")
            LIB.impl(self.op_name, self.with_defaults(composite), "Batched")
        if backends()["cuda"] is None:  # a CPU-only build: a CUDA tensor gets the fix, not "could not run"
            LIB.impl(self.op_name, _no_cuda_kernel(self.spec.name), "CUDA")

    def refuse_constant_gradients(self, args) -> None:
        """A floating argument the op is not differentiable in (class weights) that requires grad or carries a
        forward-mode tangent: torch's error, never a silently missing gradient or zero tangent."""
        for i in self.constants:
            t = args[i]
            if t is None or not t.is_floating_point():
                continue
            if (t.requires_grad and _grad_enabled()) or (
                    _forward_ad._current_level >= 0 and _forward_ad.unpack_dual(t).tangent is not None):
                raise RuntimeError(
                    f"torch_vjp.{self.spec.name} is not differentiable with respect to argument "
                    f"'{self.arg_names[i]}'. This input cannot have requires_grad True or a forward-mode tangent.")

    def autograd_kernel(self):
        """The registered op's Autograd kernel. torch.func cannot run a Function from inside the
        dispatcher, so under a torch.func transform it says which call to use instead."""
        op_name, tensors, overload = self.op_name, self.tensors, self.overload

        def kernel(*args):
            if _functorch_active():
                raise RuntimeError(
                    f"torch.ops.torch_vjp.{op_name} cannot be differentiated inside torch.func transforms; "
                    f"call torch_vjp.{self.spec.name}, which supports torch.func.vjp/jvp/vmap/jacrev/jacfwd/hessian"
                )
            if _forward_ad._current_level >= 0:
                self.refuse_constant_gradients(args)
                return self.func.apply(*args)
            if _grad_enabled() and any(args[i] is not None and args[i].requires_grad for i in tensors):
                self.refuse_constant_gradients(args)
                return self.lean.apply(*args)
            with _below_autograd():
                return overload(*args)

        return kernel


# ---------------------------------------------------------------------------------------------------------
# Autocast: torch's policy for the op's counterpart, at the registered op's Autocast key.

_AUTOCAST_KEYS = {"cuda": torch._C.DispatchKey.AutocastCUDA, "cpu": torch._C.DispatchKey.AutocastCPU}
NO_AUTOCAST = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU) | torch._C.DispatchKeySet(
    torch._C.DispatchKey.AutocastCUDA)


def _autocast_cast(policy: str, device_type: str) -> Callable:
    """torch's cast for a policy (ATen/autocast_mode.h, cached_cast): "fp32" runs a floating tensor of the
    device's type, other than float64, in float32; "lower_precision_fp" runs a float32 one in the autocast dtype."""
    if policy == "fp32":
        def cast(a):
            if (isinstance(a, _Tensor) and a.device.type == device_type and a.is_floating_point()
                    and a.dtype != torch.float64):
                return a.float()
            return a
    elif policy == "lower_precision_fp":
        def cast(a):
            if isinstance(a, _Tensor) and a.device.type == device_type and a.dtype == torch.float32:
                return a.to(torch.get_autocast_dtype(device_type))
            return a
    else:
        raise ValueError(f"unknown autocast policy {policy!r}")
    return cast


def _register_autocast(op_name: str, device_type: str, policy: str, output: str | None = None,
                       kept: frozenset = frozenset()):
    """The registered op's Autocast kernel for the device: its tensors cast by the policy (but those at `kept`),
    its first output cast to float32 where `output` is "fp32" (VJPOp.autocast_output)."""
    key = _AUTOCAST_KEYS[device_type]
    overload = getattr(ops, op_name).default
    exclude = torch._C.DispatchKeySet(key)
    cast = _autocast_cast(policy, device_type)

    def kernel(*args):
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            result = overload(*[a if i in kept else cast(a) for i, a in enumerate(args)])
        if output == "fp32":
            first = result[0] if isinstance(result, tuple) else result
            if first.dtype in (torch.float16, torch.bfloat16):
                first = first.float()
            return (first, *result[1:]) if isinstance(result, tuple) else first
        return result

    LIB.impl(op_name, kernel, key.name)


def register_fake(name: str):
    return torch.library.register_fake(f"torch_vjp::{name}", lib=LIB)


def _no_cuda_kernel(name: str):
    def kernel(*args):
        raise cuda_missing_error(name)

    return kernel


def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether the compiled extension holds a kernel for `device_type` ("cpu", "cuda")."""
    if device_type == "cuda" and backends()["cuda"] is None:
        return False  # only the error kernel above
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"torch_vjp::{op_name}", device_type.upper())
