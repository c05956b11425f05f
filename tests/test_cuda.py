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


# =========================================================================================================
# The normalization, gated and loss families (csrc/cuda/norm_epilogues.cuh, gated.cu, cross_entropy_epilogues.cuh),
# through the registered ops (torch.ops.torch_vjp.*), so that these tests do not depend on the Python layer:
# CUDA against the CPU backend (the same op on the CPU) or float64. Where the public API has the op, it is
# checked against the registered op too.
#
# Paths. layer_norm and rms_norm run on the row engine with parameter vectors (weight, bias) and, backward,
# parameter sums fused into the pass that writes dx when n % P == 0 (P = 16 / itemsize: every row then starts
# at one 16-byte offset, so a thread maps the same positions in every row); for other n the sums take a second
# pass (param_sums_kernel). Blocks: forward up to 768 threads (1024 for rms_norm), backward with sums up to 768
# and 2 packs a thread; on sm_90 a row longer than a 512-thread (forward) or 256-thread (backward) block takes
# a cluster of up to 8. cross_entropy: forward a reduction over the vocabulary (clusters of 512-thread blocks
# on sm_90), gradient a map; normalize: the row and column kernels; swiglu, geglu: the elementwise kernel
# with 2 inputs (forward) and 3 inputs, 2 outputs (backward).

