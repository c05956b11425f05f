"""Per-call cost at small sizes, where the host (Python, dispatch, autograd) dominates the kernel.

`python -m benchmarks --overhead [--shape 8x8] [--ops ...]`: for every op (its benchmark variant), at 8×8 and
64×256 float32, median µs of one call, torch_vjp against its torch reference, in three phases:

  no grad   the input does not require grad: the op alone, no graph recorded
  fwd       the input requires grad: the op, recording its autograd node
  fwd+bwd   torch.autograd.grad(op(x), x, dy): record, then run the backward

These are the figures a training loop of small tensors pays on every call. The kernels' own speed at
real sizes is the main benchmark's business. Never asserted by a test: a shared CPU's timings wander.
"""
from __future__ import annotations

import os

import torch

from .timing import environment

PHASES = ("no grad", "fwd", "fwd+bwd")
# 8×8: the size, all host; 64×256: a small MLP's log_softmax, where the kernel starts to count.
DEFAULT_SHAPES = ((8, 8), (64, 256))
COLUMNS = ["date", "device", "torch", "commit", "op", "shape", "dtype", "phase", "torch_us", "torch_vjp_us", "diff_us",
           "ratio"]


def _timer(fn):
    from torch.utils.benchmark import Timer

    fn()  # warm: first-call costs (lazy init, allocator growth) are not per-call costs
    # One thread: the per-call cost is host work, and on a busy machine an intra-op thread pool's wake-ups
    # (milliseconds when a core is taken) would drown it. Both sides run alike.
    return Timer(stmt="fn()", globals={"fn": fn}, num_threads=1)


def _pair_us(ref_call, op_call, min_run_time: float, rounds: int) -> tuple[float, float]:
    """Median µs per call of each, the least over `rounds` alternating rounds: on a shared machine other
    work only adds time, and alternating exposes both calls to the same interference."""
    timers = (_timer(ref_call), _timer(op_call))
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, timer in enumerate(timers):
            best[i] = min(best[i], timer.blocked_autorange(min_run_time=min_run_time).median)
    return best[0] * 1e6, best[1] * 1e6


def _calls(call, dy):
    """phase -> (torch call, torch_vjp call), for a testing.Call (every differentiated tensor requires grad
    from "fwd" on)."""
    primals, leaves = call.primals, call.cast(requires_grad=True).primals

    def fwd_bwd(f):
        return lambda: torch.autograd.grad(f(*leaves), leaves, dy)

    return {
        "no grad": (lambda: call.ref(*primals), lambda: call.op(*primals)),
        "fwd": (lambda: call.ref(*leaves), lambda: call.op(*leaves)),
        "fwd+bwd": (fwd_bwd(call.ref), fwd_bwd(call.op)),
    }


def run_overhead(infos, shapes=DEFAULT_SHAPES, dtype=torch.float32, device="cpu", min_run_time=0.03,
                 rounds=10) -> list[dict]:
    env = environment(device)
    rows = []
    for shape in shapes:
        for info in infos:
            gen = torch.Generator().manual_seed(0)
            x = (torch.randn(shape, generator=gen) * info.scale).to(dtype=dtype, device=device)
            call = info.call(x, **info.bench)
            dy = torch.randn(call.ref(*call.primals).shape, generator=gen).to(dtype=dtype, device=device)
            for phase, (ref_call, op_call) in _calls(call, dy).items():
                t_ref, t_op = _pair_us(ref_call, op_call, min_run_time, rounds)
                rows.append(dict(env, op=info.name, shape="x".join(map(str, shape)),
                                 dtype=str(dtype).replace("torch.", ""), phase=phase, torch_us=f"{t_ref:.2f}",
                                 torch_vjp_us=f"{t_op:.2f}", diff_us=f"{t_op - t_ref:.2f}", ratio=f"{t_op / t_ref:.2f}"))
    return rows


def markdown(rows, command: str, notes=()) -> str:
    first = rows[0]
    lines = [
        f"# torch_vjp per-call cost: {first['device']}",
        "",
        f"- date: {first['date']}; torch {first['torch']}; torch_vjp commit {first['commit']}",
        f"- command: `{command}`",
        f"- {first['dtype']}; median µs per call (torch.utils.benchmark blocked_autorange, one thread), the least of "
        "alternating rounds; each cell: torch / torch_vjp / torch_vjp − torch (µs) / torch_vjp ÷ torch",
        "- no grad: the input does not require grad; fwd: it does (the graph is recorded); fwd+bwd: "
        "`torch.autograd.grad(op(x), x, dy)`",
        *(f"- {note}" for note in notes),
    ]
    by_shape: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_shape.setdefault(r["shape"], {}).setdefault(r["op"], {})[r["phase"]] = r
    for shape, by_op in by_shape.items():
        lines += ["", f"## {shape}", "", "| op | " + " | ".join(PHASES) + " |", "|---|" + "---|" * len(PHASES)]
        for op, phases in by_op.items():
            cells = [f"{p['torch_us']} / {p['torch_vjp_us']} / {float(p['diff_us']):+.2f} / {p['ratio']}×"
                     for p in (phases[name] for name in PHASES)]
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(rows, out_dir: str, command: str, notes=()) -> dict:
    from .report import write_csv

    os.makedirs(out_dir, exist_ok=True)
    paths = {"overhead_csv": os.path.join(out_dir, "overhead.csv"), "overhead_md": os.path.join(out_dir, "overhead.md")}
    write_csv(paths["overhead_csv"], rows, COLUMNS)
    with open(paths["overhead_md"], "w") as f:
        f.write(markdown(rows, command, notes))
    return paths
