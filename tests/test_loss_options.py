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


def _assert_float64_match(ours, reference, x, grad_rtol=1e-12):
    """ours(x) and reference(x) in float64: the loss to round-off, and the gradient for a random dy."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ours(xa), reference(xb)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    dy = torch.rand_like(a)
    torch.testing.assert_close(torch.autograd.grad(a, xa, dy)[0], torch.autograd.grad(b, xb, dy)[0],
                               rtol=grad_rtol, atol=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
def test_weighted_values_and_gradients_float64(reduction, smoothing, device):
    """torch's F.cross_entropy(weight=) in float64, loss and gradient, to round-off."""
    x, t, w = _case(device=device)
    options = dict(weight=w, reduction=reduction, label_smoothing=smoothing)
    _assert_float64_match(lambda x: torch_vjp.cross_entropy(x, t, **options), lambda x: F.cross_entropy(x, t, **options), x)


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


# ---------------------------------------------------------------------------------------------------------
# softcap (Gemma 2's final-logit softcapping inside the loss) and the z-loss (PaLM's λ·lse², Liger's
# lse_square_scale). The table runs every shared check on rows with them (torch_vjp/testing.py); these are
# float64 against torch's own ops to round-off, the fused loss across chunks, the z-loss's value, both modes of
# gradcheck and gradgradcheck, vmap, compile, and the errors.

def _softcapped(x, c):
    return c * torch.tanh(x / c)


def _z_ref(x, t, reduction, lam, c=None, ignore_index=-100):
    """PaLM / Liger: λ·logsumexp(z)² per counted row, reduced as the loss ('mean': over the counted rows)."""
    z = x if c is None else _softcapped(x, c)
    counted = t != ignore_index
    per_row = torch.where(counted, lam * torch.logsumexp(z, -1) ** 2, 0)
    if reduction == "none":
        return per_row
    return per_row.sum() / counted.sum() if reduction == "mean" else per_row.sum()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("softcap", [1.5, 30.0])
def test_softcap_float64_matches_torch(reduction, smoothing, weighted, softcap, device):
    """F.cross_entropy(c·tanh(x/c), ...) in float64, loss and gradient through tanh, to round-off (logits of
    spread 3: c = 1.5 saturates many of them, c = 30 barely bends them)."""
    x, t, w = _case(device=device)
    w = w if weighted else None
    options = dict(weight=w, reduction=reduction, label_smoothing=smoothing)
    _assert_float64_match(lambda x: torch_vjp.cross_entropy(x, t, softcap=softcap, **options),
                          lambda x: F.cross_entropy(_softcapped(x, softcap), t, **options),
                          x, grad_rtol=1e-11)  # through tanh: its derivative 1 - tanh² rounds in both


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_z_loss_float64_matches_reference(reduction, smoothing, softcap, device):
    """loss + λ·lse² (PaLM; Liger's lse_square_scale), its gradient (+ 2λ·lse·softmax per row), and
    return_z_loss's term, against torch ops in float64."""
    x, t, _ = _case(device=device)
    lam = 0.05
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, z_loss = torch_vjp.cross_entropy(xa, t, reduction=reduction, label_smoothing=smoothing, softcap=softcap,
                                           lse_square_scale=lam, return_z_loss=True)
    zb = xb if softcap is None else _softcapped(xb, softcap)
    z_ref = _z_ref(xb, t, reduction, lam, softcap)
    ref = F.cross_entropy(zb, t, reduction=reduction, label_smoothing=smoothing) + z_ref
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z_loss, z_ref.detach(), rtol=1e-12, atol=1e-12)
    assert not z_loss.requires_grad and z_loss.shape == ours.shape and z_loss.dtype == ours.dtype
    dy = torch.rand_like(ours)
    torch.testing.assert_close(torch.autograd.grad(ours, xa, dy)[0], torch.autograd.grad(ref, xb, dy)[0],
                               rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", [dict(softcap=2.0), dict(lse_square_scale=0.1),
                                     dict(softcap=3.0, lse_square_scale=0.01, label_smoothing=0.1),
                                     dict(softcap=2.0, label_smoothing=0.1, weighted=True)],
                         ids=["softcap", "z", "both", "softcap-weights"])
