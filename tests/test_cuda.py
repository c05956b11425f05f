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
import collections
import os
import subprocess
import sys
import textwrap
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
    """Any op's output and every gradient, on the CPU: x as given (a view keeps its offset and strides), the
    op's other tensors drawn for x's shape on x's device (the same values on either device)."""
    call = info.call(x.detach(), **kwargs).cast(requires_grad=True)
    y = call.op(*call.primals)
    if dy is None:
        dy = sample(info, y.shape, y.dtype, "cpu", generator_seed=7).to(y.device)
    return y.cpu(), [g.cpu() for g in torch.autograd.grad(y, call.primals, dy)]


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
    y_gpu, grads_gpu = forward_backward(info, x if x.is_cuda else x.cuda(), kwargs,
                                        None if dy is None else (dy if dy.is_cuda else dy.cuda()))
    y_cpu, grads_cpu = forward_backward(info, x.cpu(), kwargs, None if dy is None else dy.cpu())
    torch.testing.assert_close(y_gpu, y_cpu, equal_nan=True, **TOL[x.dtype])
    torch.testing.assert_close(grads_gpu, grads_cpu, equal_nan=True, **TOL[x.dtype])


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
#   32768                     fp32 backward: 2 × 128 KB, past one block
#   50257                     GPT-2's vocabulary (log_softmax): odd, misaligned row starts
#   65537                     past one block in every dtype
# Three rows each, so that row starts take three different alignments when n is odd. Three rows past one block
# are split across blocks, on sm_90 too (plan_rows splits few long rows rather than cluster them): the cluster
# path needs many rows, test_paths_special_values and test_cluster_rows_match_float64 reach it (and assert it).
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
        y_shape = forward_backward(info, x, kwargs)[0].shape
        dy = sample(info, (y_shape.numel() + 1,), dtype, generator_seed=3).cuda()[1:].view(y_shape)
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
                    y, grads = forward_backward(info, inputs[k], info.call_kwargs(dim=dim))
                    torch.testing.assert_close(y, expected[k][0], rtol=0, atol=0)
                    torch.testing.assert_close(grads, expected[k][1], rtol=0, atol=0)
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
#   4104, 8192, 12289       8192 bf16 backward: past a 256-thread block of 2 packs; 12289: odd, long
#   16384, 32768, 65536     past one block in every dtype (65536: past the backward's largest cluster too)
#   50257, 128256           vocabulary lengths: odd and long (unfused sums)
# Three rows each (row starts at three alignments when n is odd). Three rows past one block are split across
# blocks, on sm_90 too (few rows: plan_rows splits them rather than cluster them); NORM_ROW_COUNTS and
# test_paths_special_values reach the sm_90 clusters with enough rows.
NORM_LENGTHS = [1, 2, 7, 8, 31, 33, 64, 255, 256, 1000, 1024, 1031, 2048, 4096, 4104, 8192, 12289, 16384, 32768, 50257,
                65536, 128256]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", NORM_KINDS)
def test_paths_norm_row_lengths(kind, dtype):
    for n in NORM_LENGTHS:
        assert_norm_matches_cpu(kind, 3, n, dtype)


# Row counts against row lengths: enough rows that the backward's grid is one wave of row slots, each mapping
# many rows (2048 × 1024, 600 × 4096 and 96 × 8192: block slots; 70000 × 8: 32 rows a 256-thread block, groups
# summed through shared memory; 40 × 32768: 4-block sm_90 clusters for bf16, 8 for float32), and odd
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


# add_layer_norm / add_rms_norm (issue 15): one kernel reads input and residual, writes s = input + residual
# (rounded to the dtype, as torch's add) and y = norm(s) (AddNormForward); the backward adds grad_sum to dx as it
# writes it (AddNormBackward). Against float64 torch from the same rounded s: y and the statistics within the
# dtype's tolerance, s bitwise equal to torch's add on the GPU, d_input = d_residual (one tensor) with and
# without grad_sum, dweight and dbias within the fp32 summation bound (_check_param_grads). Their special values
# (±inf, NaN, constant and one-element rows) at every row path against torch's own CUDA add and norm: the
# exactness section's test_paths_special_values and test_paths_one_element_rows (ENGINE_OPS).
ADD_NORM_KINDS = ["add_layer_norm", "add_rms_norm"]


def _add_norm_forward(kind, inp, res, weight, bias, eps=1e-5):
    shape = [inp.shape[-1]]
    if kind == "add_layer_norm":
        return tuple(VJP.add_layer_norm(inp, res, shape, weight, bias, eps))
    y, s, rstd = VJP.add_rms_norm(inp, res, shape, weight, eps, 0.0, "torch")
    return y, s, None, rstd


def _add_norm_backward(kind, dy, grad_sum, s, mean, rstd, weight, bias, mask):
    shape = [s.shape[-1]]
    if kind == "add_layer_norm":
        return tuple(VJP.add_layer_norm_backward(dy, grad_sum, s, mean, rstd, weight, bias, shape, list(mask)))
    dx, dw = VJP.add_rms_norm_backward(dy, grad_sum, s, rstd, weight, shape, list(mask[:2]), 0.0)
    return dx, dw, None


def _add_norm_reference(kind, s, weight, bias, dy, grad_sum, eps=1e-5):
    """float64 torch from the rounded s: y, mean, rstd, d_input (= d_residual), dweight, dbias."""
    n = s.shape[-1]
    s64 = _cpu(s).double().requires_grad_()
    w64 = None if weight is None else _cpu(weight).double().requires_grad_()
    b64 = None if bias is None else _cpu(bias).double().requires_grad_()
    F = torch.nn.functional
    if kind == "add_layer_norm":
        y64 = F.layer_norm(s64, (n,), w64, b64, eps)
        mean64 = s64.detach().mean(-1)
        var64 = s64.detach().var(-1, unbiased=False)
    else:
        y64 = F.rms_norm(s64, (n,), w64, eps)
        mean64, var64 = None, s64.detach().pow(2).mean(-1)
    inputs = [t for t in (s64, w64, b64) if t is not None]
    grads = list(torch.autograd.grad(y64, inputs, _cpu(dy).double()))
    d_s = grads.pop(0)
    if grad_sum is not None:
        d_s = d_s + _cpu(grad_sum).double()
    d_w = grads.pop(0) if w64 is not None else None
    d_b = grads.pop(0) if b64 is not None else None
    return y64.detach(), mean64, (var64 + eps).rsqrt(), d_s, d_w, d_b


def _view(rows, n, dtype, seed, offset, scale=1.0, shift=0.0):
    """A (rows, n) CUDA view `offset` elements into its storage (offset 0: 16-byte aligned)."""
    return _randn(rows * n + offset, dtype, seed, scale, shift).to(GPU)[offset:].view(rows, n)


