"""torch_vjp's ops as modules: drop-in replacements for torch.nn's.

Each subclasses its torch.nn counterpart, so it takes the same constructor arguments, has the same
attributes, `extra_repr` and (empty) state_dict, passes `isinstance(m, torch.nn.Softmax)`, and loads
the state_dict of the torch module it replaces; only `forward` calls torch_vjp. A family adds a module
here the same way: subclass the torch.nn module, and call the torch_vjp function in `forward` with the
module's attributes.
"""
from __future__ import annotations

import torch

from . import functional as F

__all__ = ["Softmax", "LogSoftmax", "GELU", "SiLU", "Mish", "Softplus", "Tanh", "Sigmoid"]

Tensor = torch.Tensor


class Softmax(torch.nn.Softmax):
    """torch.nn.Softmax(dim=None) computed by torch_vjp.softmax."""

    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(torch.nn.LogSoftmax):
    """torch.nn.LogSoftmax(dim=None) computed by torch_vjp.log_softmax."""

    def forward(self, input: Tensor) -> Tensor:
        return F.log_softmax(input, self.dim, _stacklevel=5)


class GELU(torch.nn.GELU):
    """torch.nn.GELU(approximate='none') computed by torch_vjp.gelu."""

    def forward(self, input: Tensor) -> Tensor:
        return F.gelu(input, approximate=self.approximate)


class SiLU(torch.nn.SiLU):
    """torch.nn.SiLU(inplace=False) computed by torch_vjp.silu."""

    def forward(self, input: Tensor) -> Tensor:
        return F.silu(input, inplace=self.inplace)


class Mish(torch.nn.Mish):
    """torch.nn.Mish(inplace=False) computed by torch_vjp.mish."""

    def forward(self, input: Tensor) -> Tensor:
        return F.mish(input, inplace=self.inplace)


class Softplus(torch.nn.Softplus):
    """torch.nn.Softplus(beta=1.0, threshold=20.0) computed by torch_vjp.softplus."""

    def forward(self, input: Tensor) -> Tensor:
        return F.softplus(input, self.beta, self.threshold)


class Tanh(torch.nn.Tanh):
    """torch.nn.Tanh() computed by torch_vjp.tanh."""

    def forward(self, input: Tensor) -> Tensor:
        return F.tanh(input)


class Sigmoid(torch.nn.Sigmoid):
    """torch.nn.Sigmoid() computed by torch_vjp.sigmoid."""

    def forward(self, input: Tensor) -> Tensor:
        return F.sigmoid(input)
