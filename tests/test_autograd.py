"""Autograd: the backward is dyᵀJ; gradcheck and gradgradcheck in float64; forward mode; torch.func."""
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import torch_vjp
from torch_vjp.testing import batch_of_calls, dim_calls, op_variants, sample, sample_shapes

# Small float64 inputs: gradcheck's finite differences are O(numel²). Each softmax-family op is tried
# along every dim of a 3-D tensor, so a non-last (strided) reduction is differentiated too; a norm over every
# count of trailing dims; cross_entropy on (N, C, d) logits; the fused loss on (N, H) hidden states.
GRADCHECK_SHAPE = (2, 3, 4)


def gradcheck_shape(info):
    """Losses: (N, C) logits and (N, H) hidden states, the registered ops' shapes (cross_entropy's (N, C, d)
    is views around them: test_values)."""
    return {"cross_entropy": (4, 5), "fused_linear_cross_entropy": (3, 4)}.get(info.name, GRADCHECK_SHAPE)


def calls(info, variant, device, dtype=torch.float64):
    """Every call of a row on a small float64 input: each dim, each count of normalized dims."""
    x = sample(info, gradcheck_shape(info), dtype, device)
    return [info.call(x, **kwargs) for kwargs in dim_calls(info, x.dim(), **variant)]


@pytest.mark.parametrize("info,variant", op_variants())
def test_gradcheck_and_gradgradcheck(info, variant, device):
    """First and second derivatives against finite differences, w.r.t. every differentiable argument (input,
    weight, bias, up, the fused loss's head), in every mode torch checks: reverse, forward, batched,
    reverse-over-reverse and forward-over-reverse."""
    for c in calls(info, variant, device):
        primals = c.cast(requires_grad=True).primals
        assert torch.autograd.gradcheck(c.op, primals, check_forward_ad=True, check_batched_grad=True,
                                        check_batched_forward_grad=True)
        assert torch.autograd.gradgradcheck(c.op, primals, check_batched_grad=True, check_fwd_over_rev=True)


@pytest.mark.parametrize("info,variant", op_variants())
def test_backward_is_dy_times_jacobian(info, variant, device):
    """The question behind the project: for a batch of b samples the backward equals einsum('bk,bkn->bn', dy, J)
    with J the per-sample Jacobian of the torch reference, built by vmap(jacrev) (each sample's own up or
    target; a norm's weight shared). A reduced loss couples its rows (the mean's count): its J is the
    whole batch's gradient, dy · ∂loss/∂x."""
    if info.family == "loss" and variant.get("reduction", "mean") != "none":
        x = sample(info, (5, 4) if info.name.startswith("fused") else (5, 7), torch.float64, device)
        c = info.call(x, **variant).cast(requires_grad=True)  # the batch as one call: one scalar loss
        y = c.op(*c.primals)
        dy = sample(info, y.shape, torch.float64, device, generator_seed=2)
        (dx,) = torch.autograd.grad(y, c.primals[0], dy)
        expected = dy * torch.func.grad(c.ref)(*[t.detach() for t in c.primals])
        torch.testing.assert_close(dx, expected, rtol=1e-10, atol=1e-12)
        return
    # a (C,) sample is one row of logits; rope's queries need a dim for cos and sin to broadcast over
    sample_shape = (1, 4) if info.name.startswith("fused") else (3, 6) if info.family == "rope" else (7,)
    batch = batch_of_calls(info, sample_shape, 5, torch.float64, device, **variant)
    x, *rest = batch.args
    per_sample_ref = batch.fn("ref")
    J = torch.func.vmap(torch.func.jacrev(per_sample_ref), in_dims=batch.in_dims)(x, *rest)
    leaf = x.clone().requires_grad_()
    y = torch.func.vmap(batch.fn("op"), in_dims=batch.in_dims)(leaf, *rest)
    dy = sample(info, y.shape, torch.float64, device, generator_seed=2)
    (dx,) = torch.autograd.grad(y, leaf, dy)
    b = x.shape[0]
    expected = torch.einsum("bk,bkn->bn", dy.reshape(b, -1), J.reshape(b, dy[0].numel(), -1)).reshape(x.shape)
    torch.testing.assert_close(dx, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("info,variant", op_variants())
def test_forward_mode(info, variant, device):
    """jvp gives J·t exactly as torch's own forward mode does, with a tangent on every differentiable
    argument, through both forward-AD APIs (the registered op too)."""
    for c in calls(info, variant, device):
        tangents = tuple(sample(info, t.shape, torch.float64, device, generator_seed=5 + i) for i, t in enumerate(c.primals))
        expected = torch.func.jvp(c.ref, c.primals, tangents)[1]
        torch.testing.assert_close(torch.func.jvp(c.op, c.primals, tangents)[1], expected)
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip(c.primals, tangents)]
            for fn in (c.op, c.raw):  # public API and the registered op
                torch.testing.assert_close(fwAD.unpack_dual(fn(*duals)).tangent, expected)


