"""Autograd: the backward is dyᵀJ; gradcheck and gradgradcheck in float64; forward mode; torch.func."""
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import torch_vjp
from torch_vjp.testing import op_variants, sample

# Small float64 inputs: gradcheck's finite differences are O(numel²). Each softmax-family op is tried
# along every dim of a 3-D tensor, so a non-last (strided) reduction is differentiated too.
GRADCHECK_SHAPE = (2, 3, 4)


def calls(info, variant):
    dims = range(-len(GRADCHECK_SHAPE), len(GRADCHECK_SHAPE)) if info.has_dim else [-1]
    keepdims = [False, True] if info.keepdim else [False]
    return [info.call_kwargs(dim=d, keepdim=k, **variant) for d in dims for k in keepdims]


@pytest.mark.parametrize("info,variant", op_variants())
def test_gradcheck_and_gradgradcheck(info, variant, device):
    """First and second derivatives against finite differences, in every mode torch checks: reverse,
    forward, batched, reverse-over-reverse and forward-over-reverse."""
    x = sample(info, GRADCHECK_SHAPE, torch.float64, device).requires_grad_()
    for kwargs in calls(info, variant):
        fn = lambda t: info.op(t, **kwargs)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,), check_forward_ad=True, check_batched_grad=True,
                                        check_batched_forward_grad=True)
        assert torch.autograd.gradgradcheck(fn, (x,), check_batched_grad=True, check_fwd_over_rev=True)


