"""The public API is torch's: signatures, implicit dims, dtype=, tuple dims, inplace=, out=, grad_fn names,
docstrings, torch.jit.trace."""
import inspect
import io
import itertools
import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import torch_vjp
from tests.test_values import TOLERANCES, assert_gradient_close
from torch_vjp.testing import OPS, OPS_BY_NAME, op_variants, sample


def torch_signature(ref):
    """inspect's signature, or for a builtin the one its docstring's first line gives ("exp(input, *,
    out=None) -> Tensor")."""
    try:
        return inspect.signature(ref)
    except ValueError:
        line = next(line for line in ref.__doc__.splitlines() if line.strip()).strip()
        namespace = {}
        exec(f"def f{line[line.index('('):line.rindex(')') + 1]}: pass", namespace)
        return inspect.signature(namespace["f"])


def parameters(signature):
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


@pytest.mark.parametrize("info", OPS, ids=lambda info: info.name)
def test_signature_is_torchs(info):
    """Names, kinds (positional, keyword-only) and defaults, as the counterpart's."""
    assert parameters(inspect.signature(info.op)) == parameters(torch_signature(info.ref))


@pytest.mark.parametrize("info", OPS, ids=lambda info: info.name)
def test_docstring_documents_args_shape_and_dtype(info):
    doc = info.op.__doc__
    first = doc.strip().splitlines()[0]
    assert first.startswith(f"{info.name}(") and first.endswith("-> Tensor" if info.outputs == 1 else
                                                                 f"-> ({', '.join(['Tensor'] * info.outputs)})")
    first_arg = next(iter(inspect.signature(info.op).parameters))  # input, or a gated op's gate
    for part in ("Args:", f"{first_arg} (Tensor)", "Shape:", "floating"):
        assert part in doc, (info.name, part)
    for name in inspect.signature(info.op).parameters:
        assert f"{name} (" in doc, (info.name, name)


def test_py_typed_marker_is_shipped():
    package = pathlib.Path(torch_vjp.__file__).parent
    assert (package / "py.typed").exists()
    pyproject = (package.parent / "pyproject.toml").read_text()
    assert '"py.typed"' in pyproject


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("ndim", [0, 1, 2, 3, 4])
def test_implicit_softmax_dim(name, ndim, device):
    """dim=None: torch's implicit dim (0 for 0-, 1- and 3-d input, else 1; on 4-d input, 1, not -1), with
    its deprecation warning, pointing at the same caller line as torch's."""
    info = OPS_BY_NAME[name]
    x = sample(info, (2, 3, 4, 5)[:ndim], torch.float64, device)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        y = info.op(x)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        expected = info.ref(x)
    torch.testing.assert_close(y, expected)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert ours[0].filename == theirs[0].filename == __file__


@pytest.mark.parametrize("module", [torch_vjp.nn.Softmax, torch_vjp.nn.LogSoftmax])
def test_implicit_dim_warning_from_a_module_points_where_torchs_does(module):
    x = torch.randn(2, 3, 4, 5)
    caught = []
    for m in (module(), module.__mro__[1]()):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            m(x)
        caught.append((w[0].filename, str(w[0].message)))
    assert caught[0] == caught[1]


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("in_dtype,dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64),
                                            (torch.float64, torch.float16), (torch.int64, torch.float32)],
                         ids=str)
def test_softmax_dtype_argument(name, in_dtype, dtype, device):
    """dtype=: the input is cast first, the output has that dtype, and the gradient comes back in the
    input's dtype (transformers' Llama: softmax(attn_weights, dim=-1, dtype=torch.float32))."""
    info = OPS_BY_NAME[name]
    x = (sample(info, (4, 7), torch.float64, device) * 3).to(in_dtype)
    y = info.op(x, dim=-1, dtype=dtype)
    assert y.dtype == info.ref(x, dim=-1, dtype=dtype).dtype == dtype
    # Against float64 on the cast input (torch's own float16 log_softmax loses digits near 0).
    torch.testing.assert_close(y.double(), info.ref(x.to(dtype).double(), dim=-1), **TOLERANCES[dtype])
    if in_dtype.is_floating_point:
        x.requires_grad_()
        dy = sample(info, (4, 7), dtype, device, generator_seed=1)
        (dx,) = torch.autograd.grad(info.op(x, dim=-1, dtype=dtype), x, dy)
        (dx_torch,) = torch.autograd.grad(info.ref(x, dim=-1, dtype=dtype), x, dy)
        x64 = x.detach().to(dtype).double().requires_grad_()
        (dx_ref,) = torch.autograd.grad(info.ref(x64, dim=-1), x64, dy.double())
        assert dx.dtype == in_dtype
        assert_gradient_close(dx, dx_torch, dx_ref, TOLERANCES[dtype])