def assert_add_norm_matches_reference(kind, rows, n, dtype, offsets=(0, 0, 0, 0), params="both",
                                      mask=(True, True, True), grad_sum=True, seed=0):
    """offsets: input's, residual's, dy's and grad_sum's (elements off a 16-byte boundary)."""
    inp = _view(rows, n, dtype, seed, offsets[0])
    res = _view(rows, n, dtype, seed + 10, offsets[1], 2.0, 0.5)  # s ≠ either, and carries an offset
    dy = _view(rows, n, dtype, seed + 3, offsets[2])
    gs = _view(rows, n, dtype, seed + 4, offsets[3]) if grad_sum else None
    norm = kind[len("add_"):]
    _, weight, bias, _ = _norm_inputs(norm, 1, n, dtype, params, seed=seed)
    weight, bias = _gpu(weight), _gpu(bias)
    y, s, mean, rstd = _add_norm_forward(kind, inp, res, weight, bias)
    assert y.shape == s.shape == inp.shape and y.dtype == s.dtype == dtype
    assert torch.equal(s, inp + res), "s is not torch's add rounded to the dtype"
    y64, mean64, rstd64, ds64, dw64, db64 = _add_norm_reference(kind, s, weight, bias, dy, gs)
    stat_tol = TOL[torch.float64 if dtype == torch.float64 else torch.float32]
    torch.testing.assert_close(_cpu(y).double(), y64, **TOL[dtype])
    torch.testing.assert_close(_cpu(rstd).double(), rstd64, **stat_tol)
    if mean is not None:
        torch.testing.assert_close(_cpu(mean).double(), mean64, **stat_tol)
    got = _add_norm_backward(kind, dy, gs, s, mean, rstd, weight, bias, mask)
    if mask[0]:
        assert got[0].dtype == dtype
        torch.testing.assert_close(_cpu(got[0]).double(), ds64, **TOL[dtype])
        # Against the norm's own backward plus grad_sum: the fused sum is rounded once, the unfused one twice, and
        # the two kernels' plans (their block bounds differ) may add the row sums in another order: within two
        # ulps of the terms' magnitudes, plus the dtype's atol.
        plain = _norm_backward(norm, dy, s, mean, rstd, weight, bias, mask)[0].double()
        addend = gs.double() if gs is not None else torch.zeros_like(plain)
        err = (got[0].double() - (plain + addend)).abs()
        bound = 2 * torch.finfo(dtype).eps * (plain.abs() + addend.abs()) + TOL[dtype]["atol"]
        assert (err <= bound).all(), f"max excess {float((err - bound).max())}"
    else:
        assert got[0] is None
    _check_param_grads(norm, got[1] if mask[1] else None, got[2] if mask[2] else None, _cpu(dy), _cpu(s),
                       _cpu(mean), _cpu(rstd), _cpu(weight), _cpu(bias))
    return got


# Every row length that changes the path (NORM_LENGTHS), three rows each, every dtype; and at each row path the
# plan reports for the add ops' own kernels (their block bounds differ from the norms': AddNormForward holds two
# loads, 4 packs a thread), found and asserted by shape_for.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ADD_NORM_KINDS)
def test_paths_add_norm_row_lengths(kind, dtype):
    for n in NORM_LENGTHS:
        assert_add_norm_matches_reference(kind, 3, n, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["rows_per_warp", "warp", "block", "cluster", "split"])  # ROW_PATHS, below
@pytest.mark.parametrize("op", [f"{k}{d}" for k in ADD_NORM_KINDS for d in ("", "_backward")])
def test_paths_add_norm_every_row_path(op, path, dtype):
    shape = shape_for(op, path, dtype)
    assert_add_norm_matches_reference(op.replace("_backward", ""), *shape, dtype)


@pytest.mark.parametrize("shape", NORM_ROW_COUNTS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ADD_NORM_KINDS)
def test_paths_add_norm_row_counts(kind, dtype, shape):
    assert_add_norm_matches_reference(kind, *shape, dtype)


# Every operand off the grid's alignment by itself (the grid is y's, a fresh tensor): input, residual, dy and
# grad_sum at offsets 1 and 3 in turn and together; odd n (rows at every offset, the unfused sums); no grad_sum
# (the norm's own backward); parameters none, weight, both; every output mask.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ADD_NORM_KINDS)
def test_paths_add_norm_misaligned_and_masks(kind, dtype):
    for offsets in ((1, 0, 0, 0), (0, 3, 0, 0), (0, 0, 1, 0), (0, 0, 0, 3), (1, 3, 3, 1), (3, 1, 0, 3)):
        for rows, n in ((6, 1024), (9, 33), (4, 8192), (2, 1031), (5, 7)):
            assert_add_norm_matches_reference(kind, rows, n, dtype, offsets)
    for params in ("none", "weight", "both"):
        for grad_sum in (True, False):
            for mask in ((True, True, True), (True, False, False), (False, True, True), (True, True, False)):
                for n in (64, 1031, 8192):
                    assert_add_norm_matches_reference(kind, 33, n, dtype, (0, 1, 0, 0), params, mask, grad_sum)


def test_add_norm_autograd_matches_cpu():
    """The public functions through autograd (both outputs used, so grad_sum reaches the backward): values and the
    gradients of input, residual, weight and bias on the GPU against the CPU kernels."""
    import torch_vjp

    for kind, dtype, rows, n in (("add_rms_norm", torch.bfloat16, 64, 4096), ("add_layer_norm", torch.float32, 33, 1031),
                                 ("add_rms_norm", torch.float16, 8, 65536), ("add_layer_norm", torch.bfloat16, 70000, 8)):
        tensors = [_randn((rows, n), dtype, 20), _randn((rows, n), dtype, 21), _randn(n, dtype, 22, 0.5, 1.0),
                   _randn(n, dtype, 23, 0.5)]
        if kind == "add_rms_norm":
            tensors.pop()
        dy, ds = _randn((rows, n), dtype, 24), _randn((rows, n), dtype, 25)
        results = []
        for device in ("cpu", GPU):
            leaves = [t.to(device).requires_grad_() for t in tensors]
            y, s = getattr(torch_vjp, kind)(leaves[0], leaves[1], [n], *leaves[2:])
            grads = torch.autograd.grad((y, s), leaves, (dy.to(device), ds.to(device)))
            results.append([_cpu(t) for t in (y, s, *grads)])
        for got, want in zip(results[1], results[0]):
            torch.testing.assert_close(got, want, **TOL[dtype])
        assert torch.equal(results[1][2], results[1][3]), "d_input and d_residual differ"


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


