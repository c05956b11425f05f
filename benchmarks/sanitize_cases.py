"""Every kernel path of every op, once, at small sizes: the workload compute-sanitizer runs over.

    compute-sanitizer --tool memcheck  python -m benchmarks.sanitize_cases
    compute-sanitizer --tool racecheck python -m benchmarks.sanitize_cases --family softmax

The shapes reach every path of the CUDA kernels (csrc/cuda/row_engine.cuh, elementwise.cu), small enough
to run under the sanitizers in about a minute: rows of 1 to 33 elements (several rows a warp), 128 to 1025
(a warp a row, a block a row), 4096 and 12289 (a block a row), 40 rows of 40000 (a 2-block cluster on sm_90
in float32; enough rows that none is split), 2 rows of 300007 (rows split across blocks: a workspace and two
phases); over a non-last dim: 5 and 7 columns (one a lane), 64 and 512 columns (16-byte packs of columns; n =
4096 a cluster on sm_90), one tile of 8 columns with n = 20000 (split along n); and for elementwise ops
element counts around the 16-byte pack with the input at every offset from the output's alignment
(realigned in registers). Each result is also compared with the float64 reference on the CPU, so a kernel
that reads the wrong memory without faulting still fails. Exit status 1 on any mismatch or error.
"""
from __future__ import annotations

import argparse
import sys

import torch

import torch_vjp
from torch_vjp.testing import OPS

ROW_SHAPES = ((3, 1), (3, 7), (5, 33), (3, 128), (3, 1000), (3, 1025), (3, 4096), (2, 12289), (40, 40000), (2, 300007))
COLUMN_CASES = (((6, 37, 5), 1), ((37, 6), 0), ((1025, 3), 0), ((8, 300, 64), 1), ((2, 4096, 512), 1), ((1, 20000, 8), 1))
ELEMENT_COUNTS = (1, 3, 4, 7, 8, 1000, 4099, 65537)
ELEMENT_OFFSETS = (0, 1, 3)  # the input's offset in elements: aligned, then off the output's alignment
# Loose (rtol, and atol as a fraction of the largest reference value or 1): this run looks for memory errors, and
# a kernel reading the wrong memory is off by O(1); the numeric tolerances are tests/' job.
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (5e-2, 1e-2), torch.bfloat16: (5e-2, 1e-2), torch.float64: (1e-10, 1e-12)}


def _inputs(info, device, dtype, gen):
    """(label, x, dim) triples for one op."""
    def randn(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * info.scale).to(device=device, dtype=dtype)

    if info.family == "elementwise":
        for count in ELEMENT_COUNTS:
            for offset in ELEMENT_OFFSETS:
                yield f"numel={count} offset={offset}", randn(count + offset)[offset:], None
        yield "non-contiguous 67x33.T", randn(67, 33).t(), None
        return
    for rows, n in ROW_SHAPES:
        yield f"{rows}x{n} dim=-1", randn(rows, n), -1
    yield "3x1025 offset=1 dim=-1", randn(3 * 1025 + 1)[1:].view(3, 1025), -1
    for shape, dim in COLUMN_CASES:
        yield f"{'x'.join(map(str, shape))} dim={dim}", randn(*shape), dim
    yield "non-contiguous 129x65.T dim=-1", randn(129, 65).t(), -1


def run(families, dtypes, device) -> int:
    gen = torch.Generator().manual_seed(0)
    failures, count = [], 0
    for info in OPS:
        if info.family not in families:
            continue
        if not torch_vjp.has_kernel(info.name, device):
            print(f"skip {info.name}: no {device} kernel")
            continue
        for variant in info.variants:
            for dtype in dtypes:
                for label, x, dim in _inputs(info, device, dtype, gen):
                    for keepdim in ((False, True) if info.keepdim else (False,)):
                        kwargs = info.call_kwargs(dim=dim, keepdim=keepdim, **variant) if dim is not None else info.call_kwargs(**variant)
                        name = f"{info.name}{variant or ''} {str(dtype)[6:]} {label}{' keepdim' if keepdim else ''}"
                        count += 1
                        try:
                            xg = x.detach().requires_grad_()
                            y = info.op(xg, **kwargs)
                            dy = torch.randn(y.shape, generator=gen).to(device=device, dtype=dtype)
                            (dx,) = torch.autograd.grad(y, xg, dy)
                            if device == "cuda":
                                torch.cuda.synchronize()
                            x64 = x.detach().cpu().double().requires_grad_()
                            y64 = info.ref(x64, **kwargs)
                            (dx64,) = torch.autograd.grad(y64, x64, dy.cpu().double())
                            for what, got, want in (("out", y, y64), ("grad", dx, dx64)):
                                got, want = got.detach().cpu().double(), want.detach()
                                rtol, atol = TOL[dtype]
                                atol *= max(float(want.abs().max()) if want.numel() else 0.0, 1.0)
                                if got.shape != want.shape or not torch.allclose(got, want, rtol=rtol, atol=atol):
                                    worst = float((got - want).abs().max()) if got.shape == want.shape else float("nan")
                                    failures.append(f"{name}: {what} max abs err {worst:.2e}")
                        except Exception as error:  # noqa: BLE001
                            failures.append(f"{name}: {type(error).__name__}: {error}")
    for line in failures:
        print("FAIL", line)
    print(f"sanitize_cases: {count} cases on {device}, {len(failures)} failed")
    return 1 if failures else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("all", "elementwise", "softmax"), default="all")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    families = ("elementwise", "softmax") if args.family == "all" else (args.family,)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    sys.exit(run(families, dtypes, args.device))


if __name__ == "__main__":
    main()