VJP = torch.ops.torch_vjp
GPU = "cuda"  # the tests below place their CUDA tensors here
PARAM_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def _randn(shape, dtype, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def _cpu(t):
    return None if t is None else t.detach().cpu()


def _gpu(t):
    return None if t is None else t.to(GPU)


def _norm_forward(kind, x, weight, bias, eps):
    shape = [x.shape[-1]]
    if kind == "layer_norm":
        return tuple(VJP.layer_norm(x, shape, weight, bias, eps))
    y, rstd = VJP.rms_norm(x, shape, weight, eps)
    return y, None, rstd


def _norm_backward(kind, dy, x, mean, rstd, weight, bias, mask):
    shape = [x.shape[-1]]
    if kind == "layer_norm":
        return tuple(VJP.layer_norm_backward(dy, x, mean, rstd, weight, bias, shape, list(mask)))
    dx, dw = VJP.rms_norm_backward(dy, x, rstd, weight, shape, list(mask[:2]))
    return dx, dw, None


def _norm_inputs(kind, rows, n, dtype, params, param_dtype=None, offset=0, seed=0):
    """x (a CUDA view `offset` elements into its storage), weight, bias, dy; params: "none", "weight", "bias",
    "both" (rms_norm has no bias)."""
    pdt = param_dtype or dtype
    x = _randn(rows * n + offset, dtype, seed).to(GPU)[offset:].view(rows, n)
    weight = _randn(n, pdt, seed + 1, 0.5, 1.0) if params in ("weight", "both") else None
    bias = _randn(n, pdt, seed + 2, 0.5) if params in ("bias", "both") and kind == "layer_norm" else None
    dy = _randn((rows, n), dtype, seed + 3)
    return x, weight, bias, dy


def _check_param_grads(kind, got_w, got_b, dy, x, mean, rstd, weight, bias):
    """Parameter gradients against float64 from the same inputs and statistics: within 1e-5 of the sum of the
    terms' magnitudes (fp32 accumulation in any order), plus the rounding to the parameter's dtype."""
    x64, dy64 = x.double(), dy.double()
    mean64 = mean.double()[:, None] if mean is not None else 0.0
    xhat = (x64 - mean64) * rstd.double()[:, None]
    for got, p, terms in ((got_w, weight, dy64 * xhat), (got_b, bias, dy64)):
        if got is None:
            continue
        want = terms.sum(0)
        bound = terms.abs().sum(0)
        slack = 1e-5 * bound + torch.finfo(p.dtype).eps * want.abs() + 1e-30
        err = (got.double().cpu() - want).abs()
        assert got.dtype == p.dtype and got.shape == p.shape
        assert (err <= slack).all(), f"max error {float((err - slack).max())} above the bound"


def assert_norm_matches_cpu(kind, rows, n, dtype, params="both", param_dtype=None, offset=0,
                            mask=(True, True, True), seed=0):
    x, weight, bias, dy = _norm_inputs(kind, rows, n, dtype, params, param_dtype, offset, seed)
    eps = 1e-5
    y_c, mean_c, rstd_c = _norm_forward(kind, _cpu(x), weight, bias, eps)
    y_g, mean_g, rstd_g = _norm_forward(kind, x, _gpu(weight), _gpu(bias), eps)
    stat_tol = TOL[torch.float64 if dtype == torch.float64 else torch.float32]
    torch.testing.assert_close(_cpu(y_g), y_c, **TOL[dtype])
    torch.testing.assert_close(_cpu(rstd_g), rstd_c, **stat_tol)
    if kind == "layer_norm":
        torch.testing.assert_close(_cpu(mean_g), mean_c, **stat_tol)
    # The backward from the CPU's statistics on both, so that only the backward is compared.
    want = _norm_backward(kind, dy, _cpu(x), mean_c, rstd_c, weight, bias, mask)
    got = _norm_backward(kind, _gpu(dy), x, _gpu(mean_c), _gpu(rstd_c), _gpu(weight), _gpu(bias), mask)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
    if mask[0]:
        torch.testing.assert_close(_cpu(got[0]), want[0], **TOL[dtype])
    _check_param_grads(kind, got[1], got[2], dy, _cpu(x), mean_c, rstd_c, weight, bias)
    return got


NORM_KINDS = ["layer_norm", "rms_norm"]
# Row lengths (last dim) that reach each path (bf16 P = 8, fp32 4, fp64 2 elements a pack):
#   1, 2, 7, 8, 31, 33      several rows a warp; 7, 31, 33 (n % P != 0) take the unfused parameter sums
#   64, 255, 256, 1000      a warp a row (backward with sums: up to 64 packs)
#   1024, 1031, 2048, 4096  a block a row (4096 bf16 backward: 256 threads, the sm_90 cluster threshold)
#   4104, 8192, 12289       8192 bf16 backward: a 2-block cluster on sm_90, split on sm_80; 12289: odd, long
#   16384, 32768, 65536     clusters of 4 and 8 (bf16 backward, fp32 forward), split beyond (fp32 backward 65536)
#   50257, 128256           vocabulary lengths: odd and long (unfused sums); past the backward's largest cluster
# Three rows each (row starts at three alignments when n is odd; few rows: long ones are split across blocks).
NORM_LENGTHS = [1, 2, 7, 8, 31, 33, 64, 255, 256, 1000, 1024, 1031, 2048, 4096, 4104, 8192, 12289, 16384, 32768, 50257,
                65536, 128256]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", NORM_KINDS)
def test_paths_norm_row_lengths(kind, dtype):
    for n in NORM_LENGTHS:
        assert_norm_matches_cpu(kind, 3, n, dtype)


# Row counts against row lengths: enough rows that the backward's grid is one wave of row slots, each mapping
# many rows (2048 × 1024, 600 × 4096 and 96 × 8192: block and sm_90 cluster slots; 70000 × 8: 32 rows a
# 256-thread block, groups summed through shared memory; 40 × 32768: 8-block clusters for bf16), and odd
# lengths with many rows (the unfused sums over many row slots).
NORM_ROW_COUNTS = [(2048, 1024), (600, 4096), (96, 8192), (70000, 8), (40, 32768), (3000, 33), (500, 1031), (1, 1)]


@pytest.mark.parametrize("shape", NORM_ROW_COUNTS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", NORM_KINDS)
def test_paths_norm_row_counts(kind, dtype, shape):
    assert_norm_matches_cpu(kind, *shape, dtype)


# Parameters: none, weight, bias (layer_norm), both; fp32 parameters with half-type input (mixed precision: the
# output keeps the input's dtype, the parameter gradients the parameters'); and every output mask (dx alone
# uses the backward without sums; the sums alone param_sums_kernel).
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", NORM_KINDS)
def test_paths_norm_parameters_and_masks(kind, dtype):
    for params in ("none", "weight", "bias", "both"):
        for param_dtype in ({dtype, torch.float32} if dtype != torch.float32 else {dtype}):
            for n in (256, 1031, 4096):
                assert_norm_matches_cpu(kind, 5, n, dtype, params, param_dtype)
    for mask in ((True, False, False), (False, True, True), (False, True, False), (True, True, False)):
        for n in (64, 1031, 8192):
            assert_norm_matches_cpu(kind, 33, n, dtype, "both", mask=mask)


# Misaligned x (a view 1 or 3 elements into its storage; dx is fresh, so x is realigned in registers) and a
# misaligned dy.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", NORM_KINDS)
def test_paths_norm_misaligned(kind, dtype):
    for offset in (1, 3):
        for rows, n in ((6, 1024), (9, 33), (4, 8192), (2, 1031)):
            assert_norm_matches_cpu(kind, rows, n, dtype, offset=offset)
    x, weight, bias, dy = _norm_inputs(kind, 7, 4096, dtype, "both")
    _, mean, rstd = _norm_forward(kind, x, _gpu(weight), _gpu(bias), 1e-5)
    dy_view = _randn(7 * 4096 + 1, dtype, 9).to(GPU)[1:].view(7, 4096)
    got = _norm_backward(kind, dy_view, x, mean, rstd, _gpu(weight), _gpu(bias), (True, True, True))
    want = _norm_backward(kind, dy_view.clone(), x, mean, rstd, _gpu(weight), _gpu(bias), (True, True, True))
    for a, b in zip(got, want):
        if a is not None:
            assert torch.equal(a, b)


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_norm_grads_bitwise_deterministic(kind):
    """Two runs give the same bits: the parameter sums are added in a fixed order (rows of a slot in order,
    groups and slots in order), no atomics. Fused (n % P == 0), unfused (odd n), clusters and split rows."""
    for dtype, rows, n in ((torch.bfloat16, 4096, 1024), (torch.float32, 1000, 1031), (torch.bfloat16, 64, 32768),
                           (torch.float32, 2, 65536), (torch.bfloat16, 70000, 8)):
        x, weight, bias, dy = _norm_inputs(kind, rows, n, dtype, "both")
        _, mean, rstd = _norm_forward(kind, x, _gpu(weight), _gpu(bias), 1e-5)
        first = _norm_backward(kind, _gpu(dy), x, mean, rstd, _gpu(weight), _gpu(bias), (True, True, True))
        second = _norm_backward(kind, _gpu(dy), x, mean, rstd, _gpu(weight), _gpu(bias), (True, True, True))
        for a, b in zip(first, second):
            if a is not None:
                assert torch.equal(a, b), f"{dtype} {rows}x{n}: not bitwise equal across runs"


def test_paths_norm_large_mean_fp32():
    """Mean 1e4, unit variance, fp32: the variance has no cancellation (each thread's exact two-pass over its
    registers, merged by Chan's formula), so rstd keeps fp32 accuracy. E[x²] - E[x]² would lose every digit
    (1e8 + 1 - 1e8 in fp32)."""
    for rows, n in ((4, 4096), (3, 33), (2, 32768), (64, 1031)):
        x = _randn((rows, n), torch.float32, 5, 1.0, 1e4)
        y, mean, rstd = _norm_forward("layer_norm", x.to(GPU), None, None, 1e-5)
        x64 = x.double()
        mean64 = x64.mean(-1)
        rstd64 = (x64.var(-1, correction=0) + 1e-5).rsqrt()
        torch.testing.assert_close(mean.cpu().double(), mean64, rtol=1e-6, atol=0)
        torch.testing.assert_close(rstd.cpu().double(), rstd64, rtol=1e-5, atol=0)
        # x̂ = (x - μ) r: the inputs are known to 1e-3 (fp32 at 1e4), so the output to a few thousandths.
        torch.testing.assert_close(y.cpu().double(), (x64 - mean64[:, None]) * rstd64[:, None], rtol=0, atol=5e-3)


# normalize (p = 2): the row kernel along the last dim, the column kernel along the others; rows of zeros
# (the norm below eps: dx = dy / eps).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paths_normalize(dtype):
    cases = [((3, n), -1) for n in (1, 7, 33, 1000, 1031, 8192, 50257, 65537)]
    cases += [((8, 1000, 64), 1), ((5, 300, 7), 1), ((2, 4096, 512), 1), ((64, 7), 0), ((1, 20000, 8), 1)]
    for shape, dim in cases:
        x = _randn(shape, dtype, 1)
        if len(shape) == 2 and dim == -1:
            x[0] = 0  # a zero row: clamped by eps
        dy = _randn(shape, dtype, 2)
        eps = 1e-12
        y_c, norm_c = VJP.normalize(x, dim, eps)
        y_g, norm_g = VJP.normalize(x.to(GPU), dim, eps)
        torch.testing.assert_close(_cpu(y_g), y_c, **TOL[dtype])
        torch.testing.assert_close(_cpu(norm_g), norm_c, **TOL[torch.float64 if dtype == torch.float64 else torch.float32])
        dx_c = VJP.normalize_backward(dy, y_c, norm_c, dim, eps)
        dx_g = VJP.normalize_backward(dy.to(GPU), y_c.to(GPU), norm_c.to(GPU), dim, eps)
        torch.testing.assert_close(_cpu(dx_g), dx_c, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paths_normalize_denormal_eps(dtype):
    """eps below the smallest normal float (the kernels' reciprocal flushes such a value to 0): rows of zeros
    still give 0 and dx = 0 for dy = 0, as torch's F.normalize, not NaN."""
    x = _randn((4, 1000), dtype, 1)
    x[1] = 0
    for dim in (-1, 0):
        y, norm = VJP.normalize(x.to(GPU), dim, 1e-40)
        want = torch.nn.functional.normalize(x.double(), dim=dim, eps=1e-40).to(dtype)
        torch.testing.assert_close(_cpu(y), want, **TOL[dtype])
        dx = VJP.normalize_backward(torch.zeros_like(y), y, norm, dim, 1e-40)
        assert not _cpu(dx).isnan().any()


# swiglu and geglu (tanh and exact): element counts around the 16-byte pack and a warp's run of packs, every
# input at every offset from the outputs' alignment (gate, up and dy views k, 7 - k and 3 elements in).
GATED = [("swiglu", ()), ("geglu", ("tanh",)), ("geglu", ("none",))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,extra", GATED, ids=["swiglu", "geglu-tanh", "geglu-none"])
def test_paths_gated_alignment(name, extra, dtype):
    forward, backward = getattr(VJP, name), getattr(VJP, name + "_backward")
    for numel in (1, 7, 8, 9, 1000, 4099, 65537):
        for k in range(8):
            gate = _randn(numel + k, dtype, 1, 2.0).to(GPU)[k:]
            up = _randn(numel + 7 - k, dtype, 2).to(GPU)[7 - k:]
            dy = _randn(numel + 3, dtype, 3).to(GPU)[3:]
            y = forward(gate, up, *extra)
            da, db = backward(dy, gate, up, *extra)
            torch.testing.assert_close(_cpu(y), forward(_cpu(gate), _cpu(up), *extra), **TOL[dtype])
            want_da, want_db = backward(_cpu(dy), _cpu(gate), _cpu(up), *extra)
            torch.testing.assert_close(_cpu(da), want_da, **TOL[dtype])
            torch.testing.assert_close(_cpu(db), want_db, **TOL[dtype])


def test_paths_gated_shapes():
    """A 3-D tensor (the kernels see one flat run) against float64 torch."""
    gate = _randn((4, 33, 257), torch.float32, 1, 2.0).to(GPU)
    up = _randn((4, 33, 257), torch.float32, 2).to(GPU)
    dy = _randn((4, 33, 257), torch.float32, 3).to(GPU)
    g64, u64 = gate.double().cpu().requires_grad_(), up.double().cpu().requires_grad_()
    y64 = torch.nn.functional.silu(g64) * u64
    da64, db64 = torch.autograd.grad(y64, (g64, u64), dy.double().cpu())
    torch.testing.assert_close(VJP.swiglu(gate, up).cpu().double(), y64.detach(), rtol=2e-6, atol=1e-6)
    da, db = VJP.swiglu_backward(dy, gate, up)
    torch.testing.assert_close(da.cpu().double(), da64, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(db.cpu().double(), db64, rtol=2e-6, atol=1e-6)


# cross_entropy: vocabularies around the paths (1 class; 31, 33: several rows a warp; 1024, 8192: a warp,
# a block; 32768; GPT-2's 50257: odd, rows at every alignment; Llama-3's 128256), every reduction, ignore_index,
# label smoothing. Three rows of the long vocabularies are split across blocks, on sm_90 too (few rows: the
# plan splits rather than cluster); test_paths_special_values reaches the cluster path with enough rows.
CE_VOCABS = [1, 31, 33, 1024, 8192, 32768, 50257, 128256]


def _ce_targets(rows, classes, seed, ignore_index=-100, ignored=()):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, classes, (rows,), generator=g)
    for r in ignored:
        t[r] = ignore_index
    return t


def _ce_both(x, target, ignore_index, reduction, smoothing, seed):
    """Loss, (row_max, log_sum) and dlogits from the CUDA and the CPU backends (the same registered ops)."""
    out = []
    for device in (GPU, "cpu"):
        xd, td = x.to(device), target.to(device)
        loss, row_max, log_sum = VJP.cross_entropy(xd, td, ignore_index, reduction, smoothing)
        dy = _randn(loss.shape, torch.float32, seed).to(device=device, dtype=loss.dtype)
        dx = VJP.cross_entropy_backward(dy, xd, td, row_max, log_sum, ignore_index, reduction, smoothing)
        out.append((_cpu(loss), (_cpu(row_max), _cpu(log_sum)), _cpu(dx)))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paths_cross_entropy_vocabularies(dtype):
    for classes in CE_VOCABS:
        rows = 3 if classes > 10000 else 37
        x = _randn((rows, classes), dtype, classes, 3.0)
        for reduction, smoothing, ignored in (("mean", 0.0, ()), ("none", 0.1, (1,)), ("sum", 0.0, (0, 2))):
            target = _ce_targets(rows, classes, 1, ignored=ignored)
            (loss, stats, dx), (loss_c, stats_c, dx_c) = _ce_both(x, target, -100, reduction, smoothing, 2)
            stat = TOL[torch.float64 if dtype == torch.float64 else torch.float32]
            torch.testing.assert_close(stats[0], stats_c[0], rtol=0, atol=0)  # the max: exact
            torch.testing.assert_close(stats[1], stats_c[1], **stat)
            torch.testing.assert_close(loss, loss_c, **TOL[dtype])
            torch.testing.assert_close(dx, dx_c, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paths_cross_entropy_matches_torch(dtype):
    """Against torch.nn.functional.cross_entropy in float64, every reduction, ignore_index (a custom one too),
    label smoothing; a 'mean' over only ignored rows is NaN, as in torch."""
    rows, classes = 64, 50257
    x = _randn((rows, classes), dtype, 3, 4.0)
    x64 = x.double().requires_grad_()
    for ignore_index in (-100, 7):
        target = _ce_targets(rows, classes, 4, ignore_index, ignored=(3, 10, 11))
        for reduction in ("mean", "sum", "none"):
            for smoothing in (0.0, 0.25):
                want = torch.nn.functional.cross_entropy(x64, target, ignore_index=ignore_index, reduction=reduction,
                                                         label_smoothing=smoothing)
                dy = _randn(want.shape, torch.float64, 5)
                (dx64,) = torch.autograd.grad(want, x64, dy)
                loss, row_max, log_sum = VJP.cross_entropy(x.to(GPU), target.to(GPU), ignore_index, reduction, smoothing)
                dx = VJP.cross_entropy_backward(dy.to(GPU, loss.dtype), x.to(GPU), target.to(GPU), row_max, log_sum,
                                                ignore_index, reduction, smoothing)
                torch.testing.assert_close(loss.cpu().double(), want.detach(), **TOL[dtype])
                torch.testing.assert_close(dx.cpu().double(), dx64, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] / 64)
    all_ignored = torch.full((rows,), -100)
    loss, _, _ = VJP.cross_entropy(x.to(GPU), all_ignored.to(GPU), -100, "mean", 0.0)
    assert torch.isnan(loss).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paths_cross_entropy_misaligned(dtype):
    """Logits whose rows start off a 16-byte boundary (a view one element in; vocabulary 50257 and 33) and a
    1-D input (one unbatched row, a 0-d target)."""
    for rows, classes in ((5, 50257), (9, 33), (3, 8192)):
        x = _randn(rows * classes + 1, dtype, 6, 3.0).to(GPU)[1:].view(rows, classes)
        target = _ce_targets(rows, classes, 7, ignored=(1,))
        (loss, _, dx), (loss_c, _, dx_c) = _ce_both(x, target, -100, "none", 0.1, 8)
        torch.testing.assert_close(loss, loss_c, **TOL[dtype])
        torch.testing.assert_close(dx, dx_c, **TOL[dtype])
    x = _randn(1031, dtype, 9)
    loss, _, _ = VJP.cross_entropy(x.to(GPU), torch.tensor(5, device=GPU), -100, "mean", 0.0)
    want, _, _ = VJP.cross_entropy(x, torch.tensor(5), -100, "mean", 0.0)
    torch.testing.assert_close(loss.cpu(), want, **TOL[dtype])


def test_paths_cross_entropy_inf_logits():
    """-inf logits (masked vocabulary) give finite losses without smoothing, as in torch (0 · Σx must not
    make NaN), and +inf with it, as in torch."""
    x = _randn((4, 1000), torch.float32, 10)
    x[:, 500:] = float("-inf")
    target = torch.tensor([1, 2, 3, 4])
    for smoothing in (0.0, 0.1):
        want = torch.nn.functional.cross_entropy(x.double(), target, reduction="none", label_smoothing=smoothing)
        loss, _, _ = VJP.cross_entropy(x.to(GPU), target.to(GPU), -100, "none", smoothing)
        torch.testing.assert_close(loss.cpu().double(), want, rtol=2e-5, atol=2e-6, equal_nan=True)


@pytest.mark.parametrize("op", ["forward", "backward"])
def test_cross_entropy_out_of_range_target_asserts(op):
    """A target outside [0, C) that is not ignore_index: a device-side assert (the documented CUDA behaviour,
    as torch's), never a silent loss. Run in a subprocess: the assert leaves the CUDA context unusable."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import torch, torch_vjp
        x = torch.randn(4, 1000, device="cuda")
        t = torch.tensor([1, 2, 1000, 3], device="cuda")
        if "{op}" == "forward":
            loss, row_max, log_sum = torch.ops.torch_vjp.cross_entropy(x, t, -100, "mean", 0.0)
        else:
            row_max = x.amax(-1)
            log_sum = torch.logsumexp(x - row_max[:, None], -1)
            dx = torch.ops.torch_vjp.cross_entropy_backward(torch.ones((), device="cuda"), x, t, row_max, log_sum, -100,
                                                            "mean", 0.0)
        torch.cuda.synchronize()
        print("NO ERROR")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "CUDA_LAUNCH_BLOCKING": "1"})
    assert "NO ERROR" not in result.stdout
    assert result.returncode != 0 and "device-side assert" in result.stderr, result.stderr[-2000:]


def test_paths_fused_linear_cross_entropy():
    _check_fused_linear_cross_entropy(5003)


def test_fused_linear_cross_entropy_chunks():
    """Vocabulary 128256 in fp32 takes chunks of 224 rows (kChunkBytes: 112 MiB): 600 rows are 3."""
    _check_fused_linear_cross_entropy(128256)


def _check_fused_linear_cross_entropy(vocab):
    """The fused loss on CUDA (chunks of logits, dlogits written over them in place) against float64 torch:
    loss, and the gradients of input, weight and bias, for every reduction."""
    rows, hidden = (300, 64) if vocab < 10000 else (600, 32)
    x = _randn((rows, hidden), torch.float32, 11)
    w = _randn((vocab, hidden), torch.float32, 12, 0.1)
    b = _randn(vocab, torch.float32, 13, 0.1)
    target = _ce_targets(rows, vocab, 14, ignored=(5,))
    for reduction in ("mean", "sum", "none"):
        x64, w64, b64 = (t.to(GPU, torch.float64).requires_grad_() for t in (x, w, b))
        want = torch.nn.functional.cross_entropy(x64 @ w64.T + b64, target.to(GPU), reduction=reduction,
                                                 label_smoothing=0.1)
        dy = torch.ones_like(want) if reduction != "none" else _randn(rows, torch.float64, 15).to(GPU)
        grads64 = torch.autograd.grad(want, (x64, w64, b64), dy)
        loss, gx, gw, gb = VJP.fused_linear_cross_entropy(x.to(GPU), w.to(GPU), target.to(GPU), b.to(GPU), -100,
                                                          reduction, 0.1, True)
        torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
        got = VJP.fused_linear_cross_entropy_backward(dy.float().to(GPU), x.to(GPU), w.to(GPU), target.to(GPU), b.to(GPU),
                                                      -100, reduction, 0.1)
        for g, g64 in zip(got, grads64):
            torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5)
        if reduction != "none":
            for g, g64 in zip((gx, gw, gb), grads64):
                torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5)


def test_fused_linear_cross_entropy_bf16_vocab_50000():
    rows, hidden, vocab = 512, 256, 50000
    x = _randn((rows, hidden), torch.bfloat16, 16).to(GPU)
    w = _randn((vocab, hidden), torch.bfloat16, 17, 0.05).to(GPU)
    target = _ce_targets(rows, vocab, 18, ignored=(0, 1)).to(GPU)
    loss, gx, gw, _ = VJP.fused_linear_cross_entropy(x, w, target, None, -100, "mean", 0.0, True)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    want = torch.nn.functional.cross_entropy(x64 @ w64.T, target)
    gx64, gw64 = torch.autograd.grad(want, (x64, w64))
    torch.testing.assert_close(loss.double(), want.detach(), rtol=2e-2, atol=2e-2)
    # bf16 logits and products: compare against the gradients' scale.
    for g, g64 in ((gx, gx64), (gw, gw64)):
        assert float((g.double() - g64).abs().max()) <= 2e-2 * float(g64.abs().max())


def test_fused_linear_cross_entropy_memory_target():
    """The memory target on the reference case: 8192 tokens × hidden 4096 × vocab 128256 in bf16, forward and
    backward. Beyond the inputs: grad_weight accumulated in float32 across the chunks (2,004 MiB) and then rounded
    to bf16 (1,002 MiB) while the float32 sums are still held, grad_input (64 MiB), one chunk of logits
    (kChunkBytes, 112 MiB), and 64 MiB for per-row values and cuBLAS: 3,246 MiB (1,200 MiB before grad_weight was
    accumulated in float32). Never the 2 GiB of logits. Needs ~10 GiB free."""
    free, _ = torch.cuda.mem_get_info()
    if free < 10 * 2**30:
        pytest.skip(f"needs ~10 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    g = torch.Generator(device=GPU).manual_seed(0)
    x = torch.randn(8192, 4096, generator=g, device=GPU, dtype=torch.bfloat16)
    w = torch.randn(128256, 4096, generator=g, device=GPU, dtype=torch.bfloat16).mul_(0.02)
    target = torch.randint(0, 128256, (8192,), generator=g, device=GPU)
    VJP.fused_linear_cross_entropy(x[:64], w, target[:64], None, -100, "mean", 0.0, True)  # cuBLAS workspaces
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = VJP.fused_linear_cross_entropy(x, w, target, None, -100, "mean", 0.0, True)
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - before) / 2**20
    del out
    mib = 2**20
    bound = (w.numel() * 4 + w.numel() * 2 + x.numel() * 2 + (112 << 20) + (64 << 20)) / mib
    assert extra <= bound, f"{extra:.0f} MiB beyond the inputs (bound {bound:.0f} MiB)"


def test_public_api_matches_registered_ops():
    """Where the Python layer has these ops (written in parallel with the kernels), it agrees with the
    registered ops on CUDA."""
    import torch_vjp

    checked = 0
    x = _randn((33, 1031), torch.float32, 20).to(GPU)
    w, b = _randn(1031, torch.float32, 21).to(GPU), _randn(1031, torch.float32, 22).to(GPU)
    if hasattr(torch_vjp, "layer_norm"):
        torch.testing.assert_close(torch_vjp.layer_norm(x, (1031,), w, b, 1e-5), VJP.layer_norm(x, [1031], w, b, 1e-5)[0])
        checked += 1
    if hasattr(torch_vjp, "rms_norm"):
        torch.testing.assert_close(torch_vjp.rms_norm(x, (1031,), w, 1e-5), VJP.rms_norm(x, [1031], w, 1e-5)[0])
        checked += 1
    if hasattr(torch_vjp, "swiglu"):
        torch.testing.assert_close(torch_vjp.swiglu(x, x.flip(0)), VJP.swiglu(x, x.flip(0)))
        checked += 1
    if hasattr(torch_vjp, "cross_entropy"):
        t = _ce_targets(33, 1031, 23).to(GPU)
        torch.testing.assert_close(torch_vjp.cross_entropy(x, t), VJP.cross_entropy(x, t, -100, "mean", 0.0)[0])
        checked += 1
    if not checked:
        pytest.skip("the public API has none of these ops yet")