def _every_value(dtype):
    """Every finite value of a 16-bit dtype (bit patterns 0..65535)."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    return x[torch.isfinite(x)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_paths_half_type_exact_gelu_accuracy(dtype):
    """Exact GELU and GeGLU in the half types (MUFU.EX2 and MUFU.RCP: csrc/math/gelu_fast.h), forward and
    backward, for every finite bf16 and fp16 input, against float64 (erfc-based, accurate in the lower tail):
    within one ulp of the dtype, as the host emulation (benchmarks/gelu_accuracy.py) predicts (at most 0.7)."""
    import math

    import torch_vjp

    x = _every_value(dtype)
    x64 = x.double()
    cdf = 0.5 * torch.special.erfc(-x64 / math.sqrt(2))
    want_f, want_df = x64 * cdf, cdf + x64 * torch.exp(-0.5 * x64 * x64) / math.sqrt(2 * math.pi)

    def ulps(got, ref):
        """Largest |got - ref| in ulps of dtype at ref."""
        rounded = ref.to(dtype)
        ulp = (torch.nextafter(rounded.abs(), torch.tensor(math.inf, dtype=dtype)) - rounded.abs()).double()
        return ((got.cpu().double() - ref).abs() / ulp).nan_to_num(0.0).max().item()

    xg = x.to(GPU).requires_grad_()
    y = torch_vjp.gelu(xg, approximate="none")
    (dx,) = torch.autograd.grad(y, xg, torch.ones_like(y))
    up = torch.ones_like(xg, requires_grad=True)
    z = torch_vjp.geglu(xg, up, approximate="none")
    da, db = torch.autograd.grad(z, (xg, up), torch.ones_like(z))
    for name, got, ref in (("gelu", y, want_f), ("gelu'", dx, want_df), ("geglu", z, want_f), ("geglu da", da, want_df),
                           ("geglu db", db, want_f)):
        err = ulps(got.detach(), ref)
        assert err <= 1.0, f"{name} {dtype}: {err:.3g} ulps"


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
        loss, row_max, log_sum = VJP.cross_entropy(xd, td, None, ignore_index, reduction, smoothing)
        dy = _randn(loss.shape, torch.float32, seed).to(device=device, dtype=loss.dtype)
        dx = VJP.cross_entropy_backward(dy, xd, td, None, row_max, log_sum, ignore_index, reduction, smoothing)
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
                loss, row_max, log_sum = VJP.cross_entropy(x.to(GPU), target.to(GPU), None, ignore_index, reduction, smoothing)
                dx = VJP.cross_entropy_backward(dy.to(GPU, loss.dtype), x.to(GPU), target.to(GPU), None, row_max, log_sum,
                                                ignore_index, reduction, smoothing)
                torch.testing.assert_close(loss.cpu().double(), want.detach(), **TOL[dtype])
                torch.testing.assert_close(dx.cpu().double(), dx64, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] / 64)
    all_ignored = torch.full((rows,), -100)
    loss, _, _ = VJP.cross_entropy(x.to(GPU), all_ignored.to(GPU), None, -100, "mean", 0.0)
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
    loss, _, _ = VJP.cross_entropy(x.to(GPU), torch.tensor(5, device=GPU), None, -100, "mean", 0.0)
    want, _, _ = VJP.cross_entropy(x, torch.tensor(5), None, -100, "mean", 0.0)
    torch.testing.assert_close(loss.cpu(), want, **TOL[dtype])


def test_paths_cross_entropy_inf_logits():
    """-inf logits (masked vocabulary) give finite losses without smoothing, as in torch (0 · Σx must not
    make NaN), and +inf with it, as in torch."""
    x = _randn((4, 1000), torch.float32, 10)
    x[:, 500:] = float("-inf")
    target = torch.tensor([1, 2, 3, 4])
    for smoothing in (0.0, 0.1):
        want = torch.nn.functional.cross_entropy(x.double(), target, reduction="none", label_smoothing=smoothing)
        loss, _, _ = VJP.cross_entropy(x.to(GPU), target.to(GPU), None, -100, "none", smoothing)
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
            loss, row_max, log_sum = torch.ops.torch_vjp.cross_entropy(x, t, None, -100, "mean", 0.0)
        else:
            row_max = x.amax(-1)
            log_sum = torch.logsumexp(x - row_max[:, None], -1)
            dx = torch.ops.torch_vjp.cross_entropy_backward(torch.ones((), device="cuda"), x, t, None, row_max, log_sum,
                                                            -100, "mean", 0.0)
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
        loss, gx, gw, gb = VJP.fused_linear_cross_entropy(x.to(GPU), w.to(GPU), target.to(GPU), b.to(GPU), None, -100,
                                                          reduction, 0.1, True)
        torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
        got = VJP.fused_linear_cross_entropy_backward(dy.float().to(GPU), x.to(GPU), w.to(GPU), target.to(GPU), b.to(GPU), None,
                                                      -100, reduction, 0.1)
        for g, g64 in zip(got, grads64):
            torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5)
        if reduction != "none":
            for g, g64 in zip((gx, gw, gb), grads64):
                torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paths_fused_cross_entropy_kernel_matches_the_two_kernels(dtype):
    """The fused loss's one-read kernel (loss, statistics and dlogits in place: CrossEntropyForwardGrad) gives
    the bits of cross_entropy's forward kernel followed by its gradient kernel, on every path (rows per warp,
    warp, block, cluster or split): the same plan, the same merges. Smoothing too, where the row fits a block of
    512 threads or a cluster (elsewhere its plan splits the row and may merge in another order)."""
    rows, hidden = 24, 32
    for vocab in (100, 1000, 5003, 50257, 128256):
        x = _randn((rows, hidden), dtype, 30).to(GPU)
        w = _randn((vocab, hidden), dtype, 31, 0.5).to(GPU)
        target = _ce_targets(rows, vocab, 32, ignored=(3,)).to(GPU)
        logits = torch.mm(x, w.t())  # the fused op's chunk (one chunk: rows x vocab fits kChunkBytes)
        short = vocab * logits.element_size() <= 512 * 64  # a row of at most 512 threads' packs
        for smoothing in (0.0, 0.1) if short or torch.cuda.get_device_capability()[0] >= 9 else (0.0,):
            loss, row_max, log_sum = VJP.cross_entropy(logits, target, None, -100, "none", smoothing)
            dlogits = VJP.cross_entropy_backward(torch.ones(rows, device=GPU, dtype=loss.dtype), logits, target, None,
                                                 row_max, log_sum, -100, "none", smoothing)
            fused, gx, _, _ = VJP.fused_linear_cross_entropy(x, w, target, None, None, -100, "none", smoothing, True)
            where = f"vocab {vocab}, smoothing {smoothing}"
            assert torch.equal(fused.to(dtype), loss), where
            assert torch.equal(gx, torch.mm(dlogits, w)), where


def test_fused_linear_cross_entropy_bf16_vocab_50000():
    rows, hidden, vocab = 512, 256, 50000
    x = _randn((rows, hidden), torch.bfloat16, 16).to(GPU)
    w = _randn((vocab, hidden), torch.bfloat16, 17, 0.05).to(GPU)
    target = _ce_targets(rows, vocab, 18, ignored=(0, 1)).to(GPU)
    loss, gx, gw, _ = VJP.fused_linear_cross_entropy(x, w, target, None, None, -100, "mean", 0.0, True)
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
    VJP.fused_linear_cross_entropy(x[:64], w, target[:64], None, None, -100, "mean", 0.0, True)  # cuBLAS workspaces
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = VJP.fused_linear_cross_entropy(x, w, target, None, None, -100, "mean", 0.0, True)
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
        torch.testing.assert_close(torch_vjp.cross_entropy(x, t), VJP.cross_entropy(x, t, None, -100, "mean", 0.0)[0])
        checked += 1
    if not checked:
        pytest.skip("the public API has none of these ops yet")


# =========================================================================================================
# Exactness (issue 14), on paths the plan is asked to confirm: special values at every kernel path of every
# row-engine op (issue 15's add-norms too) against torch's own CUDA results; cross-entropy's accuracy against
# float64 at confident logits; the fused loss's determinism (memory pressure) and CUDA-graph capture; the sm_80
# plans on a Hopper GPU (TORCH_VJP_DISABLE_CLUSTERS).

RowPlan = collections.namedtuple("RowPlan", "path threads cluster chunks packs")


def row_plan(op, outer, n, inner=1, dtype=torch.float32):
    """The plan the CUDA kernel of registered op `op` (e.g. "softmax", "layer_norm_backward") runs with over
    (outer, n, inner) elements reduced along n, on the current device (torch.ops.torch_vjp_cuda.row_plan, in
    CUDA builds): path "rows_per_warp", "warp", "block", "cluster", "split", "column", "column_cluster" or
    "column_split"; threads a block, blocks a cluster, chunks a row, packs a thread."""
    return RowPlan(*torch.ops.torch_vjp_cuda.row_plan(op, outer, n, inner, dtype))


def clusters_planned():
    """Whether plans may take sm_90 clusters here: an sm_90 GPU, and TORCH_VJP_DISABLE_CLUSTERS unset."""
    return torch.cuda.get_device_capability()[0] >= 9 and os.environ.get("TORCH_VJP_DISABLE_CLUSTERS", "") in ("", "0")


# Shapes tried for each path, the first that the plan confirms used (plans depend on the dtype, the op's block
# sizes and the number of SMs): (rows, n) along the last dim, (outer, n, inner) along dim 1. "cluster" needs
# many long rows (plan_rows splits whenever rows × cluster < SMs / 2); "split" a few long ones, on every GPU.
PATH_CANDIDATES = {
    "rows_per_warp": [(12, 7), (12, 3)],
    "warp": [(12, 100), (12, 60), (12, 400)],
    "block": [(12, 4000), (80, 2000), (80, 1000), (12, 12000)],
    "cluster": [(80, 65536), (80, 16384)],
    "split": [(12, 300007), (4, 300007)],
    "column": [(4, 40, 64), (64, 300, 64), (4, 300, 7)],
    "column_cluster": [(2, 4096, 512), (4, 8192, 64), (2, 16384, 64)],
    "column_split": [(1, 20000, 8), (1, 200000, 8)],
}
ROW_PATHS = ["rows_per_warp", "warp", "block", "cluster", "split"]
COLUMN_PATHS = ["column", "column_cluster", "column_split"]
# Each registered op of the row engine and its family (the special-value check runs the family's forward
# and backward at a shape where `op` takes the path); the rows-only families have no column kernel.
ENGINE_OPS = {"softmax": "softmax", "softmax_backward": "softmax", "log_softmax": "log_softmax",
              "log_softmax_backward": "log_softmax", "logsumexp": "logsumexp", "logsumexp_backward": "logsumexp",
              "layer_norm": "layer_norm", "layer_norm_backward": "layer_norm", "rms_norm": "rms_norm",
              "rms_norm_backward": "rms_norm", "normalize": "normalize", "normalize_backward": "normalize",
              "cross_entropy": "cross_entropy", "cross_entropy_backward": "cross_entropy",
              # issue 15's fused residual add and norm: x's specials shared out between input and residual
              # (add_norm_operands), s and its norm against torch's add and norm, the backward with grad_sum
              "add_layer_norm": "add_layer_norm", "add_layer_norm_backward": "add_layer_norm",
              "add_rms_norm": "add_rms_norm", "add_rms_norm_backward": "add_rms_norm"}
ROWS_ONLY = ("layer_norm", "rms_norm", "cross_entropy", "add_layer_norm", "add_rms_norm")


# Passes without a row reduction: the engine never plans a cluster for them (long rows are split into chunks
# that each only map), so they have no cluster path to reach.
NO_REDUCTION = ("logsumexp_backward", "cross_entropy_backward")


def shape_for(op, path, dtype):
    """A shape at which `op`'s kernel takes `path` here (asserted through the plan), or a skip for the cluster
    paths where there are none."""
    if "cluster" in path and not clusters_planned():
        pytest.skip("no sm_90 clusters here (or TORCH_VJP_DISABLE_CLUSTERS is set)")
    if "cluster" in path and op in NO_REDUCTION:
        pytest.skip(f"{op} reduces nothing along the row: planned without clusters")
    tried = []
    for shape in PATH_CANDIDATES[path]:
        plan = row_plan(op, *(shape if len(shape) == 3 else (*shape, 1)), dtype=dtype)
        if plan.path == path:
            return shape
        tried.append((shape, plan.path))
    pytest.fail(f"no candidate shape reaches the {path} path of {op} in {dtype}: {tried}")


def special_rows(rows, n, dtype, family, seed=0):
    """(rows, n) values, float64 draws rounded to dtype, with one special value a row at a position that moves
    from row to row (so across a row's threads, blocks and chunks): +inf (row 1), -inf (2), NaN (3), a constant
    row of 0.3 (4; not a binary fraction, so Σx / n would be off), -inf only (5, softmax family and
    cross-entropy; else a constant row of 1e4 + 0.1), an offset of 1000 (6, softmax family and cross-entropy:
    a norm's output there is as uncertain as the input's rounding, ulp(1000) · r), +inf and -inf together
    (7); the rest, and rows 0 and 8 on, plain draws."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64) * 2.0

    def pos(r):
        return (r * 7919 + n // 3) % n

    specials = {1: float("inf"), 2: float("-inf"), 3: float("nan")}
    for r, v in specials.items():
        if r < rows:
            x[r, pos(r)] = v
    if rows > 4:
        x[4] = 0.3
    if rows > 5:
        x[5] = float("-inf") if family in ("softmax", "log_softmax", "logsumexp", "cross_entropy") else 1e4 + 0.1
    if rows > 6 and family in ("softmax", "log_softmax", "logsumexp", "cross_entropy"):
        x[6] += 1000.0
    if rows > 7:
        x[7, pos(7)] = float("inf")
        x[7, (pos(7) + 1) % n] = float("-inf")
    return x.to(dtype)


def add_norm_operands(x, seed=0):
    """input and residual (x's dtype and device) whose torch sum s = input + residual keeps x's special values:
    each inf or NaN comes from the input where its row + column is even, else from the residual (the other
    operand there a plain draw), so that row 7's +inf and -inf come one from each and one-element rows alternate;
    a finite row of equal values (a constant row, every finite one-element row) is input x and residual -x/2,
    so that s is exactly x/2 (still constant, still not a binary fraction; 1e30 still overflows x², 1e-30 still
    underflows it); on other rows the residual is a plain draw (× 0.5) and the input x."""
    g = torch.Generator().manual_seed(seed + 1000)
    rows, n = x.numel() // x.shape[-1], x.shape[-1]
    flat = x.reshape(rows, n)
    draw = (torch.randn(rows, n, generator=g, dtype=torch.float64) * 0.5).to(x.dtype).to(x.device)
    finite = flat.isfinite()
    constant = (finite.all(-1) & (flat == flat[:, :1]).all(-1)).unsqueeze(-1)
    parity = (torch.arange(rows, device=x.device).view(-1, 1) + torch.arange(n, device=x.device)) % 2
    from_residual = ~finite & (parity == 1)
    half = (flat.double() / 2).to(x.dtype)  # exact: no constant row holds a subnormal value
    residual = torch.where(constant, -half, torch.where(from_residual, flat, draw))
    inp = torch.where(from_residual, draw, flat)
    return inp.view(x.shape), residual.view(x.shape)


def _assert_same(got, want, dtype, what, atol=None):
    """NaN at the same positions, infinities equal, the rest within the dtype's tolerance."""
    tol = dict(TOL[dtype])
    if atol is not None:
        tol["atol"] = atol
    torch.testing.assert_close(got, want, equal_nan=True, msg=lambda m: f"{what}: {m}", **tol)


def _grad(fn, inputs, dy):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return out.detach(), torch.autograd.grad(out, inputs, dy)


def check_family_against_torch(family, x, dim, seed=1):
    """The family's registered forward and backward ops on CUDA tensor x (reduced along dim) against torch's
    own CUDA functions on the same values: outputs, saved statistics where torch has them (on rows without
    inf or NaN), and gradients, NaN positions equal."""
    F = torch.nn.functional
    dtype = x.dtype
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator(device=x.device).manual_seed(seed)
    n = x.shape[dim]
    finite_rows = x.isfinite().all(dim)  # rows (along dim) with neither inf nor NaN
    # Backward kernels are compared from the same saved values (ours): torch's backward formulas applied to
    # our y or lse, so that a last-bit difference in a half-type output is not read as a backward error.
    if family in ("softmax", "log_softmax"):
        y = getattr(VJP, family)(x, dim)
        ref = getattr(torch, family)(x, dim)
        _assert_same(y, ref, dtype, f"{family} output")
        dy = torch.randn(x.shape, generator=g, device=x.device).to(dtype)
        dx = getattr(VJP, family + "_backward")(dy, y, dim)
        backward_data = torch._softmax_backward_data if family == "softmax" else torch._log_softmax_backward_data
        _assert_same(dx, backward_data(dy, y, dim, dtype), dtype, f"{family} grad")
    elif family == "logsumexp":
        out = VJP.logsumexp(x, dim, False)
        _assert_same(out, torch.logsumexp(x, dim), dtype, "logsumexp output")
        dy = torch.randn(out.shape, generator=g, device=x.device).to(dtype)
        dx = VJP.logsumexp_backward(dy, x, out, dim, False)
        ref_dx = dy.to(opmath).unsqueeze(dim) * (x.to(opmath) - out.to(opmath).unsqueeze(dim)).exp()  # torch's
        _assert_same(dx, ref_dx.to(dtype), dtype, "logsumexp grad")
    elif family in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"):
        assert dim in (-1, x.dim() - 1)
        add = family.startswith("add_")
        if add:
            # x holds the special values of s: input and residual share them out (add_norm_operands), and from
            # here on x is torch's s = input + residual, which ours must equal bit for bit (NaN where torch's is);
            # the norm's checks below are then on s, and torch's gradient of input (and residual) is its
            # gradient of s through the norm plus grad_sum, added in the dtype as autograd accumulates it.
            inp, res = add_norm_operands(x, seed)
            x = inp + res
            finite_rows = x.isfinite().all(dim)
            grad_sum = torch.randn(x.shape, generator=g, device=x.device).to(dtype)
        w = (torch.randn(n, generator=g, device=x.device) * 0.5 + 1.0).to(dtype)
        dy = torch.randn(x.shape, generator=g, device=x.device).to(dtype)
        rows = x.numel() // n
        sums_atol = TOL[dtype]["rtol"] * max(1.0, rows ** 0.5)  # column sums over the rows, in any order
        if family.endswith("layer_norm"):
            b = (torch.randn(n, generator=g, device=x.device) * 0.5).to(dtype)
            eps = 1e-12  # BERT's: a one-ulp error in x - μ of a constant row would be |x̂| ≈ 0.4
            if add:
                y, s, mean, rstd = VJP.add_layer_norm(inp, res, [n], w, b, eps)
            else:
                y, mean, rstd = VJP.layer_norm(x, [n], w, b, eps)
            ref_y, ref_mean, ref_rstd = torch.native_layer_norm(x, [n], w, b, eps)
            _assert_same(y, ref_y, dtype, f"{family} output")
            _assert_same(mean[finite_rows], ref_mean.view(-1)[finite_rows].to(opmath), opmath, f"{family} mean")
            _assert_same(rstd[finite_rows], ref_rstd.view(-1)[finite_rows].to(opmath), opmath, f"{family} rstd")
            constant = finite_rows & (x == x[..., :1]).all(-1)
            if constant.any():  # x - μ = 0 exactly: the output is the bias, bit for bit, as torch's
                assert torch.equal(y[constant], b.expand_as(y)[constant]), "a constant row did not give the bias"
            if add:
                dx, dw, db = VJP.add_layer_norm_backward(dy, grad_sum, s, mean, rstd, w, b, [n], [True, True, True])
            else:
                dx, dw, db = VJP.layer_norm_backward(dy, x, mean, rstd, w, b, [n], [True, True, True])
            ref_dx, ref_dw, ref_db = torch.ops.aten.native_layer_norm_backward(dy, x, [n], ref_mean, ref_rstd, w, b,
                                                                               [True, True, True])
            _assert_same(db, ref_db, dtype, f"{family} dbias", atol=sums_atol)
        else:
            eps = 1e-6
            if add:
                y, s, rstd = VJP.add_rms_norm(inp, res, [n], w, eps, 0.0, "torch")
            else:
                y, rstd = VJP.rms_norm(x, [n], w, eps)
            _assert_same(y, F.rms_norm(x, (n,), w, eps), dtype, f"{family} output")
            if add:
                dx, dw = VJP.add_rms_norm_backward(dy, grad_sum, s, rstd, w, [n], [True, True], 0.0)
            else:
                dx, dw = VJP.rms_norm_backward(dy, x, rstd, w, [n], [True, True])
            _, (ref_dx, ref_dw) = _grad(lambda t, v: F.rms_norm(t, (n,), v, eps), (x, w), dy)
        if add:
            torch.testing.assert_close(s, x, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{family} sum: {m}")
            # torch rounds its gradient of s through the norm to the dtype, then its sum with grad_sum; ours rounds
            # the sum once. Where the two terms cancel they differ by up to half an ulp of the norm's term: allowed
            # beyond the dtype's tolerance (one ulp, eps · |term|, as assert_add_norm_matches_reference allows),
            # where both results are finite (NaN and inf must still match exactly).
            slack = torch.finfo(dtype).eps * ref_dx.double().abs()
            ref_dx = (ref_dx + grad_sum).double()
            dx = dx.double()
            ref_dx = torch.where(dx.isfinite() & ref_dx.isfinite(), ref_dx + (dx - ref_dx).clamp(-slack, slack), ref_dx)
        # dx = r (g - mean g - x̂ mean(g x̂)): on a constant row r = 1/√eps = 1e6, and torch's rounding of
        # g - mean g (exactly 0 for one element) is magnified by it; compare each row relative to max(r, 1).
        scale = torch.where(finite_rows, rstd.clamp_min(1.0), torch.ones_like(rstd)).to(dx.dtype).view(-1, 1)
        _assert_same(dx.view(-1, n) / scale, ref_dx.view(-1, n) / scale, dtype, f"{family} grad")
        _assert_same(dw, ref_dw, dtype, f"{family} dweight", atol=sums_atol)
    elif family == "normalize":
        # torch in float64, rounded: ρ sums n squares, whose rounding differs by summation order (1e-4 of ρ
        # between two float32 orders at n = 300007); the clamp is decided in the input's dtype
        # (math::normalize_clamped), which no row here reaches. No special row here overflows Σx²
        # (test_paths_normalize_extremes compares those in the input's dtype).
        eps = 1e-12
        y, norm = VJP.normalize(x, dim, eps)
        x64 = x.double()
        _assert_same(y, F.normalize(x64, 2.0, dim, eps).to(dtype), dtype, "normalize output")
        _assert_same(norm, torch.linalg.vector_norm(x64, dim=dim, keepdim=True).to(opmath), opmath, "normalize norm")
        dy = torch.randn(x.shape, generator=g, device=x.device).to(dtype)
        dx = VJP.normalize_backward(dy, y, norm, dim, eps)
        _, (ref_dx,) = _grad(lambda t: F.normalize(t, 2.0, dim, eps), (x64,), dy.double())
        _assert_same(dx, ref_dx.to(dtype), dtype, "normalize grad")
    elif family == "cross_entropy":
        assert x.dim() == 2 and dim in (-1, 1)
        rows = x.shape[0]
        t = torch.randint(0, n, (rows,), generator=g, device=x.device)
        t[0] = -100  # ignored rows: 0, the NaN row 3 (loss 0, gradient NaN: 0 · NaN, as torch's), 9, 13, ...
        t[9::4] = -100
        if rows > 3:
            t[3] = -100
        if rows > 2:
            t[2] = (2 * 7919 + n // 3) % n  # row 2's target is its -inf logit: an infinite loss, as torch's
        for smoothing in (0.0, 0.1):
            loss, row_max, log_sum = VJP.cross_entropy(x, t, None, -100, "none", smoothing)
            ref = F.cross_entropy(x, t, ignore_index=-100, reduction="none", label_smoothing=smoothing)
            _assert_same(loss, ref, dtype, f"cross_entropy loss (smoothing {smoothing})")
            torch.testing.assert_close(row_max, x.to(opmath).amax(-1), rtol=0, atol=0, equal_nan=True)
            lse = torch.logsumexp(x.to(opmath), -1)
            torch.testing.assert_close((row_max + log_sum)[finite_rows], lse[finite_rows], **TOL[opmath])
            dy = torch.randn(rows, generator=g, device=x.device).to(dtype)
            dx = VJP.cross_entropy_backward(dy, x, t, None, row_max, log_sum, -100, "none", smoothing)
            _, (ref_dx,) = _grad(lambda v: F.cross_entropy(v, t, ignore_index=-100, reduction="none",
                                                           label_smoothing=smoothing), (x,), dy)
            _assert_same(dx, ref_dx, dtype, f"cross_entropy grad (smoothing {smoothing})")
    else:
        raise AssertionError(family)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ROW_PATHS + COLUMN_PATHS)
@pytest.mark.parametrize("op", list(ENGINE_OPS))
def test_paths_special_values(op, path, dtype):
    """±inf, NaN, constant rows, a row of -inf only, a large offset and ignored targets (special_rows) at a shape
    where `op`'s kernel takes `path` (asserted by shape_for), its family's forward and backward against torch's
    own CUDA results (the add-norms: s, y and the statistics against torch's input + residual and its norm, the
    gradient with grad_sum against torch's)."""
    family = ENGINE_OPS[op]
    if path in COLUMN_PATHS and family in ROWS_ONLY:
        pytest.skip(f"{family} runs on rows only")
    shape = shape_for(op, path, dtype)
    if len(shape) == 2:
        x = special_rows(*shape, dtype, family).to(GPU)
        check_family_against_torch(family, x, -1)
    else:
        outer, n, inner = shape
        # Column (o, i) of x[o, :, i] is row o·inner + i of the special rows.
        rows = special_rows(outer * inner, n, dtype, family).to(GPU)
        x = rows.view(outer, inner, n).permute(0, 2, 1).contiguous()
        check_family_against_torch(family, x, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", ["softmax", "log_softmax", "logsumexp", "layer_norm", "rms_norm", "normalize",
                                    "cross_entropy", "add_layer_norm", "add_rms_norm"])
def test_paths_one_element_rows(family, dtype):
    """Rows of one element, special and extreme values (±1e30 overflow x² in float32 and are inf in float16;
    1e-30 underflows x²), along the last dim and (where the family has a column kernel) along dim 1, against
    torch's CUDA results: normalize gives ±1 (torch's norm does not square a single element), layer_norm the
    bias exactly. The add-norms: s = x/2 from input x and residual -x/2 (the specials from either,
    add_norm_operands)."""
    values = [float("inf"), float("-inf"), float("nan"), 0.0, 1e30, -1e30, 1e-30, 3.0, -0.3, 1e4]
    # torch's Welford merge of an empty partial makes (±1e30)² · 0 = NaN there; ours the bias
    if family.endswith("layer_norm"):
        values = [v for v in values if abs(v) != 1e30] + [7.0, -2.5]
    x = torch.tensor(values, dtype=torch.float64).to(dtype).view(-1, 1).to(GPU)
    check_family_against_torch(family, x, -1)
    if family not in ROWS_ONLY:
        assert row_plan(family, 2, 1, 5, dtype).path == "column"
        check_family_against_torch(family, x.view(2, 1, 5).contiguous(), 1)


def test_paths_normalize_extremes():
    """normalize's special cases, each as torch gives it: one-element rows of ±1e30 (fp32, bf16) and ±1e200
    (fp64) are ±1; [[1e-30]] with eps = 0 is 1; [nan, 0, 1, 2] all NaN (the clamp keeps NaN); [inf, 0, 1, 2]
    is [NaN, 0, 0, 0] (1/inf = 0, no NaN from a refined reciprocal); a bf16 row whose Σx² overflows float
    (|x| > 1.8e19) normalises to 0, as torch's."""
    for dtype, big in ((torch.float32, 1e30), (torch.bfloat16, 1e30), (torch.float64, 1e200)):
        x = torch.tensor([[big], [-big]], dtype=torch.float64).to(dtype).to(GPU)
        y, norm = VJP.normalize(x, 1, 1e-12)
        assert torch.equal(y.double().cpu(), torch.tensor([[1.0], [-1.0]], dtype=torch.float64)), y
        torch.testing.assert_close(norm.double().cpu(), x.double().abs().cpu())
    y, _ = VJP.normalize(torch.tensor([[1e-30]], device=GPU), 1, 0.0)
    assert y.item() == 1.0
    for row in ([float("nan"), 0.0, 1.0, 2.0], [float("inf"), 0.0, 1.0, 2.0], [3e19, -3e19, 1e19, 0.0]):
        for dtype in DTYPES:
            x = torch.tensor([row], dtype=torch.float64).to(dtype).to(GPU)
            for dim in (1, 0):
                xd = x if dim == 1 else x.t().contiguous()
                y, _ = VJP.normalize(xd, dim, 1e-12)
                _assert_same(y, torch.nn.functional.normalize(xd, 2.0, dim, 1e-12), dtype, f"normalize {row} {dtype}")


def test_paths_normalize_clamp_tie():
    """The backward at ρ = eps exactly: clamped (torch's clamp_min passes no gradient at the tie), so
    dx = dy / eps, for the row and the column kernel."""
    x = torch.tensor([[0.5, -0.5, 0.5, 0.5]], device=GPU)  # ρ = 1 exactly (exact squares and sum)
    dy = torch.tensor([[1.0, -2.0, 3.0, 0.5]], device=GPU)
    for dim in (1, 0):
        xd, dyd = (x, dy) if dim == 1 else (x.t().contiguous(), dy.t().contiguous())
        y, norm = VJP.normalize(xd, dim, 1.0)
        assert norm.item() == 1.0
        dx = VJP.normalize_backward(dyd, y, norm, dim, 1.0)
        _, (ref,) = _grad(lambda t: torch.nn.functional.normalize(t, 2.0, dim, 1.0), (xd,), dyd)
        torch.testing.assert_close(dx, dyd)
        torch.testing.assert_close(dx, ref)


# Paths that comments in this file and in benchmarks/sanitize_cases.py name: (op, shape, dtype, path with sm_90
# clusters, path without). Asserted, so that a comment cannot claim a path its shape does not reach.
DESCRIBED_PATHS = [
    ("layer_norm_backward", (600, 4096), torch.bfloat16, "block", "block"),
    ("layer_norm_backward", (600, 4096), torch.float32, "block", "block"),
    ("layer_norm_backward", (96, 8192), torch.bfloat16, "block", "block"),
    ("layer_norm_backward", (600, 8192), torch.float32, "cluster", "split"),
    ("layer_norm_backward", (40, 32768), torch.bfloat16, "cluster", "split"),
    ("layer_norm_backward", (70000, 8), torch.bfloat16, "rows_per_warp", "rows_per_warp"),
    ("layer_norm_backward", (3, 8192), torch.bfloat16, "split", "split"),
    ("softmax_backward", (3, 32768), torch.float32, "split", "split"),
    ("softmax", (3, 65537), torch.float32, "split", "split"),
    ("softmax", (40, 40000), torch.float32, "cluster", "split"),
    ("softmax", (2, 4096, 512), torch.float32, "column_cluster", "column_split"),
    ("softmax", (1, 20000, 8), torch.float32, "column_split", "column_split"),
    ("cross_entropy", (3, 128256), torch.bfloat16, "split", "split"),
    ("cross_entropy", (80, 128256), torch.bfloat16, "cluster", "split"),
    ("cross_entropy", (64, 50257), torch.float32, "cluster", "split"),
]


@pytest.mark.parametrize("op,shape,dtype,with_clusters,without", DESCRIBED_PATHS, ids=str)
def test_paths_described(op, shape, dtype, with_clusters, without):
    if len(shape) == 2:
        shape = (*shape, 1)
    plan = row_plan(op, *shape, dtype=dtype)
    multiprocessors = torch.cuda.get_device_properties(0).multi_processor_count
    if multiprocessors < 100:
        pytest.skip(f"the paths named are an H100's or H200's (132 SMs); this GPU has {multiprocessors}")
    assert plan.path == (with_clusters if clusters_planned() else without), plan


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(80, 65536), (70, 131072)], ids=str)
def test_cluster_rows_match_float64(shape, dtype):
    """The cluster path at shapes that really take it (softmax's plan asserted; the others' reported) against
    torch in float64 on the GPU: softmax, log_softmax and layer_norm forward and backward, cross-entropy loss
    and gradient."""
    if not clusters_planned():
        pytest.skip("no sm_90 clusters here (or TORCH_VJP_DISABLE_CLUSTERS is set)")
    rows, n = shape
    assert row_plan("softmax", rows, n, dtype=dtype).path == "cluster"
    F = torch.nn.functional
    x = _randn(shape, dtype, 30, 3.0).to(GPU)
    dy = _randn(shape, dtype, 31).to(GPU)
    x64, dy64 = x.double(), dy.double()
    tol = TOL[dtype]
    paths = {}
    for op in ("softmax", "log_softmax"):
        paths[op] = row_plan(op, rows, n, dtype=dtype).path
        y = getattr(VJP, op)(x, -1)
        dx = getattr(VJP, op + "_backward")(dy, y, -1)
        y64, (dx64,) = _grad(lambda t: getattr(torch, op)(t, -1), (x64,), dy64)
        torch.testing.assert_close(y.double(), y64, msg=lambda m: f"{op} ({paths[op]}): {m}", **tol)
        torch.testing.assert_close(dx.double(), dx64, msg=lambda m: f"{op} grad: {m}", **tol)
    paths["layer_norm"] = row_plan("layer_norm", rows, n, dtype=dtype).path
    y, mean, rstd = VJP.layer_norm(x, [n], None, None, 1e-5)
    dx, _, _ = VJP.layer_norm_backward(dy, x, mean, rstd, None, None, [n], [True, False, False])
    y64, (dx64,) = _grad(lambda t: F.layer_norm(t, (n,), eps=1e-5), (x64,), dy64)
    torch.testing.assert_close(y.double(), y64, msg=lambda m: f"layer_norm ({paths['layer_norm']}): {m}", **tol)
    torch.testing.assert_close(dx.double(), dx64, msg=lambda m: f"layer_norm grad: {m}", **tol)
    paths["cross_entropy"] = row_plan("cross_entropy", rows, n, dtype=dtype).path
    t = _ce_targets(rows, n, 32, ignored=(3,)).to(GPU)
    loss, row_max, log_sum = VJP.cross_entropy(x, t, None, -100, "none", 0.1)
    dyr = _randn(rows, dtype, 33).to(GPU)
    dx = VJP.cross_entropy_backward(dyr, x, t, None, row_max, log_sum, -100, "none", 0.1)
    loss64, (dx64,) = _grad(lambda v: F.cross_entropy(v, t, reduction="none", label_smoothing=0.1), (x64,),
                            dyr.double())
    torch.testing.assert_close(loss.double(), loss64, msg=lambda m: f"cross_entropy ({paths['cross_entropy']}): {m}",
                               **tol)
    torch.testing.assert_close(dx.double(), dx64, rtol=tol["rtol"], atol=tol["atol"] / 64)


