"""Loss options (issue 15): class weights (cross_entropy's weight=, the fused loss's class_weight=).

The shared table (torch_vjp/testing.py) runs every check on rows with class weights; these are the cases the
table does not reach: float64 values against torch's to round-off over every reduction and smoothing, the
class-dim-second input, zero and all-ignored weights, torch's errors, gradcheck in both modes, a batched
weight under vmap, and the fused loss's chunks against cross_entropy on the logits."""
import pytest
import torch
import torch.nn.functional as F

import torch_vjp

REDUCTIONS = ("none", "mean", "sum")


def _case(rows=37, classes=11, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * 3).to(dtype=dtype, device=device)
    t = torch.randint(0, classes, (rows,), generator=g)
    t[torch.rand(rows, generator=g) < 0.25] = -100
    w = (torch.rand(classes, generator=g, dtype=torch.float64) * 1.75 + 0.25)
    w[2] = 0.0
    return x, t.to(device), w.to(dtype=dtype, device=device)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
def test_weighted_values_and_gradients_float64(reduction, smoothing, device):
    """torch's F.cross_entropy(weight=) in float64, loss and gradient, to round-off."""
    x, t, w = _case(device=device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = torch_vjp.cross_entropy(xa, t, weight=w, reduction=reduction, label_smoothing=smoothing)
    ref = F.cross_entropy(xb, t, weight=w, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    dy = torch.rand_like(ours)
    torch.testing.assert_close(torch.autograd.grad(ours, xa, dy)[0], torch.autograd.grad(ref, xb, dy)[0],
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_weighted_class_dim_second(reduction, smoothing, device):
    """(N, C, d): the weight applies along the class dim, as torch's."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    t = torch.randint(0, 5, (3, 4), generator=g).to(device)
    w = torch.rand(5, generator=g, dtype=torch.float64).to(device)
    ours = torch_vjp.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=smoothing)
    ref = F.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0],
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_weighted_mean_edge_cases(smoothing, device):
    """Every target ignored: NaN, as torch's 0/0. Every counted target of weight 0: NaN too (Σ w_t = 0)."""
    x, t, w = _case(rows=6, device=device)
    for target in (torch.full_like(t, -100), torch.full_like(t, 2)):  # class 2 has weight 0
        ours = torch_vjp.cross_entropy(x, target, weight=w, label_smoothing=smoothing)
        ref = F.cross_entropy(x, target, weight=w, label_smoothing=smoothing)
        assert ours.isnan() and ref.isnan()


def test_weight_errors_like_torch():
    x, t, w = _case(rows=4, classes=5)
    cases = [torch.rand(4, dtype=torch.float64), torch.rand(5), torch.rand(5, 1, dtype=torch.float64),
             torch.rand(5, dtype=torch.float64, device="meta")]
    for bad in cases:
        with pytest.raises(RuntimeError) as ours:
            torch_vjp.cross_entropy(x, t, weight=bad)
        with pytest.raises(RuntimeError) as ref:
            F.cross_entropy(x, t, weight=bad)
        assert str(ours.value) == str(ref.value)
    with pytest.raises(TypeError, match="argument 'weight' must be Tensor"):
        torch_vjp.cross_entropy(x, t, weight=[1.0] * 5)
    # not differentiable w.r.t. the weight: refused, as torch refuses it (never a silent None or zero gradient)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        torch_vjp.cross_entropy(x, t, weight=w.clone().requires_grad_())
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'class_weight'"):
        torch_vjp.fused_linear_cross_entropy(x, torch.rand(5, 5, dtype=torch.float64), t,
                                             class_weight=w.clone().requires_grad_())
    with pytest.raises(RuntimeError, match="weight tensor should be defined either for all 3 classes"):
        torch_vjp.fused_linear_cross_entropy(x, torch.rand(3, 5, dtype=torch.float64), t.clamp(max=2),
                                             class_weight=torch.rand(5, dtype=torch.float64))


def test_class_weights_get_no_silent_gradient_or_tangent():
    """The registered ops and forward mode refuse class weights that require grad or carry a tangent: torch's
    own ops leave the weight's gradient None and its tangent 0 silently (or fail an internal assert)."""
    import torch.autograd.forward_ad as fwAD
    x, t, w = _case(rows=4, classes=5)
    head = torch.rand(5, 5, dtype=torch.float64)
    calls = {
        "weight": lambda x_, w_: torch.ops.torch_vjp.cross_entropy(x_, t, w_, -100, "mean", 0.1)[0],
        "class_weight": lambda x_, w_: torch.ops.torch_vjp.fused_linear_cross_entropy(
            x_, head, t, None, w_, -100, "mean", 0.1, True)[0],
    }
    for name, call in calls.items():
        message = f"not differentiable with respect to argument '{name}'"
        with pytest.raises(RuntimeError, match=message):
            call(x.clone().requires_grad_(), w.clone().requires_grad_())
        with pytest.raises(RuntimeError, match=message):
            with fwAD.dual_level():
                call(x, fwAD.make_dual(w, torch.ones_like(w)))
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        torch.func.jvp(lambda w_: torch_vjp.cross_entropy(x, t, weight=w_), (w,), (torch.ones_like(w),))
    # the input's tangent with constant class weights is still computed
    _, tangent = torch.func.jvp(lambda x_: torch_vjp.cross_entropy(x_, t, weight=w), (x,), (torch.ones_like(x),))
    assert tangent.isfinite()


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_both_modes(smoothing, reduction, device):
    x, t, w = _case(rows=6, classes=5, device=device)
    x.requires_grad_()
    torch.autograd.gradcheck(lambda a: torch_vjp.cross_entropy(a, t, weight=w, reduction=reduction,
                                                               label_smoothing=smoothing),
                             (x,), check_forward_ad=True, check_batched_grad=True)
    torch.autograd.gradgradcheck(lambda a: torch_vjp.cross_entropy(a, t, weight=w, reduction=reduction,
                                                                   label_smoothing=smoothing), (x,))
    h = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
    head = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, device=device, requires_grad=True)
    torch.autograd.gradcheck(
        lambda a, b, c: torch_vjp.fused_linear_cross_entropy(a, b, t, c, reduction=reduction,
                                                             label_smoothing=smoothing, class_weight=w),
        (h, head, bias), check_forward_ad=True)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_chunks_match_cross_entropy(smoothing, reduction, device):
    """The fused loss over several chunks (rows beyond one chunk of the kernel's size are not needed: the
    chunk loop is shape-driven, so a long row count with a small head crosses chunks) against torch."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(300, 8, generator=g, dtype=torch.float64).to(device).requires_grad_()
    head = (torch.randn(13, 8, generator=g, dtype=torch.float64) / 3).to(device).requires_grad_()
    t = torch.randint(0, 13, (300,), generator=g)
    t[::7] = -100
    t = t.to(device)
    w = torch.rand(13, generator=g, dtype=torch.float64).to(device)
    ours = torch_vjp.fused_linear_cross_entropy(h, head, t, reduction=reduction, label_smoothing=smoothing,
                                                class_weight=w)
    ref = F.cross_entropy(h @ head.t(), t, weight=w, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    dy = torch.rand_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (h, head), dy), torch.autograd.grad(ref, (h, head), dy)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_vmap_weight_per_sample(smoothing, device):
    """A class-weight vector per sample under vmap (one call per sample inside the rule), and one shared."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 6, generator=g, dtype=torch.float64).to(device)
    t = torch.randint(0, 6, (3, 4), generator=g).to(device)
    w = torch.rand(3, 6, generator=g, dtype=torch.float64).to(device)
    def f(fn):
        return lambda a, b, c: fn(a, b, weight=c, label_smoothing=smoothing)

    for in_dims, weights in (((0, 0, 0), w), ((0, 0, None), w[0])):
        # torch's own weighted smoothing does not vmap (a masked_select): the reference loops over the samples
        per = [weights[i] if in_dims[2] is not None else weights for i in range(3)]
        torch.testing.assert_close(torch.func.vmap(f(torch_vjp.cross_entropy), in_dims)(x, t, weights),
                                   torch.stack([f(F.cross_entropy)(x[i], t[i], per[i]) for i in range(3)]))
        torch.testing.assert_close(
            torch.func.vmap(torch.func.grad(f(torch_vjp.cross_entropy)), in_dims)(x, t, weights),
            torch.stack([torch.func.grad(f(F.cross_entropy))(x[i], t[i], per[i]) for i in range(3)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_class_weight_under_autocast(dtype):
    """Autocast (CPU, bfloat16): the head's product in bfloat16, the class weights kept in float32, as torch's
    linear + cross_entropy apply them."""
    x, t, w = _case(rows=16, classes=9, dtype=torch.float32)
    h = torch.randn(16, 8)
    head = torch.randn(9, 8) / 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = torch_vjp.fused_linear_cross_entropy(h, head, t, class_weight=w, label_smoothing=0.1)
        ref = F.cross_entropy(F.linear(h, head), t, weight=w, label_smoothing=0.1)
    assert ours.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def _weighted_exact(x, target, w, smoothing, reduction):
    """Loss and dx (grad_output 1) with class weights in x87 extended precision (numpy's longdouble), torch's
    formula: (1 - ε) w_t (lse - x_t) + (ε/C) Σ_j w_j (lse - x_j), 'mean' over Σ w_t. Every target counts."""
    import numpy as np
    xl = x.double().cpu().numpy().astype(np.longdouble)
    wl = w.double().cpu().numpy().astype(np.longdouble)
    t = target.cpu().numpy()
    rows, classes = xl.shape
    m = xl.max(-1, keepdims=True)
    log_p = xl - m - np.log(np.exp(xl - m).sum(-1, keepdims=True))
    w_t = wl[t]
    onehot = np.zeros_like(xl)
    onehot[np.arange(rows), t] = 1
    loss = -(1 - smoothing) * w_t * log_p[np.arange(rows), t] - smoothing / classes * (wl * log_p).sum(-1)
    a = (1 - smoothing) * w_t + smoothing / classes * wl.sum()
    dx = a[:, None] * np.exp(log_p) - smoothing / classes * wl - ((1 - smoothing) * w_t)[:, None] * onehot
    if reduction == "mean":
        loss, dx = loss.sum() / w_t.sum(), dx / w_t.sum()
    elif reduction == "sum":
        loss = loss.sum()
    return loss, dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["confident", "offset"])
def test_weighted_as_accurate_as_torch(dtype, smoothing, kind, device):
    """Against extended precision, the weighted loss and gradient are as accurate as torch's (the unweighted
    criterion of test_exactness.py): at confident logits (spread 30) and under a shared offset of 1000, where a
    loss formed as W·lse - Σ w_j x_j would cancel."""
    import numpy as np
    g = torch.Generator().manual_seed(11)
    rows, classes = 64, 1000
    x = torch.randn(rows, classes, generator=g, dtype=torch.float64) * (30 if kind == "confident" else 3)
    if kind == "offset":
        x = x + 1000
    x = x.to(dtype=dtype, device=device)
    t = torch.randint(0, classes, (rows,), generator=g).to(device)
    w = (torch.rand(classes, generator=g, dtype=torch.float64) * 1.75 + 0.25).to(dtype=dtype, device=device)
    eps = torch.finfo(dtype).eps
    for reduction in REDUCTIONS:
        loss_exact, dx_exact = _weighted_exact(x, t, w, smoothing, reduction)
        errors = []
        for fn in (torch_vjp.cross_entropy, F.cross_entropy):
            xs = x.clone().requires_grad_()
            loss = fn(xs, t, weight=w, reduction=reduction, label_smoothing=smoothing)
            (dx,) = torch.autograd.grad(loss, xs, torch.ones_like(loss))
            errors.append((float(np.abs(loss.detach().double().cpu().numpy().astype(np.longdouble) - loss_exact).max()),
                           float(np.abs(dx.double().cpu().numpy().astype(np.longdouble) - dx_exact).max())))
        (loss_err, dx_err), (loss_torch, dx_torch) = errors
        scale = float(np.abs(loss_exact).max())
        assert loss_err <= 2 * loss_torch + 16 * eps * scale, (reduction, loss_err, loss_torch)
        assert dx_err <= 2 * dx_torch + eps / 2, (reduction, dx_err, dx_torch)
