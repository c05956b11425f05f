"""Bad input raises a clear Python exception, never a crash or a wrong result."""
import pytest
import torch

import torch_vjp
from tests.op_db import op_variants, sample


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("info,variant", op_variants())
def test_unsupported_dtype(info, variant, dtype, device):
    x = torch.ones(3, 4, device=device).to(dtype)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        info.op(x, **info.call_kwargs(**variant))


@pytest.mark.parametrize("info,variant", op_variants(("softmax",)))
@pytest.mark.parametrize("shape,dim", [((3, 4), 2), ((3, 4), -3), ((5,), 1), ((), 1), ((), -2)])
def test_dim_out_of_range(info, variant, shape, dim, device):
    x = torch.randn(shape, device=device)
    with pytest.raises(IndexError, match="Dimension out of range"):
        info.op(x, **info.call_kwargs(dim=dim, **variant))
    with pytest.raises(IndexError, match="Dimension out of range"):  # the fake kernel agrees (torch.compile)
        info.op(x.to("meta"), **info.call_kwargs(dim=dim, **variant))


def test_unknown_gelu_approximation(device):
    x = torch.randn(4, device=device)
    for t in (x, x.to("meta")):
        with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'fast'"):
            torch_vjp.gelu(t, approximate="fast")
    with pytest.raises(ValueError, match="approximate"):
        torch.ops.torch_vjp.gelu_backward(x, x, "Tanh")


@pytest.mark.parametrize("info,variant", op_variants())
def test_backward_op_rejects_wrong_grad(info, variant, device):
    """A grad of the wrong shape, dtype or device reaching a VJP op."""
    from torch_vjp._ops import REGISTRY

    x = sample(info, (3, 4), torch.float32, device)
    kwargs = info.call_kwargs(**variant)
    params = info.raw_params(**kwargs)
    y = info.raw(x, **kwargs)
    saved = [x if s == "input" else y for s in REGISTRY[info.name].saves]
    backward = getattr(torch.ops.torch_vjp, info.name + "_backward")
    wrong_shape = torch.ones(y.numel() + 1, device=device)
    with pytest.raises(RuntimeError, match="expected grad_output of shape"):
        backward(wrong_shape, *saved, *params)
    with pytest.raises(TypeError, match="same dtype"):
        backward(torch.ones_like(y, dtype=torch.float64), *saved, *params)
    other = "meta" if device == "cpu" else "cpu"
    with pytest.raises(RuntimeError, match="same device"):
        backward(torch.ones_like(y, device=other), *saved, *params)


def test_logsumexp_backward_rejects_wrong_output_shape():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="expected output of shape"):
        torch.ops.torch_vjp.logsumexp_backward(torch.ones(4), x, torch.ones(4), -1, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensors_on_different_devices():
    x = torch.randn(3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.torch_vjp.softmax_backward(x, x.cpu(), -1)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.torch_vjp.exp_backward(x.cpu(), x)


def test_non_tensor_input():
    with pytest.raises(TypeError):
        torch_vjp.softmax([1.0, 2.0])
