"""The public ops, with the names and full signatures of their torch counterparts.

Each returns what its counterpart returns (torch_vjp.testing.OPS pairs them), computed by a fused forward
kernel, and differentiates with a fused VJP kernel. Arguments are checked as torch checks them, with
torch's error types. Supported dtypes: float32, float64, float16 and bfloat16 (half types compute in
float32); integer input is promoted or refused as the counterpart does; complex input raises TypeError.
"""
from __future__ import annotations

import operator
import warnings
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ._ops import NO_AUTOCAST, _any_autocast, _grad_enabled, _is_compiling, transforms_active, wrap_dim
from .elementwise import OPS as _ELEMENTWISE
from .gated import OPS as _GATED
from .losses import OPS as _LOSSES
from .losses import _option_logits
from .norm import OPS as _NORM
from .rotary import OPS as _ROPE_OPS
from .rotary import reference as _rope_reference
from .softmax import OPS as _SOFTMAX

__all__ = ["exp", "sigmoid", "tanh", "softplus", "gelu", "silu", "mish", "softmax", "log_softmax", "logsumexp",
           "layer_norm", "rms_norm", "normalize", "add_layer_norm", "add_rms_norm", "swiglu", "geglu", "cross_entropy",
           "fused_linear_cross_entropy", "rope", "rope_cos_sin", "rope_positions"]

Tensor = torch.Tensor
# Each op's per-call entry (VJPOp.call), bound once.
_EXP, _SIGMOID, _TANH, _SOFTPLUS, _GELU, _SILU, _MISH = (
    _ELEMENTWISE[n].call for n in ("exp", "sigmoid", "tanh", "softplus", "gelu", "silu", "mish"))
_SOFTMAX_OP, _LOG_SOFTMAX, _LOGSUMEXP = (_SOFTMAX[n].call for n in ("softmax", "log_softmax", "logsumexp"))
_LAYER_NORM, _RMS_NORM, _NORMALIZE = (_NORM[n].call for n in ("layer_norm", "rms_norm", "normalize"))
_ADD_LAYER_NORM, _ADD_RMS_NORM = (_NORM[n].call for n in ("add_layer_norm", "add_rms_norm"))
_SWIGLU, _GEGLU = _GATED["swiglu"].call, _GATED["geglu"].call
_ROPE = _ROPE_OPS["rope"].call
_CROSS_ENTROPY, _FUSED_LINEAR_CROSS_ENTROPY = (_LOSSES[n].call for n in ("cross_entropy", "fused_linear_cross_entropy"))


# ---------------------------------------------------------------------------------------------------------
# Argument checks, as torch's argument parser makes them (TypeError for a wrong type).

def _int(value, fn: str, arg: str) -> int:
    """An int argument: int, an integer 0-d tensor or anything with __index__; not bool, float or None."""
    if type(value) is int:
        return value
    wrong = isinstance(value, bool) or (
        isinstance(value, Tensor) and (value.dim() != 0 or value.is_floating_point() or value.is_complex()
                                       or value.dtype == torch.bool))
    if not wrong:
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{fn}(): argument '{arg}' must be int, not {type(value).__name__}")


def _bool(value, fn: str, arg: str) -> bool:
    if type(value) is not bool:
        raise TypeError(f"{fn}(): argument '{arg}' must be bool, not {type(value).__name__}")
    return value


def _float(value, fn: str, arg: str) -> float:
    if isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.dim() == 0):
        return float(value)
    raise TypeError(f"{fn}(): argument '{arg}' must be Number, not {type(value).__name__}")


def _str(value, fn: str, arg: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{fn}(): argument '{arg}' must be str, not {type(value).__name__}")
    return value


def _tensor(value, fn: str, arg: str, optional: bool = False):
    if isinstance(value, Tensor) or (optional and value is None):
        return value
    raise TypeError(f"{fn}(): argument '{arg}' must be Tensor, not {type(value).__name__}")


def _shape(value, fn: str) -> list[int]:
    """normalized_shape: a tuple, list or torch.Size of ints (torch refuses a bare int, as here)."""
    if isinstance(value, (tuple, list, torch.Size)):
        return [_int(v, fn, "normalized_shape") for v in value]
    raise TypeError(f"{fn}(): argument 'normalized_shape' must be tuple of ints, not {type(value).__name__}")


def _dims(dim, fn: str) -> list[int] | int:
    """logsumexp's dim: an int, or a sequence (or integer tensor) of ints."""
    if type(dim) is int:
        return dim
    if (isinstance(dim, Tensor) and dim.numel() == 1
            and not (dim.is_floating_point() or dim.is_complex() or dim.dtype == torch.bool)):
        return operator.index(dim)  # as torch's parser: an integer tensor of one element is an int
    if isinstance(dim, (tuple, list, torch.Size)):
        return [_int(d, fn, "dim") for d in dim]
    if not isinstance(dim, bool) and not isinstance(dim, Tensor):
        try:
            return operator.index(dim)
        except TypeError:
            pass
    raise TypeError(f"{fn}(): argument 'dim' must be tuple of ints, not {type(dim).__name__}")


def _check_out(out, input: Tensor, fn: str) -> None:
    if not isinstance(out, Tensor):
        raise TypeError(f"{fn}(): argument 'out' must be Tensor, not {type(out).__name__}")
    if _grad_enabled() and (input.requires_grad or out.requires_grad):
        raise RuntimeError(f"{fn}(): functions with out=... arguments don't support automatic differentiation, "
                           "but one of the arguments requires grad.")


def _write_out(result: Tensor, out: Tensor, fn: str) -> Tensor:
    """torch's out= contract: out is resized to the result's shape (with torch's warning if it held
    elements), written with the result cast to out's dtype where torch allows the cast, and returned."""
    if not torch.can_cast(result.dtype, out.dtype):
        raise RuntimeError(f"{fn}(): result type {result.dtype} can't be cast to the desired output type {out.dtype}")
    if out.shape != result.shape:
        if out.numel() != 0:
            warnings.warn(f"{fn}(): an output with one or more elements was resized since it had shape "
                          f"{list(out.shape)}, which does not match the required output shape {list(result.shape)}. "
                          "This behavior is deprecated (as in torch); resize the output to zero elements first.",
                          UserWarning, stacklevel=4)  # the caller of torch_vjp.<op>(..., out=)
        out.resize_(result.shape)
    return out.copy_(result)


def _into(out: Tensor, call, input: Tensor, fn: str) -> Tensor:
    _check_out(out, input, fn)
    return _write_out(call(input), out, fn)


def _inplace(spec, input: Tensor, *params) -> Tensor:
    """`inplace=True` as torch.nn.functional has it: input is overwritten with the result and returned.

    The kernel writes a new tensor that is then copied into input. Where autograd records (input requires
    grad, or a transform is active), the op runs on a clone, so the input value its VJP needs stays intact
    after the copy; and a leaf that requires grad is refused by copy_ exactly as torch refuses it."""
    records = (_grad_enabled() and input.requires_grad) or transforms_active()
    result = spec.call(input.clone() if records and "input" in spec.saves else input, *params)
    return input.copy_(result)


def _with_args(args: str):
    """Appends the Args and Shape sections several functions share to a function's docstring."""
    def add(fn):
        fn.__doc__ = fn.__doc__.rstrip() + "\n" + args
        return fn

    return add


_OUT_ARGS = """
    Args:
        input (Tensor): any shape; floating, or integer/bool (promoted to the default float dtype).
        out (Tensor, optional): the output tensor (not differentiable, as in torch).

    Shape: output as input.
"""
_INPLACE_ARGS = """
    Args:
        input (Tensor): any shape, floating.
        inplace (bool): write the result into input and return it, as torch does (it is computed out of
            place and copied, so autograd stays exact). Default: False.

    Shape: output as input.
"""


# ---------------------------------------------------------------------------------------------------------
# Elementwise: y has the input's shape, dtype (an integer input of exp, sigmoid and tanh: the default float
# dtype), device and memory format (channels-last stays channels-last).

@_with_args(_OUT_ARGS)
def exp(input: Tensor, *, out: Optional[Tensor] = None) -> Tensor:
    r"""exp(input, *, out=None) -> Tensor

    :math:`y = e^{x}` elementwise, like :func:`torch.exp`. Backward: :math:`dx = dy \odot y` (saves y).

    Under CUDA autocast it runs in float32, as torch.exp does.
    """
    return _EXP(input) if out is None else _into(out, _EXP, input, "exp")


@_with_args(_OUT_ARGS)
def sigmoid(input: Tensor, *, out: Optional[Tensor] = None) -> Tensor:
    r"""sigmoid(input, *, out=None) -> Tensor

    :math:`y = 1 / (1 + e^{-x})` elementwise, like :func:`torch.sigmoid`. Backward:
    :math:`dx = dy \odot y(1 - y)` (saves y).
    """
    return _SIGMOID(input) if out is None else _into(out, _SIGMOID, input, "sigmoid")


@_with_args(_OUT_ARGS)
def tanh(input: Tensor, *, out: Optional[Tensor] = None) -> Tensor:
    r"""tanh(input, *, out=None) -> Tensor

    :math:`y = \tanh x` elementwise, like :func:`torch.tanh`. Backward: :math:`dx = dy \odot (1 - y^2)`
    (saves y).
    """
    return _TANH(input) if out is None else _into(out, _TANH, input, "tanh")


def softplus(input: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    r"""softplus(input, beta=1.0, threshold=20.0) -> Tensor

    :math:`y = \log(1 + e^{\beta x}) / \beta`, and :math:`y = x` where :math:`\beta x > \text{threshold}`;
    like :func:`torch.nn.functional.softplus`. Backward: :math:`dx = dy \odot \sigma(\beta x)` (1 in the
    linear region; saves x).

    Args:
        input (Tensor): any shape, floating.
        beta (float): the :math:`\beta` of the formula. Default: 1.
        threshold (float): above it (in :math:`\beta x`) the op is linear. Default: 20.

    Shape: output as input. Under CUDA autocast it runs in float32, as torch's does.
    """
    return _SOFTPLUS(input, _float(beta, "softplus", "beta"), _float(threshold, "softplus", "threshold"))


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    r"""gelu(input, approximate='none') -> Tensor

    :math:`y = x\,\Phi(x)` (:math:`\Phi` the standard normal CDF), or its tanh approximation with
    ``approximate='tanh'``; like :func:`torch.nn.functional.gelu`. Backward:
    :math:`dx = dy \odot (\Phi(x) + x\varphi(x))` (tanh form for ``'tanh'``; saves x).

    Args:
        input (Tensor): any shape, floating.
        approximate (str): ``'none'`` or ``'tanh'``. Default: ``'none'``.

    Shape: output as input.
    """
    if approximate != "none" and approximate != "tanh":
        if not isinstance(approximate, str):
            raise TypeError(f"gelu(): argument 'approximate' must be str, not {type(approximate).__name__}")
        raise RuntimeError(f"torch_vjp.gelu: approximate argument must be either none or tanh, got '{approximate}'")
    return _GELU(input, approximate)


@_with_args(_INPLACE_ARGS)
def silu(input: Tensor, inplace: bool = False) -> Tensor:
    r"""silu(input, inplace=False) -> Tensor

    :math:`y = x\,\sigma(x)`, like :func:`torch.nn.functional.silu`. Backward:
    :math:`dx = dy \odot \sigma(x)(1 + x(1 - \sigma(x)))` (saves x).
    """
    if inplace:
        return _inplace(_ELEMENTWISE["silu"], input)
    return _SILU(input)


@_with_args(_INPLACE_ARGS)
def mish(input: Tensor, inplace: bool = False) -> Tensor:
    r"""mish(input, inplace=False) -> Tensor

    :math:`y = x \tanh(\operatorname{softplus}(x))`, like :func:`torch.nn.functional.mish`. Backward:
    :math:`dx = dy \odot (t + x\sigma(x)(1 - t^2))`, :math:`t = \tanh(\operatorname{softplus}(x))` (saves x).
    """
    if inplace:
        return _inplace(_ELEMENTWISE["mish"], input)
    return _MISH(input)


# ---------------------------------------------------------------------------------------------------------
# Softmax family: along one dim (row) of any shape.

def _softmax_dim(name: str, input: Tensor, dim, stacklevel: int) -> int:
    """torch.nn.functional's implicit dim (deprecated, with its warning): 0 for 0-, 1- and 3-d input, else 1."""
    if dim is None:
        if not isinstance(input, Tensor):
            raise TypeError(f"torch_vjp.{name}(): argument 'input' must be Tensor, not {type(input).__name__}")
        warnings.warn(f"Implicit dimension choice for {name} has been deprecated. Change the call to include "
                      "dim=X as an argument.", stacklevel=stacklevel)
        return 0 if input.dim() in (0, 1, 3) else 1
    return _int(dim, name, "dim")


def _with_dtype(op, input: Tensor, dim: int, dtype) -> Tensor:
    """F.softmax's dtype: the input is cast to it first, and autocast leaves the call alone (torch's
    "fp32_set_opt_dtype" policy: float32 unless a dtype is given)."""
    input = input.to(dtype)
    if not _is_compiling() and _any_autocast():
        with torch._C._ExcludeDispatchKeyGuard(NO_AUTOCAST):
            return op(input, dim)
    return op(input, dim)


_ROW_MAP_ARGS = """
    Args:
        input (Tensor): any shape, floating (integer input needs ``dtype``, as in torch).
        dim (int): the dim the rows run along. None (deprecated, with torch's warning) picks torch's
            implicit dim: 0 for 0-, 1- and 3-d input, else 1.
        _stacklevel (int): the warning's stack level, as in torch.
        dtype (torch.dtype, optional): cast the input to it first; the output has this dtype.

    Shape: output as input. Under CUDA autocast, a float16/bfloat16 input runs in float32 unless
    ``dtype`` is given, as torch's does.
"""


@_with_args(_ROW_MAP_ARGS)
def softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
            dtype: Optional[torch.dtype] = None) -> Tensor:
    r"""softmax(input, dim=None, _stacklevel=3, dtype=None) -> Tensor

    :math:`y_i = e^{x_i} / \sum_j e^{x_j}` along ``dim``, like :func:`torch.nn.functional.softmax`, with
    its signature. Backward: :math:`dx = y \odot (dy - \langle dy, y\rangle)` (saves y).

    """
    dim = dim if type(dim) is int else _softmax_dim("softmax", input, dim, _stacklevel)
    if dtype is not None:
        return _with_dtype(_SOFTMAX_OP, input, dim, dtype)
    return _SOFTMAX_OP(input, dim)


@_with_args(_ROW_MAP_ARGS)
def log_softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
                dtype: Optional[torch.dtype] = None) -> Tensor:
    r"""log_softmax(input, dim=None, _stacklevel=3, dtype=None) -> Tensor

    :math:`y = x - \log\sum_j e^{x_j}` along ``dim``, like :func:`torch.nn.functional.log_softmax`, with
    its signature. Backward: :math:`dx = dy - e^{y} \sum dy` (saves y).

    """
    dim = dim if type(dim) is int else _softmax_dim("log_softmax", input, dim, _stacklevel)
    if dtype is not None:
        return _with_dtype(_LOG_SOFTMAX, input, dim, dtype)
    return _LOG_SOFTMAX(input, dim)