# Cross-entropy's accuracy at confident logits (randn × 20..40: p near 1 for the top class, where exp(x - lse)
# with lse rounded loses |lse|·ε; x = randn(8, 50257) × 30 once gave 7.4e-7 against torch's 1.1e-8 in
# float32), and under a shared offset of 1000 with label smoothing (lse - Σx/C cancelled): every dtype, the
# vocabularies of Llama-2, GPT-2 and Llama-3, held to torch's own CUDA error against a float64 reference that
# does not round lse (_ce_unrounded_lse).
def _ce_unrounded_lse(x, target, smoothing, ignore_index=-100):
    """Cross-entropy per row ('none') in float64 from log p = (x - m) - log Σ exp(x - m), never x - lse with lse
    rounded: torch's own float64 carries |lse|·ε there (3e-14 at scale 40), too much for a float64 reference."""
    z = x - x.amax(-1, keepdim=True)
    log_p = z - torch.log(torch.exp(z).sum(-1, keepdim=True))
    counted = target != ignore_index
    picked = log_p.gather(-1, torch.where(counted, target, 0).unsqueeze(-1)).squeeze(-1)
    loss = -(1 - smoothing) * picked - (smoothing / x.shape[-1]) * log_p.sum(-1)
    return torch.where(counted, loss, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [32000, 50257, 128256])
