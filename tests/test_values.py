"""Values and gradients against the float64 torch reference, in every dtype, shape and dim."""
import pytest
import torch

from torch_vjp.testing import op_variants, sample

# Half types are computed in float32 and rounded once, so ~2 ulps of the dtype cover them; float64 is
# near exact. Everything is compared with the float64 reference.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}
DTYPES = list(TOLERANCES)

# Empty, 0-d and one-element tensors; odd lengths (vector tails, 1023 just under a warp-row limit,
# 100003 a long prime row); 1-D to 4-D, so that every dim of a 4-D tensor is a reduced dim once.
ELEMENTWISE_SHAPES = [(), (0,), (1,), (1023,), (100003,), (3, 0, 2), (7, 33), (2, 3, 5, 7)]
SOFTMAX_SHAPES = [(), (1,), (0,), (5, 0), (0, 5), (1023,), (7, 33), (3, 1025), (2, 100003), (2, 3, 5, 7)]


def softmax_cases():
    return [(shape, dim) for shape in SOFTMAX_SHAPES for dim in range(-max(len(shape), 1), max(len(shape), 1))]


def run(info, fn, x, dy_seed, kwargs):
    """Output and input gradient of fn at x for a fixed random grad_output. The backward runs for empty
    tensors too: their gradient's shape, dtype and device are then what is compared."""
    x = x.detach().requires_grad_(True)
    y = fn(x, **kwargs)
    assert y.grad_fn is not None  # recorded even when empty: the VJP below is the op's own
    dy = sample(info, y.shape, y.dtype, y.device, generator_seed=dy_seed)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y.detach(), dx


def assert_gradient_close(dx, dx_torch, dx_ref, tol):
    """Gradients are held to torch's own accuracy in the same dtype (the criterion of FlashAttention's
    tests): max |dx - ref| ≤ 2 · max |dx_torch - ref| + atol, with ref in float64. A backward reads
    rounded saved tensors (sigmoid's dy·y(1-y) from a rounded y near 1, log_softmax's exp(y)), so neither
    implementation can match the float64 gradient elementwise to the dtype's tolerance; the check is
    that torch_vjp loses no more than torch does. NaNs must sit where the reference has them."""
    torch.testing.assert_close(dx.isnan(), dx_ref.isnan())
    finite = ~dx_ref.isnan()
    if not finite.any():
        return
    err = (dx.double() - dx_ref)[finite].abs().max().item()
    torch_err = (dx_torch.double() - dx_ref)[finite].abs().max().item()
    assert err <= 2 * torch_err + tol["atol"], f"gradient max error {err:.3g}; torch's own: {torch_err:.3g}"


def check_against_reference(info, variant, x, **call):
    kwargs = info.call_kwargs(**call, **variant)
    y, dx = run(info, info.op, x, 1, kwargs)
    y_ref, dx_ref = run(info, info.ref, x.double(), 1, kwargs)
    _, dx_torch = run(info, info.ref, x, 1, kwargs)
    tol = TOLERANCES[x.dtype]
    assert y.dtype == x.dtype and y.device == x.device and y.shape == y_ref.shape
    torch.testing.assert_close(y.double(), y_ref, equal_nan=True, **tol)
    assert dx.dtype == x.dtype and dx.device == x.device and dx.shape == x.shape == dx_torch.shape
    assert_gradient_close(dx, dx_torch, dx_ref, tol)
    return y, dx


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=str)
@pytest.mark.parametrize("info,variant", op_variants(("elementwise",)))
def test_elementwise(info, variant, shape, dtype, device):
    check_against_reference(info, variant, sample(info, shape, dtype, device))


def softmax_ops():
    """(info, variant, keepdim): keepdim both ways where the op takes it."""
    return [
        pytest.param(*case.values, keepdim, id=f"{case.id}-keepdim={keepdim}")
        for case in op_variants(("softmax",))
        for keepdim in ([False, True] if case.values[0].keepdim else [False])
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", softmax_cases(), ids=str)
@pytest.mark.parametrize("info,variant,keepdim", softmax_ops())
def test_softmax_family(info, variant, keepdim, shape, dim, dtype, device):
    check_against_reference(info, variant, sample(info, shape, dtype, device), dim=dim, keepdim=keepdim)


def strided_inputs(info, dtype, device):
    """Inputs whose memory is not plain row-major: a transpose; every other column of one (neither
    dense nor in order); channels-last 2-D and 3-D images; an expanded (stride 0) tensor."""
    base = sample(info, (9, 12), dtype, device)
    image = sample(info, (2, 3, 4, 5), dtype, device).to(memory_format=torch.channels_last)
    volume = sample(info, (2, 3, 2, 3, 4), dtype, device).to(memory_format=torch.channels_last_3d)
    expanded = sample(info, (3, 1), dtype, device).expand(3, 4)
    return {"transpose": base.t(), "strided": base.t()[:, ::2], "channels_last": image,
            "channels_last_3d": volume, "expanded": expanded}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("info,variant", op_variants())
def test_strided_and_channels_last_against_torch(info, variant, dtype, device):
    """Values and gradients of non-contiguous and channels-last inputs against the float64 torch
    reference, along every dim; an elementwise op's output keeps its input's memory format (the strides
    torch's own op gives it, for every dim longer than 1)."""
    for layout, x in strided_inputs(info, dtype, device).items():
        assert not x.is_contiguous(), layout
        for dim in (range(-x.dim(), x.dim()) if info.has_dim else [-1]):
            y, dx = check_against_reference(info, variant, x, dim=dim)
            if info.family == "elementwise":
                y_torch = info.ref(x, **info.call_kwargs(**variant))
                strides = lambda t: [st for st, n in zip(t.stride(), t.shape) if n > 1]  # noqa: E731
                assert strides(y) == strides(y_torch), (layout, y.stride(), y_torch.stride())


# Rows of -inf, +inf and NaN, and overflow/underflow, behave like torch.
SPECIAL_ROWS = [
    [0.0, float("-inf"), 1.0, 2.0],
    [float("-inf")] * 4,
    [float("inf"), 0.0, 1.0, 2.0],
    [float("nan"), 0.0, 1.0, 2.0],
    [1000.0, -1000.0, 88.0, -88.0],
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info,variant", op_variants())
def test_special_values(info, variant, dtype, device):
    x = torch.tensor(SPECIAL_ROWS, dtype=dtype, device=device)
    kwargs = info.call_kwargs(**variant)
    # float64 torch as the reference: torch's float32 CPU gelu(inf) is NaN, a vectorised-erf artefact.
    y, y_ref = info.op(x, **kwargs), info.ref(x.double(), **kwargs).to(dtype)
    torch.testing.assert_close(y, y_ref, equal_nan=True, **TOLERANCES[dtype])