@pytest.mark.parametrize("info,variant", op_variants())
def test_torch_func_transforms(info, variant, device):
    """vmap'd jacrev and jacfwd over a batch of samples (each its own up or target, parameters shared),
    reverse-over-reverse and forward-over-reverse (jvp of grad) agree with the reference, w.r.t. every
    differentiable argument."""
    batch = batch_of_calls(info, sample_shapes(info)[1 if len(sample_shapes(info)) > 1 else 0], 3, torch.float64,
                           device, **variant)
    ours, ref = batch.fn("op"), batch.fn("exact")
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(torch.func.vmap(transform(ours), in_dims=batch.in_dims)(*batch.args),
                                   torch.func.vmap(transform(ref), in_dims=batch.in_dims)(*batch.args))
    c = batch.calls[0]
    argnums = tuple(range(len(c.primals)))
    scalar = lambda f: (lambda *a: f(*a).pow(2).sum())  # noqa: E731
    torch.testing.assert_close(torch.func.jacrev(torch.func.jacrev(scalar(c.op), argnums), argnums)(*c.primals),
                               torch.func.jacrev(torch.func.jacrev(scalar(c.exact), argnums), argnums)(*c.primals))
    tangents = tuple(sample(info, t.shape, torch.float64, device, generator_seed=3 + i) for i, t in enumerate(c.primals))
    jvp_of_grad = lambda f: torch.func.jvp(torch.func.grad(scalar(f), argnums), c.primals, tangents)  # noqa: E731
    torch.testing.assert_close(jvp_of_grad(c.op), jvp_of_grad(c.exact))


def weighted_sum(f, w):
    """A scalar function whose Hessian weighs each output's Hessian by a random w: none cancels."""
    return lambda *a: (f(*a) * w).sum()


@pytest.mark.parametrize("info,variant", op_variants())
def test_hessian_every_dim(info, variant, device):
    """torch.func.hessian (forward-over-reverse: jacfwd of jacrev) equals the reference's, on every dim (and
    keepdim, count of normalized dims) of a 3-D input, w.r.t. every differentiable argument together (for
    layer_norm against a torch-ops composite: F.layer_norm's own ∂²/∂w∂x block is wrong, see testing.py)."""
    for c in calls(info, variant, device):
        argnums = tuple(range(len(c.primals)))
        w = sample(info, c.ref(*c.primals).shape, torch.float64, device, generator_seed=4)
        torch.testing.assert_close(torch.func.hessian(weighted_sum(c.op, w), argnums)(*c.primals),
                                   torch.func.hessian(weighted_sum(c.exact, w), argnums)(*c.primals), msg=repr(c))


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
# in the middle and last; every dim, count of normalized dims; parameters shared, and one per sample.

def vmap_cases(info, variant):
    return [(shape, call) for shape in sample_shapes(info) for call in dim_calls(info, len(shape), **variant)]


