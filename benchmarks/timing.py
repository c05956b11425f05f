"""How a number is measured: time (median), peak memory, and the run's metadata.

CPU: torch.utils.benchmark.Timer (blocked_autorange, median), with all of torch's threads.
CUDA: CUDA events around each call, the median of many, after a warm-up, with L2 flushed before every
repeat (the same method as triton.testing.do_bench, written out so the suite needs no triton).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class TimingConfig:
    min_run_time: float = 0.2  # CPU: seconds per blocked_autorange measurement
    warmup_ms: float = 25.0  # CUDA: warm-up time before the timed repeats
    rep_ms: float = 100.0  # CUDA: time spent in timed repeats
    max_repeats: int = 1000
    slow_s: float = 0.25  # a call longer than this is timed three times, no more (full Jacobians)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


_L2_FLUSH: dict[str, torch.Tensor] = {}


def _flush_buffer(device: str) -> torch.Tensor:
    # 256 MiB: several times any L2 (H100 50 MB, H200 60 MB), so zeroing it evicts the working set.
    if device not in _L2_FLUSH:
        _L2_FLUSH[device] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    return _L2_FLUSH[device]


def time_ms(fn, device: str, cfg: TimingConfig = TimingConfig()) -> float:
    """Median milliseconds of one call of fn() (which has been called once already: warm)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    probe = time.perf_counter() - t0
    if probe > cfg.slow_s:  # seconds a call: repeats would only spend the budget; three calls, median
        calls = [probe]
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            calls.append(time.perf_counter() - t0)
        return statistics.median(calls) * 1e3
    if device.startswith("cuda"):
        return _time_cuda(fn, device, cfg)
    from torch.utils.benchmark import Timer

    # num_threads: Timer defaults to ONE thread; the benchmark means the machine as torch runs it.
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=cfg.min_run_time).median * 1e3


def _time_cuda(fn, device: str, cfg: TimingConfig) -> float:
    flush = _flush_buffer(device)
    fn()
    torch.cuda.synchronize()
    # Estimate one call, then size the warm-up and the repeats in time, like do_bench.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(cfg.warmup_ms / estimate))):
        fn()
    repeats = min(cfg.max_repeats, max(3, int(cfg.rep_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        flush.zero_()  # L2 holds nothing of the working set when the timed call starts
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


@contextlib.contextmanager
def _quiet_fd2():
    """Silence C++ writes to stderr (Kineto prints profiler_start/stop lines) for one block."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_memory_bytes(fn, device: str):
    """Peak bytes allocated during one fn() beyond what was allocated before it, or None if not measured.

    CUDA: torch.cuda.max_memory_allocated. CPU: torch's profiler with profile_memory records every
    allocation and free made through torch's CPU allocator (tensors, including those of the compiled and
    extension kernels) as events with a time and a signed size; their running sum, in time order, peaks
    at the answer. Scratch memory a kernel takes from malloc directly is not seen. If this torch's
    profiler does not expose the events, the answer is None ("not measured"), never a guess.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with _quiet_fd2():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
        events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size))  # + allocation, - free
            stack.extend(node.children)
    except Exception:  # noqa: BLE001  (any failure means: not measured)
        return None
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return peak


_MALLOC_SET = None


def keep_freed_memory() -> str:
    """On glibc, keep freed memory in the process (mallopt: no mmap'd blocks, no trimming); says what it did.

    By default glibc serves blocks of 32 MiB and more with fresh mmap pages and returns large free blocks
    to the OS, so a CPU benchmark that allocates its outputs would page-fault them anew on every call
    (measured here: softmax forward+backward at 4096 × 2048 fp32 took 21 ms with ~9000 page faults a call,
    9 ms without) and would time the kernel's page-fault handling, not its work. A training loop reuses
    its memory (and PyTorch users often preload jemalloc or tcmalloc for exactly this); so does this setting.
    """
    global _MALLOC_SET
    if _MALLOC_SET is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
            ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
            _MALLOC_SET = "glibc mallopt: no mmap blocks, no trimming (freed memory is reused)" if ok else "default"
        except (OSError, AttributeError):
            _MALLOC_SET = "default (not glibc)"
    return _MALLOC_SET


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """Short commit of the library, "+dirty" when its sources differ from it, "unknown" without git."""
    commit = _git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "csrc", "torch_vjp", "setup.py")
    return commit + ("+dirty" if dirty else "")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def environment(device: str) -> dict:
    """The columns every row carries."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device),
        "torch": torch.__version__,
        "commit": git_commit(),
    }
