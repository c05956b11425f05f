"""The Jacobian comparison: what the VJP saves over building the Jacobian and contracting it with dy.

At a fixed batch b, over row lengths n, each method computes the same dx = dyᵀJ for y = f(x), x of shape (b, n):

  vjp       torch_vjp's fused backward kernel                              O(n) memory per row
  autograd  torch's own backward of the reference (also a VJP)              O(n) per row
  jac_vmap  J = vmap(jacrev(f_row))(x), one n×n block per row, then
            einsum('bk,bkn->bn', dy, J)                                     O(n²) per row
  jac_full  J = autograd.functional.jacobian(f, x, vectorize=True), the
            whole (b·n)×(b·n) matrix (block-diagonal, mostly zeros), then dy·J   O(b²n²)

Every method's dx is checked against the float64 VJP of the reference before it is timed. A case whose
estimated peak exceeds the memory budget is recorded as skipped, with the estimate; a real OOM is
recorded as OOM. The sweep never stops on one case.
"""
from __future__ import annotations

import time

import torch
from torch.func import jacrev, vmap

from torch_vjp.testing import OPS_BY_NAME

from .harness import TOLERANCE, describe_error, rel_err, sample
from .timing import TimingConfig, peak_memory_bytes, time_ms

# The ops swept, by torch_vjp/testing.py name: one entry per op (an op not in the library is skipped). Each is
# called in its default variant along the last dim (layer_norm: over the last dim, without weight and bias:
# J = ∂x̂/∂x, the Jacobian the VJP kernel contracts).
SWEEP_OPS = ("softmax", "layer_norm", "exp")
METHODS = ("vjp", "autograd", "jac_vmap", "jac_full")
DTYPE = torch.float32  # as the anchors: the comparison is about growth, not precision
MIB = 2**20

# Peak ≈ factor × the Jacobian's bytes. On the H200 anchors the per-row Jacobians peaked at 4× (softmax),
# 2× (exp) and 3× (layer_norm) the size of J, the whole-batch one at 3× (softmax): 4 covers them all.
JAC_FACTOR = 4


def estimate_bytes(method: str, b: int, m: int, n: int, itemsize: int) -> int:
    """Estimated peak of one method; m = outputs per row (n for softmax, 1 for logsumexp)."""
    if method in ("vjp", "autograd"):
        return 4 * b * n * itemsize  # output, dx and a temporary or two
    if method == "jac_vmap":
        return JAC_FACTOR * b * m * n * itemsize
    if method == "jac_full":
        return JAC_FACTOR * (b * m) * (b * n) * itemsize
    raise ValueError(method)


def method_fn(method: str, call, x: torch.Tensor, dy: torch.Tensor):
    """A function computing dx = dyᵀJ by one method, for the op's call (testing.Call) as a function of x."""
    b, n = x.shape

    def f(t):
        return call.ref(t)

    if method == "vjp":
        return lambda: torch.autograd.grad(call.op(x), x, dy)[0]
    if method == "autograd":
        return lambda: torch.autograd.grad(f(x), x, dy)[0]
    if method == "jac_vmap":
        def jac_vmap():
            jac = vmap(jacrev(f))(x.detach())  # (b, *out_row, n): one Jacobian per row
            return torch.einsum("bk,bkn->bn", dy.reshape(b, -1), jac.reshape(b, -1, n))
        return jac_vmap
    if method == "jac_full":
        def jac_full():
            jac = torch.autograd.functional.jacobian(f, x.detach(), vectorize=True)  # (*out, b, n)
            return (dy.reshape(1, -1) @ jac.reshape(dy.numel(), b * n)).reshape(b, n)
        return jac_full
    raise ValueError(method)


def memory_budget(device: str, budget: int | None) -> int:
    """Bytes a case may be estimated to need: the preset's budget, capped by what the machine has."""
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return total if budget is None else min(budget, total)
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    cap = available // 2 if available else 4 << 30
    return cap if budget is None else min(budget, cap)