def logsumexp(input: Tensor, dim: Union[int, Sequence[int]], keepdim: bool = False, *,
              out: Optional[Tensor] = None) -> Tensor:
    r"""logsumexp(input, dim, keepdim=False, *, out=None) -> Tensor

    :math:`\log \sum_j e^{x_j}` over ``dim``, computed stably, like :func:`torch.logsumexp`. Backward:
    :math:`dx = dy \cdot e^{x - \text{out}}` (saves x and out).

    Args:
        input (Tensor): any shape; floating, or integer/bool (promoted to the default float dtype).
        dim (int or tuple of ints): the dim or dims to reduce (an empty tuple: all of them).
        keepdim (bool): keep the reduced dims, with size 1. Default: False.
        out (Tensor, optional): the output tensor (not differentiable, as in torch).

    Shape: input's, without the reduced dims (size 1 with ``keepdim``). Under CUDA autocast it runs in
    float32, as torch's does.
    """
    if type(dim) is not int:
        dim = _dims(dim, "logsumexp")
    keepdim = _bool(keepdim, "logsumexp", "keepdim")
    if out is not None:
        return _into(out, lambda t: _logsumexp(t, dim, keepdim), input, "logsumexp")
    return _logsumexp(input, dim, keepdim)


def _logsumexp(input: Tensor, dim, keepdim: bool) -> Tensor:
    if type(dim) is int:
        return _LOGSUMEXP(input, dim, keepdim)
    if not isinstance(input, Tensor):
        return _LOGSUMEXP(input, 0, keepdim)  # the op's TypeError for a non-tensor
    ndim = input.dim()
    dims = [wrap_dim(d, ndim, "logsumexp") for d in dim] if dim else list(range(ndim))
    if len(set(dims)) != len(dims):
        duplicate = next(d for d in dims if dims.count(d) > 1)
        raise RuntimeError(f"torch_vjp.logsumexp: dim {duplicate} appears multiple times in the list of dims")
    if len(dims) <= 1:
        return _LOGSUMEXP(input, dims[0] if dims else 0, keepdim)
    # Several dims: move them last and flatten them into one row, then reduce that.
    k = len(dims)
    rows = input.movedim(dims, list(range(ndim - k, ndim))).flatten(ndim - k)
    result = _LOGSUMEXP(rows, -1, False)
    if keepdim:
        result = result.reshape([1 if d in dims else s for d, s in enumerate(input.shape)])
    return result


# ---------------------------------------------------------------------------------------------------------
# Normalization: over the trailing normalized_shape (layer_norm, rms_norm) or along one dim (normalize).

def _norm_args(params: str, eps: str) -> str:
    return f"""
    Args:
        input (Tensor): any shape ``(*, *normalized_shape)``, floating.
        normalized_shape (tuple of ints): the trailing dims each row normalizes over (a list or torch.Size too).
{params}        eps ({eps}

    The parameters may have any floating dtype: the output has the input's whatever theirs (float32 weights
    with bfloat16 activations give bfloat16, torch's rule), each parameter's gradient its own.

    Shape: output as input. Under CUDA autocast it runs in float32, as torch's does.
"""


_WEIGHT = "        weight (Tensor, optional): of shape ``normalized_shape``, multiplies x̂. Default: None (ones).\n"


@_with_args(_norm_args(_WEIGHT + "        bias (Tensor, optional): of shape ``normalized_shape``, added. Default: None.\n",
                       "float): added to the variance. Default: 1e-5."))
def layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    r"""layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-05) -> Tensor

    :math:`y = \hat x \odot w + b`, :math:`\hat x = (x - \mu)\,/\sqrt{\sigma^2 + \epsilon}` over each row of the
    trailing ``normalized_shape``, like :func:`torch.nn.functional.layer_norm`. Backward (saves x and the
    per-row :math:`\mu`, :math:`r = 1/\sqrt{\sigma^2+\epsilon}`):
    :math:`dx = r\,(g - \overline{g} - \hat x\,\overline{g \hat x})` with :math:`g = dy \odot w`;
    :math:`dw = \sum_\text{rows} dy \odot \hat x`, :math:`db = \sum_\text{rows} dy`, deterministic.
    """
    fn = "layer_norm"
    if isinstance(input, Tensor) and input.is_complex():
        raise NotImplementedError(f'torch_vjp.layer_norm: not implemented for {input.dtype} input (as torch\'s '
                                  f'"LayerNormKernelImpl")')
    return _LAYER_NORM(input, _shape(normalized_shape, fn), _tensor(weight, fn, "weight", True),
                       _tensor(bias, fn, "bias", True), _float(eps, fn, "eps"))


_RMS_OPTIONS = """        offset (float): x̂ is scaled by ``offset + weight`` (Gemma's RMSNorm: ``offset=1.0``, its weight stored
            as the difference from one); its gradient is the weight's. Default: 0.
        casting_mode (str): where the result is rounded to the input dtype, for half-precision input.
            ``"torch"``: as :func:`torch.nn.functional.rms_norm`, x̂ and its product with the weight in float32,
            rounded once. ``"gemma"``: the same rounding (Gemma's modules scale in float32, then cast).
            ``"llama"``: as transformers' ``LlamaRMSNorm``, x̂ in float32 rounded to the input dtype, then
            multiplied by the weight in the weight's and the input's promoted dtype, which is the output's
            (a float32 weight beside bfloat16 input gives float32, as the module does). The gradients are the
            same in every mode (rounding is taken to have derivative 1). Default: ``"torch"``.
"""


def _rms_eps(eps, input):
    if eps is None:
        return torch.finfo(input.dtype).eps if isinstance(input, Tensor) and input.is_floating_point() else 0.0
    return eps


def _casting_mode(casting_mode, fn: str) -> str:
    casting_mode = _str(casting_mode, fn, "casting_mode")
    if casting_mode not in ("torch", "gemma", "llama"):
        raise ValueError(f"torch_vjp.{fn}: casting_mode must be 'torch', 'gemma' or 'llama', got '{casting_mode}'")
    return casting_mode


def _promotes(input, weight) -> bool:
    """casting_mode="llama" with a weight whose dtype promotes the output beyond the input's (a float32 weight
    beside bfloat16 input): the kernel gives round(x̂) and the weight multiplies it in torch ops, as the module."""
    return (isinstance(input, Tensor) and isinstance(weight, Tensor) and input.is_floating_point()
            and weight.is_floating_point() and torch.promote_types(input.dtype, weight.dtype) != input.dtype)


def _scaled(y, weight, offset):
    return (weight if offset == 0 else weight + offset) * y


@_with_args(_norm_args(_WEIGHT + _RMS_OPTIONS, "float, optional): added to the mean square. Default: None, which "
                                               "is ``torch.finfo(input.dtype).eps``, as torch's."))