def test_cross_entropy_confident_logits_accuracy(vocab, dtype):
    F = torch.nn.functional
    rows = 16
    for scale, offset, smoothing in ((20.0, 0.0, 0.0), (40.0, 0.0, 0.1), (30.0, 1000.0, 0.1)):
        x = _randn((rows, vocab), dtype, vocab, scale, offset).to(GPU)
        t = _ce_targets(rows, vocab, 40, ignored=(5,)).to(GPU)
        dy = _randn(rows, dtype, 41).to(GPU)
        loss, row_max, log_sum = VJP.cross_entropy(x, t, None, -100, "none", smoothing)
        dx = VJP.cross_entropy_backward(dy, x, t, None, row_max, log_sum, -100, "none", smoothing)
        torch_loss, (torch_dx,) = _grad(lambda v: F.cross_entropy(v, t, reduction="none", label_smoothing=smoothing),
                                        (x,), dy)
        loss64, (dx64,) = _grad(lambda v: _ce_unrounded_lse(v, t.cpu(), smoothing), (x.double().cpu(),),
                                dy.double().cpu())
        for what, ours, theirs, ref in (("loss", loss, torch_loss, loss64), ("grad", dx, torch_dx, dx64)):
            ours_err = float((ours.double().cpu() - ref).abs().max())
            torch_err = float((theirs.double().cpu() - ref).abs().max())
            # One ulp of the largest value (16 in float64, where torch's own error against the CPU's float64 is a
            # few ulps or even 0): still a tenth of the error a rounded lse gave (|lse|·ε, lse ≈ 100 here).
            tiny = (16 if dtype == torch.float64 else 1) * torch.finfo(dtype).eps * float(ref.abs().max())
            assert ours_err <= 2 * torch_err + tiny, (
                f"{what}, scale {scale}, offset {offset}, smoothing {smoothing}: ours {ours_err:.3g}, torch's "
                f"{torch_err:.3g} (+ {tiny:.3g})")