@pytest.mark.parametrize("info,variant", op_variants())
def test_vmap_every_rank_dim_and_in_dim(info, variant, device):
    """vmap over per-sample ranks 0-3, every dim (negative too), the batch at any position (in_dims), of
    the public op and the registered op: torch's values, from one batched call (no per-sample fallback,
    which torch announces with a warning). A norm's weight and bias and the fused loss's head are shared by
    the samples, then one per sample."""
    for sample_shape, call in vmap_cases(info, variant):
        for in_dim in range(len(sample_shape) + 1):
            for batch_shared in ([False, True] if info.shared else [False]):
                batch = batch_of_calls(info, sample_shape, 3, torch.float64, device, in_dim=in_dim,
                                       batch_shared=batch_shared, **call)
                expected = torch.func.vmap(batch.fn("ref"), in_dims=batch.in_dims)(*batch.args)
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    for kind in ("op", "raw"):
                        out = torch.func.vmap(batch.fn(kind), in_dims=batch.in_dims)(*batch.args)
                        torch.testing.assert_close(out, expected, msg=f"{kind} {sample_shape} in_dim={in_dim} {call}")


@pytest.mark.parametrize("info,variant", op_variants())
def test_nested_vmap(info, variant, device):
    """vmap of vmap (batch dims at different positions, parameters unbatched), and vmap of the VJP through
    torch.func.vjp, against torch."""
    for sample_shape, call in vmap_cases(info, variant)[:3]:
        inner = [batch_of_calls(info, sample_shape, 3, torch.float64, device, in_dim=len(sample_shape), seed=10 * k,
                                **call) for k in range(2)]
        args = tuple(a if d is None else torch.stack([b.args[i] for b in inner]) for i, (a, d) in
                     enumerate(zip(inner[0].args, inner[0].in_dims)))
        outer_dims = tuple(None if d is None else 0 for d in inner[0].in_dims)

        def nested(kind):
            return torch.func.vmap(torch.func.vmap(inner[0].fn(kind), in_dims=inner[0].in_dims),
                                   in_dims=outer_dims)(*args)

        expected = nested("ref")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for kind in ("op", "raw"):
                torch.testing.assert_close(nested(kind), expected, msg=f"{kind} {call}")

        batch = inner[0]
        n = len(batch.calls[0].primals)

        def vjp_per_sample(kind):
            fn = batch.fn(kind)

            def one(*a):
                primals, rest = a[:n], a[n:-1]
                return torch.func.vjp(lambda *p: fn(*p, *rest), *primals)[1](a[-1])

            g = sample(info, torch.func.vmap(batch.fn("ref"), in_dims=batch.in_dims)(*batch.args).shape,
                       torch.float64, device, 9)
            out_dim = 0
            return torch.func.vmap(one, in_dims=(*batch.in_dims, out_dim))(*batch.args, g.movedim(0, out_dim))

        torch.testing.assert_close(vjp_per_sample("op"), vjp_per_sample("ref"), msg=str(call))


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


def shared_parameter_cases():
    """Rows with parameters every sample shares, in the variants whose whole-batch value is the sum of the
    per-sample values (a loss's 'sum' or 'none'; a 'mean' divides by the whole batch's count)."""
    cases = []
    for case in op_variants():
        info, variant = case.values
        drawn = set(info.call(sample(info, sample_shapes(info)[-1], torch.float64), **variant).names)
        if drawn & set(info.shared) and variant.get("reduction", "mean" if info.family == "loss" else None) != "mean":
            cases.append(case)
    return cases