def rms_norm(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
             eps: Optional[float] = None, offset: float = 0.0, casting_mode: str = "torch") -> Tensor:
    r"""rms_norm(input, normalized_shape, weight=None, eps=None, offset=0.0, casting_mode="torch") -> Tensor

    :math:`y = \hat x \odot (o + w)`, :math:`\hat x = x\,/\sqrt{\overline{x^2} + \epsilon}` over each row of the
    trailing ``normalized_shape``, like :func:`torch.nn.functional.rms_norm` (which is ``offset=0``). Backward
    (saves x and the per-row :math:`r`): :math:`dx = r\,(g - \hat x\,\overline{g \hat x})` with
    :math:`g = dy \odot (o + w)`; :math:`dw = \sum_\text{rows} dy \odot \hat x`, deterministic.
    """
    fn = "rms_norm"
    if isinstance(input, Tensor) and isinstance(normalized_shape, (tuple, list, torch.Size)) \
            and input.dim() < len(normalized_shape):
        raise ValueError(f"torch_vjp.rms_norm: normalized_shape={list(normalized_shape)} has more dims than the input "
                         f"of size {list(input.shape)} (torch raises ValueError here too)")
    offset, casting_mode = _float(offset, fn, "offset"), _casting_mode(casting_mode, fn)
    if offset == 0 and casting_mode == "torch" and ((isinstance(input, Tensor) and input.is_complex()) or (
            isinstance(weight, Tensor) and isinstance(input, Tensor) and input.is_floating_point()
            and not weight.is_floating_point())):
        # Forms torch computes by its composite (complex input, an integer or complex weight): torch's own.
        return F.rms_norm(input, normalized_shape, weight, eps)
    eps = _rms_eps(eps, input)
    shape, weight, eps = _shape(normalized_shape, fn), _tensor(weight, fn, "weight", True), _float(eps, fn, "eps")
    if casting_mode == "llama" and _promotes(input, weight):
        return _scaled(_RMS_NORM(input, shape, None, eps, 0.0, casting_mode), weight, offset)
    return _RMS_NORM(input, shape, weight, eps, offset, casting_mode)


_ADD_ARGS = """        residual (Tensor): of the input's shape, dtype and device; s = input + residual is normalized.
"""


def _add_norm_doc(params: str, eps: str) -> str:
    return _norm_args(params, eps).replace("floating.\n", "floating.\n" + _ADD_ARGS, 1).replace(
        "Shape: output as input. Under CUDA autocast it runs in float32, as torch's does.",
        "Shape: both outputs as input. It runs in its inputs' dtype under autocast (torch's lists hold no add:\n"
        "    the eager ``residual + x`` keeps the input dtype).")


@_with_args(_add_norm_doc(_WEIGHT + "        bias (Tensor, optional): of shape ``normalized_shape``, added. Default: "
                                    "None.\n", "float): added to the variance. Default: 1e-5."))