def test_fused_options_across_chunks(reduction, options, device):
    """The fused loss with the options over several chunks, against torch on the whole logits; return_z_loss's
    chunked recomputation too."""
    options = dict(options)
    weighted = options.pop("weighted", False)
    g = torch.Generator().manual_seed(7)
    h = torch.randn(300, 8, generator=g, dtype=torch.float64).to(device).requires_grad_()
    head = (torch.randn(13, 8, generator=g, dtype=torch.float64)).to(device).requires_grad_()
    bias = torch.randn(13, generator=g, dtype=torch.float64).to(device).requires_grad_()
    t = torch.randint(0, 13, (300,), generator=g)
    t[::7] = -100
    t = t.to(device)
    w = torch.rand(13, generator=g, dtype=torch.float64).to(device) if weighted else None
    ours, z_loss = torch_vjp.fused_linear_cross_entropy(h, head, t, bias, reduction=reduction, class_weight=w,
                                                        return_z_loss=True, **options)
    logits = h @ head.t() + bias
    c, lam = options.get("softcap"), options.get("lse_square_scale", 0.0)
    z_ref = _z_ref(logits, t, reduction, lam, c)
    ref = F.cross_entropy(logits if c is None else _softcapped(logits, c), t, weight=w, reduction=reduction,
                          label_smoothing=options.get("label_smoothing", 0.0)) + z_ref
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z_loss, z_ref.detach(), rtol=1e-12, atol=1e-12)
    dy = torch.rand_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (h, head, bias), dy), torch.autograd.grad(ref, (h, head, bias), dy)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", ["cross_entropy", "fused"])
def test_options_low_precision_within_torchs_own_error(dtype, op, device):
    """In float32 and the half types the loss and gradient are no further from the float64 result than torch's
    own F.cross_entropy(c·tanh(x/c)) + λ·lse² in that dtype is (plus a small floor: torch's error can be 0 by
    luck on a row), the kernels forming z in float32 and rounding once."""
    g = torch.Generator().manual_seed(11)
    rows, hidden, vocab = 64, 32, 301
    h64 = torch.randn(rows, hidden, generator=g, dtype=torch.float64)
    head64 = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[::5] = -100
    t = t.to(device)
    c, lam = 5.0, 1e-3

    def run(fn, *args):
        args = [a.detach().clone().to(device).requires_grad_() for a in args]
        loss = fn(*args)
        return loss, torch.autograd.grad(loss, args)

    if op == "cross_entropy":
        inputs64 = (h64 @ head64.t() * 2,)
        ours_fn = lambda x: torch_vjp.cross_entropy(x, t, softcap=c, lse_square_scale=lam)  # noqa: E731
        ref_fn = lambda x: F.cross_entropy(_softcapped(x, c), t) + _z_ref(x, t, "mean", lam, c)  # noqa: E731
    else:
        inputs64 = (h64, head64)
        ours_fn = lambda x, w: torch_vjp.fused_linear_cross_entropy(x, w, t, softcap=c, lse_square_scale=lam)  # noqa
        ref_fn = lambda x, w: F.cross_entropy(_softcapped(x @ w.t(), c), t) + _z_ref(x @ w.t(), t, "mean", lam, c)  # noqa
    exact, exact_grads = run(ref_fn, *inputs64)
    low = [a.to(dtype) for a in inputs64]
    ours, ours_grads = run(ours_fn, *low)
    theirs, their_grads = run(ref_fn, *low)
    assert ours.dtype == dtype and all(gr.dtype == dtype for gr in ours_grads)
    floor = 4 * torch.finfo(dtype).eps
    assert (ours.double() - exact).abs() <= (theirs.double() - exact).abs() + floor * exact.abs()
    for a, b, e in zip(ours_grads, their_grads, exact_grads):
        ours_err = (a.double() - e).abs().max()
        their_err = (b.double() - e).abs().max()
        assert ours_err <= their_err + floor * e.abs().max(), (ours_err, their_err)


