"""Exact where torch is exact: the cases a demanding user hits and a random test does not.

Constant rows (a padding position) and one-element rows, confident logits at real vocabulary sizes, large
shared offsets, a fused loss's parameter gradients over many chunks, bitwise reproducibility, normalize's
edges, rows of no elements, and arguments torch takes or refuses. Every check compares with torch (its
result, or its own error against float64) on the same inputs.
"""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torch_vjp

HALF = (torch.float16, torch.bfloat16)


def max_error(a, ref):
    return (a.double() - ref.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# layer_norm: a constant row normalizes to exactly 0, so its output is exactly the bias.

@pytest.mark.parametrize("n", [1, 7, 16, 768, 4096, 70001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF], ids=str)
@pytest.mark.parametrize("eps", [1e-12, 1e-5])
def test_layer_norm_of_a_constant_row_is_its_bias(n, dtype, eps, device):
    """BERT's eps = 1e-12 turns a mean one ulp off into |y| ≈ 0.4 (r = 1e6); torch's y is exactly the bias.
    Values that no sum of them represents exactly (5.1, 1/3, -7e-3) and one that grows large (3e4)."""
    for value in (5.1, 1 / 3, -7e-3, 3e4):
        x = torch.full((3, n), value, dtype=dtype, device=device)
        w = torch.linspace(0.5, 2.0, n, dtype=dtype, device=device)
        b = torch.linspace(-1.0, 1.0, n, dtype=dtype, device=device)
        y = torch_vjp.layer_norm(x, (n,), w, b, eps)
        assert torch.equal(y, b.expand_as(y)), f"value {value}: max |y - b| = {max_error(y, b.expand_as(y)):.3g}"
        assert torch.equal(torch_vjp.layer_norm(x, (n,), eps=eps), torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_layer_norm_constant_rows_backward_matches_torch(dtype, device):
    """The backward of a constant row: x̂ = 0 exactly, so dx = r (g - mean g), dw = 0 from it, db = Σ dy."""
    n = 768
    x = torch.full((4, n), 5.1, dtype=dtype, device=device)
    x[1] = torch.randn(n, dtype=dtype)  # a real row beside the padding rows
    w = torch.randn(n, dtype=dtype, device=device)
    b = torch.randn(n, dtype=dtype, device=device)
    dy = torch.randn(4, n, dtype=dtype, device=device)
    grads = []
    for fn, cast in ((torch_vjp.layer_norm, dtype), (F.layer_norm, dtype), (F.layer_norm, torch.float64)):
        xs, ws, bs = (t.detach().to(cast).requires_grad_() for t in (x, w, b))
        fn(xs, (n,), ws, bs, 1e-5).backward(dy.to(cast))
        grads.append((xs.grad, ws.grad, bs.grad))
    for ours, theirs, exact in zip(*grads):
        if dtype == torch.float64:  # torch's float64 is the reference itself: held to rounding of r (g - mean g)
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12 * exact.abs().max().item())
        else:
            assert max_error(ours, exact) <= 2 * max_error(theirs, exact) + torch.finfo(dtype).eps * exact.abs().max()


def test_nn_layer_norm_with_bert_eps_on_padding_rows(device):
    m = torch_vjp.nn.LayerNorm(768, eps=1e-12).to(device)
    ref = torch.nn.LayerNorm(768, eps=1e-12).to(device)
    ref.load_state_dict(m.state_dict())
    x = torch.full((2, 5, 768), 5.1, device=device)
    assert torch.equal(m(x), ref(x))


# ---------------------------------------------------------------------------------------------------------
# add_layer_norm / add_rms_norm: special values from either operand, constant and one-element rows. (On the GPU,
# tests/test_cuda.py's test_paths_special_values and test_paths_one_element_rows run these at every kernel path.)

ADD_NORM_REFS = {"add_layer_norm": lambda s, w, b: F.layer_norm(s, (s.shape[-1],), w, b, 1e-5),
                 "add_rms_norm": lambda s, w, b: F.rms_norm(s, (s.shape[-1],), w, 1e-6)}
# float64: torch's own x - μ of the constant row 5000.05 is an ulp (9e-13) off ours (exactly 0), times r = 316
# in x̂: 3e-10 of dweight.
ADD_NORM_RTOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def special_add_operands(n, dtype, device):
    """input and residual, 8 rows of n, a special value a row at a column that moves from row to row: +inf from
    the input (row 0), -inf from the residual (1), NaN from the input (2) and from the residual (3), +inf from
    the input and -inf from the residual beside it (4; at n = 1 the same element: NaN in s), constant rows of
    5.1 and 1e4 + 0.1 split as x and -x/2 (5, 6: s = x/2 exactly, not a binary fraction), a plain row (7)."""
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(8, n, generator=g, dtype=torch.float64) * 2).to(dtype)
    residual = (torch.randn(8, n, generator=g, dtype=torch.float64) * 2).to(dtype)
    col = [(r * 7919 + n // 3) % n for r in range(8)]
    x[0, col[0]] = float("inf")
    residual[1, col[1]] = float("-inf")
    x[2, col[2]] = float("nan")
    residual[3, col[3]] = float("nan")
    x[4, col[4]], residual[4, (col[4] + 1) % n] = float("inf"), float("-inf")
    x[5], x[6] = 5.1, 1e4 + 0.1
    residual[5:7] = -(x[5:7].double() / 2).to(dtype)
    return x.to(device), residual.to(device)


def assert_rows_close(got, want, dtype, what):
    """got (dtype) against float64 want: NaN and inf where want has them, finite values within the dtype's
    rtol of the row's largest finite |want| (at least 1: a constant row's dx is r (g - mean g), r = 1/√eps)."""
    want = want.reshape(-1, want.shape[-1])
    scale = want.nan_to_num(0.0, 0.0, 0.0).abs().amax(-1, keepdim=True).clamp_min(1.0)
    rtol = ADD_NORM_RTOL[dtype]
    torch.testing.assert_close(got.double().reshape(want.shape) / scale, want / scale, rtol=rtol, atol=rtol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("n", [1, 7, 768, 4096, 70001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF], ids=str)
@pytest.mark.parametrize("name", ADD_NORM_REFS)
def test_add_norms_special_values_like_torch(name, dtype, n, device):
    """s is torch's input + residual bit for bit (NaN where torch's is); y, the gradient of input and residual
    (the loss reads y and s) and the parameter gradients are torch's norm of that s in float64, NaN and inf at
    the same places; a constant row of add_layer_norm gives the bias exactly. Parameter gradients again from
    the finite rows alone (the NaN rows make every column's sum NaN)."""
    x, residual = special_add_operands(n, dtype, device)
    g = torch.Generator().manual_seed(n + 1)
    w = (torch.randn(n, generator=g, dtype=torch.float64) * 0.5 + 1.0).to(dtype).to(device)
    b = (torch.randn(n, generator=g, dtype=torch.float64) * 0.5).to(dtype).to(device)
    dy = torch.randn(8, n, generator=g, dtype=torch.float64).to(dtype).to(device)
    ds = torch.randn(8, n, generator=g, dtype=torch.float64).to(dtype).to(device)
    op = getattr(torch_vjp, name)
    for rows in (slice(None), slice(5, 8)):
        leaves = [t[rows].clone().requires_grad_() for t in (x, residual)] + [w.clone().requires_grad_()]
        if name == "add_layer_norm":
            leaves.append(b.clone().requires_grad_())
            y, s = op(leaves[0], leaves[1], (n,), leaves[2], leaves[3], 1e-5)
        else:
            y, s = op(leaves[0], leaves[1], (n,), leaves[2], 1e-6)
        grads = torch.autograd.grad((y * dy[rows]).sum() + (s * ds[rows]).sum(), leaves)
        torch.testing.assert_close(s, residual[rows] + x[rows], rtol=0, atol=0, equal_nan=True)
        s64, w64, b64 = (t.detach().double().requires_grad_() for t in (s, w, b))
        y64 = ADD_NORM_REFS[name](s64, w64, b64 if name == "add_layer_norm" else None)
        refs = torch.autograd.grad((y64 * dy[rows].double()).sum() + (s64 * ds[rows].double()).sum(),
                                   [s64, w64] + ([b64] if name == "add_layer_norm" else []))
        assert_rows_close(y, y64.detach(), dtype, "y")
        assert_rows_close(grads[0], refs[0], dtype, "d_input")
        assert torch.equal(grads[0].nan_to_num(), grads[1].nan_to_num()), "d_input and d_residual differ"
        for got, ref, what in zip(grads[2:], refs[1:], ("dweight", "dbias")):
            assert_rows_close(got, ref, dtype, what)
        if name == "add_layer_norm":
            constant = y[-3:-1] if rows.start is None else y[:2]
            assert torch.equal(constant, b.expand_as(constant)), "a constant row did not give the bias"


# ---------------------------------------------------------------------------------------------------------
# cross_entropy: the gradient as accurate as torch's softmax-based one, at confident logits and real vocabularies.

def _ce_exact(x, target, smoothing, reduction):
    """Loss and dx (grad_output 1) in x87 extended precision (numpy's longdouble: 11 bits beyond float64), the
    reference for float64 too. Every target counts."""
    xl = x.double().cpu().numpy().astype(np.longdouble)
    t = target.cpu().numpy()
    rows, classes = xl.shape
    m = xl.max(-1, keepdims=True)
    log_sum = np.log(np.exp(xl - m).sum(-1, keepdims=True))
    log_p = xl - m - log_sum
    onehot = np.zeros_like(xl)
    onehot[np.arange(rows), t] = 1
    q = (1 - smoothing) * onehot + smoothing / classes
    loss = -(q * log_p).sum(-1)
    dx = np.exp(log_p) - q
    if reduction == "mean":
        loss, dx = loss.mean(), dx / rows
    return loss, dx


def _ce_errors(x, target, label_smoothing=0.0, reduction="mean"):
    """(ours, torch's) max errors of the loss and of dx against the extended-precision result on the same inputs."""
    loss_exact, dx_exact = _ce_exact(x, target, label_smoothing, reduction)
    out = []
    for fn in (torch_vjp.cross_entropy, F.cross_entropy):
        xs = x.detach().clone().requires_grad_()
        loss = fn(xs, target, reduction=reduction, label_smoothing=label_smoothing)
        (dx,) = torch.autograd.grad(loss, xs, torch.ones_like(loss))
        out.append((float(np.abs(loss.detach().double().cpu().numpy().astype(np.longdouble) - loss_exact).max()),
                    float(np.abs(dx.double().cpu().numpy().astype(np.longdouble) - dx_exact).max())))
    return out


@pytest.mark.parametrize("vocab", [32000, 50257, 128256])
@pytest.mark.parametrize("scale", [20.0, 40.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF], ids=str)
def test_cross_entropy_confident_logits_as_accurate_as_torch(vocab, scale, dtype, device):
    """x = randn · 30 at vocabularies 32000-128256: with lse rounded first, exp(x - lse) lost |lse|·ε (7.4e-7
    against torch's 1.1e-8 at 50257, float32). Loss and gradient to within twice torch's own error (plus the
    dtype's rounding of the largest value, for a torch that happens to be exact)."""
    g = torch.Generator().manual_seed(vocab)
    rows = 8 if dtype != torch.float64 else 4
    x = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    target = torch.randint(0, vocab, (rows,), generator=g).to(device)
    target[0] = x[0].argmax()  # a confident, right row: p_t ≈ 1
    eps = torch.finfo(dtype).eps
    for smoothing in (0.0, 0.1):
        (loss_err, dx_err), (loss_torch, dx_torch) = _ce_errors(x, target, smoothing)
        assert dx_err <= 2 * dx_torch + eps / 2, f"dx error {dx_err:.3g}, torch's {dx_torch:.3g}"
        assert loss_err <= 2 * loss_torch + eps * 8, f"loss error {loss_err:.3g}, torch's {loss_torch:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("offset", [1000.0, -3000.0])
def test_smoothed_loss_does_not_cancel_under_a_large_offset(dtype, offset, device):
    """Logits offset by ~1000: lse - (1-ε) x_t - ε/C Σx cancelled (3.5e-5 against torch's 2.5e-7). Formed from
    x - max, the offset cancels exactly."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(16, 32000, generator=g, dtype=torch.float64) * 3 + offset).to(dtype).to(device)
    target = torch.randint(0, 32000, (16,), generator=g).to(device)
    for reduction in ("none", "mean"):
        (loss_err, dx_err), (loss_torch, dx_torch) = _ce_errors(x, target, 0.1, reduction)
        eps = torch.finfo(dtype).eps
        assert loss_err <= 2 * loss_torch + 16 * eps, f"loss error {loss_err:.3g}, torch's {loss_torch:.3g}"
        assert dx_err <= 2 * dx_torch + eps / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_loss_gradient_as_accurate_as_torch(dtype, device):
    """The fused loss shares cross_entropy's row kernels: its input gradient at confident logits is as
    accurate as torch's composite."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(64, 64, generator=g, dtype=torch.float64) * 4).to(dtype).to(device)
    w = (torch.randn(32000, 64, generator=g, dtype=torch.float64) * 2).to(dtype).to(device)
    target = torch.randint(0, 32000, (64,), generator=g).to(device)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = torch.autograd.grad(F.cross_entropy(x64 @ w64.t(), target), (x64, w64))
    errors = []
    for fn in (lambda a, b: torch_vjp.fused_linear_cross_entropy(a, b, target),
               lambda a, b: F.cross_entropy(a @ b.t(), target)):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        errors.append([max_error(d, r) for d, r in zip(torch.autograd.grad(fn(a, b), (a, b)), ref)])
    for ours, theirs in zip(*errors):
        assert ours <= 2 * theirs + torch.finfo(dtype).eps, f"{ours:.3g} against torch's {theirs:.3g}"


# ---------------------------------------------------------------------------------------------------------
# The fused loss: parameter gradients accumulated in float32 across chunks, and bitwise reproducible.

@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_fused_loss_weight_gradient_does_not_degrade_with_chunks(dtype, device):
    """4096 rows × vocab 32000 are 4 chunks of logits on the CPU (64 MiB each): dW and db added chunk by chunk
    into a bfloat16 buffer rounded once a chunk (7.5e-3 relative error at 16 chunks, torch's composite 1.7e-3).
    Accumulated in float32 and rounded once, they are as accurate as torch's single product."""
    g = torch.Generator().manual_seed(3)
    n, h, v = 4096, 32, 32000
    x = (torch.randn(n, h, generator=g) * 2).to(dtype).to(device)
    w = (torch.randn(v, h, generator=g) / 4).to(dtype).to(device)
    b = (torch.randn(v, generator=g) / 4).to(dtype).to(device)
    target = torch.randint(0, v, (n,), generator=g).to(device)
    # float64 reference on the same inputs, formed in row chunks to bound its memory
    w64, b64 = w.double(), b.double()
    dw64, db64 = torch.zeros_like(w64), torch.zeros_like(b64)
    for rows in torch.arange(n).split(1024):
        logits = x[rows].double() @ w64.t() + b64
        d = (torch.softmax(logits, -1) - F.one_hot(target[rows], v).double()) / n
        dw64 += d.t() @ x[rows].double()
        db64 += d.sum(0)
    relative = []
    for fn in (torch_vjp.fused_linear_cross_entropy, lambda a, b_, t, c: F.cross_entropy(F.linear(a, b_, c), t)):
        ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
        dw, db = torch.autograd.grad(fn(x, ws, target, bs), (ws, bs))
        relative.append(((dw.double() - dw64).norm() / dw64.norm()).item())
        relative.append(((db.double() - db64).norm() / db64.norm()).item())
    (ours_w, ours_b, torch_w, torch_b) = relative
    assert ours_w <= 1.1 * torch_w, f"dW relative error {ours_w:.3g}, torch's {torch_w:.3g}"
    assert ours_b <= 1.1 * torch_b, f"db relative error {ours_b:.3g}, torch's {torch_b:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_loss_gradients_are_bitwise_reproducible(dtype, device):
    """The chunking is a function of the shapes alone: two calls give the same bits, also with a large
    allocation held in between (memory pressure changed the chunk when it was sized from free memory)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(700, 48, generator=g).to(dtype).to(device)
    w = (torch.randn(50000, 48, generator=g) / 8).to(dtype).to(device)
    b = torch.randn(50000, generator=g).to(dtype).to(device)
    target = torch.randint(0, 50000, (700,), generator=g).to(device)

    def grads():
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        loss = torch_vjp.fused_linear_cross_entropy(xs, ws, target, bs, label_smoothing=0.1)
        return (loss, *torch.autograd.grad(loss, (xs, ws, bs)))

    first = grads()
    ballast = torch.empty(512 << 20, dtype=torch.uint8, device=device)  # 512 MiB held
    second = grads()
    del ballast
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


# ---------------------------------------------------------------------------------------------------------
# normalize: torch's formula and tie rule.

@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e30), (torch.bfloat16, 1e30), (torch.float16, 6e4),
                                       (torch.float64, 1e200)], ids=str)
def test_normalize_one_element_rows_do_not_square(dtype, big, device):
    """A row of one element has ‖x‖ = |x| (torch's norm): no square to overflow (1e30 in float32 gave 0) or
    underflow (1e-30 with eps = 0 gave inf)."""
    x = torch.tensor([[big], [-big], [1e-30 if dtype != torch.float16 else 1e-7], [0.0]], dtype=dtype, device=device)
    for eps in (1e-12, 0.0):
        y = torch_vjp.normalize(x, dim=1, eps=eps)
        # float64 torch, rounded (float16 torch would make the zero row 0/0: its eps = 1e-12 is 0 there)
        y_torch = F.normalize(x.double(), dim=1, eps=eps).to(dtype)
        torch.testing.assert_close(y, y_torch, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(torch_vjp.normalize(x[:2], dim=1), torch.tensor([[1.0], [-1.0]], dtype=dtype, device=device))
    assert torch.equal(torch_vjp.normalize(x[2:3], dim=1, eps=0.0), torch.ones(1, 1, dtype=dtype, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF], ids=str)
def test_normalize_gradient_at_the_norm_equal_to_eps(dtype, device):
    """‖x‖ == eps exactly: torch's clamp_min passes no gradient to the norm at the tie (dx = dy / eps)."""
    cases = [(torch.tensor([[0.6, 0.8]]), 1.0), (torch.tensor([[3.0, 4.0]]), 5.0), (torch.tensor([[1.0]]), 1.0),
             (torch.tensor([[-2.0]]), 2.0)]
    for x, eps in cases:
        x = x.to(dtype).to(device)
        dy = torch.tensor([[1.0, -1.0]][0][: x.shape[1]], dtype=dtype, device=device).expand_as(x)
        grads = []
        for fn in (torch_vjp.normalize, F.normalize):
            xs = x.clone().requires_grad_()
            (dx,) = torch.autograd.grad(fn(xs, dim=1, eps=eps), xs, dy)
            grads.append(dx)
        torch.testing.assert_close(grads[0], grads[1])


NONFINITE_ROWS = [[float("inf"), 0.0, 1.0, 2.0], [float("nan"), 0.0, 1.0, 2.0], [float("-inf"), 0.0, 1.0, 2.0],
                  [float("inf"), float("-inf"), 1.0, 2.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF], ids=str)
def test_normalize_non_finite_rows_like_torch(dtype, device):
    """[inf, 0, 1, 2] is [NaN, 0, 0, 0] (an infinite norm divides to 0, inf/inf is NaN); a NaN anywhere makes
    the row NaN (the clamp keeps it). Also bfloat16 rows whose Σx² overflows."""
    x = torch.tensor(NONFINITE_ROWS, dtype=dtype, device=device)
    torch.testing.assert_close(torch_vjp.normalize(x, dim=1), F.normalize(x, dim=1), equal_nan=True)
    if dtype == torch.bfloat16:
        big = torch.tensor([[2e19, 1.0, -3e19]], dtype=dtype, device=device)
        torch.testing.assert_close(torch_vjp.normalize(big, dim=1), F.normalize(big, dim=1), equal_nan=True)


# ---------------------------------------------------------------------------------------------------------
# Norms over rows of no elements.

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norms_of_rows_of_no_elements_have_torch_statistics(dtype, device):
    """normalized_shape holding a 0: every row is empty. torch's native_layer_norm gives mean 0 and rstd NaN
    per row; the statistics came straight from at::empty."""
    x = torch.empty(3, 2, 0, dtype=dtype, device=device)
    y, mean, rstd = torch.ops.torch_vjp.layer_norm(x, [0], None, None, 1e-5)
    y_torch, mean_torch, rstd_torch = torch.native_layer_norm(x.float(), [0], None, None, 1e-5)
    assert y.shape == x.shape and mean.shape == rstd.shape == (3, 2)
    torch.testing.assert_close(mean, mean_torch.reshape(3, 2), equal_nan=True)
    torch.testing.assert_close(rstd, rstd_torch.reshape(3, 2), equal_nan=True)
    y, rstd = torch.ops.torch_vjp.rms_norm(x, [0], None, 1e-5)
    assert y.shape == x.shape and rstd.shape == (3, 2) and rstd.isnan().all()
    xs = x.clone().requires_grad_()
    w = torch.ones(0, dtype=dtype, device=device, requires_grad=True)
    torch_vjp.layer_norm(xs, (0,), w, w).sum().backward()
    assert xs.grad.shape == x.shape and w.grad.shape == (0,)


# ---------------------------------------------------------------------------------------------------------
# Arguments: what torch takes is taken and computed like torch; what torch refuses, refused with its type.

def test_reduction_none_is_torch_value_error(device):
    x, t = torch.randn(4, 5, device=device), torch.tensor([0, 1, 2, 3], device=device)
    for bad in (None, "avg", 3):
        for fn in (torch_vjp.cross_entropy, F.cross_entropy):
            with pytest.raises(ValueError, match="is not a valid value for reduction"):
                fn(x, t, reduction=bad)
        with pytest.raises(ValueError, match="is not a valid value for reduction"):
            torch_vjp.fused_linear_cross_entropy(x, torch.randn(6, 5, device=device), t, reduction=bad)


def test_label_smoothing_as_torch_takes_it(device):
    """torch takes ε ≤ 0 and NaN as no smoothing and refuses ε > 1 with RuntimeError."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, generator=g).to(device)
    t = torch.randint(0, 5, (6,), generator=g).to(device)
    w = torch.randn(5, 5, generator=g).to(device)
    for eps in (-0.1, float("nan"), 0.0, 1.0):
        torch.testing.assert_close(torch_vjp.cross_entropy(x, t, label_smoothing=eps),
                                   F.cross_entropy(x, t, label_smoothing=eps))
        torch.testing.assert_close(torch_vjp.fused_linear_cross_entropy(x, w, t, label_smoothing=eps),
                                   F.cross_entropy(x @ w.t(), t, label_smoothing=eps))
        loss, *_ = torch.ops.torch_vjp.cross_entropy(x, t, None, -100, "mean", eps)
        torch.testing.assert_close(loss, F.cross_entropy(x, t, label_smoothing=eps))
    for fn in (lambda: torch_vjp.cross_entropy(x, t, label_smoothing=1.5),
               lambda: torch_vjp.fused_linear_cross_entropy(x, w, t, label_smoothing=1.5),
               lambda: F.cross_entropy(x, t, label_smoothing=1.5)):
        with pytest.raises(RuntimeError, match="label_smoothing must be between 0.0 and 1.0"):
            fn()


@pytest.mark.parametrize("kwargs", [dict(dim=None), dict(dim=(0, 1)), dict(dim=[1, 2]), dict(p="fro"),
                                    dict(p="fro", dim=(1, 2)), dict(p=2.0, dim=(0, 2), eps=0.5)], ids=str)
def test_normalize_takes_what_torch_takes(kwargs, device):
    x = torch.randn(3, 4, 5, device=device, dtype=torch.float64, requires_grad=True)
    y, y_torch = torch_vjp.normalize(x, **kwargs), F.normalize(x, **kwargs)
    torch.testing.assert_close(y, y_torch)
    dy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, dy), torch.autograd.grad(y_torch, x, dy))


def test_normalize_complex_as_torch(device):
    x = torch.randn(3, 4, dtype=torch.complex64, device=device)
    torch.testing.assert_close(torch_vjp.normalize(x), F.normalize(x))


def test_rms_norm_takes_what_torch_takes(device):
    """An integer weight and complex input go through torch's composite, as torch's own rms_norm does."""
    x = torch.randn(3, 5, device=device)
    w = torch.tensor([1, 2, 3, 4, 5], device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's: "Mismatch dtype between input and weight", on both calls
        y_torch = F.rms_norm(x, [5], w)
        y = torch_vjp.rms_norm(x, [5], w)
    assert y.dtype == y_torch.dtype
    torch.testing.assert_close(y, y_torch)
    xc = torch.randn(3, 5, dtype=torch.complex64, device=device)
    torch.testing.assert_close(torch_vjp.rms_norm(xc, [5]), F.rms_norm(xc, [5]))


@pytest.mark.parametrize("input_dtype,param_dtype", [
    (torch.float64, torch.float32), (torch.float32, torch.float64), (torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float64),
], ids=str)
def test_layer_norm_refuses_mixed_dtypes_torch_refuses(input_dtype, param_dtype, device):
    x = torch.randn(3, 5, dtype=input_dtype, device=device)
    p = torch.ones(5, dtype=param_dtype, device=device)
    for args in ((p, None), (None, p), (p, p)):
        if device == "cpu":  # torch's CUDA layer_norm takes some of these; its CPU rule is the one followed
            with pytest.raises(RuntimeError, match="mixed dtype"):
                F.layer_norm(x, (5,), *args)
        with pytest.raises(RuntimeError, match="mixed dtype"):
            torch_vjp.layer_norm(x, (5,), *args)
    # and the mixed precision torch takes: float32 parameters beside half input
    if input_dtype in HALF:
        f = torch.ones(5, device=device)
        torch.testing.assert_close(torch_vjp.layer_norm(x, (5,), f, f), F.layer_norm(x, (5,), f, f))


def test_layer_norm_refuses_complex_input_like_torch(device):
    x = torch.randn(3, 5, dtype=torch.complex64, device=device)
    with pytest.raises(NotImplementedError):
        F.layer_norm(x, (5,))
    with pytest.raises(NotImplementedError):
        torch_vjp.layer_norm(x, (5,))


# ---------------------------------------------------------------------------------------------------------
# The loss value torch prints under autocast.

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_loss_under_autocast_is_torchs_float32_value(reduction, device):
    """Under bfloat16 autocast torch's linear gives bfloat16 logits and its cross_entropy their float32 loss,
    unrounded: 10.8049 where the fused loss rounded through bfloat16 gave 10.8125. One chunk of rows, so both
    products are the same BLAS call shape: the logits agree, and the losses to float32 round-off."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(64, 32, generator=g).to(device)
    w = (torch.randn(1000, 32, generator=g) / 4).to(device)
    target = torch.randint(0, 1000, (64,), generator=g).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        ours = torch_vjp.fused_linear_cross_entropy(x, w, target, reduction=reduction)
        ref = F.cross_entropy(F.linear(x, w), target, reduction=reduction)
        ours_grad = torch_vjp.fused_linear_cross_entropy(x.clone().requires_grad_(), w, target, reduction=reduction)
    assert ours.dtype == ours_grad.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(ours_grad.detach(), ref, rtol=2e-6, atol=2e-6)
    # and outside autocast a bfloat16 head gives a bfloat16 loss, rounded once from the same float32 value
    xb, wb = x.bfloat16(), w.bfloat16()
    plain = torch_vjp.fused_linear_cross_entropy(xb, wb, target, reduction=reduction)
    assert plain.dtype == torch.bfloat16
    torch.testing.assert_close(plain, ours.bfloat16(), rtol=0, atol=0)