def sweep_ops(names=None):
    """The OpInfo rows to sweep: SWEEP_OPS that the library has (and that `names` allows)."""
    return [OPS_BY_NAME[name] for name in SWEEP_OPS if name in OPS_BY_NAME and (names is None or name in names)]


# How a call's time grows with n at a fixed batch, to predict the next point from the last one. Calls
# under PREDICT_FROM_MS are mostly fixed overhead (and noise) and predict nothing.
TIME_GROWTH = {"vjp": 1, "autograd": 1, "jac_vmap": 2, "jac_full": 2}
PREDICT_FROM_MS = 50.0


def run_sweep(info, ns, batch: int, device: str, budget: int, timing: TimingConfig, base: dict, seed: int,
              max_call_s: float = float("inf"), methods=METHODS, tick=lambda label: None,
              deadline: float | None = None) -> list[dict]:
    """Rows for one op over the row lengths ns (ascending). A method whose next call is predicted, from its
    last measured point, to take longer than max_call_s is skipped from there on, with the prediction."""
    rows, last = [], {}
    for j, n in enumerate(ns):
        predicted = {m: last[m][1] * (n / last[m][0]) ** TIME_GROWTH[m] / 1e3 for m in last}
        point = run_point(info, n, batch, device, budget, timing, base, seed + 2 * j, methods, tick, deadline,
                          too_slow={m: t for m, t in predicted.items() if t > max_call_s})
        for row in point:
            if row["status"] == "ok" and float(row["median_ms"]) >= PREDICT_FROM_MS:
                last[row["method"]] = (n, float(row["median_ms"]))
        rows += point
    return rows


def run_point(info, n: int, batch: int, device: str, budget: int, timing: TimingConfig, base: dict, seed: int,
              methods=METHODS, tick=lambda label: None, deadline: float | None = None, too_slow=None) -> list[dict]:
    """Rows (one per method) for one op at one row length. too_slow: {method: predicted seconds a call}."""
    import torch_vjp

    x = sample(info, (batch, n), DTYPE, device, seed).requires_grad_()
    call = info.call(x.detach())
    x64 = x.detach().to(torch.float64).requires_grad_()
    y64 = call.cast(torch.float64).ref(x64)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    dy = torch.randn(y64.shape, generator=g, device=device, dtype=DTYPE)
    (dx64,) = torch.autograd.grad(y64, x64, dy.to(torch.float64))
    m = y64.numel() // batch  # outputs per row
    del x64, y64

    rows = []
    for method in methods:
        tick(f"jacobian {info.name} n={n} {method}")
        est = estimate_bytes(method, batch, m, n, x.element_size())
        row = dict(base, op=info.name, batch=batch, n=n, dtype=str(DTYPE).replace("torch.", ""), method=method,
                   est_mib=f"{est / MIB:.1f}")
        if deadline is not None and time.monotonic() > deadline:
            rows.append(dict(row, status="skipped (time budget)"))
            continue
        if est > budget:
            rows.append(dict(row, status=f"skipped (est. {est / 2**30:.1f} GiB)"))
            continue
        if too_slow and method in too_slow:
            rows.append(dict(row, status=f"skipped (est. {too_slow[method]:.0f} s a call)"))
            continue
        if method == "vjp" and not torch_vjp.has_kernel(info.name, device.split(":")[0]):
            rows.append(dict(row, status=f"no {device} kernel"))
            continue
        fn = method_fn(method, call, x, dy)
        try:
            err = rel_err(fn(), dx64)
            if not err <= TOLERANCE[DTYPE]:
                rows.append(dict(row, status="wrong", grad_err=f"{err:.2e}"))
                continue
            peak = peak_memory_bytes(fn, device)
            ms = time_ms(fn, device, timing)
            rows.append(dict(row, status="ok", grad_err=f"{err:.2e}", median_ms=f"{ms:.4f}",
                             peak_mib="not measured" if peak is None else f"{peak / MIB:.3f}"))
        except Exception as error:  # noqa: BLE001  (OOM above all: record it and go on)
            rows.append(dict(row, status=describe_error(error)))
        finally:
            fn = None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows
