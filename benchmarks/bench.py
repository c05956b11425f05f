"""One benchmark run: copy ceiling, the main cases, the Jacobian sweep, then the report."""
from __future__ import annotations

import os
import sys
import time

import torch

from torch_vjp.testing import OPS

from . import fused_loss, jacobian, providers as providers_mod
from .harness import DTYPES, make_cases, run_case
from .report import JAC_COLUMNS, MAIN_COLUMNS, write_csv, write_report
from .ceiling import describe, memory_ceiling
from .timing import environment, keep_freed_memory


def _busy_seconds_of_others():
    """CPU seconds the whole machine has been busy, less those of this process and its children (Linux;
    None elsewhere). Its growth over the run says how much other work competed with the measurements."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
        mine = 0
        pids = {os.getpid()}
        for entry in os.listdir("/proc"):  # this process and its descendants (torch.compile's workers)
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        stat = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(entry) == os.getpid() or int(stat[1]) in pids:
                    pids.add(int(entry))
                    mine += sum(int(v) for v in stat[11:15])  # utime stime cutime cstime
        return (busy - mine) / tick
    except (OSError, ValueError, IndexError):
        return None


def other_work(others_start, elapsed: float) -> str:
    """How much CPU other processes took since `others_start` (_busy_seconds_of_others), in words."""
    others_end = _busy_seconds_of_others()
    if others_start is None or others_end is None:
        return "unknown"
    cpu_s = max(0.0, others_end - others_start)
    return (f"{cpu_s:.0f} CPU-seconds by other processes, {100 * cpu_s / (elapsed * (os.cpu_count() or 1)):.0f}% "
            f"of the {os.cpu_count()} cores (above a few %, CPU timings are inflated)")


def timer_name(device: str) -> str:
    if device.startswith("cuda"):
        return ("CUDA graph replay of N back-to-back calls over rotating input sets, median of 10 replays / N (the "
                "timer column says where a call could not be captured); host time per call measured apart (host_ms)")
    return f"torch.utils.benchmark blocked_autorange median, {torch.get_num_threads()} threads"


def memory_method(device: str) -> str:
    if device.startswith("cuda"):
        return "torch.cuda.max_memory_allocated during one forward+backward, less what was allocated before"
    return ("peak of torch's CPU allocator timeline (torch.profiler, profile_memory) during one forward+backward, "
            "less what was allocated before; malloc outside torch's allocator is not seen")


def run_benchmark(device: str, preset, out_dir: str, ops=None, provider_names=None, dtypes=None,
                  sections=("main", "jacobian", "fused"),
                  makers=None, all_variants=False, time_budget: float | None = None, progress: bool = True,
                  command: str | None = None, seed: int = 0) -> dict:
    """Runs the benchmark and writes the report into out_dir; returns {"main": rows, "jacobian": rows, "paths": ...}."""
    start = time.monotonic()
    others_start = _busy_seconds_of_others()
    deadline = None if time_budget is None else start + time_budget
    infos = [info for info in OPS if ops is None or info.name in ops]
    dtypes = [DTYPES[d] for d in (dtypes or preset.dtypes)]
    makers = dict(providers_mod.MAKERS, **(makers or {}))
    # torch's own fused loss (fused_loss.TORCH_PROVIDERS) is a provider of the fused section alone: by default it
    # runs there (where torch has it); named in provider_names, it runs there and nowhere else.
    if provider_names is None:
        fused_only, main_names = list(fused_loss.TORCH_PROVIDERS), list(providers_mod.ALL)
    else:
        fused_only = [p for p in provider_names if p in fused_loss.TORCH_PROVIDERS]
        main_names = [p for p in provider_names if p not in fused_loss.TORCH_PROVIDERS]
    names = providers_mod.available(main_names, device, known=makers)
    env = environment(device)
    base = dict(env, timer=timer_name(device))
    allocator = keep_freed_memory() if not device.startswith("cuda") else "CUDA caching allocator"

    ceiling = memory_ceiling(device, preset.copy_bytes, preset.timing)
    ceiling_bps = ceiling["bps"]
    cases = make_cases(infos, preset, dtypes, all_variants) if "main" in sections else []
    row_sweep = make_cases(infos, preset, dtypes, row_sweep=True) if "main" in sections else []
    sweep = jacobian.sweep_ops(ops) if "jacobian" in sections else []
    fused = preset.fused_shapes if "fused" in sections and (ops is None or "fused_linear_cross_entropy" in ops) else ()
    fused_providers = [p for p in fused_loss.PROVIDERS if p == "matmuls" or p in names or p in fused_only]
    total = ((len(cases) + len(row_sweep)) * len(names) + len(sweep) * len(preset.jac_ns) * len(jacobian.METHODS)
             + len(fused) * (len(fused_providers) - 1))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=True)

    def tick(label):
        if bar is not None:
            bar.set_description_str(label[:60])
            bar.update(1)

    # Order = priority under a time budget: the reference sizes, the Jacobian comparison, the fused loss, the
    # row sweep. The CSVs are rewritten after every case, so a run cut off from outside keeps what it measured.
    main_rows, jac_rows, fused_rows = [], [], []
    os.makedirs(out_dir, exist_ok=True)

    def save_progress():
        write_csv(os.path.join(out_dir, "results.csv"), main_rows, MAIN_COLUMNS)
        write_csv(os.path.join(out_dir, "jacobian.csv"), jac_rows, JAC_COLUMNS)

    try:
        for i, case in enumerate(cases):
            main_rows += run_case(case, makers, names, device, preset.timing, ceiling_bps, base, seed=seed + 2 * i,
                                  tick=tick, deadline=deadline)
            save_progress()
        budget = jacobian.memory_budget(device, preset.jac_budget_bytes)
        for info in sweep:
            jac_rows += jacobian.run_sweep(info, preset.jac_ns, preset.jac_batch, device, budget, preset.jac_timing, base,
                                           seed=seed + 1000, max_call_s=preset.jac_max_call_s, tick=tick, deadline=deadline)
            save_progress()
        fused_rows = fused_loss.run(fused, DTYPES[preset.fused_dtype], device, fused_providers, preset.timing, base,
                                    tick=tick, deadline=deadline)
        for i, case in enumerate(row_sweep):
            main_rows += run_case(case, makers, names, device, preset.timing, ceiling_bps, base, seed=seed + 500 + 2 * i,
                                  tick=tick, deadline=deadline)
            save_progress()
    finally:
        if bar is not None:
            bar.close()

    elapsed = time.monotonic() - start
    others = other_work(others_start, elapsed)
    header = "\n".join([
        f"# torch_vjp benchmark: {env['device']}",
        "",
        f"- date: {env['date']}; torch {env['torch']}; torch_vjp commit {env['commit']}; preset `{preset.name}`",
        f"- command: `{command or 'python -m benchmarks'}` ({elapsed:.0f} s)",
        f"- {describe(ceiling, preset.copy_bytes)}; speed-of-light (SoL) = the fewest bytes the op must move "
        "(benchmarks/sol.py) / that ceiling; a time under its SoL time is flagged, not printed as a percentage",
        f"- time: {timer_name(device)}; memory: {memory_method(device)}; allocator: {allocator}",
        *([f"- other work on the machine during the run: {others}"] if not device.startswith("cuda") else []),
        "- every provider's output and gradients (input, weight, bias, up) were checked against the float64 reference "
        "before timing (a mismatch is shown as **wrong**, untimed)",
        "",
    ])
    paths = write_report(out_dir, main_rows, jac_rows, header, fused_rows)
    with open(os.path.join(out_dir, "command.txt"), "w") as f:
        f.write(f"{command or 'python -m benchmarks'}\n\n"
                f"device: {env['device']}\ntorch: {env['torch']}\ncommit: {env['commit']}\ndate: {env['date']}\n"
                f"preset: {preset.name}\nseconds: {elapsed:.0f}\n"
                + (f"other work during the run: {others}\n" if not device.startswith("cuda") else ""))
    paths["command"] = os.path.join(out_dir, "command.txt")
    return {"main": main_rows, "jacobian": jac_rows, "fused": fused_rows, "paths": paths, "seconds": elapsed,
            "ceiling_gbps": ceiling_bps / 1e9}
