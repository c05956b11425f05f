"""Every kernel path of every op, once, at small sizes: the workload compute-sanitizer runs over.

    compute-sanitizer --tool memcheck  python -m benchmarks.sanitize_cases
    compute-sanitizer --tool racecheck python -m benchmarks.sanitize_cases --family softmax,norm

The shapes reach every path of the CUDA kernels (csrc/cuda/row_engine.cuh, elementwise.cu), small enough
to run under the sanitizers in about a minute: rows of 1 to 33 elements (several rows a warp), 128 to 1025
(a warp a row, a block a row), 4096 and 12289 (a block a row), 40 rows of 40000 (a 3-block cluster on sm_90
in float32; enough rows that none is split), 2 rows of 300007 (rows split across blocks: a workspace and two
phases); over a non-last dim: 5 and 7 columns (one a lane), 64 and 512 columns (16-byte packs of columns; n =
4096 a cluster on sm_90), one tile of 8 columns with n = 20000 (split along n); and for elementwise ops
element counts around the 16-byte pack with the input at every offset from the output's alignment
(realigned in registers). Each result is also compared with the float64 reference on the CPU, so a kernel
that reads the wrong memory without faulting still fails. Exit status 1 on any mismatch or error.

The normalization, gated and loss families run through their registered ops (torch.ops.torch_vjp.*; the
Python layer need not have them) against float64 torch: layer_norm and rms_norm with weight and bias over
rows of 1 to 40000 (several rows a warp with their parameter sums added across the block's groups, a warp, a
block, an sm_90 cluster, split rows; odd lengths take the unfused parameter sums, as does a backward with no
dx), add_layer_norm and add_rms_norm (s = input + residual in the norm's kernel, grad_sum in its dx pass;
input, residual, dy and grad_sum each at its own alignment), normalize along the last and other dims, swiglu and geglu at several element counts and offsets, and
cross_entropy over vocabularies of 1 to 128256 with ignore_index and label smoothing, plus the fused linear
loss (logits chunked, dlogits written over them in place).
"""
from __future__ import annotations

import argparse
import sys

import torch

import torch_vjp
from torch_vjp.testing import OPS, Call

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


FAMILIES = ("elementwise", "softmax", "norm", "gated", "loss")
VJP = torch.ops.torch_vjp
NORM_SHAPES = ((3, 1), (5, 33), (70, 8), (300, 64), (3, 1000), (3, 1024), (2, 4096), (40, 8192), (2, 40000))
# add_*_norm: NORM_SHAPES' paths and 12289 (odd and long: misaligned operands across a block, split on sm_80)
ADD_NORM_SHAPES = ((3, 1), (5, 33), (70, 8), (3, 1000), (3, 1024), (2, 4096), (2, 12289), (40, 8192), (2, 40000))
NORMALIZE_CASES = (((3, 1000), -1), ((5, 33), -1), ((8, 300, 64), 1), ((64, 7), 0), ((2, 40000), -1))
GATED_COUNTS = (1, 7, 1000, 4099, 65537)
CE_SHAPES = ((3, 1), (37, 33), (5, 1024), (3, 50257), (2, 128256))


