"""The registered ops as torch sees them: torch.library.opcheck and torch.compile."""
import pytest
import torch

from torch_vjp.testing import OPS, SAMPLED, dim_calls, op_variants, sample
from torch_vjp import compile_policy
from torch_vjp._ops import REGISTRY


def test_every_registered_op_is_in_the_table():
    names = {n for info in OPS for n in info.registered}
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("torch_vjp::")}
    assert registered == names and set(REGISTRY) == {info.name for info in OPS}


def opcheck_calls(info, variant, device):
    """Calls along dim 0 and -1 (with keepdim both ways), over one and two normalized dims, on (3, 5) float32
    inputs; the fused loss also with its forward computing the gradients (compute_grad)."""
    x = sample(info, (3, 5), torch.float32, device)
    if info.has_dim:
        kwargs = [dict(dim=d, keepdim=k) for d in (0, -1) for k in (False, True)]
    else:
        kwargs = dim_calls(info, 2)
    calls = [info.call(x, **k, **variant) for k in kwargs]
    overrides = [{}, {"compute_grad": True}] if info.name == "fused_linear_cross_entropy" else [{}]
    return [(c, o) for c in calls for o in overrides]


@pytest.mark.parametrize("info,variant", op_variants())
def test_opcheck(info, variant, device):
    """Schema, autograd registration, fake kernel and AOT dispatch with dynamic shapes, forward and VJP op, with
    every floating tensor argument requiring grad (a norm's saved statistics too: the VJP op is differentiable
    in each of its arguments) but those the op is not differentiable in (class weights: refused, as torch's)."""
    spec = REGISTRY[info.name]

    def grad_leaves(op, args):
        names = [a.name for a in op._schema.arguments]
        return tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                     and names[i] not in spec.nondifferentiable else a for i, a in enumerate(args))

    for c, overrides in opcheck_calls(info, variant, device):
        forward = getattr(torch.ops.torch_vjp, info.name).default
        args = grad_leaves(forward, c.raw_args(**overrides))
        torch.library.opcheck(forward, args)
        outputs = getattr(torch.ops.torch_vjp, info.name)(*args)
        y = outputs[0] if isinstance(outputs, tuple) else outputs
        dy = sample(info, y.shape, y.dtype, device, generator_seed=1)
        if spec.public_outputs > 1:  # a gradient for each public output (rope: q and k; add_rms_norm: y and s)
            dy = tuple(sample(info, o.shape, o.dtype, device, generator_seed=1 + i)
                       for i, o in enumerate(outputs[:spec.public_outputs]))
        vjp_args = spec.vjp_call_args(args, outputs, dy)
        backward = getattr(torch.ops.torch_vjp, info.name + "_backward").default
        torch.library.opcheck(backward, grad_leaves(backward, vjp_args))


def composite(ops):
    """f(x, *tensors): every (row, variant) of ops applied to x, each with its own drawn tensors (weight, bias,
    up, targets, a head; `draw(x)` gives them for an x, in f's order, the floating ones the op is differentiable
    in requiring grad: not class weights), summed with position weights. A norm normalizes x's last dim, read from
    x's shape (a new shape recompiles)."""
    def tensors_of(info, c):
        constants = REGISTRY[info.name].nondifferentiable
        named = [*zip(c.names, c.primals[1:]), *((k, v) for k, v in c.kwargs.items() if isinstance(v, torch.Tensor))]
        return [t.requires_grad_() if t.is_floating_point() and name not in constants else t for name, t in named]

    def draw(x):
        return [t for info, variant in ops for t in tensors_of(info, info.call(x.detach(), **variant))]

    def f(x, *tensors):
        out = x.new_zeros(())
        k = 0
        for info, variant in ops:
            kwargs = info.call_kwargs(**{key: v for key, v in variant.items() if v is not SAMPLED})
            kwargs.update(fixed[(info.name, tuple(variant.items()))])  # what the draw chose (rope's unsqueeze_dim)
            if info.has_normalized_shape:
                kwargs["normalized_shape"] = x.shape[-1:]
            for name in drawn_names[(info.name, tuple(variant.items()))]:
                kwargs[name] = tensors[k]
                k += 1
            y = info.joined(info.op(x, **kwargs))
            out = out + (y * torch.arange(y.numel(), device=y.device).reshape(y.shape)).sum()
        return out

    probe = torch.zeros(2, 3)
    drawn_names, fixed = {}, {}
    for info, variant in ops:
        c = info.call(probe, **variant)
        fixed[(info.name, tuple(variant.items()))] = {k: v for k, v in c.kwargs.items() if not isinstance(v, torch.Tensor)}
        drawn_names[(info.name, tuple(variant.items()))] = [*c.names, *(k for k, v in c.kwargs.items()
                                                                        if isinstance(v, torch.Tensor))]
    return f, draw


@pytest.mark.parametrize("policy", ["kernels", "shipped"])
def test_compile_fullgraph_matches_eager(device, policy, monkeypatch):
    """One compiled graph through every op (fullgraph=True: no graph break), forward and backward, w.r.t. x
    and every drawn tensor that is differentiated: every op as its kernel (the graph then computes what eager
    does, to rounding order), and with the compile policy as shipped, where some ops are their torch-ops forms
    (each held to the float64 reference by tests/test_compile_policy.py): the same to float32's tolerance."""
    monkeypatch.setattr(compile_policy, "DECOMPOSE", {} if policy == "kernels" else dict(compile_policy.DECOMPOSE))
    torch._dynamo.reset()
    torch.manual_seed(0)
    ops = [case.values for case in op_variants()]
    f, draw = composite(ops)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    for shape in [(4, 33), (6, 17)]:  # a second shape exercises recompilation
        x = torch.randn(shape, device=device, requires_grad=True)
        tensors = draw(x)
        leaves = [x, *(t for t in tensors if t.requires_grad)]
        y, y_c = f(x, *tensors), compiled(x, *tensors)
        grads_c, grads = torch.autograd.grad(y_c, leaves), torch.autograd.grad(y, leaves)
        if policy == "kernels":
            torch.testing.assert_close(y_c, y)
            torch.testing.assert_close(grads_c, grads)
            continue
        # float32's tolerance, relative to each tensor's largest element: f sums every op's output weighted by
        # up to numel, so an element's rounding is that of the largest terms, not of the (cancelled) sum.
        for a, b in [(y_c, y), *zip(grads_c, grads)]:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))
    torch._dynamo.reset()


def test_compile_inductor_on_cpu():
    """The default backend too (inductor, which generates C++ for the surrounding ops on CPU)."""
    from torch_vjp.testing import OPS_BY_NAME

    ops = [(OPS_BY_NAME[n], v) for n, v in (("gelu", {}), ("softmax", {}), ("logsumexp", {}),
                                            ("layer_norm", {"weight": SAMPLED, "bias": SAMPLED}),
                                            ("cross_entropy", {}), ("swiglu", {}))]
    f, draw = composite(ops)
    x = torch.randn(5, 9, requires_grad=True)
    tensors = draw(x)
    y_c = torch.compile(f, fullgraph=True)(x, *tensors)
    torch.testing.assert_close(y_c, f(x, *tensors))
    torch.testing.assert_close(torch.autograd.grad(y_c, x)[0], torch.autograd.grad(f(x, *tensors), x)[0])
