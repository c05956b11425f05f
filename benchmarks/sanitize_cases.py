"""Every kernel path of every op, once, at small sizes: the workload compute-sanitizer runs over.

    compute-sanitizer --tool memcheck  python -m benchmarks.sanitize_cases
    compute-sanitizer --tool racecheck python -m benchmarks.sanitize_cases --family softmax

The shapes are chosen to reach each path a kernel may take, whatever its thresholds: rows far shorter
than a warp, exactly a warp and one past it (warp-per-row), rows of 1000-5000 (block-per-row), rows of
12289 and 40000 (longer than one block holds: a multi-pass or split-row path), a reduction over a dim
that is not the last (strided rows), non-contiguous inputs, and for elementwise ops element counts that
are not a multiple of the vector width and a storage offset that breaks 16-byte alignment (vector body
plus scalar tail, and the unaligned fallback). Each result is also compared with the float64 reference on
the CPU, so a kernel that reads the wrong memory without faulting still fails. Exit status 1 on any
mismatch or error.
"""
from __future__ import annotations

import argparse
import sys

import torch

import torch_vjp
from tests.op_db import OPS

ROW_LENGTHS = (1, 7, 32, 33, 128, 1000, 1024, 1025, 4096, 5000, 12289, 40000)
ELEMENT_COUNTS = (1, 3, 4, 7, 8, 1000, 4099, 65537)
# Loose (rtol, and atol as a fraction of the largest reference value or 1): this run looks for memory errors, and
# a kernel reading the wrong memory is off by O(1); the numeric tolerances are tests/' job.
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (5e-2, 1e-2), torch.bfloat16: (5e-2, 1e-2), torch.float64: (1e-10, 1e-12)}


def _inputs(info, device, dtype, gen):
    """(label, x, dim) triples for one op."""
    def randn(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * info.scale).to(device=device, dtype=dtype)

    if info.family == "elementwise":
        for count in ELEMENT_COUNTS:
            yield f"numel={count}", randn(count), None
            yield f"numel={count} offset=1", randn(count + 1)[1:], None  # storage offset: not 16-byte aligned
        yield "non-contiguous 67x33.T", randn(67, 33).t(), None
        return
    for n in ROW_LENGTHS:
        rows = 3 if n <= 5000 else 2
        yield f"{rows}x{n} dim=-1", randn(rows, n), -1
    yield "6x37x5 dim=1", randn(6, 37, 5), 1
    yield "37x6 dim=0", randn(37, 6), 0
    yield "1025x3 dim=0", randn(1025, 3), 0
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
