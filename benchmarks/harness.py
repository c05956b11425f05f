"""The main benchmark: every op × provider × dtype × shape, checked against float64, then timed.

For one case (op, shape, dtype) the op is called on an input of that shape, with the other tensors its
row draws (a norm's weight and bias, a gated op's up projection, a loss's targets): a `Call`. The float64
reference (the op's torch reference run in float64) gives the output and the gradients of every
differentiated tensor for one random dy. Each provider's output and gradients must match them (relative
norm error under TOLERANCE) before anything is timed: a wrong kernel is reported as wrong, never as fast.
Then it measures the peak memory of forward+backward and the median time of the forward, the backward and
forward+backward (every gradient).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from torch_vjp.testing import OpInfo

from . import sol
from .providers import NoKernel
from .timing import TIMERS, TimingConfig, cuda_input_sets, measure, on_capture_stream, peak_memory_bytes

# ‖out − ref‖ / ‖ref‖ against float64. A correct kernel lands far under these (fp32 ~1e-7, bf16 ~4e-3
# from rounding its output); a wrong one lands near 1. NaN never passes.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
MIB = 2**20
ROTATE_CPU = 4  # input sets timed in turn on CPU: 4 × (x, dy, y) of 16 MiB is 6× a 32 MiB L3
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass(frozen=True)
class Case:
    info: OpInfo
    variant: dict
    rows: int
    n: int
    dtype: torch.dtype

    @property
    def variant_name(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.variant.items())

    @property
    def label(self) -> str:
        v = f"({self.variant_name})" if self.variant else ""
        return f"{self.info.name}{v} {self.rows}x{self.n} {str(self.dtype).replace('torch.', '')}"


# Ops the main table leaves to a section of their own: the fused loss is matrix products, not a map over
# rows × n (benchmarks/fused_loss.py).
OWN_SECTION = ("fused_linear_cross_entropy",)


def make_cases(infos, preset, dtypes, all_variants=False, row_sweep=False) -> list[Case]:
    """The reference shapes in every dtype (row_sweep=False), or the row-length sweep (row_sweep=True: the
    first dtype, ops that reduce along a row; elementwise and gated ops are indifferent to n). Each op in its
    benchmark variant (OpInfo.bench: a norm with its parameters), or every variant."""
    infos = [info for info in infos if info.name not in OWN_SECTION]
    out = []
    if row_sweep:
        for rows, n in preset.row_sweep:
            for info in infos:
                if info.family not in ("elementwise", "gated"):
                    out.append(Case(info, info.bench, rows, n, dtypes[0]))
        return out
    for dtype in dtypes:
        for rows, n in preset.shapes:
            for info in infos:
                for variant in info.variants if all_variants else (info.bench,):
                    out.append(Case(info, variant, rows, n, dtype))
    return out


def sample(info: OpInfo, shape, dtype, device, seed):
    """Fresh random input, randn · scale (never zeros), drawn on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    base = torch.float64 if dtype == torch.float64 else torch.float32
    return (torch.randn(shape, generator=g, device=device, dtype=base) * info.scale).to(dtype)


def make_call(info: OpInfo, variant: dict, shape, dtype, device, seed):
    """The op's call on a fresh input of `shape`, with its other tensors drawn (testing.OpInfo.call)."""
    return info.call(sample(info, shape, dtype, device, seed), seed=seed, **variant)


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    value = value.detach().to(torch.float64)
    err = float(torch.linalg.vector_norm(value - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300))
    return err if err == err else float("inf")  # NaN anywhere → inf: never passes


def describe_error(error: BaseException) -> str:
    text = str(error).lower()
    if isinstance(error, _OOM) or "out of memory" in text or "can't allocate memory" in text:
        return "OOM"
    message = " ".join(str(error).split())[:100]
    return f"error: {type(error).__name__}: {message}"


def run_case(case: Case, makers: dict, providers, device: str, timing: TimingConfig, ceiling_bps: float,
             base: dict, seed: int, tick=lambda label: None, deadline: float | None = None) -> list[dict]:
    """Rows (one per provider and phase) for one case."""
    info, dtype = case.info, case.dtype
    call = make_call(info, case.variant, (case.rows, case.n), dtype, device, seed)
    ref = call.cast(torch.float64, requires_grad=True)
    y64 = ref.ref(*ref.primals)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    dy = torch.randn(y64.shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    grads64 = torch.autograd.grad(y64, ref.primals, dy.to(torch.float64))
    y64 = y64.detach()
    del ref

    common = dict(base, op=info.name, variant=case.variant_name, family=info.family, dtype=str(dtype).replace("torch.", ""),
                  rows=case.rows, n=case.n, shape=f"{case.rows}x{case.n}", ceiling_gbps=round(ceiling_bps / 1e9, 2))
    rows = []
    for name in providers:
        tick(f"{case.label} {name}")
        cell = dict(common, provider=name)
        if deadline is not None and time.monotonic() > deadline:
            rows += _phase_rows(cell, "skipped (time budget)")
            continue
        try:
            fn = makers[name](call, device.split(":")[0])
        except NoKernel as error:
            rows += _phase_rows(cell, str(error))
            continue
        except Exception as error:  # noqa: BLE001  (a failed import, say: the cell says so)
            rows += _phase_rows(cell, describe_error(error))
            continue
        if fn is None:  # the provider has no such op: no row
            continue
        try:
            rows += _measure(fn, case, cell, call, dy, y64, grads64, device, timing, ceiling_bps)
        except Exception as error:  # noqa: BLE001  (a compile failure, OOM: record and go on)
            rows += _phase_rows(cell, describe_error(error))
        finally:
            fn = None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


def _phase_rows(cell: dict, status: str, **extra) -> list[dict]:
    return [dict(cell, phase=phase, status=status, **extra) for phase in sol.PHASES]


def _measure(fn, case, cell, call, dy, y64, grads64, device, timing, ceiling_bps) -> list[dict]:
    leaves = call.cast(requires_grad=True).primals
    # Correctness first, on this exact input (the call also compiles, for "compile"): the output and every
    # gradient; the worst gradient's error is reported.
    y = fn(*leaves)
    grads = torch.autograd.grad(y, leaves, dy)
    out_err, grad_err = rel_err(y, y64), max(rel_err(g, g64) for g, g64 in zip(grads, grads64))
    del y, grads
    errors = dict(out_err=f"{out_err:.2e}", grad_err=f"{grad_err:.2e}")
    tol = TOLERANCE[case.dtype]
    if not (out_err <= tol and grad_err <= tol):
        return _phase_rows(cell, "wrong", **errors)

    # Timing rotates among input sets (each call's tensors drawn afresh) so that consecutive calls do not find
    # their inputs in cache: on CPU the sets together are several times the L3; on CUDA (calls replayed back
    # to back in a graph) the calls between two uses of a set move three times the L2.
    x = call.x
    numel, itemsize = x.numel(), x.element_size()
    call_bytes = sol.sol_bytes(case.info.name, case.info.family, numel, itemsize, "fwd+bwd")
    sets, dys = [leaves], [dy]
    for k in range(1, ROTATE_CPU if device == "cpu" else cuda_input_sets(call_bytes, device)):
        other = make_call(case.info, case.variant, (case.rows, case.n), case.dtype, device, seed=10_000 + k)
        sets.append(other.cast(requires_grad=True).primals)
        dys.append(torch.randn_like(dy))
    turn = itertools.cycle(range(len(sets)))

    def fwd():
        return fn(*sets[next(turn)])

    def fwd_bwd():
        i = next(turn)
        return torch.autograd.grad(fn(*sets[i]), sets[i], dys[i])

    peak = peak_memory_bytes(lambda: torch.autograd.grad(fn(*leaves), leaves, dy), device)
    with on_capture_stream(device):  # a backward runs on its forward's stream: where bwd() is captured
        ys = [fn(*primals) for primals in sets]

    def bwd():
        i = next(turn)
        return torch.autograd.grad(ys[i], sets[i], dys[i], retain_graph=True)

    # autograd.grad, not .backward: no accumulation into .grad, which would add a pass.
    times = {"fwd": measure(fwd, device, timing), "bwd": measure(bwd, device, timing),
             "fwd+bwd": measure(fwd_bwd, device, timing)}
    del ys, sets, dys
    out = []
    for phase, m in times.items():
        ms = m.ms
        nbytes = sol.sol_bytes(case.info.name, case.info.family, numel, itemsize, phase)
        sol_ms = nbytes / ceiling_bps * 1e3
        row = dict(cell, phase=phase, status="ok", median_ms=f"{ms:.4f}", sol_bytes=nbytes, sol_ms=f"{sol_ms:.4f}",
                   gbps=f"{nbytes / (ms * 1e-3) / 1e9:.1f}", pct_sol=f"{100 * sol_ms / ms:.1f}",
                   host_ms="" if m.host_ms is None else f"{m.host_ms:.4f}", **errors)
        if m.timer != "cpu":  # the run's timer (the header's) unless this call needed another
            row["timer"] = TIMERS[m.timer]
        if phase == "fwd+bwd":
            row["peak_mib"] = "not measured" if peak is None else f"{peak / MIB:.1f}"
        out.append(row)
    return out
