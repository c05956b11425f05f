"""The fused linear cross-entropy against materialised logits: time and peak memory of forward + backward.

For hidden states (N tokens × H), a head (V × H) and class-index targets, each provider computes the mean
loss and its gradients for the hidden states and the head:

  torch_vjp  torch_vjp.fused_linear_cross_entropy: rows in chunks, the (N, V) logits never held whole
  eager      F.cross_entropy(F.linear(x, W), target): the logits, their log-softmax and their gradient held
  compile    torch.compile of eager
  liger      Liger-Kernel's LigerFusedLinearCrossEntropyLoss (CUDA, when importable)
  torch_lce  torch's own F.linear_cross_entropy (torch >= 2.13) with options=LinearCrossEntropyOptions():
             its chunked path, default options (chunk rows, accumulation policy and dtype chosen by torch)
  torch_lce_ref  F.linear_cross_entropy with options=None: torch's reference path (linear, then cross_entropy)
  matmuls    the three matrix products alone, x Wᵀ, dlogits W and dlogitsᵀ x: the floor every provider pays,
             and the fused loss's speed of light (its softmax part is O(N·V) against the products' O(N·V·H))

Before timing, each provider's loss and both gradients are checked against a reference: float64 eager where
it fits in memory (the CPU sizes), else eager in float32. Peak memory is beyond the inputs (x, W, targets),
measured as the main benchmark measures it.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import torch_vjp

from .harness import MIB, TOLERANCE, describe_error, rel_err
from .timing import TimingConfig, peak_memory_bytes, time_ms

PROVIDERS = ("torch_vjp", "eager", "compile", "liger", "torch_lce", "torch_lce_ref", "matmuls")
# Providers of this section alone (not of the main benchmark's op table): torch's own fused loss. They run
# wherever torch has F.linear_cross_entropy, unless a provider list is given that leaves them out.
TORCH_PROVIDERS = ("torch_lce", "torch_lce_ref")


def torch_has_linear_cross_entropy() -> bool:
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
COLUMNS = ["date", "device", "torch", "commit", "tokens", "hidden", "vocab", "dtype", "provider", "status", "median_ms",
           "peak_mib", "matmuls_ms", "loss_err", "grad_err", "timer"]


def _eager(x, w, target):
    return F.cross_entropy(F.linear(x, w), target)


def make(provider: str, device: str):
    """fn(x, w, target) -> loss, or None where the provider is absent."""
    if provider == "torch_vjp":
        if not torch_vjp.has_kernel("fused_linear_cross_entropy", device.split(":")[0]):
            raise RuntimeError(f"no {device} kernel")
        return torch_vjp.fused_linear_cross_entropy
    if provider == "eager":
        return _eager
    if provider == "compile":
        torch._dynamo.reset()
        return torch.compile(_eager)
    if provider == "liger":
        if not device.startswith("cuda"):
            return None
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception:  # noqa: BLE001  (absent: no column, as in the main benchmark)
            return None
        loss = LigerFusedLinearCrossEntropyLoss()
        return lambda x, w, target: loss(w, x, target)
    if provider in TORCH_PROVIDERS:
        if not torch_has_linear_cross_entropy():
            return None  # torch < 2.13: no column
        options = torch.nn.LinearCrossEntropyOptions() if provider == "torch_lce" else None
        return lambda x, w, target: F.linear_cross_entropy(x, w, target, options=options)
    raise ValueError(provider)


def inputs(tokens, hidden, vocab, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g, device=device, dtype=torch.float32).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g, device=device, dtype=torch.float32) / hidden**0.5).to(dtype)
    target = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    return x, w, target


def matmuls_fn(x, w):
    """The three products of forward + backward, with a dlogits of the logits' shape and dtype."""
    dlogits = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype).normal_()

    def fn():
        logits = x @ w.t()
        return logits, dlogits @ w, dlogits.t() @ x

    return fn


def reference(x, w, target, device):
    """(loss, grad_x, grad_w) of eager in float64 where the logits fit (CPU), else in float32."""
    dtype = torch.float64 if not device.startswith("cuda") else torch.float32
    xr, wr = x.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
    loss = _eager(xr, wr, target)
    return (loss.detach(), *torch.autograd.grad(loss, (xr, wr)))


