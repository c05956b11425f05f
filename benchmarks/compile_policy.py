"""The measurements behind torch_vjp/compile_policy.py: under torch.compile, each op with neighbours inductor
would fuse it with, as torch_vjp's opaque kernel against its torch-ops form (the decomposition).

`python -m benchmarks.compile_policy [--ops ...] [--shapes 1024x256,4096x1024] [--dtype float32,bfloat16]
[--threads 1] [--out DIR]`: for every op with a decomposition (and the fused loss against torch's linear +
cross_entropy), the graph

    y = op(x + r) * s          (a residual add before, a scale after: what a model puts around a norm or an
                                activation; the loss: loss(x + r) alone)

compiled with fullgraph=True, forward + backward w.r.t. x and the op's parameters, median ms of rounds that
alternate the two forms. On the CPU with one thread (the default) the time is the calling thread's CPU time
(time.thread_time: the compiled code, the kernels and the CPU backward all run on it), which other work on a
shared machine does not inflate as it does wall time; otherwise wall time. A ratio kernel ÷ decomposition
above 1 means the opaque kernel loses to inductor's fusion. Never asserted by a test.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch

import torch_vjp
from torch_vjp import compile_policy
from torch_vjp._ops import REGISTRY
from torch_vjp.testing import OPS_BY_NAME, Call

from .timing import environment

DEFAULT_SHAPES = ((1024, 256), (4096, 1024))  # a tiny model's hidden rows (batch 4 x 256); a wider layer
LOSS_VOCAB = 32000


def _leaves(call):
    return [p.detach().clone().requires_grad_() for p in call.primals]


def _graph(call, form: str, r, s):
    """The compiled graph of one form: 'kernel' or 'decomposition' (the policy is set before each call, so
    each compiled function keeps the form it was traced with)."""
    loss = call.info.family == "loss"

    def f(*leaves):
        y = call.op(leaves[0] + r, *leaves[1:])
        return y if loss else y * (s if y.dim() and y.shape[-1] == s.shape[0] else 1.5)  # a reduction: scalar

    return torch.compile(f, fullgraph=True, dynamic=False)


def _set_policy(name: str, form: str, device: str) -> None:
    if form == "decomposition":
        compile_policy.DECOMPOSE[name] = frozenset({device})
    else:
        compile_policy.DECOMPOSE.pop(name, None)


def clock(device: str):
    """The timer: the calling thread's CPU time where everything runs on it (the CPU, one thread)."""
    return time.thread_time if device == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def measure(name: str, dtype: torch.dtype, shape, device: str = "cpu", rounds: int = 7, repeat: int = 3) -> dict:
    torch._dynamo.reset()  # each measurement traces afresh (the graph function's code object is shared)
    info = OPS_BY_NAME[name]
    x = torch.randn(shape, dtype=dtype, device=device) * info.scale
    if name == "fused_linear_cross_entropy":  # hidden states of shape; a head of LOSS_VOCAB rows
        head = torch.randn(LOSS_VOCAB, shape[1], dtype=dtype, device=device) / shape[1] ** 0.5
        target = torch.randint(0, LOSS_VOCAB, (shape[0],), device=device)
        call = Call(info, (x, head), ("weight",), {"target": target})
    else:
        call = info.call(x, **info.bench)
    r, s = torch.randn_like(x), torch.randn(shape[-1], dtype=dtype, device=device)
    forms = ("kernel", "decomposition") if REGISTRY[name].decomposition is not None else ("kernel", "torch")
    saved = dict(compile_policy.DECOMPOSE)
    try:
        graphs = {}
        for form in forms:
            _set_policy(name, form, device)
            graphs[form] = (_graph(call, form, r, s) if form != "torch" else
                            torch.compile(lambda *l: call.ref(l[0] + r, *l[1:]), fullgraph=True, dynamic=False))
        leaves = {form: _leaves(call) for form in forms}

        def step(form):
            _set_policy(name, form, device)
            y = graphs[form](*leaves[form])
            torch.autograd.grad(y, leaves[form], torch.ones_like(y))

        for form in forms:
            step(form), step(form)  # compile, warm
        times, now = {form: [] for form in forms}, clock(device)
        for _ in range(rounds):
            for form in forms:
                start = now()
                for _ in range(repeat):
                    step(form)
                times[form].append((now() - start) / repeat * 1e3)
    finally:
        compile_policy.DECOMPOSE.clear()
        compile_policy.DECOMPOSE.update(saved)
    kernel, other = (statistics.median(times[f]) for f in forms)
    return {"timer": "thread CPU time" if now is time.thread_time else "wall", "op": name, "dtype": str(dtype).removeprefix("torch."), "shape": "x".join(map(str, shape)),
            "other_form": forms[1], "kernel_ms": round(kernel, 4), "other_ms": round(other, 4),
            "ratio": round(kernel / other, 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_policy", description=__doc__.split("\n\n")[0])
    with_forms = [n for n, op in REGISTRY.items() if op.decomposition is not None] + ["fused_linear_cross_entropy"]
    parser.add_argument("--ops", default=",".join(with_forms))
    parser.add_argument("--shapes", default=",".join(f"{a}x{b}" for a, b in DEFAULT_SHAPES))
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=os.path.join("bench_out", "compile_policy"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "compile_policy.csv")
    rows = []
    for name in args.ops.split(","):
        for dtype in args.dtype.split(","):
            for shape in shapes:
                row = {**environment(args.device), "threads": args.threads,
                       **measure(name, getattr(torch, dtype), shape, args.device)}
                rows.append(row)
                print(f"{row['op']:28s} {row['dtype']:9s} {row['shape']:>10s}  kernel {row['kernel_ms']:8.3f} ms  "
                      f"{row['other_form']} {row['other_ms']:8.3f} ms  ratio {row['ratio']:.2f}", flush=True)
                with open(path, "w", newline="") as f:  # after every row: a long run interrupted keeps its rows
                    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(rows)
    print(f"benchmarks.compile_policy: wrote {path}")


if __name__ == "__main__":
    main()
