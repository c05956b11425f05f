"""Loads the compiled kernels and gives the generic glue every op shares.

The single choice of how autograd reaches the kernels is made here (`VJPOp`):

* Each op is two registered C++ ops, `torch_vjp::<name>` and `torch_vjp::<name>_backward` (the VJP).
* A new-style `torch.autograd.Function` wraps each of them. The forward Function saves what the VJP op
  needs and its backward calls the backward Function, whose own backward (the second derivative) is
  composite, so double backward and higher work. The forward Function has a `jvp`, so forward-mode AD
  is exact; the backward Function has none, so forward-over-reverse raises rather than returning zeros.
* Both Functions are registered as the ops' Autograd kernels, so `torch.ops.torch_vjp.*` is
  differentiable by itself and passes `torch.library.opcheck`.
* Eager calls go through `Function.apply` directly: that is what `torch.func` (jvp, vmap, jacrev,
  jacfwd) supports. Under `torch.compile` the call is the registered op instead: Dynamo treats it as one
  opaque node with a fake kernel, while AOTAutograd reaches the same Functions through the Autograd key.
  (Dynamo refuses to trace a Function that has a `jvp`, which is why the paths differ.)
* Every op also gets a vmap rule (`torch.library.register_vmap`), so `vmap` and `jacrev` batch instead
  of looping.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.autograd import Function

from ._extension import backends, cuda_missing_error  # loading the libraries registers torch.ops.torch_vjp.*

LIB = torch.library.Library("torch_vjp", "IMPL")
ops = torch.ops.torch_vjp
REGISTRY: dict[str, "VJPOp"] = {}  # name -> VJPOp, every op of the library


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


@dataclass(frozen=True)
class VJPOp:
    """One op of the library, as its family describes it.

    name:      the registered forward op; `name + "_backward"` is its VJP op.
    saves:     what the VJP op takes after grad_output: "input" and/or "output" of the forward.
    jvp:       (tangent, saved, params) -> output tangent, J·t.
    vjp_grads: (g, grad_output, saved, params) -> gradients of the VJP op w.r.t. (grad_output, *saved):
               the second derivative, from differentiable (composite or registered) ops.
    dim_param: index into params of a `dim` argument, shifted by the vmap rule; None if absent.
    """

    name: str
    saves: tuple[str, ...]
    jvp: Callable
    vjp_grads: Callable
    dim_param: int | None = None

    def __post_init__(self):
        forward_fn, backward_fn = _make_functions(self)
        object.__setattr__(self, "forward_function", forward_fn)
        object.__setattr__(self, "backward_function", backward_fn)
        REGISTRY[self.name] = self
        LIB.impl(self.name, _autograd_kernel(self.name, forward_fn), "Autograd")
        LIB.impl(self.name + "_backward", _autograd_kernel(self.name + "_backward", backward_fn), "Autograd")
        for op_name in (self.name, self.name + "_backward"):
            torch.library.register_vmap(f"torch_vjp::{op_name}", _vmap_rule(getattr(ops, op_name), self.dim_param))
            if backends()["cuda"] is None:  # a CPU-only build: a CUDA tensor gets the fix, not "could not run"
                LIB.impl(op_name, _no_cuda_kernel(self.name), "CUDA")

    def __call__(self, input: torch.Tensor, *params):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"torch_vjp.{self.name}(): argument 'input' must be Tensor, not {type(input).__name__}")
        if torch.compiler.is_compiling():
            return getattr(ops, self.name)(input, *params)
        return self.forward_function.apply(input, *params)

    def backward(self, grad_output: torch.Tensor, *saved_and_params):
        """The VJP op, differentiable (used by jvp and second-derivative formulas)."""
        return self.backward_function.apply(grad_output, *saved_and_params)


def _make_functions(spec: VJPOp):
    forward_op = getattr(ops, spec.name).default
    backward_op = getattr(ops, spec.name + "_backward").default
    n_saved = len(spec.saves)

    class Backward(Function):

        @staticmethod
        def forward(grad_output, *saved_and_params):
            with torch._C._AutoDispatchBelowAutograd():
                return backward_op(grad_output, *saved_and_params)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs[: 1 + n_saved])
            ctx.params = inputs[1 + n_saved :]

        @staticmethod
        def backward(ctx, g):
            grad_output, *saved = ctx.saved_tensors
            grads = spec.vjp_grads(g, grad_output, tuple(saved), ctx.params)
            return (*grads, *(None,) * len(ctx.params))

        @staticmethod
        def jvp(ctx, *tangents):
            raise NotImplementedError(
                f"torch_vjp.{spec.name}: forward-mode AD through its backward (forward-over-reverse, as in "
                f"torch.func.hessian or jvp of grad) is not implemented; use reverse-over-reverse instead "
                f"(torch.func.jacrev(torch.func.jacrev(f)) or autograd.grad with create_graph=True)"
            )

    class Forward(Function):

        @staticmethod
        def forward(input, *params):
            with torch._C._AutoDispatchBelowAutograd():
                return forward_op(input, *params)

        @staticmethod
        def setup_context(ctx, inputs, output):
            input, *params = inputs
            saved = [input if s == "input" else output for s in spec.saves]
            ctx.save_for_backward(*saved)
            ctx.save_for_forward(*saved)
            ctx.params = tuple(params)

        @staticmethod
        def backward(ctx, grad_output):
            return (Backward.apply(grad_output, *ctx.saved_tensors, *ctx.params), *(None,) * len(ctx.params))

        @staticmethod
        def jvp(ctx, tangent, *_):
            return spec.jvp(tangent, tuple(ctx.saved_tensors), ctx.params)

    # Batching calls the Function once on the batched tensors (generate_vmap_rule would instead vmap the
    # staticmethods, which torch.func cannot do for a jvp over a backward).
    Forward.vmap = staticmethod(_vmap_rule(Forward.apply, spec.dim_param))
    Backward.vmap = staticmethod(_vmap_rule(Backward.apply, spec.dim_param))
    title = "".join(part.title() for part in spec.name.split("_"))
    Forward.__name__ = Forward.__qualname__ = f"{title}Function"
    Backward.__name__ = Backward.__qualname__ = f"{title}BackwardFunction"
    return Forward, Backward


def _autograd_kernel(op_name: str, function):
    """The Autograd-key kernel of a registered op: its Function. torch.func cannot run a Function from
    inside the dispatcher, so under a torch.func transform say which call to use instead."""

    def kernel(*args):
        if torch._C._are_functorch_transforms_active():
            public = op_name.removesuffix("_backward")
            raise RuntimeError(
                f"torch.ops.torch_vjp.{op_name} cannot be differentiated inside torch.func transforms; "
                f"call torch_vjp.{public}, which supports torch.func.vjp/jvp/vmap/jacrev/jacfwd"
            )
        return function.apply(*args)

    return kernel


def _vmap_rule(call, dim_param: int | None):
    """A vmap rule for `call` (a registered op or a Function's apply). Batch by moving every batched tensor's vmap dim to the front (unbatched ones are expanded),
    then calling the op once; a non-negative `dim` moves up by one."""

    def rule(info, in_dims, *args):
        args = list(args)
        for i, (arg, bdim) in enumerate(zip(args, in_dims)):
            if isinstance(arg, torch.Tensor):
                args[i] = arg.movedim(bdim, 0) if bdim is not None else arg.expand(info.batch_size, *arg.shape)
        if dim_param is not None:
            first_param = sum(isinstance(a, torch.Tensor) for a in args)
            dim = args[first_param + dim_param]
            if dim >= 0:
                args[first_param + dim_param] = dim + 1
        return call(*args), 0

    return rule


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