def test_options_errors_like_torch_arguments():
    x, t, w = _case(rows=4, classes=5)
    head = torch.rand(5, 5, dtype=torch.float64)
    calls = {"cross_entropy": lambda **kw: torch_vjp.cross_entropy(x, t, **kw),
             "fused_linear_cross_entropy": lambda **kw: torch_vjp.fused_linear_cross_entropy(x, head, t, **kw)}
    for fn, call in calls.items():
        for bad in (-1.0, float("nan"), float("inf"), -float("inf")):
            with pytest.raises(ValueError, match="softcap must be a positive finite number"):
                call(softcap=bad)
            with pytest.raises(ValueError, match="lse_square_scale must be a non-negative finite number"):
                call(lse_square_scale=bad)
        with pytest.raises(TypeError, match=f"{fn}\\(\\): argument 'softcap' must be Number, not str"):
            call(softcap="30")
        with pytest.raises(TypeError, match="argument 'lse_square_scale' must be Number"):
            call(lse_square_scale=None)
        weights = {"weight": w} if fn == "cross_entropy" else {"class_weight": w}
        with pytest.raises(NotImplementedError, match="class weights with the z-loss"):
            call(lse_square_scale=0.1, **weights)
        # None and 0 are off: the plain loss, bit for bit
        assert torch.equal(call(softcap=None), call()) and torch.equal(call(softcap=0.0, lse_square_scale=0.0), call())
    # the registered ops check too, with the same types (the fake kernels as well: see test_fake_kernels_check)
    with pytest.raises(ValueError, match="softcap must be a positive finite number"):
        torch.ops.torch_vjp.cross_entropy(x, t, None, -100, "mean", 0.0, -2.0, 0.0)
    with pytest.raises(ValueError, match="lse_square_scale must be a non-negative finite number"):
        torch.ops.torch_vjp.fused_linear_cross_entropy(x, head, t, None, None, -100, "mean", 0.0, False, 0.0,
                                                       float("nan"))
    with pytest.raises(NotImplementedError, match="class weights with the z-loss"):
        torch.ops.torch_vjp.cross_entropy_backward(torch.ones(()), x, t, w, torch.zeros(4, dtype=torch.float64),
                                                   torch.zeros(4, dtype=torch.float64), -100, "mean", 0.0, 0.0, 0.1)


def test_fake_kernels_check_options():
    x, t, _ = _case(rows=4, classes=5)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx, ft = mode.from_tensor(x), mode.from_tensor(t)
        with pytest.raises(ValueError, match="softcap must be a positive finite number"):
            torch.ops.torch_vjp.cross_entropy(fx, ft, None, -100, "mean", 0.0, float("inf"), 0.0)
        loss, m, log_s = torch.ops.torch_vjp.cross_entropy(fx, ft, None, -100, "none", 0.0, 3.0, 0.1)
        assert loss.shape == (4,) and m.shape == (4,)


def test_registered_ops_keep_their_old_arity():
    """Callers written before the options (benchmarks, CUDA tests) pass none: the defaults are off."""
    x, t, _ = _case(rows=6, classes=5)
    old = torch.ops.torch_vjp.cross_entropy(x, t, None, -100, "mean", 0.1)
    new = torch.ops.torch_vjp.cross_entropy(x, t, None, -100, "mean", 0.1, 0.0, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(old, new))
    head = torch.rand(5, 5, dtype=torch.float64)
    assert torch.equal(torch.ops.torch_vjp.fused_linear_cross_entropy(x, head, t, None, None, -100, "sum", 0.0, False)[0],
                       torch.ops.torch_vjp.fused_linear_cross_entropy(x, head, t, None, None, -100, "sum", 0.0, False,
                                                                      0.0, 0.0)[0])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_options_gradcheck_both_modes(reduction, device):
    x, t, _ = _case(rows=6, classes=5, device=device)
    x.requires_grad_()
    fn = lambda a: torch_vjp.cross_entropy(a, t, reduction=reduction, label_smoothing=0.1, softcap=2.0,  # noqa
                                           lse_square_scale=0.05)
    torch.autograd.gradcheck(fn, (x,), check_forward_ad=True, check_batched_grad=True)
    torch.autograd.gradgradcheck(fn, (x,))
    h = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
    head = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, device=device, requires_grad=True)
    fused = lambda a, b, c: torch_vjp.fused_linear_cross_entropy(a, b, t, c, reduction=reduction, softcap=1.5,  # noqa
                                                                 lse_square_scale=0.05)
    torch.autograd.gradcheck(fused, (h, head, bias), check_forward_ad=True)
    torch.autograd.gradgradcheck(fused, (h, head, bias))


