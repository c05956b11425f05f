"""The autograd glue every op shares: how a call reaches the kernels, and how autograd differentiates it.

Each op is two registered C++ ops, `torch_vjp::<name>` and `torch_vjp::<name>_backward` (the VJP). A
family module describes the op once (`VJPOp`: what the VJP op needs saved, the forward-mode formula, the
second-order formulas); everything else is made here, the same way for every op and for its VJP op.

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
   loaded trace differentiate it through the op's Autograd kernel (below).

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

from . import _direct
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

# Which forward tensors the VJP op takes after grad_output.
_SAVED = {
    ("input",): lambda x, y: (x,),
    ("output",): lambda x, y: (y,),
    ("input", "output"): lambda x, y: (x, y),
}


@dataclass(frozen=True, eq=False)
class VJPOp:
    """One op of the library, as its family describes it.

    name:          the registered forward op; `name + "_backward"` is its VJP op, b(grad_output, *saved, *params).
    saves:         what the VJP op takes after grad_output: ("input",), ("output",) or ("input", "output").
    jvp:           (tangent, saved, params) -> the output tangent J·t (forward mode).
    vjp_grads:     (g, grad_output, saved, params) -> the VJP op's gradients w.r.t. (grad_output, *saved),
                   for the cotangent g: the second derivative, reverse mode.
    backward_jvp:  (t_grad_output, t_saved, grad_output, saved, params) -> the VJP op's output tangent,
                   ∂b/∂dy·ṫ_dy + Σ ∂b/∂s·ṫ_s, a tangent None where it is zero: forward-over-reverse.
    dim_param:     index into params of a `dim` argument (the vmap rule moves it); None if absent.
    keepdim_param: index into params of a `keepdim` argument; None if absent.
    elementwise:   the output keeps the input's memory format (the kernels are layout-free maps).
    autocast:      {device type: torch's autocast policy for the op's counterpart}, from torch's lists
                   (ATen/autocast_mode.h): "fp32" casts float16/bfloat16 inputs to float32. Devices absent
                   run the op in its input's dtype, as torch does for counterparts on none of its lists.
    integers:      what the public op does with an integer or bool input, as its counterpart does:
                   "promote" (to the default float dtype) or "error" (NotImplementedError).
    """

    name: str
    saves: tuple[str, ...]
    jvp: Callable
    vjp_grads: Callable
    backward_jvp: Callable
    dim_param: int | None = None
    keepdim_param: int | None = None
    elementwise: bool = False
    autocast: dict = field(default_factory=dict)
    integers: str = "error"

    def __post_init__(self):
        forward = _Paths(self, self.name, n_tensors=1)
        backward = _Paths(self, self.name + "_backward", n_tensors=1 + len(self.saves))
        forward.make_functions(backward)
        backward.make_functions(None)
        object.__setattr__(self, "_forward", forward)
        object.__setattr__(self, "backward", backward)  # the VJP op, called differentiably
        object.__setattr__(self, "call", self._make_call())
        REGISTRY[self.name] = self
        for paths in (forward, backward):
            paths.register()
        for device_type, policy in self.autocast.items():
            _register_autocast(self.name, device_type, policy)

    def __call__(self, input: torch.Tensor, *params):
        """The public op: input, then the registered op's other arguments, positionally (checked by the caller)."""
        return self.call(input, *params)

    def _make_call(self):
        """`call`, the public op's per-call path choice (module docstring), with what it needs bound as locals:
        it runs on every call."""
        forward, name, casts = self._forward, self.name, bool(self.autocast)
        traceable, func_apply, lean_apply, below = forward.traceable, forward.func.apply, forward.lean.apply, forward.below
        integral_input, autocast_input = self.integral_input, self.autocast_input

        def call(input, *params):
            if not isinstance(input, _Tensor):
                raise TypeError(f"torch_vjp.{name}(): argument 'input' must be Tensor, not {type(input).__name__}")
            if not input.is_floating_point():
                input = integral_input(input)
            if _is_compiling() or _tracing_state() is not None:
                return traceable(input, *params)
            if casts and _any_autocast():
                input = autocast_input(input)
            if _functorch_active() or _forward_ad._current_level >= 0:
                return func_apply(input, *params)
            if input.requires_grad and _grad_enabled():
                return lean_apply(input, *params)
            return below(input, *params)

        return call

    def integral_input(self, input: torch.Tensor) -> torch.Tensor:
        """torch's rule for an integer or bool input (see `integers`). A complex input goes on to the kernels'
        TypeError: torch_vjp has no complex kernels."""
        if input.is_complex():
            return input
        if self.integers == "promote":
            return input.to(torch.get_default_dtype())
        raise NotImplementedError(
            f"torch_vjp.{self.name}: not implemented for {input.dtype} input (as torch's counterpart, which only "
            f"computes it for floating types); cast the input to a floating dtype first")

    def autocast_input(self, input: torch.Tensor) -> torch.Tensor:
        """The input as torch's autocast policy for this op would give it to the kernel."""
        device_type = input.device.type
        if (self.autocast.get(device_type) == "fp32" and torch.is_autocast_enabled(device_type)
                and input.dtype in (torch.float16, torch.bfloat16)):
            return input.float()
        return input