def run_case(tokens, hidden, vocab, dtype, device, providers, timing: TimingConfig, base: dict, tick=lambda s: None,
             deadline=None) -> list[dict]:
    x, w, target = inputs(tokens, hidden, vocab, dtype, device)
    ref = reference(x, w, target, device)
    mm = matmuls_fn(x, w)
    matmuls_ms = time_ms(mm, device, timing)
    common = dict(base, tokens=tokens, hidden=hidden, vocab=vocab, dtype=str(dtype).replace("torch.", ""),
                  matmuls_ms=f"{matmuls_ms:.3f}")
    rows = [dict(common, provider="matmuls", status="ok", median_ms=f"{matmuls_ms:.3f}",
                 peak_mib=_mib(peak_memory_bytes(mm, device)))]
    for name in providers:
        if name == "matmuls":
            continue
        tick(f"fused {tokens}x{hidden}x{vocab} {name}")
        cell = dict(common, provider=name)
        if deadline is not None and time.monotonic() > deadline:
            rows.append(dict(cell, status="skipped (time budget)"))
            continue
        try:
            fn = make(name, device)
            if fn is None:
                continue
            xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()

            def fwd_bwd():
                return torch.autograd.grad(fn(xg, wg, target), (xg, wg))

            loss = fn(xg, wg, target)
            grads = torch.autograd.grad(loss, (xg, wg))
            loss_err, grad_err = rel_err(loss, ref[0]), max(rel_err(g, r) for g, r in zip(grads, ref[1:]))
            del loss, grads
            errors = dict(loss_err=f"{loss_err:.2e}", grad_err=f"{grad_err:.2e}")
            if not (loss_err <= TOLERANCE[dtype] and grad_err <= TOLERANCE[dtype]):
                rows.append(dict(cell, status="wrong", **errors))
                continue
            peak = peak_memory_bytes(fwd_bwd, device)
            ms = time_ms(fwd_bwd, device, timing)
            rows.append(dict(cell, status="ok", median_ms=f"{ms:.3f}", peak_mib=_mib(peak), **errors))
        except Exception as error:  # noqa: BLE001  (OOM above all: record it and go on)
            rows.append(dict(cell, status=describe_error(error)))
        finally:
            fn = None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


def _mib(peak):
    return "not measured" if peak is None else f"{peak / MIB:.1f}"


def run(shapes, dtype, device, providers, timing, base, tick=lambda s: None, deadline=None) -> list[dict]:
    rows = []
    for tokens, hidden, vocab in shapes:
        rows += run_case(tokens, hidden, vocab, dtype, device, providers, timing, base, tick, deadline)
    return rows


def markdown(rows) -> str:
    if not rows:
        return ""
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    others = [p for p in ("eager", "torch_lce") if p in providers]  # the ratio columns besides ÷ matmuls
    lines = ["### Fused linear cross-entropy, forward + backward (mean loss; gradients of x and W)", "",
             "Each cell: median ms / peak MiB beyond the inputs. `matmuls`: the three matrix products alone, the "
             "floor of every provider; `÷ matmuls`: torch_vjp's time over theirs (1 is the speed of light). "
             "`torch_lce`: torch's `F.linear_cross_entropy` with `options=LinearCrossEntropyOptions()` (its chunked "
             "path), `torch_lce_ref`: with `options=None` (its reference path).", "",
             "| tokens × hidden × vocab | dtype | " + " | ".join(providers) + " | torch_vjp ÷ matmuls | " +
             " | ".join(f"torch_vjp ÷ {p}" for p in others) + " |",
             "|---|---|" + "---|" * (len(providers) + 1 + len(others))]
    cases = {}
    for r in rows:
        cases.setdefault((r["tokens"], r["hidden"], r["vocab"], r["dtype"]), {})[r["provider"]] = r
    for (tokens, hidden, vocab, dtype), by in cases.items():
        cells = []
        for p in providers:
            r = by.get(p)
            if r is None:
                cells.append("-")
            elif r["status"] != "ok":
                cells.append(r["status"] if r["status"] != "wrong" else f"**wrong** (loss {r['loss_err']}, grad {r['grad_err']})")
            else:
                mib = r.get("peak_mib", "")
                cells.append(f"{float(r['median_ms']):.2f} / {float(mib):.0f}" if mib not in ("", "not measured")
                             else f"{float(r['median_ms']):.2f} / n/m")
        ours = by.get("torch_vjp")

        def ratio(other):
            if ours is None or other is None or ours["status"] != "ok" or other["status"] != "ok":
                return "-"
            return f"{float(ours['median_ms']) / float(other['median_ms']):.2f}"

        lines.append(f"| {tokens} × {hidden} × {vocab} | {dtype} | " + " | ".join(cells) +
                     f" | {ratio(by.get('matmuls'))} | " + " | ".join(ratio(by.get(p)) for p in others) + " |")
    checked = [p for p in providers if p != "matmuls"]
    lines += ["", "Relative error against the reference (float64 eager on the CPU, float32 eager on CUDA): loss / "
              "the worse of the two gradients (‖value − ref‖ / ‖ref‖).", "",
              "| tokens × hidden × vocab | dtype | " + " | ".join(checked) + " |", "|---|---|" + "---|" * len(checked)]
    for (tokens, hidden, vocab, dtype), by in cases.items():
        cells = []
        for p in checked:
            r = by.get(p)
            cells.append("-" if r is None or not r.get("loss_err") else f"{r['loss_err']} / {r['grad_err']}")
        lines.append(f"| {tokens} × {hidden} × {vocab} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
