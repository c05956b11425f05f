"""rms_norm's offset and casting_mode, and add_rms_norm / add_layer_norm's two outputs.

The op table (torch_vjp/testing.py) runs every shared check on rms_norm's options and on the add_* ops'
normalized output. Here: what the table cannot see. The models' own arithmetic, bit for bit (Gemma's scale by
1 + weight in float32, Llama's rounding of x̂ before the weight); s = input + residual, its rounding, and the
gradient reaching s from its other uses (grad_sum, added in the VJP kernel's dx pass) through every path:
eager, double backward, forward AD, vmap, torch.compile and opcheck.

Why these shapes: rows of 64 (hidden sizes of the tiny models) and 37 (not a multiple of any vector width, so
the partial-group code runs), three leading dims' worth of rows.
"""
import pytest
import torch
import torch.nn.functional as F

import torch_vjp
import torch_vjp.nn

ADD_OPS = {
    "add_rms_norm": (torch_vjp.add_rms_norm, lambda s, shape, w, b: F.rms_norm(s, shape, w, 1e-6), 1e-6),
    "add_layer_norm": (torch_vjp.add_layer_norm, lambda s, shape, w, b: F.layer_norm(s, shape, w, b, 1e-5), 1e-5),
}


def draws(n, dtype, device, seed=0, rows=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*rows, n, generator=g, dtype=torch.float64) * 2).to(dtype).to(device)
    residual = (torch.randn(*rows, n, generator=g, dtype=torch.float64) * 2).to(dtype).to(device)
    w = (torch.randn(n, generator=g, dtype=torch.float64) * 0.3 + 0.5).to(dtype).to(device)
    b = (torch.randn(n, generator=g, dtype=torch.float64) * 0.3).to(dtype).to(device)
    return x, residual, w, b


def add_call(name, x, residual, w, b):
    op = ADD_OPS[name][0]
    shape = (x.shape[-1],)
    return op(x, residual, shape, w, b, 1e-5) if name == "add_layer_norm" else op(x, residual, shape, w, 1e-6)


def add_ref(name, x, residual, w, b):
    s = residual + x
    return ADD_OPS[name][1](s, (x.shape[-1],), w, b), s


# ---------------------------------------------------------------------------------------------------------
# rms_norm's options, against the models' arithmetic.

def gemma_eager(x, w, eps):
    """GemmaRMSNorm.forward (transformers 5.x), written out."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + w.float())).type_as(x)


def llama_eager(x, w, eps):
    """LlamaRMSNorm.forward (transformers 5.x), written out."""
    xf = x.to(torch.float32)
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * out.to(x.dtype)


@pytest.mark.parametrize("n", [64, 37])
@pytest.mark.parametrize("dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                           (torch.float16, torch.float16), (torch.float32, torch.float32)])
def test_casting_modes_are_the_models_arithmetic(n, dtype, w_dtype, device):
    """offset=1.0 gives Gemma's module's bits, casting_mode="llama" Llama's (its output dtype too: a float32 weight
    beside bfloat16 input gives float32), in half types and float32, wherever the row statistic rounds as the
    eager module's (it is the same sum in float32: checked by the float32 rows' equality of the default mode)."""
    x, _, w, _ = draws(n, dtype, device, seed=n)
    w = w.to(w_dtype)
    gemma = torch_vjp.rms_norm(x, (n,), w, 1e-6, offset=1.0, casting_mode="gemma")
    llama = torch_vjp.rms_norm(x, (n,), w, 1e-6, casting_mode="llama")
    assert gemma.dtype == gemma_eager(x, w, 1e-6).dtype and llama.dtype == llama_eager(x, w, 1e-6).dtype
    if device == "cpu":  # the CUDA kernels' rstd is rsqrt.approx: round-off, not bits
        assert torch.equal(gemma, gemma_eager(x, w, 1e-6))
        assert torch.equal(llama, llama_eager(x, w, 1e-6))
    else:
        torch.testing.assert_close(gemma, gemma_eager(x, w, 1e-6))
        torch.testing.assert_close(llama, llama_eager(x, w, 1e-6))


@pytest.mark.parametrize("n", [1, 7, 8, 37, 64, 4096, 70000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_default_mode_is_torchs_rms_norm_bit_for_bit(n, dtype):
    """casting_mode="torch": F.rms_norm's bits on the CPU, with and without a weight, at row lengths on either
    side of one vector and long enough for the sum's cascade to flush its levels (70000: 8750 vectors)."""
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(3, n, generator=g, dtype=torch.float64) * 3).to(dtype)
    w = (torch.randn(n, generator=g, dtype=torch.float64) * 0.3 + 1).to(dtype)
    for weight in (None, w):
        assert torch.equal(torch_vjp.rms_norm(x, (n,), weight, 1e-6), F.rms_norm(x, (n,), weight, 1e-6)), weight is None