@pytest.mark.parametrize("info,variant", op_variants())
def test_backward_is_dy_times_jacobian(info, variant, device):
    """The question behind the project: for a batch (b, n) the backward equals einsum('bk,bkn->bn', dy, J)
    with J the per-sample Jacobian of the torch reference, built by vmap(jacrev)."""
    x = sample(info, (5, 7), torch.float64, device).requires_grad_()
    kwargs = info.call_kwargs(**variant)
    per_sample = lambda row: info.ref(row, **kwargs)  # noqa: E731
    J = torch.func.vmap(torch.func.jacrev(per_sample))(x.detach())
    y = info.op(x, **kwargs)
    dy = sample(info, y.shape, torch.float64, device, generator_seed=2)
    (dx,) = torch.autograd.grad(y, x, dy)
    expected = torch.einsum("bk,bkn->bn", dy, J) if J.dim() == 3 else dy[:, None] * J  # logsumexp: J is (b, n)
    torch.testing.assert_close(dx, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("info,variant", op_variants())
def test_forward_mode(info, variant, device):
    """jvp gives J·t exactly as torch's own forward mode does, through both forward-AD APIs."""
    x = sample(info, GRADCHECK_SHAPE, torch.float64, device)
    t = sample(info, GRADCHECK_SHAPE, torch.float64, device, generator_seed=5)
    for kwargs in calls(info, variant):
        expected = torch.func.jvp(lambda a: info.ref(a, **kwargs), (x,), (t,))[1]
        torch.testing.assert_close(torch.func.jvp(lambda a: info.op(a, **kwargs), (x,), (t,))[1], expected)
        with fwAD.dual_level():
            for fn in (info.op, info.raw):  # public API and the registered op
                out = fn(fwAD.make_dual(x, t), **kwargs)
                torch.testing.assert_close(fwAD.unpack_dual(out).tangent, expected)


@pytest.mark.parametrize("info,variant", op_variants())
def test_torch_func_transforms(info, variant, device):
    """vmap'd jacrev and jacfwd, reverse-over-reverse and forward-over-reverse (jvp of grad) agree with
    the reference."""
    x = sample(info, (3, 5), torch.float64, device)
    t = sample(info, (3, 5), torch.float64, device, generator_seed=3)
    kwargs = info.call_kwargs(**variant)
    ours, ref = (lambda a: info.op(a, **kwargs)), (lambda a: info.ref(a, **kwargs))
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(torch.func.vmap(transform(ours))(x), torch.func.vmap(transform(ref))(x))
    scalar = lambda f: (lambda a: f(a).pow(2).sum())  # noqa: E731
    torch.testing.assert_close(torch.func.jacrev(torch.func.jacrev(scalar(ours)))(x),
                               torch.func.jacrev(torch.func.jacrev(scalar(ref)))(x))
    jvp_of_grad = lambda f: torch.func.jvp(torch.func.grad(scalar(f)), (x,), (t,))  # noqa: E731
    torch.testing.assert_close(jvp_of_grad(ours), jvp_of_grad(ref))


def weighted_sum(f, w):
    """A scalar function whose Hessian weighs each output's Hessian by a random w: none cancels."""
    return lambda a: (f(a) * w).sum()


@pytest.mark.parametrize("info,variant", op_variants())
def test_hessian_every_dim(info, variant, device):
    """torch.func.hessian (forward-over-reverse: jacfwd of jacrev) equals torch's, on every dim (and
    keepdim) of a 3-D input."""
    x = sample(info, GRADCHECK_SHAPE, torch.float64, device)
    for kwargs in calls(info, variant):
        ours, ref = (lambda a: info.op(a, **kwargs)), (lambda a: info.ref(a, **kwargs))
        w = sample(info, ref(x).shape, torch.float64, device, generator_seed=4)
        torch.testing.assert_close(torch.func.hessian(weighted_sum(ours, w))(x),
                                   torch.func.hessian(weighted_sum(ref, w))(x), msg=str(kwargs))


# logsumexp's forward mode where exp(x - out), from the rounded output, is wrong: out = 1e8 + log 4 rounds to
# 1e8 in float32 (step 8), so Σ exp(x - out) = 4, not 1; likewise in float16 at 100.
LOGSUMEXP_ROUNDED = [
    (torch.full((4,), 1e8), torch.float32),
    (torch.full((3,), 1e8), torch.float32),
    (torch.tensor([100.0, 100.5]), torch.float16),
    (torch.tensor([[1e8, 1e8 + 8], [-3.0, 2.0]]), torch.float32),
]


@pytest.mark.parametrize("x,dtype", LOGSUMEXP_ROUNDED, ids=str)
def test_logsumexp_forward_mode_is_stable(x, dtype, device):
    """jvp, jacfwd, forward AD and forward-over-reverse of logsumexp give torch's (stable) answer, and the
    Jacobian sums to 1 per row, where weights from the rounded output would not."""
    x = x.to(dtype=dtype, device=device)
    t = torch.ones_like(x)
    ours, ref = (lambda u: torch_vjp.logsumexp(u, -1)), (lambda u: torch.logsumexp(u, -1))
    expected = torch.func.jvp(ref, (x,), (t,))[1]
    torch.testing.assert_close(torch.func.jvp(ours, (x,), (t,))[1], expected)
    torch.testing.assert_close(expected, torch.ones_like(expected))
    jac = torch.func.jacfwd(ours)(x)
    torch.testing.assert_close(jac, torch.func.jacfwd(ref)(x))
    with fwAD.dual_level():
        torch.testing.assert_close(fwAD.unpack_dual(torch_vjp.logsumexp(fwAD.make_dual(x, t), -1)).tangent, expected)
    if dtype == torch.float32:  # second order, where torch's own formula is exact too
        w = torch.linspace(0.5, 1.5, ours(x).numel(), device=device).reshape(ours(x).shape)
        x64 = x.double()
        torch.testing.assert_close(torch.func.hessian(weighted_sum(ours, w))(x).double(),
                                   torch.func.hessian(weighted_sum(ref, w.double()))(x64), rtol=1e-4, atol=1e-6)


def test_raw_op_under_torch_func_is_refused_clearly():
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="call torch_vjp.softmax"):
        torch.func.jvp(lambda a: torch.ops.torch_vjp.softmax(a, -1), (x,), (x,))


