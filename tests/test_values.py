"""Values and gradients against the float64 torch reference, in every dtype, shape and dim."""
import math

import pytest
import torch
import torch.nn.functional as F

import torch_vjp

from torch_vjp.testing import OPS_BY_NAME, Call, dim_calls, op_variants, sample

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
# Norms over the trailing 1..4 dims: one row and many, rows of 0 elements (NaN statistics, as torch) and no
# rows, the odd lengths and the long prime row as above; the column sums of dw, db over 1 to 1000 rows.
NORM_SHAPES = [(1,), (5, 0), (0, 5), (1023,), (7, 33), (3, 1025), (1000, 3), (2, 100003), (2, 3, 5, 7)]
# Logits (N, C): one class, one row, no rows, odd vocabularies, a long vocabulary; (C,) with a 0-d target;
# (N, C, d) with the class dim second. The fused loss's input is (N, H), its head VOCAB × H.
LOSS_SHAPES = [(5,), (1, 1), (0, 5), (7, 33), (3, 1025), (4, 50257), (2, 7, 3)]
FUSED_SHAPES = [(1, 1), (0, 5), (7, 33), (3, 1025), (64, 16)]
# Rotary embedding (queries (..., D); testing._draw_rope draws k, cos and sin): rows of no elements and no rows,
# head dims even (whole rotation: 8, 64) and odd (one element passed through: 1 rotates nothing, 7, 33, 1025,
# the long prime 100003), transformers' 4-D layouts with one key head and cos shared by the batch.
ROPE_SHAPES = [(5, 0), (0, 6), (3, 1), (7, 33), (3, 1025), (2, 100003), (2, 3, 5, 8), (2, 3, 5, 7), (2, 4, 3, 64)]


def shape_cases(info):
    """(shape, call) pairs of a row's family: every shape, with every dim (or count of normalized dims)."""
    if info.family == "loss":
        return [(s, {}) for s in (FUSED_SHAPES if info.name.startswith("fused") else LOSS_SHAPES)]
    shapes = {"elementwise": ELEMENTWISE_SHAPES, "gated": ELEMENTWISE_SHAPES, "softmax": SOFTMAX_SHAPES,
              "norm": SOFTMAX_SHAPES if info.has_dim else NORM_SHAPES, "rope": ROPE_SHAPES}[info.family]
    return [(s, call) for s in shapes for call in dim_calls(info, len(s))]


def run(call, fn, dy=None):
    """Output and the gradients of every primal of fn (a Call's op or ref) for grad_output dy (default: drawn
    in the output's dtype). The backward runs for empty tensors too: their gradient's shape, dtype and device
    are then compared."""
    primals = tuple(t.detach().requires_grad_(True) for t in call.primals)
    y = fn(*primals)
    assert y.grad_fn is not None  # recorded even when empty: the VJP below is the op's own
    dy = sample(call.info, y.shape, y.dtype, y.device, generator_seed=1) if dy is None else dy.to(y.dtype)
    return y.detach(), torch.autograd.grad(y, primals, dy)


def assert_gradient_close(dx, dx_torch, dx_ref, tol):
    """Gradients are held to torch's own accuracy in the same dtype (the criterion of FlashAttention's
    tests): max |dx - ref| ≤ 2 · max(max |dx_torch - ref|, rounding) + atol, with ref in float64. A backward
    reads rounded saved tensors (sigmoid's dy·y(1-y) from a rounded y near 1, log_softmax's exp(y)), so neither
    implementation can match the float64 gradient elementwise to the dtype's tolerance; the check is that
    torch_vjp loses no more than torch does. `rounding`, half an ulp of the largest |ref| in the dtype, is what
    a correctly rounded gradient may lose: where torch happens to be exact at its worst element, a correctly
    rounded result must still pass (atol alone is under half an ulp for gradients above 8 in float32, as a
    norm's column sums and a gated op's products are). NaNs must sit where the reference has them."""
    torch.testing.assert_close(dx.isnan(), dx_ref.isnan())
    finite = ~dx_ref.isnan()
    if not finite.any():
        return
    err = (dx.double() - dx_ref)[finite].abs().max().item()
    torch_err = (dx_torch.double() - dx_ref)[finite].abs().max().item()
    largest = dx_ref[finite].abs().max().item()
    rounding = 0.0 if largest == 0 or math.isinf(largest) else \
        torch.finfo(dx.dtype).eps * 2.0 ** math.floor(math.log2(largest)) / 2
    assert err <= 2 * max(torch_err, rounding) + tol["atol"], \
        f"gradient max error {err:.3g}; torch's own: {torch_err:.3g}; rounding: {rounding:.3g}"


