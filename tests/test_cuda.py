"""CUDA against CPU on the shapes that select each CUDA kernel path (the rest of the suite already runs
every check on CUDA through the `device` fixture). Skipped where no GPU is present.

The CUDA softmax family runs on the row engine (csrc/cuda/row_engine.cuh), which picks its kernel from the
row length n, the number of rows, the reduced dim and the device: several rows a warp (n up to 32 packs
of 16 bytes), a warp a row, a block a row (up to 1024 threads), a thread-block cluster a row (sm_90),
rows split across blocks (longer rows, or very few long rows), and a tiled column kernel for a dim that is
not the last (register-held, clustered, or split along n). The elementwise kernel and every row path load
16-byte packs at any alignment. Every size below says which of these it reaches.

Tests named test_paths_* (and test_more_than_2_31_elements) are the quick subset benchmarks/gpu_check.sh
runs first: every kernel path, dtype and alignment case once, the issue-7 crash shapes included.
"""
import threading

import pytest
import torch

from torch_vjp.testing import OPS_BY_NAME, op_variants, sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# Row lengths around the kernels' thresholds: warp-per-row (short), block-per-row (medium), rows too long
# for one block; odd lengths for the partial packs at the row ends; more rows than one grid dimension holds.
ROW_SHAPES = [(3, 1), (5, 31), (64, 128), (33, 1023), (8, 1024), (8, 1025), (16, 4096), (4, 12289),
              (2, 65536), (2, 300007), (70000, 8)]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12),
       torch.bfloat16: dict(rtol=1.6e-2, atol=2e-3), torch.float16: dict(rtol=2e-3, atol=2e-4)}
DTYPES = list(TOL)
SOFTMAX_FAMILY = op_variants(families=("softmax",))


def forward_backward(info, x, kwargs, dy=None):
    """A single-input op's output and input gradient, on the CPU."""
    x = x.detach().requires_grad_()
    y = info.op(x, **kwargs)
    if dy is None:
        dy = sample(info, y.shape, y.dtype, "cpu", generator_seed=7).to(y.device)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y.cpu(), dx.cpu()


def call_forward_backward(call):
    """Output and every gradient of a Call (any op of the table, on CPU or CUDA), on the CPU."""
    c = call.cast(requires_grad=True)
    y = c.op(*c.primals)
    dy = sample(c.info, y.shape, y.dtype, "cpu", generator_seed=7).to(y.device)
    return y.cpu(), [g.cpu() for g in torch.autograd.grad(y, c.primals, dy)]


def on_cuda(call):
    """The same call with every tensor argument on the GPU."""
    from torch_vjp.testing import Call

    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in call.kwargs.items()}
    return Call(call.info, tuple(t.cuda() for t in call.primals), call.names, kwargs)


