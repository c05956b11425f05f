"""The registered ops as torch sees them: torch.library.opcheck and torch.compile."""
import pytest
import torch

from torch_vjp.testing import OPS, op_variants, sample
from torch_vjp._ops import REGISTRY


def test_every_registered_op_is_in_the_table():
    names = {n for info in OPS for n in info.registered}
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("torch_vjp::")}
    assert registered == names and set(REGISTRY) == {info.name for info in OPS}


@pytest.mark.parametrize("info,variant", op_variants())
def test_opcheck(info, variant, device):
    """Schema, autograd registration, fake kernel and AOT dispatch with dynamic shapes, forward and VJP op."""
    spec = REGISTRY[info.name]
    x = sample(info, (3, 5), torch.float32, device).requires_grad_()
    for kwargs in [info.call_kwargs(dim=d, keepdim=k, **variant) for d in (0, -1) for k in (False, True)]:
        params = info.raw_params(**kwargs)
        y = info.raw(x, **kwargs)
        torch.library.opcheck(getattr(torch.ops.torch_vjp, info.name).default, (x, *params))
        saved = [x if s == "input" else y for s in spec.saves]
        dy = sample(info, y.shape, y.dtype, device, generator_seed=1).requires_grad_()
        args = (dy, *[t.detach().requires_grad_() for t in saved], *params)
        torch.library.opcheck(getattr(torch.ops.torch_vjp, info.name + "_backward").default, args)


def composite(ops):
    def f(x):
        out = x.new_zeros(())
        for info, variant in ops:
            y = info.op(x, **info.call_kwargs(**variant))
            out = out + (y * torch.arange(y.numel(), device=y.device).reshape(y.shape)).sum()
        return out

    return f


def test_compile_fullgraph_matches_eager(device):
    """One compiled graph through every op (fullgraph=True: no graph break), forward and backward."""
    ops = [case.values for case in op_variants()]
    f = composite(ops)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    for shape in [(4, 33), (6, 17)]:  # a second shape exercises recompilation
        x = torch.randn(shape, device=device, requires_grad=True)
        y, y_c = f(x), compiled(x)
        (dx,) = torch.autograd.grad(y, x)
        (dx_c,) = torch.autograd.grad(y_c, x)
        torch.testing.assert_close(y_c, y)
        torch.testing.assert_close(dx_c, dx)


def test_compile_inductor_on_cpu():
    """The default backend too (inductor, which generates C++ for the surrounding ops on CPU)."""
    from torch_vjp.testing import OPS_BY_NAME

    ops = [(OPS_BY_NAME[n], {}) for n in ("gelu", "softmax", "logsumexp")]
    f = composite(ops)
    x = torch.randn(5, 9, requires_grad=True)
    y_c = torch.compile(f, fullgraph=True)(x)
    torch.testing.assert_close(y_c, f(x))
    torch.testing.assert_close(torch.autograd.grad(y_c, x)[0], torch.autograd.grad(f(x), x)[0])