def check_against_reference(info, variant, x, **call):
    """Output and every gradient (input, weight, bias, up) against the float64 reference, the gradients to
    torch's own accuracy in x's dtype (a fused op's: its unfused parts'); returns the output and the input's
    gradient."""
    c = info.call(x, **call, **variant)
    y, grads = run(c, c.op)
    # The reference computes in float64 on exactly the inputs the ops get: x and dy rounded to x's dtype.
    c64 = c.cast(torch.float64)
    y_ref, grads_ref = run(c64, c64.ref, sample(info, y.shape, y.dtype, y.device, generator_seed=1))
    # The baseline: torch's own op in x's dtype, or a fused op's unfused form (OpInfo.unfused), whose parts
    # are held to torch's accuracy by their own rows.
    _, grads_torch = run(c, c.baseline)
    if info.scaled_grads and y.dim() == 0 and x.dtype in (torch.float16, torch.bfloat16):
        # The op's documented rounding (OpInfo.scaled_grads): the baseline is its gradient for grad_output = 1,
        # scaled by grad_output in x's dtype, the same two roundings.
        dy = sample(info, y.shape, y.dtype, y.device, generator_seed=1)
        grads_torch = tuple(g * dy for g in run(c, c.baseline, torch.ones_like(dy))[1])
    tol = TOLERANCES[x.dtype]
    assert y.dtype == x.dtype and y.device == x.device and y.shape == y_ref.shape
    torch.testing.assert_close(y.double(), y_ref, equal_nan=True, **tol)
    for t, g, g_torch, g_ref in zip(c.primals, grads, grads_torch, grads_ref):
        assert g.dtype == t.dtype and g.device == t.device and g.shape == t.shape == g_torch.shape
        assert_gradient_close(g, g_torch, g_ref, tol)
    return y, grads[0]