def assert_cuda_matches_cpu(info, x, kwargs, dy=None):
    """x (and dy) on the CPU or a CUDA view; the CUDA run sees them as given (views and offsets kept)."""
    y_gpu, dx_gpu = forward_backward(info, x if x.is_cuda else x.cuda(), kwargs,
                                     None if dy is None else (dy if dy.is_cuda else dy.cuda()))
    x_cpu = x.cpu()
    y_cpu, dx_cpu = forward_backward(info, x_cpu, kwargs, None if dy is None else dy.cpu())
    torch.testing.assert_close(y_gpu, y_cpu, equal_nan=True, **TOL[x.dtype])
    torch.testing.assert_close(dx_gpu, dx_cpu, equal_nan=True, **TOL[x.dtype])


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("info,variant", op_variants())
def test_cuda_matches_cpu(info, variant, shape, dtype):
    x = sample(info, shape, dtype)
    for dim in ([-1, 0] if info.has_dim else [-1]):
        call = info.call(x, **(dict(dim=dim) if info.has_dim else {}), **variant)
        y_cpu, grads_cpu = call_forward_backward(call)
        y_gpu, grads_gpu = call_forward_backward(on_cuda(call))
        torch.testing.assert_close(y_gpu, y_cpu, equal_nan=True, **TOL[dtype])
        torch.testing.assert_close(grads_gpu, grads_cpu, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("info,variant", op_variants())
def test_misaligned_storage(info, variant, offset):
    """Rows starting off a 16-byte boundary (the input's; its drawn companions are aligned), realigned in
    registers, agree with the aligned copy."""
    base = sample(info, (6 * 1031 + offset,), torch.bfloat16).cuda()
    x = base[offset:].view(6, 1031)
    call = info.call(x, **variant)
    y, grads = call_forward_backward(call)
    y_ref, grads_ref = call_forward_backward(call.with_primals(x.contiguous().clone(), *call.primals[1:]))
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


# ---------------------------------------------------------------------------------------------------------
# The quick subset: every path once.

# Issue 7's launch crashes: the old block kernels asked for exactly 48 KB of dynamic shared memory at these
# row lengths (fp32 forward 12288 and backward 6144, half types forward 24576 and backward 12288, double
# forward 6144 and backward 3072), which with their static shared memory exceeded the limit without an
# opt-in. Every length in every dtype, and one either side of the largest.
CRASH_LENGTHS = [3072, 6144, 12287, 12288, 12289, 24576]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info,variant", SOFTMAX_FAMILY)
def test_paths_issue7_crash_lengths(info, variant, dtype):
    for n in CRASH_LENGTHS:
        assert_cuda_matches_cpu(info, sample(info, (3, n), dtype), info.call_kwargs(dim=-1, **variant))


# Row lengths (last dim) that reach each row path in every dtype (P = 16 / itemsize elements a pack; a
# thread holds up to 32 elements of one input, or 4 packs of each of two):
#   1, 2, 3, 5, 31, 33        several rows a warp (1 to 16 lanes a row), partial packs at both row ends
#   64, 255, 257, 1000        a warp a row, 1 to 8 packs a lane
#   1023, 1024, 1025, 2049    the warp / block boundary (fp32 forward: 1024 = 32 lanes × 32 elements)
#   4097, 8193, 16385         a block a row; 16385 is past a 1024-thread block for fp32 backward (16 each)
#   32768                     fp32 backward: 2 × 128 KB, a 2-block cluster on sm_90, split rows on sm_80
#   50257                     GPT-2's vocabulary (log_softmax): odd, misaligned row starts
#   65537                     past one block in every dtype: cluster (sm_90) or split
# Three rows each, so that row starts take three different alignments when n is odd.
PATH_LENGTHS = [1, 2, 3, 5, 31, 33, 64, 255, 257, 1000, 1023, 1024, 1025, 2049, 4097, 8193, 16385, 32768, 50257,
                65537]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info,variant", SOFTMAX_FAMILY)
def test_paths_row_lengths(info, variant, dtype):
    for n in PATH_LENGTHS:
        assert_cuda_matches_cpu(info, sample(info, (3, n), dtype), info.call_kwargs(dim=-1, **variant))


# Row counts against row lengths: few very long rows are split across blocks so that the GPU fills
# (2 × 300007: 600 K elements on 2 rows; 4 × 65536); 70000 × 8 puts 8 rows in a warp; 16384 × 4096 is the
# benchmark's reference shape at a lighter 512 × 4096.
ROW_COUNTS = [(2, 300007), (4, 65536), (70000, 8), (512, 4096), (1, 131073)]


@pytest.mark.parametrize("shape", ROW_COUNTS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("info,variant", SOFTMAX_FAMILY)
def test_paths_row_counts(info, variant, dtype, shape):
    assert_cuda_matches_cpu(info, sample(info, shape, dtype), info.call_kwargs(dim=-1, **variant))


# Every dim of 3-D tensors: the last dim takes the row paths, the others the column kernel. (8, 1000, 64):
# dim 1 is n = 1000 over 64 columns (16-byte packs of columns), dim 0 is n = 8 over 64000 columns. (5, 300, 7):
# 7 columns, no whole pack: one column a lane. (2, 4096, 512): n = 4096 held by a cluster on sm_90, split
# along n elsewhere. (1, 20000, 8): one tile of 8 columns, n split across blocks. (3, 5, 1): inner of 1 after
# a non-last dim.
SHAPES_3D = [(8, 1000, 64), (5, 300, 7), (2, 4096, 512), (1, 20000, 8), (3, 5, 1)]


@pytest.mark.parametrize("shape", SHAPES_3D, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info,variant", SOFTMAX_FAMILY)
def test_paths_every_dim_3d(info, variant, dtype, shape):
    x = sample(info, shape, dtype)
    for dim in range(3):
        for keepdim in ((False, True) if info.keepdim else (False,)):
            assert_cuda_matches_cpu(info, x, info.call_kwargs(dim=dim, keepdim=keepdim, **variant))


# Misaligned views. x[1:] of a flat buffer shifts every element by one (the output, freshly allocated, is
# aligned: inputs are realigned in registers); x[1:] of a matrix with an odd row length shifts the whole
# tensor; x[:, 1:] is not contiguous (the frontend copies it). n = 1031 (odd, a block row), 33 (sub-warp),
# 50257 (vocabulary). Also a misaligned grad_output, which the backward reads as its own input.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info,variant", op_variants())
def test_paths_misaligned_views(info, variant, dtype):
    kwargs = info.call_kwargs(**variant)
    for rows, n in ((6, 1031), (9, 33), (2, 50257)):
        flat = sample(info, (rows * n + 1,), dtype).cuda()
        assert_cuda_matches_cpu(info, flat[1:].view(rows, n), kwargs)
        matrix = sample(info, (rows + 1, n), dtype).cuda()
        assert_cuda_matches_cpu(info, matrix[1:], kwargs)
        wide = sample(info, (rows, n + 1), dtype).cuda()
        assert_cuda_matches_cpu(info, wide[:, 1:], kwargs)
        x = sample(info, (rows, n), dtype)
        y_shape = info.op(x[:1], **kwargs).shape[1:]
        dy = sample(info, (rows * y_shape.numel() + 1,), dtype, generator_seed=3).cuda()[1:].view(rows, *y_shape)
        assert_cuda_matches_cpu(info, x, kwargs, dy=dy)


# Elementwise ops: element counts around the 16-byte pack and the warp's run of packs, at every alignment
# of input and output (x[k:] for k < 8 covers every misalignment of every dtype).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info,variant", op_variants(families=("elementwise",)))
def test_paths_elementwise_alignment(info, variant, dtype):
    kwargs = info.call_kwargs(**variant)
    for numel in (1, 7, 8, 9, 1000, 4099, 65537):
        for k in range(8):
            base = sample(info, (numel + k,), dtype).cuda()
            dy = sample(info, (numel + 7 - k,), dtype, generator_seed=5).cuda()[7 - k:]
            assert_cuda_matches_cpu(info, base[k:], kwargs, dy=dy)


def test_paths_concurrent_host_threads():
    """Launches from several host threads at once, each on its own stream, at sizes that take different
    paths (sub-warp, block, cluster or split, column): no launch may depend on another thread's (a kernel
    attribute set per launch once did), and every result must be right."""
    softmax, log_softmax = OPS_BY_NAME["softmax"], OPS_BY_NAME["log_softmax"]
    cases = [(softmax, (70000, 8), -1), (log_softmax, (4, 12288), -1), (softmax, (2, 65536), -1),
             (log_softmax, (2, 300007), -1), (softmax, (64, 50257), -1), (softmax, (8, 1000, 64), 1)]
    inputs, expected = [], []
    for info, shape, dim in cases:
        x = sample(info, shape, torch.float32).cuda()
        inputs.append(x)
        expected.append(forward_backward(info, x, info.call_kwargs(dim=dim)))
    errors = []

    def worker(first):
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                for step in range(12):
                    k = (first + step) % len(cases)
                    info, _, dim = cases[k]
                    y, dx = forward_backward(info, inputs[k], info.call_kwargs(dim=dim))
                    torch.testing.assert_close(y, expected[k][0], rtol=0, atol=0)
                    torch.testing.assert_close(dx, expected[k][1], rtol=0, atol=0)
        except Exception as error:  # noqa: BLE001  (reported from the main thread)
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_more_than_2_31_elements():
    """One softmax over more than 2^31 elements (bf16, 4 GiB a tensor): 64-bit indexing everywhere. Rows
    around element 2^31 and the last row are checked against the CPU in float64; skipped without ~20 GiB
    of free GPU memory (x, y, dy, dx, 4 GiB each, and the check's copies)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs ~24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    info = OPS_BY_NAME["softmax"]
    n = 4099  # odd: row starts at every alignment, and a row straddles element 2^31
    rows = 2**31 // n + 2
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, n, generator=g, device="cuda", dtype=torch.bfloat16).mul_(info.scale).requires_grad_()
    dy = torch.randn(rows, n, generator=g, device="cuda", dtype=torch.bfloat16)
    y = info.op(x, dim=-1)
    (dx,) = torch.autograd.grad(y, x, dy)
    straddle = 2**31 // n
    for r in (0, straddle - 1, straddle, straddle + 1, rows - 1):
        x64 = x[r].detach().double().cpu().requires_grad_()
        y64 = torch.softmax(x64, -1)
        (dx64,) = torch.autograd.grad(y64, x64, dy[r].double().cpu())
        torch.testing.assert_close(y[r].detach().cpu().double(), y64, **TOL[torch.bfloat16])
        torch.testing.assert_close(dx[r].cpu().double(), dx64, **TOL[torch.bfloat16])
    del x, y, dy, dx
    # And an elementwise op over as many elements, with the last element checked.
    exp = OPS_BY_NAME["exp"]
    t = torch.full((2**31 + 9,), -1.0, device="cuda", dtype=torch.bfloat16)
    t[-3:] = torch.tensor([0.0, 1.0, 2.0], dtype=torch.bfloat16)
    out = exp.op(t)
    torch.testing.assert_close(out[-4:].float().cpu(), torch.tensor([-1.0, 0.0, 1.0, 2.0]).exp(), **TOL[torch.bfloat16])
