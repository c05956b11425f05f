"""The implementations compared side by side, each made into a function of a call's differentiated tensors.

  torch_vjp  the library (its registered C++/CUDA kernels)
  eager      the torch reference of torch_vjp/testing.py (same signature)
  compile    torch.compile of that reference, default mode
  liger      Liger-Kernel, for the ops it has, when it is importable (CUDA only; silently absent otherwise)

`make(name, call, device)` returns fn(*call.primals) (the input, then the drawn weight, bias or up projection;
targets are the call's own), or None when the provider has no such op (no row is written). A provider that
has the op but fails is not hidden: the harness records its error.
"""
from __future__ import annotations

from typing import Callable

import torch

import torch_vjp

ALL = ("torch_vjp", "eager", "compile", "liger")


class NoKernel(Exception):
    """torch_vjp has this op but no kernel for the device: recorded as the cell's status."""


def _torch_vjp(call, device):
    name = call.info.name
    if not torch_vjp.has_kernel(name, device) or not torch_vjp.has_kernel(name + "_backward", device):
        raise NoKernel(f"no {device} kernel")
    return call.op


def _eager(call, device):
    return call.ref


def _compile(call, device):
    # A fresh Dynamo state per case: the wrappers share one code object, so without the reset every
    # new op or shape is a recompile of the last, and Dynamo stops compiling at its recompile limit.
    torch._dynamo.reset()
    # The bwd phase runs a recorded graph's backward again (retain_graph=True), which a compiled backward
    # that donates its saved buffers refuses (AOTAutograd donates them for layer_norm's statistics, say).
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    ref = call.ref

    def reference(*primals):
        return ref(*primals)

    return torch.compile(reference)


# Liger-Kernel's functions for the ops in torch_vjp/testing.py. Each factory takes the call and returns
# fn(*primals), or None where Liger has no such form (a softmax along another dim, a cross_entropy over (N, C, d)).
# Liger's RMSNorm runs with in_place=False: in place it writes dx over dy, which the harness reuses.
# Its cross_entropy writes the gradient into the logits' storage during the forward (its design): the
# harness's input then holds gradients on later calls, which leaves the timing representative.

def _liger_softmax(call):
    if call.kwargs.get("dim", -1) not in (-1, call.x.dim() - 1):
        return None
    from liger_kernel.ops.softmax import LigerSoftmaxFunction

    return LigerSoftmaxFunction.apply


def _liger_layer_norm(call):
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    if len(call.kwargs["normalized_shape"]) != 1 or set(call.names) != {"weight", "bias"}:
        return None
    eps = call.kwargs.get("eps", 1e-5)
    return lambda x, weight, bias: LigerLayerNormFunction.apply(x, weight, bias, eps)


def _liger_rms_norm(call):
    from liger_kernel.transformers import LigerRMSNorm

    if len(call.kwargs["normalized_shape"]) != 1 or call.names != ("weight",):
        return None
    eps = call.kwargs.get("eps") or torch.finfo(call.x.dtype).eps
    module = LigerRMSNorm(call.x.shape[-1], eps=eps, in_place=False).to(call.x.device, call.primals[1].dtype)
    return lambda x, weight: torch.func.functional_call(module, {"weight": weight}, (x,))


def _liger_gated(function, approximate):
    def factory(call):
        if call.kwargs.get("approximate", "tanh") != approximate:
            return None
        import importlib

        module = importlib.import_module("liger_kernel.ops." + ("swiglu" if "SiLU" in function else "geglu"))
        return getattr(module, function).apply

    return factory


def _liger_cross_entropy(call):
    if call.x.dim() != 2:
        return None
    from liger_kernel.transformers import LigerCrossEntropyLoss

    kw = {k: call.kwargs[k] for k in ("ignore_index", "reduction", "label_smoothing") if k in call.kwargs}
    loss, target = LigerCrossEntropyLoss(**kw), call.kwargs["target"]
    return lambda x: loss(x, target)


def _liger_fused_linear_cross_entropy(call):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    kw = {k: call.kwargs[k] for k in ("ignore_index", "reduction", "label_smoothing") if k in call.kwargs}
    loss, target = LigerFusedLinearCrossEntropyLoss(**kw), call.kwargs["target"]
    return lambda x, weight, bias=None: loss(weight, x, target, bias)


LIGER: dict[str, Callable] = {
    "softmax": _liger_softmax,
    "layer_norm": _liger_layer_norm,
    "rms_norm": _liger_rms_norm,
    "swiglu": _liger_gated("LigerSiLUMulFunction", "tanh"),  # silu has one form
    "geglu": _liger_gated("LigerGELUMulFunction", "tanh"),  # Liger's geglu is gelu's tanh form only
    "cross_entropy": _liger_cross_entropy,
    "fused_linear_cross_entropy": _liger_fused_linear_cross_entropy,
}


def _liger(call, device):
    if call.info.name not in LIGER:
        return None
    return LIGER[call.info.name](call)


MAKERS = {"torch_vjp": _torch_vjp, "eager": _eager, "compile": _compile, "liger": _liger}


def liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except Exception:  # noqa: BLE001  (absent, or present without triton: either way, no liger column)
        return False
    return True


def available(names, device: str, known=None) -> list[str]:
    """The requested providers that can run here; liger drops out without a word where it can't."""
    out = []
    for name in names:
        if name not in (known or MAKERS):
            raise ValueError(f"unknown provider {name!r}; choose from {', '.join(ALL)}")
        if name == "liger" and (not device.startswith("cuda") or not liger_available()):
            continue
        out.append(name)
    return out


def make(name: str, call, device: str):
    """fn(*call.primals) for this provider, or None when it has no such op. May raise NoKernel."""
    return MAKERS[name](call, device.split(":")[0])