def all_dim_tuples(ndim):
    dims = list(range(-ndim, ndim))
    return [c for k in (1, 2, 3) for c in itertools.combinations(dims, k) if len({d % ndim for d in c}) == k]


@pytest.mark.parametrize("keepdim", [False, True])
def test_logsumexp_tuple_dims(keepdim, device):
    """Every tuple of distinct dims of a 3-D input (negative too, in any order), and lists: values and
    gradients against torch.logsumexp."""
    info = OPS_BY_NAME["logsumexp"]
    x = sample(info, (2, 3, 4), torch.float64, device).requires_grad_()
    for dims in all_dim_tuples(3):
        for dim in (dims, list(dims)):
            y, expected = torch_vjp.logsumexp(x, dim, keepdim), torch.logsumexp(x, dim, keepdim)
            torch.testing.assert_close(y, expected)
            dy = sample(info, y.shape, torch.float64, device, generator_seed=2)
            torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(expected, x, dy)[0])
    assert torch.autograd.gradcheck(lambda t: torch_vjp.logsumexp(t, (0, 2), keepdim), (x,))
    assert torch_vjp.logsumexp(x, (-1,), keepdim).grad_fn.name() == "LogsumexpBackward"


def test_logsumexp_empty_dims_reduce_everything(device):
    """dim=(): every dim, as torch gives with keepdim=True (torch's keepdim=False raises, a shape bug)."""
    x = torch.randn(2, 3, device=device)
    torch.testing.assert_close(torch_vjp.logsumexp(x, (), True), torch.logsumexp(x, (), True))
    torch.testing.assert_close(torch_vjp.logsumexp(x, ()), torch.logsumexp(x.flatten(), 0))
    scalar = torch.tensor(1.5, device=device)
    torch.testing.assert_close(torch_vjp.logsumexp(scalar, ()), torch.logsumexp(scalar, ()))


@pytest.mark.parametrize("name", ["silu", "mish"])
def test_inplace(name, device):
    """inplace=True overwrites and returns the input, as torch's does; autograd through it is exact (the
    VJP gets the input value from before the overwrite); a leaf that requires grad is refused as torch
    refuses it; under no_grad it is simply in place."""
    info = OPS_BY_NAME[name]
    x = sample(info, (4, 5), torch.float64, device)
    expected = info.ref(x)
    y = x.clone()
    assert info.op(y, inplace=True) is y
    torch.testing.assert_close(y, expected)

    w = x.clone().requires_grad_()
    for fn in (info.op, info.ref):
        h = w * 2  # a non-leaf
        out = fn(h, inplace=True)
        assert out is h
        torch.autograd.grad(out.pow(2).sum(), w)  # must not raise (the saved input is intact)
    ours = torch.autograd.grad(info.op(w * 2, inplace=True).pow(2).sum(), w)[0]
    theirs = torch.autograd.grad(info.ref(w * 2, inplace=True).pow(2).sum(), w)[0]
    torch.testing.assert_close(ours, theirs)
    assert torch.autograd.gradcheck(lambda t: info.op(t * 1.5, inplace=True), (w,))
    assert torch.autograd.gradgradcheck(lambda t: info.op(t * 1.5, inplace=True), (w,))

    for fn in (info.ref, info.op):
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            fn(w, inplace=True)
    with torch.no_grad():
        z = w.clone()
        info.op(z, inplace=True)
        torch.testing.assert_close(z, info.ref(w))


@pytest.mark.parametrize("name", ["exp", "sigmoid", "tanh", "logsumexp"])
def test_out_argument(name, device):
    """out=: written and returned; resized (with torch's warning) when its shape differs; cast to its
    dtype where torch allows; refused with autograd, as torch refuses it."""
    info = OPS_BY_NAME[name]
    x = sample(info, (3, 4), torch.float32, device)
    kwargs = info.call_kwargs(dim=1) if info.has_dim else {}
    expected = info.ref(x, **kwargs)
    out = torch.empty(expected.shape, device=device)
    assert info.op(x, **kwargs, out=out) is out
    torch.testing.assert_close(out, expected)
    wide = torch.empty(0, dtype=torch.float64, device=device)
    info.op(x, **kwargs, out=wide)
    assert wide.shape == expected.shape and wide.dtype == torch.float64
    torch.testing.assert_close(wide, expected.double())
    with pytest.warns(UserWarning, match="resized"):
        info.op(x, **kwargs, out=torch.empty(7, device=device))
    with pytest.raises(RuntimeError):
        info.ref(x, **kwargs, out=torch.empty(expected.shape, dtype=torch.int64, device=device))
    with pytest.raises(RuntimeError, match="can't be cast"):
        info.op(x, **kwargs, out=torch.empty(expected.shape, dtype=torch.int64, device=device))
    for fn in (info.ref, info.op):
        with pytest.raises(RuntimeError, match="don't support automatic differentiation"):
            fn(x.clone().requires_grad_(), **kwargs, out=torch.empty(expected.shape, device=device))