@pytest.mark.parametrize("info,variant", shared_parameter_cases())
def test_shared_parameter_gradient_is_the_batch_sum_of_per_sample_gradients(info, variant, device):
    """The gradient of a parameter every sample uses (a norm's weight and bias, the fused loss's head and bias)
    is the sum over the batch of the per-sample gradients: the kernel's column sum over all rows equals
    vmap(grad) per sample (one batched call), summed."""
    batch = batch_of_calls(info, sample_shapes(info)[1 if info.family == "norm" else 0], 6, torch.float64, device,
                           **variant)
    n = len(batch.calls[0].primals)
    shared = [i for i in range(1, n) if batch.in_dims[i] is None]
    assert shared, "the row draws no shared parameter"
    out_shape = torch.func.vmap(batch.fn("op"), in_dims=batch.in_dims)(*batch.args).shape
    w = sample(info, out_shape, torch.float64, device, generator_seed=6)  # weights every output: none cancels
    if len(out_shape) == 1:  # a loss per sample ('sum'): the batch's 'sum' weighs them alike
        w = torch.ones_like(w)

    def per_sample(*a):
        return (batch.fn("op")(*a[:-1]) * a[-1]).sum()

    per_sample_grads = torch.func.vmap(torch.func.grad(per_sample, argnums=tuple(shared)),
                                       in_dims=(*batch.in_dims, 0))(*batch.args, w)
    # The whole batch in one call of the op: the samples' rows together, the parameters' gradients one column sum.
    x = batch.args[0]
    c = batch.calls[0].with_primals(x, *batch.args[1:n])
    c.kwargs = dict(c.kwargs, **{k: a.reshape(-1, *a.shape[2:]) if a.dim() > 1 else a.reshape(-1)
                                 for k, a in zip(batch.keys[n:], batch.args[n:])})
    if info.family == "loss":  # rows of all samples stacked: (6 N, H)
        c = c.with_primals(x.reshape(-1, x.shape[-1]), *batch.args[1:n])
    leaves = c.cast(requires_grad=True).primals
    out = c.op(*leaves)
    total = (out * w.reshape(out.shape)).sum() if out.dim() else out
    if info.outputs > 1:  # each output weighted by its part of every sample's joined output (testing.OpInfo.joined)
        outs = info.op(leaves[0], **c._kwargs(leaves))
        parts = w.reshape(w.shape[0], -1).split([o.numel() // w.shape[0] for o in outs], dim=1)
        total = sum((o * part.reshape(o.shape)).sum() for o, part in zip(outs, parts))
    batch_grads = torch.autograd.grad(total, [leaves[i] for i in shared])
    for per, whole in zip(per_sample_grads, batch_grads):
        assert per.shape == (6, *whole.shape)
        torch.testing.assert_close(per.sum(0), whole, rtol=1e-10, atol=1e-12)


# The graph Liger-Kernel gets wrong (it writes dlogits into the logits' storage): the logits feed the loss
# and another term, so their stored value must survive the loss's forward and backward.
OTHER_TERMS = {
    "square": lambda z: (z * z).sum(),
    "softmax": lambda z: (torch.softmax(z, -1) * torch.arange(z.shape[-1], dtype=z.dtype, device=z.device)).sum(),
    "saved by exp": lambda z: z.exp().sum(),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("term", OTHER_TERMS, ids=str)
def test_loss_plus_another_term_of_the_logits(term, reduction, device):
    """loss = cross_entropy(logits) + f(logits), logits = x Wᵀ (non-leaf), and the fused loss beside f of the
    same logits: the gradients are torch's, and the logits' storage and version are untouched (no kernel
    writes into a tensor of the user's graph)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(7, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    target = torch.tensor([0, 3, -100, 6, 2, 1], device=device)
    f = OTHER_TERMS[term]

    def total(ce, fused):
        logits = x @ w.t()
        before, version = logits.detach().clone(), logits._version
        loss = ce(logits, target, reduction=reduction, label_smoothing=0.1).sum() + f(logits)
        if fused is not None:
            loss = loss + fused(x, w, target, reduction=reduction).sum()
        grads = torch.autograd.grad(loss, (x, w))
        assert torch.equal(logits, before) and logits._version == version
        return grads

    def torch_fused(x, w, target, reduction):
        return torch.nn.functional.cross_entropy(x @ w.t(), target, reduction=reduction)

    expected = total(torch.nn.functional.cross_entropy, torch_fused)
    torch.testing.assert_close(total(torch_vjp.cross_entropy, torch_vjp.fused_linear_cross_entropy), expected)