def family_cases(*families):
    return [pytest.param(info, variant, shape, call, id=f"{case.id}-{list(shape)}-{call}")
            for case in op_variants(families) for info, variant in [case.values]
            for shape, call in shape_cases(info)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info,variant,shape,call", family_cases("elementwise", "gated"))
def test_elementwise(info, variant, shape, call, dtype, device):
    check_against_reference(info, variant, sample(info, shape, dtype, device), **call)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info,variant,shape,call", family_cases("softmax", "norm"))
def test_row_families(info, variant, shape, call, dtype, device):
    """Softmax family and normalize along every dim; layer_norm and rms_norm over every count of trailing
    dims, with and without weight and bias."""
    check_against_reference(info, variant, sample(info, shape, dtype, device), **call)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info,variant,shape,call", family_cases("loss"))
def test_losses(info, variant, shape, call, dtype, device):
    check_against_reference(info, variant, sample(info, shape, dtype, device), **call)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info,variant,shape,call", family_cases("rope"))
def test_rope(info, variant, shape, call, dtype, device):
    """q_embed and k_embed, and the gradients of q, k, cos and sin, against transformers' formula in float64."""
    check_against_reference(info, variant, sample(info, shape, dtype, device), **call)


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
    reference, along every dim (every count of normalized dims); an elementwise op's output keeps its input's
    memory format (the strides torch's own op gives it, for every dim longer than 1). The fused loss takes
    2-D hidden states only."""
    for layout, x in strided_inputs(info, dtype, device).items():
        assert not x.is_contiguous(), layout
        if info.name == "fused_linear_cross_entropy" and x.dim() != 2:
            continue
        for call in dim_calls(info, x.dim()):
            y, dx = check_against_reference(info, variant, x, **call)
            if info.family == "elementwise":
                y_torch = info.ref(x, **info.call_kwargs(**variant))
                strides = lambda t: [st for st, n in zip(t.stride(), t.shape) if n > 1]  # noqa: E731
                assert strides(y) == strides(y_torch), (layout, y.stride(), y_torch.stride())


# Rows of -inf, +inf and NaN, and overflow/underflow, behave like torch (a norm's row, a row of logits, a
# row of hidden states).
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
    c = info.call(torch.tensor(SPECIAL_ROWS, dtype=dtype, device=device), **variant)
    # float64 torch as the reference: torch's float32 CPU gelu(inf) is NaN, a vectorised-erf artefact.
    c64 = c.cast(torch.float64)
    y, y_ref = c.op(*c.primals), c64.ref(*c64.primals).to(dtype)
    torch.testing.assert_close(y, y_ref, equal_nan=True, **TOLERANCES[dtype])


# Row lengths at which the kernel paths change, on either backend. CPU (cpu/loops.h): shorter than one vector
# (masked loads only), one vector and a tail, several vectors and a tail (the four-accumulator max), rows
# past the streaming threshold (7 rows x 262147 x 4 bytes > 4 MiB of output). CUDA (cuda/row_engine.cuh):
# several rows a warp (<= 32), a warp a row (33, 67, 1025 in packs), a block (4099), a cluster on sm_90 or a
# block holding the row (70001), split rows (262147). tests/test_cuda.py asserts which path each reaches.
PATH_LENGTHS = [1, 7, 33, 67, 1025, 4099, 70001, 262147]


def special_rows(n, dtype, device, seed=0):
    """Seven rows of n: -inf at the end (a vector tail), all -inf, +inf in the middle, NaN at the end, values
    that overflow exp and a square (±1000), a constant row (padding), and an ordinary one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, n, generator=g, dtype=torch.float64) * 3
    x[0, -1] = float("-inf")
    x[1] = float("-inf")
    x[2, n // 2] = float("inf")
    x[3, -1] = float("nan")
    x[4] = torch.where(torch.arange(n) % 2 == 0, 1000.0, -1000.0)
    x[5] = 5.1
    return x.to(dtype).to(device)


@pytest.mark.parametrize("n", PATH_LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info,variant", op_variants(("softmax", "norm", "loss")))
def test_special_values_at_every_path_length(info, variant, dtype, n, device):
    """±inf, NaN, overflow, constant and one-element rows behave like float64 torch at every row length where a
    kernel path changes, along the last dim and (softmax family, normalize) along dim 0: the column kernel."""
    if info.name == "fused_linear_cross_entropy" and n > 4099:
        pytest.skip("the fused loss's rows are hidden states: their length does not choose a kernel path")
    x = special_rows(n, dtype, device)
    layouts = [dict(dim=-1), dict(dim=0)] if info.has_dim else [{}]
    for layout in layouts:
        rows = x if layout.get("dim", -1) == -1 else x.t().contiguous()
        c = info.call(rows, **layout, **variant)
        c64 = c.cast(torch.float64)
        y, y_ref = c.op(*c.primals), c64.ref(*c64.primals)
        torch.testing.assert_close(y.double(), y_ref, equal_nan=True, **TOLERANCES[dtype])


def _first_grad(fn, call, dy):
    leaves = call.cast(requires_grad=True).primals
    return torch.autograd.grad(fn(*leaves), leaves[0], dy)[0].double()


@pytest.mark.parametrize("n", PATH_LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info,variant", op_variants(("softmax", "norm", "loss")))
def test_special_values_gradients_at_every_path_length(info, variant, dtype, n, device):
    """The gradient on the special rows, at every row length where a kernel path changes (the backward's streaming
    stores included) and along dim 0: NaN and ±inf exactly where float64 torch has them, and elsewhere no further
    from float64 than torch's own gradient in the dtype (twice its error, plus 4 ulps of the largest element: so
    exactly 0 where torch is exact, as on one-element rows). In float64, where torch's gradient is the reference
    itself, within the value tests' float64 tolerance."""
    if info.name == "fused_linear_cross_entropy" and n > 4099:
        pytest.skip("the fused loss's rows are hidden states: their length does not choose a kernel path")
    x = special_rows(n, dtype, device)
    for layout in [dict(dim=-1), dict(dim=0)] if info.has_dim else [{}]:
        rows = x if layout.get("dim", -1) == -1 else x.t().contiguous()
        c = info.call(rows, **layout, **variant)
        c64 = c.cast(torch.float64)
        dy = torch.rand(c64.ref(*c64.primals).shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        ours = _first_grad(c.op, c, dy.to(device, dtype))
        exact = _first_grad(c64.ref, c64, dy.to(device))
        for special in (torch.isnan, torch.isinf):
            assert torch.equal(special(ours), special(exact)), (layout, special, n)
        if dtype == torch.float64:
            torch.testing.assert_close(ours, exact, equal_nan=True, **TOLERANCES[dtype])
            continue
        if not torch.isfinite(exact).any():
            continue
        theirs = _first_grad(c.ref, c, dy.to(device, dtype))
        finite = torch.isfinite(exact) & torch.isfinite(theirs)
        floor = 4 * torch.finfo(dtype).eps * exact[torch.isfinite(exact)].abs().max()
        our_error = (ours - exact)[torch.isfinite(exact)].abs().max()
        their_error = (theirs - exact)[finite].abs().max() if finite.any() else 0.0
        assert our_error <= 2 * their_error + floor, (layout, float(our_error), float(their_error), float(floor))


@pytest.mark.parametrize("n", PATH_LENGTHS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_rows_all_ignored(n, reduction, device):
    """Every target ignored: 'mean' is NaN (0/0) as torch's, the others 0; the gradient as torch's."""
    x = special_rows(n, torch.float32, device)[4:]
    target = torch.full((x.shape[0],), -100, device=device)
    results = []
    for fn in (torch_vjp.cross_entropy, F.cross_entropy):
        xs = x.clone().requires_grad_()
        loss = fn(xs, target, reduction=reduction)
        results.append((loss, *torch.autograd.grad(loss.sum(), xs)))
    expected = torch.full_like(results[1][0], float("nan") if reduction == "mean" else 0.0)
    torch.testing.assert_close(results[1][0], expected, equal_nan=True)
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_loss_bfloat16_vocab_50000(reduction, device):
    """The fused loss in bfloat16 over a 50000-word vocabulary: 700 rows, so that on the CPU (64 MiB of logits
    a chunk) the rows span two chunks. Loss and every gradient against float64 on the same inputs, to the
    accuracy of the unfused kernels (torch's linear, then torch_vjp.cross_entropy) and within bfloat16's
    relative tolerance of float64 torch."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(700, 32, generator=g) * 2).to(device, torch.bfloat16)
    w = (torch.randn(50000, 32, generator=g) / 4).to(device, torch.bfloat16)
    b = (torch.randn(50000, generator=g) / 4).to(device, torch.bfloat16)
    target = torch.randint(0, 50000, (700,), generator=g).to(device)
    target[::9] = -100
    call = OPS_BY_NAME["fused_linear_cross_entropy"].call(x)
    call = Call(call.info, (x, w, b), ("weight", "bias"), {"target": target, "reduction": reduction,
                                                            "label_smoothing": 0.1})
    check = [call.cast(requires_grad=True), call.cast(torch.float64, requires_grad=True),
             call.cast(requires_grad=True)]
    results = []
    for c, fn in zip(check, ("op", "ref", "baseline")):
        y = getattr(c, fn)(*c.primals)
        dy = torch.ones_like(y) if y.dim() == 0 else sample(c.info, y.shape, torch.bfloat16, device, 1).to(y.dtype)
        results.append((y.detach(), torch.autograd.grad(y, c.primals, dy)))
    (y, grads), (y_ref, grads_ref), (_, grads_unfused) = results
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), y_ref, rtol=1.6e-2, atol=1e-3)
    for grad, ref, unfused in zip(grads, grads_ref, grads_unfused):
        assert grad.dtype == torch.bfloat16
        assert_gradient_close(grad, unfused, ref, TOLERANCES[torch.bfloat16])
        assert (grad.double() - ref).norm() <= 1.6e-2 * ref.norm()


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_norm_float32_parameters_with_half_activations(name, dtype, device):
    """Mixed precision's norms: float32 weight and bias with bfloat16/float16 input give torch's output dtype
    (the input's) and values; each gradient comes back in its tensor's dtype, to torch's own accuracy."""
    info = OPS_BY_NAME[name]
    x = sample(info, (64, 48), dtype, device)
    c = info.call(x.float(), **info.bench)  # parameters drawn in float32
    c = Call(info, (x, *c.primals[1:]), c.names, c.kwargs)
    y, grads = run(c, c.op)
    y_torch, grads_torch = run(c, c.ref)
    c64 = c.cast(torch.float64)
    y_ref, grads_ref = run(c64, c64.ref, sample(info, y.shape, y.dtype, device, generator_seed=1))
    assert y.dtype == y_torch.dtype == dtype
    torch.testing.assert_close(y.double(), y_ref, **TOLERANCES[dtype])
    for t, g, g_torch, g_ref in zip(c.primals, grads, grads_torch, grads_ref):
        assert g.dtype == g_torch.dtype == t.dtype
        assert_gradient_close(g, g_torch, g_ref, TOLERANCES[t.dtype])
