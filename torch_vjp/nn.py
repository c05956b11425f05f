"""torch_vjp's ops as modules: drop-in replacements for torch.nn's.

Each subclasses its torch.nn counterpart, so it takes the same constructor arguments, has the same
attributes, `extra_repr` and (empty) state_dict, passes `isinstance(m, torch.nn.Softmax)`, and loads
the state_dict of the torch module it replaces; only `forward` calls torch_vjp. A family adds a module
here the same way: subclass the torch.nn module, and call the torch_vjp function in `forward` with the
module's attributes.
"""
from __future__ import annotations

import inspect

import torch

from . import functional as F

__all__ = ["Softmax", "LogSoftmax", "GELU", "SiLU", "Mish", "Softplus", "Tanh", "Sigmoid", "LayerNorm", "RMSNorm",
           "CrossEntropyLoss", "FusedLinearCrossEntropyLoss"]

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


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm(normalized_shape, eps=1e-05, elementwise_affine=True, bias=True, device=None, dtype=None)
    computed by torch_vjp.layer_norm: the same parameters (weight, bias), so it loads torch's state_dict."""

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm(normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *, offset=0.0,
    casting_mode="torch") computed by torch_vjp.rms_norm: the same parameter (weight), so it loads torch's
    state_dict. ``offset`` and ``casting_mode`` are rms_norm's: ``RMSNorm(n, eps=1e-6, offset=1.0)`` is Gemma's
    norm, whose weight starts at 1 - offset (zeros) so that a new module scales by one, as Gemma's does;
    ``casting_mode="llama"`` rounds as Llama's."""

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True, device=None,
                 dtype=None, *, offset: float = 0.0, casting_mode: str = "torch") -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)
        self.offset, self.casting_mode = float(offset), casting_mode
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            torch.nn.init.constant_(self.weight, 1.0 - getattr(self, "offset", 0.0))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps, self.offset, self.casting_mode)

    def extra_repr(self) -> str:
        extra = "" if self.offset == 0 else f", offset={self.offset}"
        return super().extra_repr() + extra + ("" if self.casting_mode == "torch" else f", casting_mode={self.casting_mode!r}")

# torch.nn.RMSNorm's constructor signature, then the keyword-only options (inspect.signature, IDEs).
_RMS_SIGNATURE = inspect.signature(torch.nn.RMSNorm)
RMSNorm.__signature__ = _RMS_SIGNATURE.replace(parameters=[
    *_RMS_SIGNATURE.parameters.values(),
    inspect.Parameter("offset", inspect.Parameter.KEYWORD_ONLY, default=0.0, annotation=float),
    inspect.Parameter("casting_mode", inspect.Parameter.KEYWORD_ONLY, default="torch", annotation=str)])


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss(weight=None, size_average=None, ignore_index=-100, reduce=None, reduction='mean',
    label_smoothing=0.0, *, softcap=None, lse_square_scale=0.0, return_z_loss=False, return_token_accuracy=False)
    computed by torch_vjp.cross_entropy (class-index targets; class weights as torch's; the keyword-only loss options
    as torch_vjp.cross_entropy's: with return_z_loss and/or return_token_accuracy, forward returns (loss, z_loss,
    token_accuracy), those asked for)."""

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, softcap: float | None = None,
                 lse_square_scale: float = 0.0, return_z_loss: bool = False, return_token_accuracy: bool = False) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.softcap, self.lse_square_scale, self.return_z_loss = softcap, lse_square_scale, return_z_loss
        self.return_token_accuracy = return_token_accuracy

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing, softcap=self.softcap,
                               lse_square_scale=self.lse_square_scale, return_z_loss=self.return_z_loss,
                               return_token_accuracy=self.return_token_accuracy)


# torch's own annotations for its parameters (this module's are strings): the constructor reads as torch's.
CrossEntropyLoss.__init__.__annotations__.update(torch.nn.CrossEntropyLoss.__init__.__annotations__)


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """The loss of a linear head without its logits: forward(input, weight, target, bias=None) is
    torch_vjp.fused_linear_cross_entropy, ``cross_entropy(input @ weight.T + bias, target)``, with the head's
    parameters passed in (``loss_fn(hidden, lm_head.weight, target)``), as torch.nn's losses take their inputs.
    No state of its own (an empty state_dict)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 softcap: float | None = None, lse_square_scale: float = 0.0, return_z_loss: bool = False,
                 return_token_accuracy: bool = False) -> None:
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.softcap, self.lse_square_scale, self.return_z_loss = softcap, lse_square_scale, return_z_loss
        self.return_token_accuracy = return_token_accuracy

    def forward(self, input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.fused_linear_cross_entropy(input, weight, target, bias, ignore_index=self.ignore_index,
                                            reduction=self.reduction, label_smoothing=self.label_smoothing,
                                            softcap=self.softcap, lse_square_scale=self.lse_square_scale,
                                            return_z_loss=self.return_z_loss,
                                            return_token_accuracy=self.return_token_accuracy)

    def extra_repr(self) -> str:
        text = f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"
        if self.softcap:
            text += f", softcap={self.softcap}"
        if self.lse_square_scale:
            text += f", lse_square_scale={self.lse_square_scale}"
        return text