def _new_family_cases(family, device, dtype, gen):
    """(label, run) pairs: run() returns [(what, got, float64 reference)], the op run on `device`."""
    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)

    def grads(fn, inputs, dy):
        inputs64 = [t.detach().cpu().double().requires_grad_() for t in inputs]
        out = fn(*inputs64)
        return out.detach(), torch.autograd.grad(out, inputs64, dy.detach().cpu().double())

    F = torch.nn.functional
    if family == "norm":
        for kind in ("layer_norm", "rms_norm"):
            for rows, n in NORM_SHAPES:
                for mask in ((True, True, True), (False, True, True)):
                    if mask[0] is False and n not in (1024, 33):
                        continue

                    def run(kind=kind, rows=rows, n=n, mask=mask):
                        x, dy = randn(rows, n), randn(rows, n)
                        w, b = randn(n, scale=0.5, shift=1.0), randn(n, scale=0.5)
                        if kind == "layer_norm":
                            y, mean, rstd = VJP.layer_norm(x, [n], w, b, 1e-5)
                            dx, dw, db = VJP.layer_norm_backward(dy, x, mean, rstd, w, b, [n], list(mask))
                            y64, (dx64, dw64, db64) = grads(lambda x, w, b: F.layer_norm(x, (n,), w, b, 1e-5), (x, w, b), dy)
                        else:
                            y, rstd = VJP.rms_norm(x, [n], w, 1e-5)
                            dx, dw = VJP.rms_norm_backward(dy, x, rstd, w, [n], list(mask[:2]))
                            db = db64 = None
                            y64, (dx64, dw64) = grads(lambda x, w: F.rms_norm(x, (n,), w, 1e-5), (x, w), dy)
                        checks = [("out", y, y64), ("dweight", dw, dw64)]
                        if dx is not None:
                            checks.append(("grad", dx, dx64))
                        if db is not None:
                            checks.append(("dbias", db, db64))
                        return checks

                    yield f"{kind} {rows}x{n}{'' if mask[0] else ' no dx'}", run
        # add_layer_norm / add_rms_norm: input and residual added in the norm's kernel, s and y written by it,
        # grad_sum added as dx is written. Every operand at its own offset (input 1, residual 3, dy 0, grad_sum
        # 1 elements off a 16-byte boundary) on the odd and long shapes, aligned on the others; without grad_sum
        # and without dx once each.
        for kind in ("add_layer_norm", "add_rms_norm"):
            for rows, n in ADD_NORM_SHAPES:
                for with_sum, mask in ((True, (True, True, True)), (False, (True, True, True)), (True, (False, True, True))):
                    if (not with_sum or not mask[0]) and n not in (1024, 33):
                        continue

                    def run(kind=kind, rows=rows, n=n, with_sum=with_sum, mask=mask):
                        offsets = (1, 3, 0, 1) if n % 2 else (0, 0, 0, 0)
                        inp, res, dy, gs = (randn(rows * n + o)[o:].view(rows, n) for o in offsets)
                        gs = gs if with_sum else None
                        w, b = randn(n, scale=0.5, shift=1.0), randn(n, scale=0.5)
                        if kind == "add_layer_norm":
                            y, s, mean, rstd = VJP.add_layer_norm(inp, res, [n], w, b, 1e-5)
                            dx, dw, db = VJP.add_layer_norm_backward(dy, gs, s, mean, rstd, w, b, [n], list(mask))
                            ref = lambda s, w, b: F.layer_norm(s, (n,), w, b, 1e-5)  # noqa: E731
                            y64, (ds64, dw64, db64) = grads(ref, (s, w, b), dy)
                        else:
                            y, s, rstd = VJP.add_rms_norm(inp, res, [n], w, 1e-5, 0.0, "torch")
                            dx, dw = VJP.add_rms_norm_backward(dy, gs, s, rstd, w, [n], list(mask[:2]), 0.0)
                            db = db64 = None
                            y64, (ds64, dw64) = grads(lambda s, w: F.rms_norm(s, (n,), w, 1e-5), (s, w), dy)
                        # s: torch's add in the dtype, exactly (a mismatch reads as an error of 1)
                        checks = [("out", y, y64), ("sum", (s != inp + res).to(s.dtype), torch.zeros(rows, n, dtype=torch.float64)),
                                  ("dweight", dw, dw64)]
                        if dx is not None:
                            checks.append(("grad", dx, ds64 + (gs.cpu().double() if gs is not None else 0.0)))
                        if db is not None:
                            checks.append(("dbias", db, db64))
                        return checks

                    yield f"{kind} {rows}x{n}{'' if with_sum else ' no grad_sum'}{'' if mask[0] else ' no dx'}", run
        for shape, dim in NORMALIZE_CASES:
            def run(shape=shape, dim=dim):
                x, dy = randn(*shape), randn(*shape)
                y, norm = VJP.normalize(x, dim, 1e-12)
                dx = VJP.normalize_backward(dy, y, norm, dim, 1e-12)
                y64, (dx64,) = grads(lambda x: F.normalize(x, 2.0, dim, 1e-12), (x,), dy)
                return [("out", y, y64), ("grad", dx, dx64)]

            yield f"normalize {'x'.join(map(str, shape))} dim={dim}", run
    elif family == "gated":
        for name, extra in (("swiglu", ()), ("geglu", ("tanh",)), ("geglu", ("none",))):
            act = F.silu if name == "swiglu" else (lambda a, approximate=extra[0]: F.gelu(a, approximate=approximate))
            for count in GATED_COUNTS:
                for offset in ELEMENT_OFFSETS:
                    def run(name=name, extra=extra, act=act, count=count, offset=offset):
                        a = randn(count + offset, scale=2.0)[offset:]
                        b, dy = randn(count + 1)[1:], randn(count)
                        y = getattr(VJP, name)(a, b, *extra)
                        da, db = getattr(VJP, name + "_backward")(dy, a, b, *extra)
                        y64, (da64, db64) = grads(lambda a, b: act(a) * b, (a, b), dy)
                        return [("out", y, y64), ("grad gate", da, da64), ("grad up", db, db64)]

                    yield f"{name}{extra} numel={count} offset={offset}", run
    elif family == "loss":
        for rows, classes in CE_SHAPES:
            def run(rows=rows, classes=classes):
                x = randn(rows, classes, scale=3.0)
                t = torch.randint(0, classes, (rows,), generator=gen)
                t[0] = -100
                t = t.to(device)
                loss, row_max, log_sum = VJP.cross_entropy(x, t, None, -100, "none", 0.1)
                dy = randn(rows)
                dx = VJP.cross_entropy_backward(dy, x, t, None, row_max, log_sum, -100, "none", 0.1)
                tc = t.cpu()
                loss64, (dx64,) = grads(lambda x: F.cross_entropy(x, tc, reduction="none", label_smoothing=0.1), (x,), dy)
                return [("out", loss, loss64), ("grad", dx, dx64)]

            yield f"cross_entropy {rows}x{classes}", run

        def run_fused():
            x, w = randn(300, 64), randn(5003, 64, scale=0.1)
            t = torch.randint(0, 5003, (300,), generator=gen).to(device)
            loss, gx, gw, _ = VJP.fused_linear_cross_entropy(x, w, t, None, None, -100, "mean", 0.0, True)
            tc = t.cpu()
            loss64, (gx64, gw64) = grads(lambda x, w: F.cross_entropy(x @ w.T, tc), (x, w), torch.ones((), dtype=torch.float64))
            return [("out", loss, loss64), ("grad input", gx, gx64), ("grad weight", gw, gw64)]

        yield "fused_linear_cross_entropy 300x64x5003", run_fused