def title(name):
    return "".join(part.title() for part in name.split("_"))


@pytest.mark.parametrize("info,variant", op_variants())
def test_grad_fn_is_named_after_the_op(info, variant, device):
    """SoftmaxBackward, not a generic node: the profiler and anomaly mode can tell ops apart; the VJP op's
    own node (double backward) is SoftmaxBackwardBackward. The same under torch.func's path."""
    c = info.call(sample(info, (3, 4), torch.float64, device), **variant).cast(requires_grad=True)
    # The op's own outputs (the table's checks see several outputs concatenated: testing.OpInfo.joined).
    first = (lambda out: out) if info.outputs == 1 else (lambda out: out[0])  # noqa: E731
    outs = c.info.op(c.x, **c._kwargs(c.primals))
    outs = outs if info.outputs > 1 else (outs,)
    assert all(y.grad_fn.name() == f"{title(info.name)}Backward" for y in outs)
    (dx, *_) = torch.autograd.grad(outs, c.primals, [torch.ones_like(y) for y in outs], create_graph=True)
    assert dx.grad_fn.name() == f"{title(info.name)}BackwardBackward"
    raw = getattr(torch.ops.torch_vjp, info.name)(*c.raw_args())
    assert first(raw[:info.outputs] if info.outputs > 1 else raw[0] if isinstance(raw, tuple) else raw
                 ).grad_fn.name() == f"{title(info.name)}Backward"
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():  # the torch.func-capable Function
        duals = [fwAD.make_dual(t, torch.ones_like(t)) for t in c.primals]
        out = c.info.op(duals[0], **c._kwargs(duals))
        assert first(out).grad_fn.name() == f"{title(info.name)}Backward"


def test_profiler_tells_the_ops_apart():
    """The profiler's trace names each op's forward, VJP kernel and autograd node (a reduced fused loss
    computes its gradients in the forward: its 'none' form runs the VJP kernel)."""
    from torch.profiler import profile

    x = torch.randn(3, 4)
    calls = [info.call(x, **({"reduction": "none"} if info.scaled_grads else {})).cast(requires_grad=True)
             for info in OPS]
    with profile() as prof:
        for c in calls:
            y = c.op(*c.primals)
            torch.autograd.grad(y, c.primals, torch.ones_like(y))
    names = {event.name for event in prof.events()}
    for info in OPS:
        node = f"{title(info.name)}Backward"
        assert {f"torch_vjp::{info.name}_backward", f"autograd::engine::evaluate_function: {node}"} <= names, node


def traced_model():
    weight, bias = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    target = torch.tensor([0, 3, -100, 5])

    def f(x):
        h = torch_vjp.gelu(x, approximate="tanh") + torch_vjp.softplus(x, 2.0, 5.0) + torch_vjp.silu(x)
        h = torch_vjp.mish(h) * torch_vjp.sigmoid(x) + torch_vjp.tanh(x) + torch_vjp.exp(-x.abs())
        h = torch_vjp.log_softmax(h, -1) + torch_vjp.softmax(h, 0) + torch_vjp.logsumexp(h, 1, True)
        h = torch_vjp.layer_norm(h, (6,), weight, bias) + torch_vjp.rms_norm(h, (6,)) + torch_vjp.normalize(x)
        h = torch_vjp.swiglu(h, x) + torch_vjp.geglu(x, h)
        q_embed, k_embed = torch_vjp.rope(h, x, weight.cos(), weight.sin(), 0)
        h = h + q_embed * k_embed
        return h * torch_vjp.cross_entropy(h, target)

    return f


def test_jit_trace_refuses_the_fused_loss_clearly():
    """TorchScript has no optional outputs: torch.jit.trace of the fused loss says so and names the way out."""
    x, head, target = torch.randn(4, 6), torch.randn(7, 6), torch.tensor([0, 3, -100, 5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        with pytest.raises(RuntimeError, match="cannot record torch_vjp.fused_linear_cross_entropy.*torch.export"):
            torch.jit.trace(lambda t: torch_vjp.fused_linear_cross_entropy(t, head, target), (x,))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_jit_trace_saves_and_loads(requires_grad, tmp_path, device):
    """torch.jit.trace records torch_vjp's registered ops; the trace saves, loads (with torch_vjp
    imported) and gives the same values and gradients."""
    f = traced_model()
    x = torch.randn(4, 6, dtype=torch.float64, device=device, requires_grad=requires_grad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        traced = torch.jit.trace(f, (x,))
        assert "torch_vjp::softmax" in str(traced.graph)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    x2 = torch.randn(4, 6, dtype=torch.float64, device=device, requires_grad=True)
    torch.testing.assert_close(loaded(x2), f(x2))
    torch.testing.assert_close(torch.autograd.grad(loaded(x2).sum(), x2)[0], torch.autograd.grad(f(x2).sum(), x2)[0])