class _Paths:
    """Every way to call one registered op (a forward op or a VJP op): below autograd, through the lean
    or the torch.func Function, or as the registered op (see the module docstring)."""

    def __init__(self, spec: VJPOp, op_name: str, n_tensors: int):
        self.spec, self.op_name, self.n_tensors = spec, op_name, n_tensors
        self.packet = getattr(ops, op_name)
        self.overload = self.packet.default
        n_args = len(self.overload._schema.arguments)
        self.nones = (None,) * (n_args - n_tensors)  # gradients of the non-tensor arguments
        self.below = _below(op_name, n_tensors, spec.elementwise)
        self.traceable = _keep_layout(self.packet, n_tensors) if spec.elementwise else self.packet
        title = "".join(part.title() for part in spec.name.split("_"))
        self.title = title + ("Backward" if op_name.endswith("_backward") else "")

    def __call__(self, *args):
        """Differentiable call, the cheapest exact path (as VJPOp.call, for the VJP op's arguments)."""
        if _is_compiling() or _tracing_state() is not None:
            return self.traceable(*args)
        if _functorch_active() or _forward_ad._current_level >= 0:
            return self.func.apply(*args)
        if _grad_enabled() and any(t.requires_grad for t in args[: self.n_tensors]):
            return self.lean.apply(*args)
        return self.below(*args)

    def make_functions(self, vjp: "_Paths | None"):
        """The lean and the torch.func Function. `vjp`: the VJP op's paths (for a forward op), or None for
        a VJP op, whose gradients are the family's second-order formulas."""
        spec, below, nones, n_tensors = self.spec, self.below, self.nones, self.n_tensors
        if vjp is not None:
            select = _SAVED[spec.saves]
            vjp_below = vjp.below

            def save(ctx, inputs, output):
                return select(inputs[0], output)

            # The eager path's forward and backward, the per-call hot path: written out for ops with and
            # without non-tensor arguments. Under create_graph (grad mode on in backward) the VJP op is
            # called differentiably; otherwise directly.
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
                return spec.jvp(tangents[0], ctx.saved_tensors, ctx.params)
        else:

            def save(ctx, inputs, output):
                return inputs[:n_tensors]

            def lean_forward(ctx, *args):
                output = below(*args)
                ctx.save_for_backward(*args[:n_tensors])
                ctx.params = args[n_tensors:]
                return output

            def gradients(ctx, g):
                grad_output, *saved = ctx.saved_tensors
                return (*spec.vjp_grads(g, grad_output, tuple(saved), ctx.params), *nones)

            def tangent(ctx, tangents):
                grad_output, *saved = ctx.saved_tensors
                return spec.backward_jvp(tangents[0], tangents[1:n_tensors], grad_output, tuple(saved), ctx.params)

        def func_forward(*args):
            return below(*args)

        def setup_context(ctx, inputs, output):
            saved = save(ctx, inputs, output)
            ctx.save_for_backward(*saved)
            ctx.save_for_forward(*saved)
            ctx.params = tuple(inputs[n_tensors:])

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

    def vmap_rule(self, call: Callable) -> Callable:
        """A vmap rule for `call` (the registered op or a Function's apply): every batched tensor's vmap dim
        moved to the front (an unbatched one expanded), then one call. A `dim` is wrapped against the
        per-sample rank, then shifted past the batch dim. A 0-d sample (its own row of one element) is
        given a length-1 dim to reduce over, then loses it again."""
        n_tensors, op_name = self.n_tensors, self.op_name
        spec = self.spec
        if spec.dim_param is None:
            dim_at = keepdim_at = None
        else:
            dim_at = n_tensors + spec.dim_param
            keepdim_at = None if spec.keepdim_param is None else n_tensors + spec.keepdim_param
        rank_of = 0 if n_tensors == 1 else 1  # the VJP op's first saved tensor is shaped like the input

        def rule(info, in_dims, *args):
            args = list(args)
            for i in range(n_tensors):
                bdim = in_dims[i]
                args[i] = args[i].movedim(bdim, 0) if bdim is not None else args[i].expand(info.batch_size, *args[i].shape)
            if dim_at is None:
                return call(*args), 0
            rank = args[rank_of].dim() - 1
            dim = wrap_dim(args[dim_at], rank, op_name)
            if rank == 0:
                for i in range(n_tensors):
                    args[i] = args[i].unsqueeze(1)
                args[dim_at] = 1
                if keepdim_at is not None:
                    args[keepdim_at] = True
                return call(*args).squeeze(1), 0
            args[dim_at] = dim + 1
            return call(*args), 0

        return rule

    def register(self):
        LIB.impl(self.op_name, self.autograd_kernel(), "Autograd")
        torch.library.register_vmap(f"torch_vjp::{self.op_name}", self.vmap_rule(self.packet))
        if backends()["cuda"] is None:  # a CPU-only build: a CUDA tensor gets the fix, not "could not run"
            LIB.impl(self.op_name, _no_cuda_kernel(self.spec.name), "CUDA")

    def autograd_kernel(self):
        """The registered op's Autograd kernel. torch.func cannot run a Function from inside the
        dispatcher, so under a torch.func transform it says which call to use instead."""
        op_name, n_tensors, overload = self.op_name, self.n_tensors, self.overload

        def kernel(*args):
            if _functorch_active():
                raise RuntimeError(
                    f"torch.ops.torch_vjp.{op_name} cannot be differentiated inside torch.func transforms; "
                    f"call torch_vjp.{self.spec.name}, which supports torch.func.vjp/jvp/vmap/jacrev/jacfwd/hessian"
                )
            if _forward_ad._current_level >= 0:
                return self.func.apply(*args)
            if _grad_enabled() and any(t.requires_grad for t in args[:n_tensors]):
                return self.lean.apply(*args)
            with _below_autograd():
                return overload(*args)

        return kernel


# ---------------------------------------------------------------------------------------------------------
# Autocast: torch's policy for the op's counterpart, at the registered op's Autocast key.

_AUTOCAST_KEYS = {"cuda": torch._C.DispatchKey.AutocastCUDA, "cpu": torch._C.DispatchKey.AutocastCPU}
NO_AUTOCAST = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU) | torch._C.DispatchKeySet(
    torch._C.DispatchKey.AutocastCUDA)


def _register_autocast(op_name: str, device_type: str, policy: str):
    """torch's "fp32" policy (ATen/autocast_mode.h, cached_cast): a floating input of the device's type,
    other than float64, runs in float32."""
    if policy != "fp32":
        raise ValueError(f"torch_vjp.{op_name}: unknown autocast policy {policy!r}")
    key = _AUTOCAST_KEYS[device_type]
    overload = getattr(ops, op_name).default
    exclude = torch._C.DispatchKeySet(key)

    def cast(a):
        if (isinstance(a, _Tensor) and a.device.type == device_type and a.is_floating_point()
                and a.dtype != torch.float64):
            return a.float()
        return a

    def kernel(*args):
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            return overload(*[cast(a) for a in args])

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