def test_options_softcap_statistics_and_transforms():
    """torch.func over the options (jvp, vmap of grad, hessian) against torch's composite, and the statistics
    (softcapped logits' max and log Σ exp) differentiate through tanh."""
    x, t, _ = _case(rows=5, classes=7)
    ours = lambda a, t=t: torch_vjp.cross_entropy(a, t, softcap=2.0, lse_square_scale=0.1)  # noqa: E731
    ref = lambda a, t=t: F.cross_entropy(_softcapped(a, 2.0), t) + _z_ref(a, t, "mean", 0.1, 2.0)  # noqa: E731
    tangent = torch.randn_like(x)
    torch.testing.assert_close(torch.func.jvp(ours, (x,), (tangent,)), torch.func.jvp(ref, (x,), (tangent,)),
                               rtol=1e-10, atol=1e-12)
    t2 = torch.tensor([3, 1])
    torch.testing.assert_close(torch.func.hessian(lambda a: ours(a, t2))(x[:2]),
                               torch.func.hessian(lambda a: ref(a, t2))(x[:2]), rtol=1e-9, atol=1e-11)
    batch = torch.randn(3, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(torch.vmap(torch.func.grad(ours))(batch), torch.vmap(torch.func.grad(ref))(batch),
                               rtol=1e-10, atol=1e-12)
    loss, m, log_s = torch.ops.torch_vjp.cross_entropy(x, t, None, -100, "none", 0.0, 2.0, 0.0)
    z = _softcapped(x, 2.0)
    torch.testing.assert_close(m, z.amax(-1))
    torch.testing.assert_close(m + log_s, torch.logsumexp(z, -1), rtol=1e-12, atol=1e-12)


def test_options_compile_fullgraph():
    x, t, _ = _case(rows=8, classes=6)
    h = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    head = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)

    def f(a, b):
        ce = torch_vjp.cross_entropy(a @ b.t(), t, softcap=3.0, lse_square_scale=0.01)
        fused = torch_vjp.fused_linear_cross_entropy(a, b, t, softcap=3.0, lse_square_scale=0.01)
        return ce + fused

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = f(h, head)
    out = compiled(h, head)
    torch.testing.assert_close(out, eager, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out, (h, head)), torch.autograd.grad(eager, (h, head))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_nn_modules_take_the_options():
    x, t, _ = _case(rows=6, classes=5)
    loss = torch_vjp.nn.CrossEntropyLoss(label_smoothing=0.1, softcap=2.0, lse_square_scale=0.1)
    torch.testing.assert_close(loss(x, t), torch_vjp.cross_entropy(x, t, label_smoothing=0.1, softcap=2.0,
                                                                   lse_square_scale=0.1))
    value, z = torch_vjp.nn.CrossEntropyLoss(lse_square_scale=0.1, return_z_loss=True)(x, t)
    torch.testing.assert_close(z, _z_ref(x, t, "mean", 0.1))
    head = torch.rand(5, 5, dtype=torch.float64)
    fused = torch_vjp.nn.FusedLinearCrossEntropyLoss(softcap=2.0, lse_square_scale=0.1)
    torch.testing.assert_close(fused(x, head, t), torch_vjp.fused_linear_cross_entropy(x, head, t, softcap=2.0,
                                                                                      lse_square_scale=0.1))
    assert "softcap=2.0" in repr(fused)


# ---------------------------------------------------------------------------------------------------------
# Per-token weights (token_weight=, both losses): the 'none' loss times a weight per row, 'sum' summed,
# 'mean' divided by Σ v_i w_{t_i} over the rows not ignored (torch's class-weighted mean, v the token weights).
# A composite over the registered ops' 'none' form, so autograd, forward AD, vmap and compile are torch's.

def _token_ref(per_row, t, v, reduction, w=None, ignore_index=-100):
    weighted = per_row * v
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    counted = t != ignore_index
    row_w = counted.to(per_row.dtype) if w is None else torch.where(counted, w[torch.where(counted, t, 0)], 0)
    return weighted.sum() / (row_w * v).sum()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", [{}, dict(label_smoothing=0.1, weighted=True), dict(softcap=2.0),
                                     dict(lse_square_scale=0.1, softcap=3.0)],
                         ids=["plain", "smoothing-class-weights", "softcap", "z-softcap"])