def test_offset_is_a_shift_of_the_weight_and_its_gradient_the_weights(device):
    """rms_norm(x, w, offset=o) is rms_norm(x, o + w) (float64, where the sums are exact enough to compare), and
    the weight's gradient is the same: d(o + w) = dw."""
    x, _, w, _ = draws(37, torch.float64, device)
    w1, w2 = w.clone().requires_grad_(), (w + 0.75).requires_grad_()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = torch_vjp.rms_norm(x1, (37,), w1, 1e-6, offset=0.75)
    y2 = torch_vjp.rms_norm(x2, (37,), w2, 1e-6)
    torch.testing.assert_close(y1, y2, rtol=1e-15, atol=1e-15)
    dy = torch.randn_like(y1)
    g1, g2 = torch.autograd.grad(y1, (x1, w1), dy), torch.autograd.grad(y2, (x2, w2), dy)
    torch.testing.assert_close(g1, g2, rtol=1e-14, atol=1e-14)


def test_casting_mode_is_checked(device):
    x = torch.randn(2, 5, device=device)
    for fn in (lambda m: torch_vjp.rms_norm(x, (5,), casting_mode=m),
               lambda m: torch_vjp.add_rms_norm(x, x, (5,), casting_mode=m),
               lambda m: torch.ops.torch_vjp.rms_norm(x, [5], None, 1e-6, 0.0, m)):
        with pytest.raises(ValueError, match="casting_mode must be 'torch', 'gemma' or 'llama'"):
            fn("bf16")
    with pytest.raises(TypeError, match="casting_mode"):
        torch_vjp.rms_norm(x, (5,), casting_mode=None)


def test_rmsnorm_module_with_offset_is_gemmas(device):
    """nn.RMSNorm(n, offset=1.0): Gemma's weight convention (starts at zeros, scale one), its values bitwise."""
    m = torch_vjp.nn.RMSNorm(64, eps=1e-6, offset=1.0, device=device, dtype=torch.bfloat16)
    assert torch.equal(m.weight, torch.zeros_like(m.weight)) and "offset=1.0" in repr(m)
    with torch.no_grad():
        m.weight.normal_(0.0, 0.3)
    x = draws(64, torch.bfloat16, device)[0]
    out = m(x)
    if device == "cpu":
        assert torch.equal(out, gemma_eager(x, m.weight, 1e-6))
    llama = torch_vjp.nn.RMSNorm(64, eps=1e-6, casting_mode="llama", device=device)
    assert torch.equal(llama.weight, torch.ones_like(llama.weight)) and "casting_mode='llama'" in repr(llama)
    assert torch_vjp.nn.RMSNorm(8).state_dict().keys() == torch.nn.RMSNorm(8).state_dict().keys()


# ---------------------------------------------------------------------------------------------------------
# add_rms_norm and add_layer_norm: both outputs.

@pytest.mark.parametrize("name", ADD_OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_add_norm_is_the_norm_of_the_rounded_sum(name, dtype, device):
    """s is torch's `residual + input`, bit for bit (rounded to the input dtype), and y is torch_vjp's norm of
    that s, bit for bit: the fused op changes no rounding."""
    x, residual, w, b = draws(64, dtype, device)
    y, s = add_call(name, x, residual, w, b)
    assert torch.equal(s, residual + x)
    alone = torch_vjp.layer_norm(s, (64,), w, b, 1e-5) if name == "add_layer_norm" else torch_vjp.rms_norm(s, (64,), w, 1e-6)
    assert torch.equal(y, alone)


@pytest.mark.parametrize("name", ADD_OPS)
def test_add_norm_gradients_with_both_outputs_used(name, device):
    """The gradient of input and of residual is ds + the norm's dx at s: against torch's autograd of the composite
    (float64), with the loss reading y and s, y alone and s alone; gradcheck and gradgradcheck (forward AD and
    batched gradients too) on both outputs."""
    x, residual, w, b = (t.requires_grad_() for t in draws(37, torch.float64, device))
    dy, ds = torch.randn(3, 5, 37, dtype=torch.float64, device=device), torch.randn(3, 5, 37, dtype=torch.float64,
                                                                                   device=device)
    for use in ("both", "y", "s"):
        def loss(outputs):
            y, s = outputs
            return {"both": (y * dy).sum() + (s * ds).sum(), "y": (y * dy).sum(), "s": (s * ds).sum()}[use]
        ours = torch.autograd.grad(loss(add_call(name, x, residual, w, b)), (x, residual, w, b), allow_unused=True)
        theirs = torch.autograd.grad(loss(add_ref(name, x, residual, w, b)), (x, residual, w, b), allow_unused=True)
        for a, e in zip(ours, theirs):
            if e is None:
                assert a is None or torch.count_nonzero(a) == 0
            else:
                torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    small = tuple(t.detach()[:2, :2, :5].clone().requires_grad_() if t.dim() > 1 else t.detach()[:5].clone().requires_grad_()
                  for t in (x, residual, w, b))
    fn = lambda *a: add_call(name, *a)  # noqa: E731
    assert torch.autograd.gradcheck(fn, small, check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(fn, small, check_fwd_over_rev=True)


@pytest.mark.parametrize("name", ADD_OPS)
def test_add_norm_transforms_on_both_outputs(name, device):
    """torch.func: jvp and vjp of both outputs against the composite's; vmap over samples with a shared and with
    a per-sample weight; jacrev of s through y and s."""
    x, residual, w, b = draws(6, torch.float64, device, rows=(4,))
    tangents = tuple(torch.randn_like(t) for t in (x, residual, w, b))
    ours = torch.func.jvp(lambda *a: add_call(name, *a), (x, residual, w, b), tangents)
    theirs = torch.func.jvp(lambda *a: add_ref(name, *a), (x, residual, w, b), tangents)
    torch.testing.assert_close(ours, theirs)
    for in_dims in ((0, 0, None, None), (0, 0, 0, 0), (1, 0, None, 0)):
        batch = [t.unsqueeze(d).expand(*t.shape[:d], 3, *t.shape[d:]).contiguous() * torch.arange(
            1, 4, dtype=t.dtype, device=device).reshape(*([1] * d), 3, *([1] * (t.dim() - d)))
            if d is not None else t for t, d in zip((x, residual, w, b), in_dims)]
        ours = torch.func.vmap(lambda *a: add_call(name, *a), in_dims=in_dims)(*batch)
        theirs = torch.func.vmap(lambda *a: add_ref(name, *a), in_dims=in_dims)(*batch)
        torch.testing.assert_close(ours, theirs)
        jac = torch.func.vmap(torch.func.jacrev(lambda *a: sum(o.sum() for o in add_call(name, *a)), argnums=(0, 1, 2)),
                              in_dims=in_dims)(*batch)
        jac_ref = torch.func.vmap(torch.func.jacrev(lambda *a: sum(o.sum() for o in add_ref(name, *a)),
                                                    argnums=(0, 1, 2)), in_dims=in_dims)(*batch)
        torch.testing.assert_close(jac, jac_ref)


@pytest.mark.parametrize("name", ADD_OPS)
def test_add_norm_compiles_fullgraph_with_both_outputs(name, device, monkeypatch):
    """One graph, the registered op in it (the kernel: the compile policy emptied; its torch-ops form is
    tests/test_compile_policy.py's), the same values and gradients as eager, bit for bit (the decoder layer's
    use: s goes on, y feeds the next sublayer)."""
    from torch_vjp import compile_policy

    monkeypatch.setattr(compile_policy, "DECOMPOSE", {})
    torch._dynamo.reset()
    x, residual, w, b = draws(37, torch.float32, device)

    def layer(x, residual, w, b):
        y, s = add_call(name, x, residual, w, b)
        return (y.sin() + s).sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, residual, w, b)]
    leaves_c = [t.clone().requires_grad_() for t in (x, residual, w, b)]
    eager, ours = layer(*leaves), compiled(*leaves_c)
    assert torch.equal(eager, ours)
    used = 4 if name == "add_layer_norm" else 3  # add_rms_norm takes no bias
    for a, e in zip(torch.autograd.grad(ours, leaves_c[:used]), torch.autograd.grad(eager, leaves[:used])):
        assert torch.equal(a, e)


@pytest.mark.parametrize("name", ADD_OPS)
def test_add_norm_opcheck_with_grad_sum(name, device):
    """The VJP op with grad_sum given (the table's rows run it with None): schema, fake kernel, autograd."""
    x, residual, w, b = draws(37, torch.float32, device)
    outputs = getattr(torch.ops.torch_vjp, name)(*([x, residual, [37], w, b, 1e-5] if name == "add_layer_norm"
                                                  else [x, residual, [37], w, 1e-6]))
    dy, ds = torch.randn_like(x), torch.randn_like(x)
    s = outputs[1]
    if name == "add_layer_norm":
        args = (dy, ds, s, outputs[2], outputs[3], w, b, [37], [True, True, True])
    else:
        args = (dy, ds, s, outputs[2], w, [37], [True, True], 0.0)
    leaf = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(getattr(torch.ops.torch_vjp, name + "_backward").default, leaf)
    with_sum = getattr(torch.ops.torch_vjp, name + "_backward")(*args)
    without = getattr(torch.ops.torch_vjp, name + "_backward")(args[0], None, *args[2:])
    torch.testing.assert_close(with_sum[0], without[0] + ds, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a, e) for a, e in zip(with_sum[1:], without[1:]))


def test_add_rms_norm_options_and_autocast(device):
    """offset and casting_mode reach the add op (y as rms_norm's of s with them); the public op returns (y, s)."""
    x, residual, w, _ = draws(64, torch.bfloat16, device)
    y, s = torch_vjp.add_rms_norm(x, residual, (64,), w, 1e-6, offset=1.0, casting_mode="gemma")
    assert torch.equal(y, torch_vjp.rms_norm(s, (64,), w, 1e-6, offset=1.0))
    y, s = torch_vjp.add_rms_norm(x, residual, (64,), w.float(), 1e-6, casting_mode="llama")
    assert y.dtype == torch.float32 and torch.equal(y, torch_vjp.rms_norm(s, (64,), w.float(), 1e-6, casting_mode="llama"))
