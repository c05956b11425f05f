"""Bad input raises a clear Python exception, never a crash or a wrong result."""
import warnings

import numpy as np
import pytest
import torch

import torch_vjp
from torch_vjp.testing import op_variants, sample


def outcome(fn):
    """(result, None) or (None, the exception's type)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the implicit softmax dim's; checked in test_signatures.py
            return fn(), None
    except Exception as error:  # noqa: BLE001  (the type is what is compared)
        return None, type(error)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool])
@pytest.mark.parametrize("info,variant", op_variants())
def test_integer_input_behaves_as_torch(info, variant, dtype, device):
    """Integer and bool input: promoted to the default float dtype where torch promotes (exp, sigmoid,
    tanh, logsumexp), else torch's error type (NotImplementedError); on the registered op, the kernels'
    TypeError."""
    x = torch.arange(-3, 9, device=device).reshape(3, 4).to(dtype)
    kwargs = info.call_kwargs(**variant)
    expected, expected_error = outcome(lambda: info.ref(x, **kwargs))
    got, error = outcome(lambda: info.op(x, **kwargs))
    assert error is expected_error, (error, expected_error)
    if expected is not None:
        assert got.dtype == expected.dtype == torch.get_default_dtype()
        torch.testing.assert_close(got, expected)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        info.raw(x, **kwargs)


@pytest.mark.parametrize("info,variant", op_variants())
def test_complex_input_is_refused(info, variant, device):
    x = torch.ones(3, 4, device=device, dtype=torch.complex64)
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
    """torch's RuntimeError from the public function (F.gelu raises one); the registered ops' own check
    raises ValueError, on the device and in the fake kernel."""
    x = torch.randn(4, device=device)
    with pytest.raises(RuntimeError):
        torch.nn.functional.gelu(x, approximate="fast")
    for t in (x, x.to("meta")):
        with pytest.raises(RuntimeError, match="approximate argument must be either none or tanh, got 'fast'"):
            torch_vjp.gelu(t, approximate="fast")
        with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'fast'"):
            torch.ops.torch_vjp.gelu(t, "fast")
    with pytest.raises(ValueError, match="approximate"):
        torch.ops.torch_vjp.gelu_backward(x, x, "Tanh")
    with pytest.raises(TypeError, match="approximate"):
        torch_vjp.gelu(x, approximate=1)


# Arguments of the wrong type: torch's parser raises TypeError for each (checked against torch below).
BAD_DIMS = [None, "a", 0.5, torch.tensor(0.7), True, torch.tensor(1.0), (0.5,), torch.tensor([0, 1])]
BAD_KEEPDIMS = [None, 2, 1.0, 0, torch.tensor(True), "yes"]


@pytest.mark.parametrize("dim", BAD_DIMS, ids=repr)
@pytest.mark.parametrize("info,variant", op_variants(("softmax",)))
def test_bad_dim_type_is_a_type_error(info, variant, dim, device):
    """None (where torch has no implicit dim), a name, a float, a float tensor or a bool as dim: a
    TypeError wherever torch raises one, never a silent truncation (softmax(x, tensor(0.7)) ran as dim 0)."""
    x = torch.randn(2, 3, 4, device=device)
    kwargs = dict(info.call_kwargs(**variant), dim=dim)
    expected, expected_error = outcome(lambda: info.ref(x, **kwargs))
    got, error = outcome(lambda: info.op(x, **kwargs))
    assert error is expected_error, (dim, error, expected_error)
    if expected is not None:  # F.softmax(x, None): the implicit dim
        torch.testing.assert_close(got, expected)
    else:
        assert error is TypeError


@pytest.mark.parametrize("keepdim", BAD_KEEPDIMS, ids=repr)
def test_bad_keepdim_type_is_a_type_error(keepdim, device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(TypeError):
        torch.logsumexp(x, 0, keepdim)
    with pytest.raises(TypeError, match="keepdim"):
        torch_vjp.logsumexp(x, 0, keepdim)


@pytest.mark.parametrize("dim", [0, torch.tensor(1), np.int64(-1), [0, 2], (2, 0), torch.tensor([1])], ids=repr)
def test_dim_accepts_what_torch_accepts(dim, device):
    x = torch.randn(2, 3, 4, device=device)
    torch.testing.assert_close(torch_vjp.logsumexp(x, dim), torch.logsumexp(x, dim))
    if not isinstance(dim, (list, tuple)) and not (isinstance(dim, torch.Tensor) and dim.dim() == 1):
        torch.testing.assert_close(torch_vjp.softmax(x, dim), torch.nn.functional.softmax(x, dim))


def test_duplicate_dims(device):
    x = torch.randn(2, 3, 4, device=device)
    with pytest.raises(RuntimeError, match="appears multiple times"):
        torch.logsumexp(x, (0, -3))
    with pytest.raises(RuntimeError, match="dim 0 appears multiple times"):
        torch_vjp.logsumexp(x, (0, -3))
    with pytest.raises(IndexError, match="Dimension out of range"):
        torch_vjp.logsumexp(x, (0, 3))


def test_bad_scalar_arguments(device):
    x = torch.randn(4, device=device)
    with pytest.raises(TypeError, match="beta"):
        torch_vjp.softplus(x, beta="2")
    with pytest.raises(TypeError, match="threshold"):
        torch_vjp.softplus(x, threshold=None)
    with pytest.raises(TypeError, match="input"):
        torch_vjp.exp([1.0])


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
