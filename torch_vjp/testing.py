"""The one table of torch_vjp's ops, for tests and benchmarks (as torch keeps its OpInfos in torch.testing).

Every check in tests/ and every benchmark case iterates over OPS, so adding an op to torch_vjp means adding
one OpInfo row here (plus its kernels). Each row pairs the torch_vjp function with its torch counterpart
(same signature), says which family it belongs to (which decides the shapes and dims it is tried on) and
which extra keyword variants to try. MODULES pairs torch_vjp.nn's modules with torch.nn's.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import torch_vjp
import torch_vjp.nn

__all__ = ["OpInfo", "OPS", "OPS_BY_NAME", "ModuleInfo", "MODULES", "op_variants", "sample"]


@dataclass(frozen=True)
class OpInfo:
    name: str
    op: Callable  # torch_vjp.<name>
    ref: Callable  # the torch reference, same signature
    family: str  # "elementwise" (shape-preserving map) | "softmax" (reduces or normalises along dim)
    variants: tuple[dict, ...] = ({},)  # keyword arguments to try, beyond dim/keepdim
    keepdim: bool = False  # takes keepdim (logsumexp)
    scale: float = 1.0  # spread of the random inputs (randn * scale)
    registered: tuple[str, ...] = field(default=())  # names in torch.ops.torch_vjp this row exercises

    @property
    def has_dim(self) -> bool:
        return self.family == "softmax"

    def raw_params(self, **kwargs) -> tuple:
        """The non-tensor arguments of the registered op, positionally, by the names its schema gives them
        (the public function's defaults filling in)."""
        bound = inspect.signature(self.op).bind(None, **kwargs)
        bound.apply_defaults()
        schema = getattr(torch.ops.torch_vjp, self.name).default._schema
        return tuple(bound.arguments[arg.name] for arg in schema.arguments[1:])

    def raw(self, input, **kwargs):
        """The same call on the registered op, torch.ops.torch_vjp.<name>."""
        return getattr(torch.ops.torch_vjp, self.name)(input, *self.raw_params(**kwargs))

    def call_kwargs(self, dim=-1, keepdim=False, **variant):
        """Keyword arguments for one call, shared by op and ref."""
        kwargs = dict(variant)
        if self.has_dim:
            kwargs["dim"] = dim
        if self.keepdim:
            kwargs["keepdim"] = keepdim
        return kwargs


def _row(name, op, ref, family, **kw):
    return OpInfo(name, op, ref, family, registered=(name, name + "_backward"), **kw)


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
]
OPS_BY_NAME = {info.name: info for info in OPS}


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
]


def op_variants(families=("elementwise", "softmax")):
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
