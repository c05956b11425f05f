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
    c = info.call(torch.arange(-3, 9, device=device).reshape(3, 4).to(dtype), **variant)
    expected, expected_error = outcome(lambda: c.ref(*c.primals))
    got, error = outcome(lambda: c.op(*c.primals))
    assert error is expected_error, (error, expected_error)
    if expected is not None:
        assert got.dtype == expected.dtype == torch.get_default_dtype()
        torch.testing.assert_close(got, expected)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        c.raw(*c.primals)


# The norms follow torch on complex input (tests/test_exactness.py): layer_norm refuses it with torch's
# NotImplementedError; rms_norm and normalize compute it as torch does (its composite).
FOLLOW_TORCH_ON_COMPLEX = ("layer_norm", "rms_norm", "normalize")


@pytest.mark.parametrize("info,variant", [c for c in op_variants() if c.values[0].name not in FOLLOW_TORCH_ON_COMPLEX])
def test_complex_input_is_refused(info, variant, device):
    c = info.call(torch.ones(3, 4, device=device, dtype=torch.complex64), **variant)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        c.op(*c.primals)


@pytest.mark.parametrize("info,variant", [case for case in op_variants() if case.values[0].has_dim])
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
    """A grad of the wrong shape, dtype or device reaching a VJP op. A loss's grad_output is a per-row scale,
    read in the compute type: any floating dtype is taken (and gives the converted grad's result)."""
    from torch_vjp._ops import REGISTRY

    c = info.call(sample(info, (3, 4), torch.float32, device), **variant)
    args = c.raw_args()
    outputs = getattr(torch.ops.torch_vjp, info.name)(*args)
    y = outputs[0] if isinstance(outputs, tuple) else outputs
    backward = getattr(torch.ops.torch_vjp, info.name + "_backward")

    def vjp(grad):
        n_public = REGISTRY[info.name].public_outputs
        if n_public > 1:  # the first output's gradient wrong, the others right (rope's k, add_rms_norm's s)
            grad = (grad, *(torch.ones_like(o) for o in outputs[1:n_public]))
        return backward(*REGISTRY[info.name].vjp_call_args(args, outputs, grad))

    # (rope's VJP op is not given q's shape: it refuses a gradient that cos and sin do not broadcast to)
    with pytest.raises(RuntimeError, match="grad_output of shape|a 0-d grad_output|do not broadcast"):
        vjp(torch.ones(y.numel() + 1, device=device))
    wide = torch.ones_like(y, dtype=torch.float64)
    if info.family == "loss":
        torch.testing.assert_close(vjp(wide), vjp(wide.float()), rtol=0, atol=0)
    else:
        with pytest.raises(TypeError, match="same dtype"):
            vjp(wide)
    other = "meta" if device == "cpu" else "cpu"
    with pytest.raises(RuntimeError, match="same device|grad_output on"):
        vjp(torch.ones_like(y, device=other))


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