def test_raw_op_is_differentiable():
    """torch.ops.torch_vjp.* carry autograd themselves (registered at the Autograd key)."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.torch_vjp.log_softmax(t, 0), (x,))
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.torch_vjp.gelu(t, "tanh"), (x,))


# Per-sample ranks 0-3 (a 0-d sample is its own one-element row), each with the batch dim at the front,
# in the middle and last.
VMAP_SAMPLE_SHAPES = [(), (5,), (3, 4), (2, 3, 4)]


def vmap_calls(info, variant, rank):
    dims = range(-max(rank, 1), max(rank, 1)) if info.has_dim else [None]
    keepdims = [False, True] if info.keepdim else [False]
    return [info.call_kwargs(dim=d, keepdim=k, **variant) if d is not None else info.call_kwargs(**variant)
            for d in dims for k in keepdims]


@pytest.mark.parametrize("sample_shape", VMAP_SAMPLE_SHAPES, ids=str)
@pytest.mark.parametrize("info,variant", op_variants())
def test_vmap_every_rank_dim_and_in_dim(info, variant, sample_shape, device):
    """vmap over per-sample ranks 0-3, every dim (negative too), the batch at any position (in_dims), of
    the public op and the registered op: torch's values, from one batched call (no per-sample fallback,
    which torch announces with a warning)."""
    rank = len(sample_shape)
    for in_dim in range(rank + 1):
        shape = list(sample_shape)
        shape.insert(in_dim, 3)
        x = sample(info, shape, torch.float64, device)
        for kwargs in vmap_calls(info, variant, rank):
            expected = torch.func.vmap(lambda a: info.ref(a, **kwargs), in_dims=in_dim)(x)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                for fn in (info.op, info.raw):
                    out = torch.func.vmap(lambda a: fn(a, **kwargs), in_dims=in_dim)(x)
                    torch.testing.assert_close(out, expected, msg=f"in_dim={in_dim} {kwargs}")


@pytest.mark.parametrize("sample_shape", [(), (4,), (2, 3)], ids=str)
@pytest.mark.parametrize("info,variant", op_variants())
def test_nested_vmap(info, variant, sample_shape, device):
    """vmap of vmap (batch dims at different positions, an unbatched second argument), and vmap of the
    VJP through torch.func.vjp, against torch."""
    rank = len(sample_shape)
    x = sample(info, (2, *sample_shape, 3), torch.float64, device)  # outer batch first, inner batch last
    for kwargs in vmap_calls(info, variant, rank):
        def nested(f):
            return torch.func.vmap(torch.func.vmap(lambda a: f(a, **kwargs), in_dims=-1), in_dims=0)(x)

        expected = nested(info.ref)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for fn in (info.op, info.raw):
                torch.testing.assert_close(nested(fn), expected, msg=str(kwargs))

        def vjp_per_sample(f):
            def one(a, g):
                return torch.func.vjp(lambda t: f(t, **kwargs), a)[1](g)[0]
            inner = x[..., 0]
            g = sample(info, torch.func.vmap(lambda a: info.ref(a, **kwargs))(inner).shape, torch.float64, device, 9)
            return torch.func.vmap(one)(inner, g)

        torch.testing.assert_close(vjp_per_sample(info.op), vjp_per_sample(info.ref), msg=str(kwargs))


def test_vmap_over_zero_dim_samples_is_per_sample():
    """The issue's cases: a softmax over 0-d samples is 1 for each (it was a softmax over the batch), and
    dim 0 or logsumexp no longer raise."""
    v = torch.randn(5, dtype=torch.float64)
    for dim in (-1, 0):
        torch.testing.assert_close(torch.func.vmap(lambda a: torch_vjp.softmax(a, dim))(v), torch.ones_like(v))
        torch.testing.assert_close(torch.func.vmap(lambda a: torch_vjp.logsumexp(a, dim))(v), v)
        torch.testing.assert_close(torch.func.vmap(lambda a: torch_vjp.log_softmax(a, dim))(v), torch.zeros_like(v))
    with pytest.raises(IndexError, match="Dimension out of range"):
        torch.func.vmap(lambda a: torch_vjp.softmax(a, 1))(v)