def add_layer_norm(input: Tensor, residual: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    r"""add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-05) -> (Tensor, Tensor)

    :math:`s = x + \text{residual}` (rounded to the input dtype, as the eager ``residual + x``), then
    :func:`layer_norm` of :math:`s`; returns ``(layer_norm(s), s)``, the pre-norm decoder layer's pattern (s is
    the next residual), in one pass over the inputs on the CPU. Backward: the gradient of ``input`` and of
    ``residual`` is one tensor, :math:`ds + \text{layer\_norm's } dx` at :math:`s` (ds, the gradient reaching s
    from its other uses), added in the dx pass; the parameters' are layer_norm's.
    """
    fn = "add_layer_norm"
    return _ADD_LAYER_NORM(_tensor(input, fn, "input"), _tensor(residual, fn, "residual"), _shape(normalized_shape, fn),
                           _tensor(weight, fn, "weight", True), _tensor(bias, fn, "bias", True), _float(eps, fn, "eps"))


@_with_args(_add_norm_doc(_WEIGHT + _RMS_OPTIONS, "float, optional): added to the mean square. Default: None, "
                                                  "which is ``torch.finfo(input.dtype).eps``."))
def add_rms_norm(input: Tensor, residual: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
                 eps: Optional[float] = None, offset: float = 0.0, casting_mode: str = "torch"
                 ) -> tuple[Tensor, Tensor]:
    r"""add_rms_norm(input, residual, normalized_shape, weight=None, eps=None, offset=0.0, casting_mode="torch") -> (Tensor, Tensor)

    :math:`s = x + \text{residual}` (rounded to the input dtype, as the eager ``residual + x``), then
    :func:`rms_norm` of :math:`s`; returns ``(rms_norm(s), s)``, the pre-norm decoder layer's pattern (s is the
    next residual), in one pass over the inputs on the CPU. Backward: the gradient of ``input`` and of
    ``residual`` is one tensor, :math:`ds + \text{rms\_norm's } dx` at :math:`s`, added in the dx pass; the
    weight's is rms_norm's.
    """
    fn = "add_rms_norm"
    offset, casting_mode = _float(offset, fn, "offset"), _casting_mode(casting_mode, fn)
    input, residual = _tensor(input, fn, "input"), _tensor(residual, fn, "residual")
    shape, weight, eps = _shape(normalized_shape, fn), _tensor(weight, fn, "weight", True), _rms_eps(eps, input)
    eps = _float(eps, fn, "eps")
    if casting_mode == "llama" and _promotes(input, weight):
        y, s = _ADD_RMS_NORM(input, residual, shape, None, eps, 0.0, casting_mode)
        return _scaled(y, weight, offset), s
    return _ADD_RMS_NORM(input, residual, shape, weight, eps, offset, casting_mode)


def normalize(input: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out: Optional[Tensor] = None) -> Tensor:
    r"""normalize(input, p=2.0, dim=1, eps=1e-12, out=None) -> Tensor

    :math:`y = x / \max(\lVert x \rVert_p, \epsilon)` along ``dim``, like :func:`torch.nn.functional.normalize`.
    For p = 2, fused kernels; backward (saves y and the per-row norm :math:`\rho`):
    :math:`dx = (dy - y\,\langle y, dy\rangle)/\rho`, or :math:`dy/\epsilon` where :math:`\rho \le \epsilon`
    (torch's tie rule); a row of one element has :math:`\rho = |x|`, as torch's norm. Any other p, a named norm,
    several dims (or ``dim=None``) and complex input are computed as torch computes them (its norm, clamp and
    division, so its autograd).

    Args:
        input (Tensor): any shape, floating.
        p (float or str): the exponent of the norm. Default: 2.
        dim (int, tuple of ints or None): the dim the rows run along. Default: 1 (torch's).
        eps (float): the smallest norm divided by. Default: 1e-12.
        out (Tensor, optional): the output tensor (not differentiable, as in torch).

    Shape: output as input. Under CUDA autocast it runs in float32 (torch's norm does, and its division then
    gives float32).
    """
    fn = "normalize"
    if isinstance(p, str) or dim is None or isinstance(dim, (tuple, list, torch.Size)) or (
            isinstance(input, Tensor) and input.is_complex()):
        # Forms torch takes and torch_vjp does not fuse (a named norm, several dims or all of them, complex
        # input): torch's own computation.
        return F.normalize(input, p, dim, eps, out)
    p, dim, eps = _float(p, fn, "p"), _int(dim, fn, "dim"), _float(eps, fn, "eps")
    if p == 2.0:
        call = lambda t: _NORMALIZE(t, dim, eps)  # noqa: E731
    else:
        call = lambda t: t / t.norm(p, dim, keepdim=True).clamp_min(eps).expand_as(t)  # noqa: E731  torch's own
    return call(input) if out is None else _into(out, call, input, fn)


# ---------------------------------------------------------------------------------------------------------
# Gated activations: f(gate) ⊙ up, gate and up of one shape.

_GATED_ARGS = """
    Args:
        gate (Tensor): any shape, floating: the activation's argument.
        up (Tensor): the shape, dtype and device of gate (no broadcasting).

    Shape: output as gate.
"""


@_with_args(_GATED_ARGS)
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    r"""swiglu(gate, up) -> Tensor

    :math:`y = \operatorname{silu}(a) \odot b` for the gate a and the up projection b (a SwiGLU MLP's
    ``silu(x W_g) * (x W_u)``). Backward (saves a and b): :math:`da = dy \odot b \odot \operatorname{silu}'(a)`,
    :math:`db = dy \odot \operatorname{silu}(a)`, one pass.
    """
    return _SWIGLU(gate, _tensor(up, "swiglu", "up"))


@_with_args(_GATED_ARGS + """        approximate (str): gelu's form, ``'tanh'`` or ``'none'``. Default: ``'tanh'``.
""")
def geglu(gate: Tensor, up: Tensor, approximate: str = "tanh") -> Tensor:
    r"""geglu(gate, up, approximate='tanh') -> Tensor

    :math:`y = \operatorname{gelu}(a) \odot b`, gelu's tanh form by default. Backward (saves a and b):
    :math:`da = dy \odot b \odot \operatorname{gelu}'(a)`, :math:`db = dy \odot \operatorname{gelu}(a)`.
    """
    if approximate != "none" and approximate != "tanh":
        _str(approximate, "geglu", "approximate")
        raise RuntimeError(f"torch_vjp.geglu: approximate argument must be either none or tanh, got '{approximate}'")
    return _GEGLU(gate, _tensor(up, "geglu", "up"), approximate)


# ---------------------------------------------------------------------------------------------------------
# Rotary position embedding.

def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    r"""rope(q, k, cos, sin, unsqueeze_dim=1) -> (Tensor, Tensor)

    Rotary position embedding of q and k in one call, transformers' ``apply_rotary_pos_emb`` (rotate-half
    convention): :math:`y = x \odot \cos + \operatorname{rotate\_half}(x) \odot \sin` with
    :math:`\operatorname{rotate\_half}(x) = (-x_2, x_1)`, cos and sin unsqueezed at ``unsqueeze_dim``. Partial
    rotary dims: when cos's last dim R is smaller than the head dim, the first R elements of each row rotate
    and the rest pass through (Phi, GPT-NeoX's ``rotary_ndims``). Backward (saves cos and sin; q and k too only
    when cos or sin require grad): the transposed rotation :math:`dx = dy \odot \cos -
    \operatorname{rotate\_half}(dy \odot \sin)`, and, when asked, the gradients of cos and sin.

    Args:
        q (Tensor): queries (..., D), floating, e.g. (batch, heads, seq, head_dim).
        k (Tensor): keys (..., D), floating; its leading dims may differ from q's (fewer key heads).
        cos (Tensor): (..., R), R even and at most D, e.g. (batch, seq, R); cos.unsqueeze(unsqueeze_dim) must
            broadcast to the leading dims of q and of k (the outputs have their shapes).
        sin (Tensor): cos's shape.
        unsqueeze_dim (int): where cos and sin get the dim they broadcast over (1 for q of shape
            (batch, heads, seq, head_dim), 2 for (batch, seq, heads, head_dim)). Default: 1.

    Shape: the outputs as q and k. Dtype: the four tensors' promoted dtype, as torch's formula gives it
    (bfloat16 q with float32 cos gives float32); integer or bool q or k are left to torch's formula itself.
    """
    fn = "rope"
    q, k, cos, sin = (_tensor(t, fn, name) for t, name in ((q, "q"), (k, "k"), (cos, "cos"), (sin, "sin")))
    unsqueeze_dim = _int(unsqueeze_dim, fn, "unsqueeze_dim")
    if not (q.is_floating_point() and k.is_floating_point()) and not (q.is_complex() or k.is_complex()):
        # Integer or bool q or k: torch's formula itself, as torch computes it (its integer negation in
        # rotate_half wraps around for uint8, and bool has none): there is no kernel of ours to run.
        return _rope_reference(q, k, cos, sin, unsqueeze_dim)
    dtype = q.dtype
    for t in (k, cos, sin):
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype.is_floating_point and not (q.dtype == k.dtype == cos.dtype == sin.dtype):
        q, k, cos, sin = (t.to(dtype) for t in (q, k, cos, sin))  # torch's type promotion: exact widening
    return _ROPE(q, k, cos, sin, unsqueeze_dim)


def rope_cos_sin(positions: Tensor, inv_freq: Optional[Tensor] = None, *, dim: Optional[int] = None,
                 theta: float = 10000.0, attention_scaling: float = 1.0, dtype: Optional[torch.dtype] = None
                 ) -> tuple[Tensor, Tensor]:
    r"""rope_cos_sin(positions, inv_freq=None, *, dim=None, theta=10000.0, attention_scaling=1.0, dtype=None) -> (Tensor, Tensor)

    The cos and sin tables :func:`rope` takes, from position ids, computed as transformers' default rotary
    embedding (``LlamaRotaryEmbedding``) computes them, operation for operation (so the same bits):
    :math:`\text{inv\_freq}_i = 1 / \theta^{2i/\text{dim}}` in float32 (when not given),
    :math:`f = \text{positions} \cdot \text{inv\_freq}` in float32, :math:`e = (f, f)` concatenated,
    :math:`\cos = \cos(e) \cdot \text{attention\_scaling}`, the same for sin, then cast to ``dtype``.

    Args:
        positions (Tensor): integer (or floating) position ids, (batch, seq) as transformers' ``position_ids``
            (or any shape: the tables get a last dim of size dim).
        inv_freq (Tensor, optional): the inverse frequencies (dim / 2,), e.g. a rotary embedding module's
            ``inv_freq`` buffer (scaled RoPE types: llama3, yarn, linear, ...). Default: the plain RoPE ones from
            ``dim`` and ``theta``.
        dim (int, optional): the rotary dim R (even): the head dim, or less for partial rotary. Needed when
            ``inv_freq`` is not given.
        theta (float): the RoPE base (transformers' ``rope_theta``). Default: 10000.
        attention_scaling (float): the factor cos and sin are multiplied by (transformers' ``attention_scaling``
            of scaled RoPE types; 1 for plain RoPE). Default: 1.
        dtype (torch.dtype, optional): the tables' dtype (transformers casts them to the hidden states'
            dtype). Default: float32.

    Shape: cos and sin are ``positions.shape + (R,)``, R = 2 · len(inv_freq). Not differentiable in positions.
    """
    if inv_freq is None:
        if dim is None:
            raise TypeError("torch_vjp.rope_cos_sin: give inv_freq or dim (the rotary dim)")
        dim = _int(dim, "rope_cos_sin", "dim")
        if dim <= 0 or dim % 2:
            raise ValueError(f"torch_vjp.rope_cos_sin: dim must be even and positive, got {dim}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=positions.device) / dim))
    freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * attention_scaling, emb.sin() * attention_scaling
    if dtype is not None:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos, sin


def rope_positions(q: Tensor, k: Tensor, positions: Tensor, inv_freq: Optional[Tensor] = None, *,
                   dim: Optional[int] = None, theta: float = 10000.0, attention_scaling: float = 1.0,
                   unsqueeze_dim: int = 1, dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    r"""rope_positions(q, k, positions, inv_freq=None, *, dim=None, theta=10000.0, attention_scaling=1.0, unsqueeze_dim=1, dtype=None) -> (Tensor, Tensor)

    :func:`rope` from position ids: the cos and sin tables of :func:`rope_cos_sin` (transformers' rotary
    embedding), then ``rope(q, k, cos, sin, unsqueeze_dim)``; the same result as transformers'
    ``apply_rotary_pos_emb(q, k, *rotary_emb(x, positions))``.

    Args:
        q (Tensor): queries (batch, heads, seq, head_dim) (or (batch, seq, heads, head_dim) with unsqueeze_dim=2).
        k (Tensor): keys, q's layout (fewer heads allowed).
        positions (Tensor): position ids (batch, seq); a 1-D (seq,) is taken as (1, seq).
        inv_freq (Tensor, optional): see :func:`rope_cos_sin`. Default: plain RoPE of ``dim`` and ``theta``.
        dim (int, optional): the rotary dim; default the head dim (q's last), less for partial rotary.
        theta (float): the RoPE base. Default: 10000.
        attention_scaling (float): see :func:`rope_cos_sin`. Default: 1.
        unsqueeze_dim (int): as :func:`rope`'s. Default: 1.
        dtype (torch.dtype, optional): the tables' dtype; transformers uses the hidden states' dtype, which is
            q's unless autocast changed q. Default: q's dtype.

    Shape: the outputs as q and k.
    """
    q, k = _tensor(q, "rope_positions", "q"), _tensor(k, "rope_positions", "k")
    positions = _tensor(positions, "rope_positions", "positions")
    if positions.dim() == 1:
        positions = positions[None]
    if inv_freq is None and dim is None:
        dim = q.shape[-1]
    cos, sin = rope_cos_sin(positions, inv_freq, dim=dim, theta=theta, attention_scaling=attention_scaling,
                            dtype=q.dtype if dtype is None else dtype)
    return rope(q, k, cos, sin, unsqueeze_dim)


# ---------------------------------------------------------------------------------------------------------
# Losses over class-index targets.

def _reduction(size_average, reduce, reduction: str) -> str:
    """torch's legacy size_average / reduce, which override reduction (with torch's deprecation warning); a
    reduction that is not one of torch's names (None included) is torch's ValueError."""
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction as legacy

        return legacy.legacy_get_string(size_average, reduce)
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def _class_weight(value, fn: str, arg: str):
    """Class weights: a tensor or None; refused where it requires grad (torch's nll_loss refuses it: the loss is
    not differentiable with respect to its weight)."""
    value = _tensor(value, fn, arg, True)
    if value is not None and value.requires_grad and _grad_enabled():
        raise RuntimeError(f"torch_vjp.{fn} is not differentiable with respect to argument '{arg}' (as torch's "
                           f"nll_loss_forward is not). This input cannot have requires_grad True.")
    return value


def _label_smoothing(value, fn: str) -> float:
    """ε as torch takes it: a Number; ≤ 0 or NaN is no smoothing; above 1 torch's RuntimeError (the kernels')."""
    value = _float(value, fn, "label_smoothing")
    return value if value > 0.0 else 0.0


def _softcap(value, fn: str) -> float:
    """softcap: None or 0 (off), else a positive finite Number; a negative, NaN or infinite one is a ValueError."""
    if value is None:
        return 0.0
    value = _float(value, fn, "softcap")
    if not (value >= 0.0 and value != float("inf")):
        raise ValueError(f"{fn}(): softcap must be a positive finite number (or None or 0 for none), got {value}")
    return value


def _lse_square_scale(value, fn: str) -> float:
    value = _float(value, fn, "lse_square_scale")
    if not (value >= 0.0 and value != float("inf")):
        raise ValueError(f"{fn}(): lse_square_scale must be a non-negative finite number, got {value}")
    return value


def _z_loss(lse_of_rows, target, ignore_index, reduction, lse_square_scale, dtype, token_weight=None):
    """return_z_loss's value: λ lse² per counted row from `lse_of_rows()` (computed only when λ > 0), reduced as
    the loss (with the token weights), detached (for logging: the loss already holds it)."""
    from .losses import z_loss_of
    with torch.no_grad():
        if lse_square_scale > 0:
            per_row = reduction if token_weight is None else "none"
            z = z_loss_of(lse_of_rows(), target.reshape(-1), ignore_index, per_row, lse_square_scale)
            if token_weight is not None:
                return _token_reduce(z.reshape(target.shape), target, token_weight, None, ignore_index,
                                     reduction).to(dtype)
        else:
            z = torch.zeros(target.numel() if reduction == "none" else (), device=target.device)
        return (z.reshape(target.shape) if reduction == "none" else z).to(dtype)


def _token_weight(value, target, fn: str):
    """Per-token weights: a floating tensor shaped like the target, on its device (None: none)."""
    value = _tensor(value, fn, "token_weight", True)
    if value is None:
        return None
    if not value.is_floating_point():
        raise TypeError(f"{fn}(): token_weight must be a floating tensor, got {value.dtype}")
    if value.shape != target.shape:
        raise ValueError(f"{fn}(): expected token_weight of the target's shape {list(target.shape)}, got "
                         f"{list(value.shape)}")
    if value.device != target.device:
        raise RuntimeError(f"{fn}(): expected token_weight on the target's device {target.device}, got {value.device}")
    if type(value) is not Tensor or type(target) is not Tensor:
        raise NotImplementedError(f"torch_vjp.{fn}: token_weight with DTensor arguments is not implemented")
    return value


def _token_reduce(per_row, target, token_weight, class_weight, ignore_index, reduction):
    """Row losses (reduction='none': target-shaped, class weights applied, 0 where ignored) times the token
    weights, reduced in the compute type and rounded once: 'sum' Σ_i v_i l_i; 'mean' divides that by
    Σ_i v_i w_{t_i} over the rows not ignored (w_t = 1 without class weights), as torch's class-weighted mean."""
    dtype = per_row.dtype
    ct = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    v = token_weight.to(ct)
    weighted = per_row.to(ct) * v
    if reduction == "none":
        return weighted.to(dtype)
    total = weighted.sum()
    if reduction == "mean":
        counted = target != ignore_index
        if class_weight is None:
            row_w = counted.to(ct)
        else:
            picked = class_weight.to(ct)[torch.where(counted, target, 0).long()]
            row_w = torch.where(counted, picked, 0)
        total = total / (row_w * v).sum()
    return total.to(dtype)


def _token_accuracy(argmax_of_rows, target, ignore_index, reduction, dtype):
    """return_token_accuracy's value, detached: whether each counted row's largest logit is at its target
    (torch.argmax's: the first of tied maxima), 0 for an ignored row; 'sum' counts them and 'mean' divides by the
    rows not ignored (NaN where every row is), unweighted by class or token weights."""
    with torch.no_grad():
        flat = target.reshape(-1)
        counted = flat != ignore_index
        hit = ((argmax_of_rows() == flat) & counted).to(torch.float64 if dtype == torch.float64 else torch.float32)
        if reduction == "none":
            return hit.reshape(target.shape).to(dtype)
        total = hit.sum()
        return (total / counted.sum() if reduction == "mean" else total).to(dtype)


def _with_extras(loss, z_loss, accuracy):
    extras = tuple(e for e in (z_loss, accuracy) if e is not None)
    return (loss, *extras) if extras else loss


_LOSS_OPTIONS = """
        softcap (float, optional): keyword only. Gemma 2's final-logit softcapping inside the loss: the loss
            (and its gradient, through tanh) of ``softcap * tanh(input / softcap)``, formed in float32 for half
            types. None or 0: off. Default: None.
        lse_square_scale (float): keyword only. PaLM's z-loss λ: ``λ·logsumexp(logits)²`` is added to each row's
            loss (0 for an ignored row) and reduced with it; with a softcap, of the capped logits. Not with class
            weights (NotImplementedError). Default: 0.
        return_z_loss (bool): keyword only. Return ``(loss, z_loss)``, the z-loss term reduced as the loss,
            detached (for logging; the loss already holds it; zeros for λ = 0). Default: False.
        token_weight (Tensor, optional): keyword only. A floating weight per row (per token), shaped like the
            target: row i's loss (and its z-loss) is multiplied by ``token_weight[i]``; ``'sum'`` sums the weighted
            losses and ``'mean'`` divides that by the sum of the weights of the rows not ignored (times their class
            weights), as torch's class-weighted mean. Differentiable (the gradient of the loss with respect to a
            token's weight is its row's loss). Computed from the ``'none'`` loss (for the fused loss the backward
            then recomputes the logits chunk by chunk). Default: None.
        return_token_accuracy (bool): keyword only. Also return the token accuracy (after the z-loss where both
            are asked for): whether each row's largest logit is at its target (``torch.argmax``'s first maximum,
            of the logits before any softcap, which keeps their order), per row for ``'none'`` (0 for an ignored
            row), counted for ``'sum'``, the fraction of the rows not ignored for ``'mean'``; unweighted, detached,
            in the loss's dtype. One more pass over the logits (for the fused loss, one more matrix product chunk by
            chunk, without gradients). Default: False."""

_LOSS_ARGS = """
        ignore_index (int): a target value that is ignored: its loss is 0 and it does not count in the mean
            (a 'mean' over only ignored targets is NaN, as torch's). Default: -100.
        reduction (str): ``'none'`` (a loss per row), ``'mean'`` or ``'sum'``. Default: ``'mean'``.
        label_smoothing (float): ε in [0, 1]: the target is (1 - ε) one-hot + ε/C uniform. Default: 0.

    The loss and the gradient come back in the input's dtype, computed in float32 for half types. A target out
    of range raises IndexError on the CPU; on CUDA the kernel asserts on the device.
"""


@_with_args("""
    Args:
        input (Tensor): logits, ``(N, C)``, ``(C,)`` or ``(N, C, d1, ...)`` (the class dim second), floating.
        target (Tensor): class indices (int64 or uint8), ``(N,)``, ``()`` or ``(N, d1, ...)``.
        weight (Tensor, optional): class weights ``(C,)``, of the input's dtype and device, as torch's: row i's
            loss is weighted by ``weight[target_i]`` and ``'mean'`` divides by the sum of those weights over the
            rows not ignored; with label smoothing the smoothing term is weighted per class as torch's. Not
            differentiable (a weight that requires grad is refused, as torch refuses it).
        size_average (bool, optional): torch's deprecated form of ``reduction`` (with its warning).
        reduce (bool, optional): likewise.""" + _LOSS_OPTIONS + _LOSS_ARGS + """
    Shape: the loss is a scalar, or the target's shape for ``reduction='none'``. Under autocast (CUDA and CPU)
    it runs in float32, as torch's does.
""")
def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average: Optional[bool] = None,
                  ignore_index: int = -100, reduce: Optional[bool] = None, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, softcap: Optional[float] = None, lse_square_scale: float = 0.0,
                  return_z_loss: bool = False, token_weight: Optional[Tensor] = None,
                  return_token_accuracy: bool = False) -> Tensor:
    r"""cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction='mean', label_smoothing=0.0, *, softcap=None, lse_square_scale=0.0, return_z_loss=False, token_weight=None, return_token_accuracy=False) -> Tensor

    :math:`\ell_i = \operatorname{lse}(x_i) - (1 - \varepsilon) x_{i,t_i} - \tfrac{\varepsilon}{C} \sum_j x_{ij}`,
    reduced, like :func:`torch.nn.functional.cross_entropy` with class-index targets. Backward (saves x and the
    per-row lse): :math:`dx_i = s_i\,(\operatorname{softmax}(x_i) - \tfrac{\varepsilon}{C} - (1-\varepsilon)\,
    \operatorname{onehot}(t_i))`, one pass, with :math:`s_i` the row's share of dy (0 for an ignored row).
    """
    fn = "cross_entropy"
    _tensor(input, fn, "input")
    _tensor(target, fn, "target")
    weight = _class_weight(weight, fn, "weight")
    reduction = _reduction(size_average, reduce, reduction)
    ignore_index, label_smoothing = _int(ignore_index, fn, "ignore_index"), _label_smoothing(label_smoothing, fn)
    softcap, lse_square_scale = _softcap(softcap, fn), _lse_square_scale(lse_square_scale, fn)
    if weight is not None and lse_square_scale > 0:
        raise NotImplementedError("torch_vjp.cross_entropy: class weights with the z-loss (lse_square_scale > 0) are "
                                  "not implemented")
    if target.is_floating_point() and target.shape == input.shape and input.dim() > 0:
        raise NotImplementedError("torch_vjp.cross_entropy: class-probability targets (a floating target shaped like "
                                  "the input) are not implemented; give class indices")
    if input.dim() == 1 and target.dim() == 1:  # torch takes a target of one element for one row of logits
        if target.numel() != 1:
            raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.numel()}")
        target = target.reshape(())
        if token_weight is not None and isinstance(token_weight, Tensor) and token_weight.dim() == 1:
            token_weight = token_weight.reshape(())
    token_weight = _token_weight(token_weight, target, fn)
    options = (softcap, lse_square_scale)
    if token_weight is None:
        loss = _cross_entropy_rows(input, target, weight, ignore_index, reduction, label_smoothing, options)
    else:
        loss = _token_reduce(_cross_entropy_rows(input, target, weight, ignore_index, "none", label_smoothing, options),
                             target, token_weight, weight, ignore_index, reduction)
    if not (return_z_loss or return_token_accuracy):
        return loss
    rows = input.movedim(1, -1).reshape(-1, input.shape[1]) if input.dim() > 2 else input
    lse = lambda: torch.logsumexp(_option_logits(rows, softcap), -1)  # noqa: E731
    z_loss = _z_loss(lse, target, ignore_index, reduction, lse_square_scale, loss.dtype, token_weight) \
        if return_z_loss else None
    accuracy = _token_accuracy(lambda: rows.argmax(-1).reshape(-1), target, ignore_index, reduction, loss.dtype) \
        if return_token_accuracy else None
    return _with_extras(loss, z_loss, accuracy)


def _cross_entropy_rows(input, target, weight, ignore_index, reduction, label_smoothing, options):
    if input.dim() <= 2:
        if type(input) is not Tensor and type(input).__name__ == "DTensor":  # logits sharded by class: vocab-parallel
            from . import distributed
            if weight is not None and (distributed.is_class_sharded(input) or reduction == "mean"):
                raise NotImplementedError("torch_vjp.cross_entropy: class weights with vocabulary-parallel or "
                                          "row-sharded 'mean' DTensor logits are not implemented")
            if distributed.is_class_sharded(input):
                if any(options):
                    raise NotImplementedError("torch_vjp.cross_entropy: softcap and lse_square_scale with "
                                              "vocabulary-parallel DTensor logits are not implemented")
                return distributed.vocab_parallel_cross_entropy(input, target, ignore_index, reduction, label_smoothing)
            if reduction == "mean" and distributed.rows_sharded(input, target):  # rows sharded: the sum, the count
                total = _CROSS_ENTROPY(input, target, None, ignore_index, "sum", label_smoothing, *options)
                return distributed.mean_of_sharded_rows(total, target, ignore_index)
        return _CROSS_ENTROPY(input, target, weight, ignore_index, reduction, label_smoothing, *options)
    # (N, C, d1, ...): every position a row of C logits.
    expected = [input.shape[0], *input.shape[2:]]
    if list(target.shape) != expected:
        raise RuntimeError(f"Expected target size {expected}, got {list(target.shape)}")
    rows = input.movedim(1, -1).reshape(-1, input.shape[1])
    loss = _CROSS_ENTROPY(rows, target.reshape(-1), weight, ignore_index, reduction, label_smoothing, *options)
    return loss.reshape(target.shape) if reduction == "none" else loss


@_with_args("""
    Args:
        input (Tensor): hidden states, ``(N, H)``, floating.
        weight (Tensor): the head, ``(V, H)``, of the input's dtype and device.
        target (Tensor): class indices (int64 or uint8), ``(N,)``.
        bias (Tensor, optional): ``(V,)``.""" + _LOSS_ARGS + """
        class_weight (Tensor, optional): class weights ``(V,)`` (keyword only), as ``weight=`` of
            :func:`cross_entropy` (torch's ``F.cross_entropy(weight=)``): named apart from the head ``weight``.""" +
    _LOSS_OPTIONS + """ Here the z-loss's value is recomputed chunk by chunk (the matrix product
            once more, without gradients) when asked for.

    Shape: the loss is a scalar, or ``(N,)`` for ``reduction='none'``. Under autocast (CUDA and CPU) the matrix
    products run in the autocast dtype and the loss comes back in float32, as torch's linear + cross_entropy
    give it: the float32 loss of the low-precision logits, never rounded to the autocast dtype.
""")
def fused_linear_cross_entropy(input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                               ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, *,
                               class_weight: Optional[Tensor] = None, softcap: Optional[float] = None,
                               lse_square_scale: float = 0.0, return_z_loss: bool = False,
                               token_weight: Optional[Tensor] = None, return_token_accuracy: bool = False) -> Tensor:
    r"""fused_linear_cross_entropy(input, weight, target, bias=None, ignore_index=-100, reduction='mean', label_smoothing=0.0, *, class_weight=None, softcap=None, lse_square_scale=0.0, return_z_loss=False, token_weight=None, return_token_accuracy=False) -> Tensor

    ``cross_entropy(input @ weight.T + bias, target, ...)`` without ever holding the ``(N, V)`` logits or their
    gradient: rows go in chunks, each chunk's logits reduced and turned into its gradient contribution at once.
    Where the gradient is wanted (and not differentiated again), the forward computes it too, so forward and
    backward together take three matrix products and the backward only scales the result.
    """
    fn = "fused_linear_cross_entropy"
    _tensor(input, fn, "input")
    weight, target, bias = _tensor(weight, fn, "weight"), _tensor(target, fn, "target"), _tensor(bias, fn, "bias", True)
    reduction = _reduction(None, None, reduction)
    ignore_index, label_smoothing = _int(ignore_index, fn, "ignore_index"), _label_smoothing(label_smoothing, fn)
    class_weight = _class_weight(class_weight, fn, "class_weight")
    softcap, lse_square_scale = _softcap(softcap, fn), _lse_square_scale(lse_square_scale, fn)
    if class_weight is not None and lse_square_scale > 0:
        raise NotImplementedError("torch_vjp.fused_linear_cross_entropy: class weights with the z-loss "
                                  "(lse_square_scale > 0) are not implemented")
    options = (softcap, lse_square_scale)
    token_weight = _token_weight(token_weight, target, fn)
    if token_weight is None:
        loss = _fused_rows(input, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, options)
    else:
        if type(weight) is not Tensor or type(input) is not Tensor:
            raise NotImplementedError(f"torch_vjp.{fn}: token_weight with DTensor arguments is not implemented")
        per_row = _fused_rows(input, weight, target, bias, class_weight, ignore_index, "none", label_smoothing, options,
                              rounded=False)
        loss = _token_reduce(per_row, target, token_weight, class_weight, ignore_index, reduction)
        if loss.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type):
            loss = loss.to(input.dtype)
    if not (return_z_loss or return_token_accuracy):
        return loss

    def per_chunk(f, dtype):  # chunk by chunk, as the op's rows: never the (N, V) logits at once
        step = max(8, (64 << 20) // max(1, weight.shape[0] * input.element_size()) // 8 * 8)
        parts = [f(F.linear(x, weight, bias)) for x in input.split(step)]
        return torch.cat(parts) if parts else input.new_empty((0,), dtype=dtype)

    ct = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    lse = lambda: per_chunk(lambda y: torch.logsumexp(_option_logits(y.to(ct), softcap), -1), ct)  # noqa: E731
    z_loss = _z_loss(lse, target, ignore_index, reduction, lse_square_scale, loss.dtype, token_weight) \
        if return_z_loss else None
    accuracy = _token_accuracy(lambda: per_chunk(lambda y: y.argmax(-1), torch.long), target, ignore_index,
                               reduction, loss.dtype) if return_token_accuracy else None
    return _with_extras(loss, z_loss, accuracy)


def _fused_rows(input, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, options,
                rounded=True):
    # The gradients in the forward pass (three products in all) where a plain backward will scale them: a
    # graph is recorded, the loss is reduced (a 'none' backward weighs every row differently), no transform.
    compute_grad = (reduction != "none" and _grad_enabled()
                    and any(t is not None and t.requires_grad for t in (input, weight, bias))
                    and (_is_compiling() or not transforms_active()))
    if type(weight) is not Tensor and type(weight).__name__ == "DTensor":  # a head sharded by vocabulary rows
        from . import distributed
        if class_weight is not None and (distributed.is_vocab_sharded(weight) or reduction == "mean"):
            raise NotImplementedError("torch_vjp.fused_linear_cross_entropy: class weights with a vocabulary-parallel "
                                      "head or row-sharded 'mean' DTensors are not implemented")
        if distributed.is_vocab_sharded(weight) and any(options):
            raise NotImplementedError("torch_vjp.fused_linear_cross_entropy: softcap and lse_square_scale with a "
                                      "vocabulary-parallel head are not implemented")
        if distributed.is_vocab_sharded(weight):
            loss = distributed.vocab_parallel_fused_linear_cross_entropy(input, weight, target, bias, ignore_index,
                                                                         reduction, label_smoothing)
            return loss.to(input.dtype) if not torch.is_autocast_enabled(input.device.type) else loss
        if reduction == "mean" and distributed.rows_sharded(input, target):  # rows sharded: the sum, the count
            total = _fused_rows(input, weight, target, bias, None, ignore_index, "sum", label_smoothing, options)
            return distributed.mean_of_sharded_rows(total, target, ignore_index)
    loss = _FUSED_LINEAR_CROSS_ENTROPY(input, weight, target, bias, class_weight, ignore_index, reduction,
                                       label_smoothing, compute_grad, *options)
    # The op's loss is in the compute type. Under autocast it is torch's value as it is (the float32 loss of
    # the low-precision logits); otherwise torch's is in the input's dtype, rounded once.
    if rounded and loss.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type):
        loss = loss.to(input.dtype)
    return loss