def _check(name, checks, dtype, failures):
    for what, got, want in checks:
        got, want = got.detach().cpu().double(), want.detach()
        rtol, atol = TOL[dtype]
        atol *= max(float(want.abs().max()) if want.numel() else 0.0, 1.0)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=rtol, atol=atol):
            worst = float((got - want).abs().max()) if got.shape == want.shape else float("nan")
            failures.append(f"{name}: {what} max abs err {worst:.2e}")


def run(families, dtypes, device) -> int:
    gen = torch.Generator().manual_seed(0)
    failures, count = [], 0
    for family in ("norm", "gated", "loss"):
        if family not in families:
            continue
        op = {"norm": "layer_norm", "gated": "swiglu", "loss": "cross_entropy"}[family]
        if not torch_vjp.has_kernel(op, device):
            print(f"skip {family}: no {device} kernel")
            continue
        for dtype in dtypes:
            for label, case in _new_family_cases(family, device, dtype, gen):
                name = f"{label} {str(dtype)[6:]}"
                count += 1
                try:
                    checks = case()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    _check(name, checks, dtype, failures)
                except Exception as error:  # noqa: BLE001
                    failures.append(f"{name}: {type(error).__name__}: {error}")
    for info in OPS:
        if info.family not in families:
            continue
        if not torch_vjp.has_kernel(info.name, device):
            print(f"skip {info.name}: no {device} kernel")
            continue
        for variant in info.variants:
            for dtype in dtypes:
                for label, x, dim in _inputs(info, device, dtype, gen):
                    if info.name == "fused_linear_cross_entropy" and x.dim() != 2:
                        continue  # hidden states (N, H) only: the column cases are no input of it
                    for keepdim in ((False, True) if info.keepdim else (False,)):
                        name = f"{info.name}{variant or ''} {str(dtype)[6:]} {label}{' keepdim' if keepdim else ''}"
                        count += 1
                        try:
                            # The op with every tensor it takes (a norm's weight, an add-norm's residual, a loss's
                            # target: the table's Call draws them on x's device), and every primal's gradient.
                            where = dict(dim=dim, keepdim=keepdim) if dim is not None else {}
                            call = info.call(x.detach(), **where, **variant).cast(requires_grad=True)
                            y = call.op(*call.primals)
                            dy = torch.randn(y.shape, generator=gen).to(device=device, dtype=dtype)
                            grads = torch.autograd.grad(y, call.primals, dy)
                            if device == "cuda":
                                torch.cuda.synchronize()
                            on_cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in call.kwargs.items()}
                            call64 = Call(info, tuple(t.detach().cpu() for t in call.primals), call.names, on_cpu)
                            call64 = call64.cast(torch.float64, requires_grad=True)
                            y64 = call64.ref(*call64.primals)
                            grads64 = torch.autograd.grad(y64, call64.primals, dy.cpu().double())
                            checks = [("out", y, y64)]
                            checks += [(f"grad {n}", g, g64) for n, g, g64 in zip(("x", *call.names), grads, grads64)]
                            _check(name, checks, dtype, failures)
                        except Exception as error:  # noqa: BLE001
                            failures.append(f"{name}: {type(error).__name__}: {error}")
    for line in failures:
        print("FAIL", line)
    print(f"sanitize_cases: {count} cases on {device}, {len(failures)} failed")
    return 1 if failures else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="all", help=f"all, or a comma-separated list of {', '.join(FAMILIES)}")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    families = FAMILIES if args.family == "all" else tuple(args.family.split(","))
    unknown = set(families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; choose from all, {', '.join(FAMILIES)}")
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    sys.exit(run(families, dtypes, args.device))


if __name__ == "__main__":
    main()
