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


def forward_backward(info, x, kwargs):
    x = x.detach().requires_grad_()
    y = info.op(x, **kwargs)
    dy = sample(info, y.shape, y.dtype, "cpu", generator_seed=7).to(y.device)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y.cpu(), dx.cpu()


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("info,variant", op_variants())
def test_cuda_matches_cpu(info, variant, shape, dtype):
    x = sample(info, shape, dtype)
    for dim in ([-1, 0] if info.has_dim else [-1]):
        kwargs = info.call_kwargs(dim=dim, **variant)
        y_cpu, dx_cpu = forward_backward(info, x, kwargs)
        y_gpu, dx_gpu = forward_backward(info, x.cuda(), kwargs)
        torch.testing.assert_close(y_gpu, y_cpu, equal_nan=True, **TOL[dtype])
        torch.testing.assert_close(dx_gpu, dx_cpu, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("info,variant", op_variants())
def test_misaligned_storage(info, variant, offset):
    """Rows starting off a 16-byte boundary take the scalar path and agree with the aligned copy."""
    base = sample(info, (6 * 1031 + offset,), torch.bfloat16).cuda()
    x = base[offset:].view(6, 1031)
    kwargs = info.call_kwargs(**variant)
    y, dx = forward_backward(info, x, kwargs)
    y_ref, dx_ref = forward_backward(info, x.contiguous().clone(), kwargs)
    torch.testing.assert_close(y, y_ref, **TOL[torch.bfloat16])
    torch.testing.assert_close(dx, dx_ref, **TOL[torch.bfloat16])


def test_runs_on_the_current_stream_and_device():
    import torch_vjp

    x = torch.randn(1024, 1024, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = torch_vjp.softmax(x)
    stream.synchronize()
    torch.testing.assert_close(y, torch.softmax(x, -1))
