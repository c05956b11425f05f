"""The public ops, with the names and signatures of torch / torch.nn.functional.

Each returns what its torch counterpart returns (see tests/op_db.py for the pairing), computed by a
fused forward kernel, and differentiates with a fused VJP kernel.
"""
from __future__ import annotations

import torch

from .elementwise import OPS as _ELEMENTWISE
from .softmax import OPS as _SOFTMAX

__all__ = ["exp", "sigmoid", "tanh", "softplus", "gelu", "silu", "mish", "softmax", "log_softmax", "logsumexp"]

Tensor = torch.Tensor


def exp(input: Tensor) -> Tensor:
    """eˣ, like torch.exp."""
    return _ELEMENTWISE["exp"](input)


def sigmoid(input: Tensor) -> Tensor:
    """1 / (1 + e⁻ˣ), like torch.sigmoid."""
    return _ELEMENTWISE["sigmoid"](input)


def tanh(input: Tensor) -> Tensor:
    """tanh x, like torch.tanh."""
    return _ELEMENTWISE["tanh"](input)


def softplus(input: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    """log(1 + e^{βx}) / β, linear where βx > threshold; like torch.nn.functional.softplus."""
    return _ELEMENTWISE["softplus"](input, float(beta), float(threshold))


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """x Φ(x), or its tanh approximation; like torch.nn.functional.gelu."""
    return _ELEMENTWISE["gelu"](input, approximate)


def silu(input: Tensor) -> Tensor:
    """x σ(x), like torch.nn.functional.silu."""
    return _ELEMENTWISE["silu"](input)


def mish(input: Tensor) -> Tensor:
    """x tanh(softplus(x)), like torch.nn.functional.mish."""
    return _ELEMENTWISE["mish"](input)


def softmax(input: Tensor, dim: int = -1) -> Tensor:
    """exp(x - max) / Σ exp(x - max) along dim, like torch.softmax."""
    return _SOFTMAX["softmax"](input, dim)


def log_softmax(input: Tensor, dim: int = -1) -> Tensor:
    """x - logsumexp(x) along dim, like torch.log_softmax."""
    return _SOFTMAX["log_softmax"](input, dim)


def logsumexp(input: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    """log Σ exp(x) along dim, like torch.logsumexp."""
    return _SOFTMAX["logsumexp"](input, dim, keepdim)
