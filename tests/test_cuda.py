"""CUDA against CPU on the shapes that select each CUDA kernel path (the rest of the suite already runs
every check on CUDA through the `device` fixture). Skipped where no GPU is present."""
import pytest
import torch

from tests.op_db import op_variants, sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# Row lengths around the kernels' thresholds: warp-per-row (short), block-per-row with the row cached
# on chip (medium), and the multi-pass path (rows too long for shared memory); odd lengths for the
# scalar tails; more rows than one grid dimension holds.
ROW_SHAPES = [(3, 1), (5, 31), (64, 128), (33, 1023), (8, 1024), (8, 1025), (16, 4096), (4, 12289),
              (2, 65536), (2, 300007), (70000, 8)]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12),
       torch.bfloat16: dict(rtol=1.6e-2, atol=2e-3), torch.float16: dict(rtol=2e-3, atol=2e-4)}


def forward_backward(call):
    """Output and every gradient of a Call (on CPU or CUDA), on the CPU."""
    c = call.cast(requires_grad=True)
    y = c.op(*c.primals)
    dy = sample(c.info, y.shape, y.dtype, "cpu", generator_seed=7).to(y.device)
    return y.cpu(), [g.cpu() for g in torch.autograd.grad(y, c.primals, dy)]


def on_cuda(call):
    """The same call with every tensor argument on the GPU."""
    from torch_vjp.testing import Call

    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in call.kwargs.items()}
    return Call(call.info, tuple(t.cuda() for t in call.primals), call.names, kwargs)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("info,variant", op_variants())
def test_cuda_matches_cpu(info, variant, shape, dtype):
    x = sample(info, shape, dtype)
    for dim in ([-1, 0] if info.has_dim else [-1]):
        call = info.call(x, **(dict(dim=dim) if info.has_dim else {}), **variant)
        y_cpu, grads_cpu = forward_backward(call)
        y_gpu, grads_gpu = forward_backward(on_cuda(call))
        torch.testing.assert_close(y_gpu, y_cpu, equal_nan=True, **TOL[dtype])
        torch.testing.assert_close(grads_gpu, grads_cpu, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("info,variant", op_variants())
def test_misaligned_storage(info, variant, offset):
    """Rows starting off a 16-byte boundary (the input's; its drawn companions are aligned) take the scalar
    path and agree with the aligned copy."""
    base = sample(info, (6 * 1031 + offset,), torch.bfloat16).cuda()
    x = base[offset:].view(6, 1031)
    call = info.call(x, **variant)
    y, grads = forward_backward(call)
    y_ref, grads_ref = forward_backward(call.with_primals(x.contiguous().clone(), *call.primals[1:]))
    torch.testing.assert_close(y, y_ref, **TOL[torch.bfloat16])
    torch.testing.assert_close(grads, grads_ref, **TOL[torch.bfloat16])


def test_runs_on_the_current_stream_and_device():
    import torch_vjp

    x = torch.randn(1024, 1024, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = torch_vjp.softmax(x)
    stream.synchronize()
    torch.testing.assert_close(y, torch.softmax(x, -1))