def test_token_weights_float64(reduction, options, device):
    options = dict(options)
    weighted = options.pop("weighted", False)
    x, t, w = _case(device=device)
    w = w if weighted else None
    g = torch.Generator().manual_seed(4)
    v = (torch.rand(t.shape, generator=g, dtype=torch.float64) * 2).to(device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    va, vb = v.clone().requires_grad_(), v.clone().requires_grad_()
    ours = torch_vjp.cross_entropy(xa, t, weight=w, reduction=reduction, token_weight=va, **options)
    c, lam = options.get("softcap"), options.get("lse_square_scale", 0.0)
    zb = xb if c is None else _softcapped(xb, c)
    per_row = F.cross_entropy(zb, t, weight=w, reduction="none", label_smoothing=options.get("label_smoothing", 0.0))
    per_row = per_row + _z_ref(xb, t, "none", lam, c) if lam else per_row
    ref = _token_ref(per_row, t, vb, reduction, w)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    dy = torch.rand_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (xa, va), dy), torch.autograd.grad(ref, (xb, vb), dy)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    if lam:
        _, z = torch_vjp.cross_entropy(x, t, reduction=reduction, token_weight=v, return_z_loss=True, **options)
        torch.testing.assert_close(z, _token_ref(_z_ref(x, t, "none", lam, c), t, v, reduction))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_token_weights_fused_and_class_dim_second(reduction, device):
    g = torch.Generator().manual_seed(8)
    h = torch.randn(300, 8, generator=g, dtype=torch.float64).to(device).requires_grad_()
    head = torch.randn(13, 8, generator=g, dtype=torch.float64).to(device).requires_grad_()
    t = torch.randint(0, 13, (300,), generator=g)
    t[::7] = -100
    t = t.to(device)
    v = torch.rand(300, generator=g, dtype=torch.float64).to(device).requires_grad_()
    cw = torch.rand(13, generator=g, dtype=torch.float64).to(device)
    ours = torch_vjp.fused_linear_cross_entropy(h, head, t, reduction=reduction, class_weight=cw, softcap=3.0,
                                                label_smoothing=0.1, token_weight=v)
    per_row = F.cross_entropy(_softcapped(h @ head.t(), 3.0), t, weight=cw, reduction="none", label_smoothing=0.1)
    ref = _token_ref(per_row, t, v, reduction, cw)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    dy = torch.rand_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (h, head, v), dy), torch.autograd.grad(ref, (h, head, v), dy)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    # (N, C, d): the token weight is shaped like the target
    x = torch.randn(3, 5, 4, generator=g, dtype=torch.float64).to(device)
    t2 = torch.randint(0, 5, (3, 4), generator=g).to(device)
    v2 = torch.rand(3, 4, generator=g, dtype=torch.float64).to(device)
    ours = torch_vjp.cross_entropy(x, t2, reduction=reduction, token_weight=v2)
    ref = _token_ref(F.cross_entropy(x, t2, reduction="none"), t2, v2, reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_token_weights_low_precision_within_torchs_own_error(dtype, device):
    g = torch.Generator().manual_seed(12)
    x64 = torch.randn(64, 301, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, 301, (64,), generator=g)
    t[::5] = -100
    t = t.to(device)
    v64 = torch.rand(64, generator=g, dtype=torch.float64) * 2

    def run(fn, x, v):
        x, v = x.clone().to(device).requires_grad_(), v.clone().to(device).requires_grad_()
        loss = fn(x, v)
        return loss, torch.autograd.grad(loss, (x, v))

    ours_fn = lambda x, v: torch_vjp.cross_entropy(x, t, token_weight=v)  # noqa: E731
    ref_fn = lambda x, v: _token_ref(F.cross_entropy(x, t, reduction="none"), t, v, "mean")  # noqa: E731
    exact, exact_grads = run(ref_fn, x64, v64)
    ours, ours_grads = run(ours_fn, x64.to(dtype), v64.to(dtype))
    theirs, their_grads = run(ref_fn, x64.to(dtype), v64.to(dtype))
    floor = 4 * torch.finfo(dtype).eps
    assert ours.dtype == dtype
    assert (ours.double() - exact).abs() <= (theirs.double() - exact).abs() + floor * exact.abs()
    for a, b, e in zip(ours_grads, their_grads, exact_grads):
        assert (a.double() - e).abs().max() <= (b.double() - e).abs().max() + floor * e.abs().max()


def test_token_weights_transforms_and_errors():
    x, t, _ = _case(rows=6, classes=5)
    v = torch.rand(6, dtype=torch.float64)
    fn = lambda a, b: torch_vjp.cross_entropy(a, t, token_weight=b, softcap=2.0)  # noqa: E731
    torch.autograd.gradcheck(fn, (x.clone().requires_grad_(), v.clone().requires_grad_()), check_forward_ad=True,
                             check_batched_grad=True)
    torch.autograd.gradgradcheck(fn, (x.clone().requires_grad_(), v.clone().requires_grad_()))
    batch_x, batch_v = torch.randn(3, 6, 5, dtype=torch.float64), torch.rand(3, 6, dtype=torch.float64)
    torch.testing.assert_close(torch.vmap(fn)(batch_x, batch_v), torch.stack([fn(a, b) for a, b in zip(batch_x, batch_v)]))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, v), fn(x, v))
    with pytest.raises(ValueError, match="expected token_weight of the target's shape"):
        torch_vjp.cross_entropy(x, t, token_weight=torch.rand(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="token_weight must be a floating tensor"):
        torch_vjp.cross_entropy(x, t, token_weight=torch.ones(6, dtype=torch.long))
    with pytest.raises(TypeError, match="argument 'token_weight' must be Tensor"):
        torch_vjp.fused_linear_cross_entropy(x, torch.rand(5, 5, dtype=torch.float64), t, token_weight=[1.0] * 6)
    # all ignored: 'mean' is NaN (0/0), as torch's
    assert torch_vjp.cross_entropy(x, torch.full_like(t, -100), token_weight=v).isnan()
    # one row of logits (C,) with a one-element target and weight, as torch takes the target
    one = torch.tensor([2])
    torch.testing.assert_close(torch_vjp.cross_entropy(x[0], one, token_weight=v[:1], reduction="sum"),
                               F.cross_entropy(x[0], one[0], reduction="sum") * v[0])


# ---------------------------------------------------------------------------------------------------------
# Token accuracy (return_token_accuracy=True, both losses): argmax of the logits at the target, over the rows
# not ignored; detached, unweighted.

def _accuracy_ref(logits, t, reduction, ignore_index=-100):
    counted = t != ignore_index
    hit = ((logits.argmax(-1) == t) & counted).to(logits.dtype)
    if reduction == "none":
        return hit
    return hit.sum() / counted.sum() if reduction == "mean" else hit.sum()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_token_accuracy(reduction, dtype, device):
    g = torch.Generator().manual_seed(9)
    h = torch.randn(300, 8, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    head = torch.randn(13, 8, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    t = torch.randint(0, 13, (300,), generator=g)
    t[::7] = -100
    logits = h @ head.t()
    t[:100] = torch.where(t[:100] == -100, -100, logits[:100].argmax(-1).cpu())  # a third of the rows right
    t = t.to(device)
    expected = _accuracy_ref(logits, t, reduction)
    loss, accuracy = torch_vjp.cross_entropy(logits.clone().requires_grad_(), t, reduction=reduction, softcap=2.0,
                                             return_token_accuracy=True)
    assert not accuracy.requires_grad and accuracy.dtype == loss.dtype and accuracy.shape == loss.shape
    torch.testing.assert_close(accuracy, expected, rtol=0, atol=0)
    loss, z, accuracy = torch_vjp.fused_linear_cross_entropy(h.clone().requires_grad_(), head, t, reduction=reduction,
                                                             lse_square_scale=0.1, return_z_loss=True,
                                                             return_token_accuracy=True)
    torch.testing.assert_close(accuracy, expected, rtol=0, atol=0)
    assert z.shape == loss.shape == accuracy.shape and not z.requires_grad and loss.requires_grad
    # the loss itself is unchanged by asking for the extras
    torch.testing.assert_close(loss, torch_vjp.fused_linear_cross_entropy(h, head, t, reduction=reduction,
                                                                          lse_square_scale=0.1), rtol=0, atol=0)
    if reduction == "mean":  # every row ignored: NaN, as the loss
        assert torch_vjp.cross_entropy(logits, torch.full_like(t, -100), return_token_accuracy=True)[1].isnan()
    module = torch_vjp.nn.CrossEntropyLoss(reduction=reduction, return_token_accuracy=True)
    torch.testing.assert_close(module(logits, t)[1], expected, rtol=0, atol=0)
