"""The implementations compared side by side, each made into a function of the input tensor alone.

  torch_vjp  the library (its registered C++/CUDA kernels)
  eager      the torch reference of torch_vjp/testing.py (same signature)
  compile    torch.compile of that reference, default mode
  liger      Liger-Kernel, for the ops it has, when it is importable (CUDA only; silently absent otherwise)

`make(info, kwargs, device)` returns the function, or None when the provider has no such op (no row is
written). A provider that has the op but fails is not hidden: the harness records its error.
"""
from __future__ import annotations

from typing import Callable

import torch

import torch_vjp

ALL = ("torch_vjp", "eager", "compile", "liger")


class NoKernel(Exception):
    """torch_vjp has this op but no kernel for the device: recorded as the cell's status."""


def _torch_vjp(info, kwargs, device):
    if not torch_vjp.has_kernel(info.name, device) or not torch_vjp.has_kernel(info.name + "_backward", device):
        raise NoKernel(f"no {device} kernel")
    return lambda x: info.op(x, **kwargs)


def _eager(info, kwargs, device):
    return lambda x: info.ref(x, **kwargs)


def _compile(info, kwargs, device):
    # A fresh Dynamo state per case: the wrappers share one code object, so without the reset every
    # new op or shape is a recompile of the last, and Dynamo stops compiling at its recompile limit.
    torch._dynamo.reset()
    ref = info.ref

    def reference(x):
        return ref(x, **kwargs)

    return torch.compile(reference)


def _liger_softmax(kwargs):
    if kwargs.get("dim", -1) != -1:
        return None
    from liger_kernel.ops.softmax import LigerSoftmaxFunction

    return LigerSoftmaxFunction.apply


# Liger-Kernel's functions for the ops in torch_vjp/testing.py (it has softmax; layer_norm, rms_norm, swiglu
# and cross_entropy join here when the library has them). Each factory takes the call's kwargs.
LIGER: dict[str, Callable] = {
    "softmax": _liger_softmax,
}


def _liger(info, kwargs, device):
    if info.name not in LIGER:
        return None
    return LIGER[info.name](kwargs)


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


def make(name: str, info, kwargs: dict, device: str):
    """fn(x) for this provider, or None when it has no such op. May raise NoKernel."""
    return MAKERS[name](info, kwargs, device.split(":")[0])