# Normalization: each bad argument with torch's error type (compared) and a message that names it, on the
# device and in the fake kernel (meta tensors: torch.compile's view) alike.
NORM_BAD = [
    ("normalized_shape not the input's trailing dims", lambda t: (t(2, 6), (5,), None, None), "normalized_shape=\\[5\\]"),
    ("normalized_shape longer than the input", lambda t: (t(6), (2, 6), None, None), "normalized_shape=\\[2, 6\\]"),
    ("empty normalized_shape", lambda t: (t(2, 6), (), None, None), "at least 1-dimensional"),
    ("weight of another shape", lambda t: (t(2, 6), (6,), t(5), None), "weight to be of same shape"),
    ("bias of another shape", lambda t: (t(2, 6), (6,), None, t(2, 3)), "bias to be of same shape"),
]


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("case,make,message", NORM_BAD, ids=[c[0] for c in NORM_BAD])
def test_norm_bad_shapes(name, case, make, message, device):
    if name == "rms_norm" and "bias" in case:
        return  # rms_norm has no bias
    expected = None
    for dev in (device, "meta"):
        x, shape, w, b = make(lambda *s: torch.randn(*s, device=dev))
        args = (x, shape, w, b) if name == "layer_norm" else (x, shape, w)
        if expected is None:
            _, expected = outcome(lambda: getattr(torch.nn.functional, name)(*args))
            assert expected in (RuntimeError, ValueError), expected
        with pytest.raises(expected, match=message):
            getattr(torch_vjp, name)(*args)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_norm_integer_weight_as_torch(dtype, device):
    """An integer weight or bias: layer_norm refuses it with torch's RuntimeError ('mixed dtype'), also in the
    fake kernel; rms_norm computes it as torch's composite does (torch warns that it cannot fuse it)."""
    x = torch.randn(2, 6, device=device)
    w = torch.ones(6, device=device, dtype=dtype)
    for t in (x, x.to("meta")):
        for args in ((w.to(t.device),), (None, w.to(t.device))):
            with pytest.raises(RuntimeError, match="mixed dtype"):
                torch_vjp.layer_norm(t, (6,), *args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(torch_vjp.rms_norm(x, (6,), w), torch.nn.functional.rms_norm(x, (6,), w))


def test_norm_bad_argument_types(device):
    x = torch.randn(2, 6, device=device)
    for fn in (torch.nn.functional.layer_norm, torch_vjp.layer_norm, torch_vjp.rms_norm):
        with pytest.raises(TypeError, match="normalized_shape"):
            fn(x, 6)
    with pytest.raises(TypeError, match="weight"):
        torch_vjp.layer_norm(x, (6,), [1.0] * 6)
    with pytest.raises(TypeError, match="eps"):
        torch_vjp.rms_norm(x, (6,), None, "1e-5")


def test_normalize_other_p_and_bad_dim(device):
    """p other than 2 is torch's own computation (so its autograd); a dim out of range is torch's IndexError."""
    x = torch.randn(3, 4, device=device, dtype=torch.float64, requires_grad=True)
    for p in (1.0, 3.0, float("inf")):
        torch.testing.assert_close(torch_vjp.normalize(x, p=p), torch.nn.functional.normalize(x, p=p))
        assert torch.autograd.gradcheck(lambda t: torch_vjp.normalize(t, p=p, dim=0), (x,))
    with pytest.raises(IndexError, match="Dimension out of range"):
        torch_vjp.normalize(torch.randn(3, device=device))  # dim=1 of a 1-D input, as torch
    for p in ("2", "nuc"):  # a named norm goes to torch, which refuses these with its RuntimeError
        with pytest.raises(RuntimeError, match="linalg.matrix_norm"):
            torch_vjp.normalize(x, p=p)


# Losses: torch's error type for each (compared), and a message that says what is wrong.
CE_BAD = [
    ("target of floats", lambda t: (t(4, 5), torch.tensor([0.0, 1.0, 2.0, 3.0])), {}, "Long or Byte"),
    ("target of int32", lambda t: (t(4, 5), torch.tensor([0, 1, 2, 3], dtype=torch.int32)), {}, "Long or Byte"),
    ("target of another length", lambda t: (t(4, 5), torch.tensor([0, 1, 2])), {}, "batch_size \\(4\\)"),
    ("target of two dims", lambda t: (t(4, 5), torch.zeros(4, 1, dtype=torch.long)), {}, "multi-target not supported"),
    ("target out of range", lambda t: (t(4, 5), torch.tensor([0, 1, 5, 2])), {}, "Target 5 is out of bounds"),
    ("negative target", lambda t: (t(4, 5), torch.tensor([0, -1, 2, 2])), {}, "Target -1 is out of bounds"),
    ("byte target out of range", lambda t: (t(4, 5), torch.tensor([0, 1, 7, 2], dtype=torch.uint8)), {},
     "Target 7 is out of bounds"),
    ("strided target out of range", lambda t: (t(4, 5), torch.tensor([0, 9, 1, 9, 6, 9, 2, 9])[::2]), {},
     "Target 6 is out of bounds"),
    ("unknown reduction", lambda t: (t(4, 5), torch.tensor([0, 1, 2, 3])), {"reduction": "avg"},
     "avg is not a valid value for reduction"),
    ("label_smoothing above 1", lambda t: (t(4, 5), torch.tensor([0, 1, 2, 3])), {"label_smoothing": 1.5},
     "label_smoothing must be between 0.0 and 1.0"),
]


@pytest.mark.parametrize("case,make,kwargs,message", CE_BAD, ids=[c[0] for c in CE_BAD])
def test_cross_entropy_bad_input(case, make, kwargs, message, device):
    x, target = make(lambda *s: torch.randn(*s, device=device))
    target = target.to(device)
    _, expected = outcome(lambda: torch.nn.functional.cross_entropy(x, target, **kwargs))
    with pytest.raises(expected, match=message):
        torch_vjp.cross_entropy(x, target, **kwargs)
    head = torch.randn(5, 3, device=device)  # the fused loss checks its targets and arguments alike
    with pytest.raises(expected, match=message):
        torch_vjp.fused_linear_cross_entropy(torch.randn(4, 3, device=device), head, target, **kwargs)


def test_cross_entropy_what_is_not_implemented(device):
    """Class-probability targets: NotImplementedError that says so (class weights are implemented:
    tests/test_loss_options.py)."""
    x = torch.randn(4, 5, device=device)
    with pytest.raises(NotImplementedError, match="class-probability targets"):
        torch_vjp.cross_entropy(x, torch.softmax(torch.randn(4, 5, device=device), -1))
    with pytest.raises(RuntimeError, match="Expected target size \\[2, 3\\], got \\[2, 4\\]"):
        torch_vjp.cross_entropy(torch.randn(2, 5, 3, device=device), torch.zeros(2, 4, dtype=torch.long, device=device))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_mean_over_only_ignored_targets_is_nan_as_torch(label_smoothing, device):
    """'mean' over targets that are all ignore_index: NaN (0/0), and zero gradients, as torch's; 'sum' is 0."""
    for x in (torch.randn(3, 5, device=device), torch.randn(5, device=device)):
        target = torch.full(x.shape[:-1], -100, dtype=torch.long, device=device)
        for reduction in ("mean", "sum", "none"):
            leaf, leaf_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
            loss = torch_vjp.cross_entropy(leaf, target, reduction=reduction, label_smoothing=label_smoothing)
            expected = torch.nn.functional.cross_entropy(leaf_ref, target, reduction=reduction,
                                                         label_smoothing=label_smoothing)
            torch.testing.assert_close(loss, expected, equal_nan=True)
            assert loss.isnan().all() == (reduction == "mean")
            torch.testing.assert_close(torch.autograd.grad(loss.sum(), leaf)[0],
                                       torch.autograd.grad(expected.sum(), leaf_ref)[0])
    hidden, head = torch.randn(3, 4, device=device), torch.randn(5, 4, device=device)
    target = torch.full((3,), -100, dtype=torch.long, device=device)
    assert torch_vjp.fused_linear_cross_entropy(hidden, head, target).isnan()


FUSED_BAD = [
    ("hidden sizes differ", lambda t: (t(4, 3), t(5, 6), None), RuntimeError, "hidden sizes differ"),
    ("3-D hidden states", lambda t: (t(2, 4, 3), t(5, 3), None), RuntimeError, "input of shape \\(N, H\\)"),
    ("1-D head", lambda t: (t(4, 3), t(5), None), RuntimeError, "weight of shape \\(V, H\\)"),
    ("bias of another length", lambda t: (t(4, 3), t(5, 3), t(4)), RuntimeError, "bias of shape \\(5,\\)"),
    ("head of another dtype", lambda t: (t(4, 3), t(5, 3).double(), None), TypeError, "same dtype"),
]


@pytest.mark.parametrize("case,make,error,message", FUSED_BAD, ids=[c[0] for c in FUSED_BAD])
def test_fused_linear_cross_entropy_bad_input(case, make, error, message, device):
    for dev in (device, "meta"):  # the fake kernel agrees
        x, w, b = make(lambda *s: torch.randn(*s, device=dev))
        with pytest.raises(error, match=message):
            torch_vjp.fused_linear_cross_entropy(x, w, torch.zeros(x.shape[0], dtype=torch.long, device=dev), b)


def test_gated_bad_input(device):
    """gate and up of different shapes (no broadcasting) or dtypes; an unknown gelu form."""
    a = torch.randn(3, 4, device=device)
    for fn in (torch_vjp.swiglu, torch_vjp.geglu):
        for t in (a, a.to("meta")):
            with pytest.raises(RuntimeError, match="expected up of shape \\[3, 4\\]"):
                fn(t, t[:, :1])
            with pytest.raises(TypeError, match="same dtype"):
                fn(t, t.double())
        with pytest.raises(TypeError, match="'up' must be Tensor"):
            fn(a, 1.0)
    with pytest.raises(RuntimeError, match="approximate argument must be either none or tanh"):
        torch_vjp.geglu(a, a, approximate="fast")
    with pytest.raises(ValueError, match="geglu: approximate must be 'none' or 'tanh'"):
        torch.ops.torch_vjp.geglu(a, a, "fast")


def test_cross_entropy_one_row_with_a_target_of_one_element(device):
    """(C,) logits take a 0-d target, or one of shape (1,), as torch's; longer is torch's ValueError."""
    x = torch.randn(5, device=device)
    for target in (torch.tensor(2), torch.tensor([2]), torch.tensor([-100])):
        for reduction in ("mean", "none"):
            target = target.to(device)
            torch.testing.assert_close(torch_vjp.cross_entropy(x, target, reduction=reduction),
                                       torch.nn.functional.cross_entropy(x, target, reduction=reduction), equal_nan=True)
    with pytest.raises(ValueError, match="1D target must have size 1"):
        torch_vjp.cross_entropy(x, torch.tensor([1, 2], device=device))