def _fused_inputs(rows, hidden, vocab, dtype, seed=50):
    x = _randn((rows, hidden), dtype, seed).to(GPU)
    w = _randn((vocab, hidden), dtype, seed + 1, 0.1).to(GPU)
    b = _randn(vocab, dtype, seed + 2, 0.1).to(GPU)
    t = _ce_targets(rows, vocab, seed + 3, ignored=(1,)).to(GPU)
    return x, w, b, t


def test_fused_linear_cross_entropy_bitwise_under_memory_pressure():
    """The chunk of logits is a function of the shapes alone (kChunkBytes), so the fused loss and its
    gradients are the same bits on every call: twice, and again while an unrelated tensor holds all but
    600 MiB of the GPU (the chunk once followed free memory: below ~900 MiB free it shrank, and the float32
    sums of grad_weight changed order). 2048 tokens × vocab 128256, fp32: 10 chunks of 224 rows. Holding the
    GPU's memory would starve other tests: run serially (benchmarks/gpu_check.sh's tests_serial step)."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        pytest.skip("holds nearly all GPU memory: run without pytest-xdist")
    x, w, b, t = _fused_inputs(2048, 64, 128256, torch.float32)
    dy = torch.ones((), device=GPU)

    def run():
        out = VJP.fused_linear_cross_entropy(x, w, t, b, None, -100, "mean", 0.1, True)
        grads = VJP.fused_linear_cross_entropy_backward(dy, x, w, t, b, None, -100, "mean", 0.1)
        torch.cuda.synchronize()
        return [*out, *grads]

    first, second = run(), run()
    torch.cuda.empty_cache()
    hold, step = [], 1 << 30
    free = torch.cuda.mem_get_info()[0]
    try:
        while free > (660 << 20) and step >= (16 << 20):  # leave ~600 MiB, in pieces (no one giant block)
            try:
                hold.append(torch.empty(min(step, free - (600 << 20)), dtype=torch.uint8, device=GPU))
            except torch.OutOfMemoryError:
                step //= 2
            free = torch.cuda.mem_get_info()[0]
        assert free < (900 << 20), f"could not bring free memory below 900 MiB ({free >> 20} MiB free)"
        pressed = run()
    finally:
        del hold
        torch.cuda.empty_cache()
    for a, b_, c in zip(first, second, pressed):
        assert torch.equal(a, b_) and torch.equal(a, c), "the fused loss's results changed between calls"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_linear_cross_entropy_cuda_graph(dtype):
    """The fused loss (forward with gradients, and its backward) and cross_entropy captured in a CUDA graph:
    no host synchronisation, every launch on the capturing stream, workspaces from the graph's pool. Replays
    equal eager calls, on the captured inputs and after new values are copied into them. 1000 tokens × vocab
    32000: two chunks."""
    x, w, b, t = _fused_inputs(1000, 64, 32000, dtype)
    dy = torch.full((), 0.5, device=GPU, dtype=dtype)
    logits = _randn((64, 50257), dtype, 60, 3.0).to(GPU)
    lt = _ce_targets(64, 50257, 61, ignored=(0,)).to(GPU)
    ldy = _randn(64, dtype, 62).to(GPU)

    def calls():
        out = list(VJP.fused_linear_cross_entropy(x, w, t, b, None, -100, "mean", 0.1, True))
        out += VJP.fused_linear_cross_entropy_backward(dy, x, w, t, b, None, -100, "mean", 0.1)
        loss, row_max, log_sum = VJP.cross_entropy(logits, lt, None, -100, "none", 0.1)
        out += [loss, row_max, log_sum, VJP.cross_entropy_backward(ldy, logits, lt, None, row_max, log_sum, -100, "none", 0.1)]
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream (cuBLAS handles, plans), as torch.cuda.graph asks
        for _ in range(2):
            calls()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = calls()
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else TOL[dtype]
    for step in range(2):
        if step == 1:  # new values through the same graph
            x.copy_(_randn(tuple(x.shape), dtype, 63).to(GPU))
            logits.copy_(_randn(tuple(logits.shape), dtype, 64, 3.0).to(GPU))
        graph.replay()
        torch.cuda.synchronize()
        eager = calls()
        for got, want in zip(captured, eager):
            torch.testing.assert_close(got, want, **tol)


def test_clusters_disabled_in_a_subprocess():
    """TORCH_VJP_DISABLE_CLUSTERS=1 (read once per process): in a fresh process no plan takes a cluster, also at
    shapes that do here on sm_90, and those shapes (now the block and split paths) still match torch."""
    code = textwrap.dedent("""
        import torch, torch_vjp
        F, VJP, plan = torch.nn.functional, torch.ops.torch_vjp, torch.ops.torch_vjp_cuda.row_plan
        ops = ("softmax", "softmax_backward", "log_softmax", "layer_norm", "layer_norm_backward", "rms_norm_backward",
               "normalize", "normalize_backward", "cross_entropy", "cross_entropy_backward")
        for op in ops:
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                for shape in ((80, 65536, 1), (80, 16384, 1), (70, 262144, 1), (2, 4096, 512), (4, 8192, 64)):
                    if shape[2] > 1 and op.startswith(("layer_norm", "rms_norm", "cross_entropy")):
                        continue
                    path, threads, cluster, chunks, packs = plan(op, *shape, dtype)
                    assert cluster == 1 and "cluster" not in path, (op, shape, dtype, path, cluster)
        x = torch.randn(80, 65536, device="cuda") * 3
        dy = torch.randn(80, 65536, device="cuda")
        y = VJP.softmax(x, -1)
        torch.testing.assert_close(y, torch.softmax(x, -1))
        torch.testing.assert_close(VJP.softmax_backward(dy, y, -1), torch.ops.aten._softmax_backward_data(dy, y, -1, x.dtype))
        y, mean, rstd = VJP.layer_norm(x, [65536], None, None, 1e-5)
        torch.testing.assert_close(y, F.layer_norm(x, (65536,), eps=1e-5), rtol=2e-5, atol=2e-5)
        t = torch.randint(0, 65536, (80,), device="cuda")
        loss, row_max, log_sum = VJP.cross_entropy(x, t, None, -100, "none", 0.1)
        torch.testing.assert_close(loss, F.cross_entropy(x, t, reduction="none", label_smoothing=0.1))
        print("NO CLUSTERS: OK")
    """)
    env = {**os.environ, "TORCH_VJP_DISABLE_CLUSTERS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and "NO CLUSTERS: OK" in result.stdout, result.stderr[-3000:]
    if clusters_planned():  # and here the same shape does take a cluster: the switch is what changed it
        assert row_plan("softmax", 80, 65536).path == "cluster"


def test_paths_host_plans_match_the_device():
    """benchmarks/plans.py computes the plans of the benchmark shapes for cards we do not have, from the host
    build of plan_rows and a mirror of each op's constants: here the mirror is checked against the plan the
    library itself reports on this GPU (torch.ops.torch_vjp_cuda.row_plan)."""
    from benchmarks import config, plans

    preset = config.PRESETS["cuda"]
    props = torch.cuda.get_device_properties(0)
    gpu = {"here": plans.Gpu(props.multi_processor_count, clusters_planned(), 1e12)}
    shapes = tuple(preset.shapes) + tuple(preset.row_sweep) + ((64, 128256), (3, 300007), (70000, 8))
    for r in plans.row_table(shapes, ("bfloat16", "float32", "float64"), gpus=gpu):
        got = row_plan(r["op"], r["rows"], r["n"], dtype=getattr(torch, r["dtype"]))
        assert (got.path, got.threads, got.cluster, got.chunks, got.packs) == (
            r["path"], r["threads"], r["cluster"], r["chunks"], r["V"]), r


# rope (csrc/cuda/rope.cu): 16-byte packs where every pointer, row stride and half-row allows them, else the
# scalar instance. Head dims 64 and 128 (packs in every dtype), 8 (one pack of bf16 pairs is half a row), 6 and
# 33 (scalar: no whole pack of pairs, an odd pass-through), partial rotary (32 of 128); q transposed from
# (B, S, H, D) as transformers gives it, k with fewer heads, cos shared by the batch, a misaligned q.
ROPE_CASES = [  # (q shape, k heads, rotary dim, layout)
    ((2, 8, 5, 64), 2, 64, "bshd"), ((1, 4, 7, 128), 4, 128, "contiguous"), ((2, 3, 4, 8), 1, 8, "bshd"),
    ((2, 2, 3, 6), 2, 6, "contiguous"), ((3, 2, 5, 33), 1, 32, "contiguous"), ((2, 4, 6, 128), 2, 32, "bshd"),
    ((1, 2, 3, 64), 2, 64, "misaligned"), ((64, 16, 32, 64), 4, 64, "bshd"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: f"{list(c[0])}-k{c[1]}-r{c[2]}-{c[3]}")
def test_paths_rope(case, dtype):
    """Both outputs and the gradients of q, k, cos and sin on CUDA against the CPU kernels."""
    import torch_vjp

    (b, h, s, d), kh, rotary, layout = case
    g = torch.Generator().manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    if layout == "bshd":
        q, k = draw(b, s, h, d).transpose(1, 2), draw(b, s, kh, d).transpose(1, 2)
    elif layout == "misaligned":
        q, k = draw(b * h * s * d + 1)[1:].view(b, h, s, d), draw(b, kh, s, d)
    else:
        q, k = draw(b, h, s, d), draw(b, kh, s, d)
    cos, sin = draw(1, s, rotary), draw(1, s, rotary)
    dq, dk = draw(b, h, s, d), draw(b, kh, s, d)

    def placed(t, device):
        """t on the device with t's layout and storage offset (Tensor.to would make the copy dense from 0)."""
        storage = torch.empty(t.storage_offset() + t.untyped_storage().nbytes() // t.element_size(), dtype=dtype,
                              device=device)
        view = storage.as_strided(t.shape, t.stride(), t.storage_offset())
        view.copy_(t)
        return view

    def run(device):
        leaves = [placed(t, device).requires_grad_() for t in (q, k, cos, sin)]
        out = torch_vjp.rope(*leaves)
        grads = torch.autograd.grad(out, leaves, (dq.to(device), dk.to(device)))
        return [t.cpu() for t in (*out, *grads)]

    for got, expected in zip(run(GPU), run("cpu")):
        torch.testing.assert_close(got, expected, **TOL[dtype])
