"""How a number is measured: time (median), peak memory, and the run's metadata.

CPU: torch.utils.benchmark.Timer (blocked_autorange, median), with all of torch's threads.
CUDA: the GPU's time for a call, never the host's. The autograd wrapper costs about as much host time per
forward + backward (~0.1 ms) as the kernels take at the reference sizes, so events around single calls would
time the host. Instead the calls are captured in a CUDA graph, N in a row, and the graph is replayed between
two events (triton.testing.do_bench_cudagraph's method): the median of 10 replays, divided by N. The harness
gives consecutive calls different input sets, so that L2 never holds a call's inputs from the call before.
Captured on capture_stream(): autograd runs each backward op on the stream of its forward op, so a graph
that replays only a backward needs that forward recorded on the capture stream too (on_capture_stream()).
A call that cannot be captured is timed as N back-to-back calls between two events instead (then the host
can be the bound; the row's timer says which method). The host's own cost per call is measured apart
(host_overhead_ms): wall time of issuing calls without waiting for the GPU, per call.
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
    rep_ms: float = 100.0  # CUDA: time spent in timed repeats (10 graph replays)
    max_repeats: int = 1000  # CUDA: at most this many calls in one graph
    slow_s: float = 0.25  # a call longer than this is timed three times, no more (full Jacobians)


# How a CUDA (or CPU) time was taken, as the `timer` column says it.
TIMERS = {
    "graph": "CUDA graph replay (N calls captured, median of 10 replays / N)",
    "events": "CUDA events around N back-to-back calls (the call could not be captured; the host may bound it)",
    "wall": "wall clock, median of 3 calls (calls over 0.25 s)",
    "cpu": "torch.utils.benchmark blocked_autorange, median",
}


@dataclass(frozen=True)
class Measurement:
    ms: float  # median milliseconds of one call
    timer: str  # a key of TIMERS
    host_ms: float | None = None  # CUDA: host time to issue one call (Python, autograd, launches)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn, device: str, cfg: TimingConfig = TimingConfig()) -> float:
    """Median milliseconds of one call of fn() (which has been called once already: warm)."""
    return measure(fn, device, cfg).ms


def measure(fn, device: str, cfg: TimingConfig = TimingConfig()) -> Measurement:
    """Median milliseconds of one call of fn() (called once already: warm), how they were taken, and on CUDA
    the host's time to issue one call."""
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
        return Measurement(statistics.median(calls) * 1e3, "wall")
    if device.startswith("cuda"):
        # The probe (wall time of one call) bounds the GPU time from above: it sizes what follows, so that a
        # slow call (a full Jacobian, tens of ms) is not run hundreds of times.
        host = host_overhead_ms(fn, calls=int(min(20, max(1, 4 / (probe * 1e3)))))
        try:
            return Measurement(_time_graph(fn, cfg, probe * 1e3), "graph", host)
        except Exception:  # noqa: BLE001  (capture refused: a host sync, a CPU-side op, a non-capture stream)
            torch.cuda.synchronize()
            return Measurement(_time_back_to_back(fn, cfg, probe * 1e3), "events", host)
    from torch.utils.benchmark import Timer

    # num_threads: Timer defaults to ONE thread; the benchmark means the machine as torch runs it.
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return Measurement(timer.blocked_autorange(min_run_time=cfg.min_run_time).median * 1e3, "cpu")


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def capture_stream() -> torch.cuda.Stream:
    """The side stream CUDA graphs are captured on (one per device; capture cannot use the default stream)."""
    device = torch.cuda.current_device()
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream()
    return _CAPTURE_STREAMS[device]


@contextlib.contextmanager
def on_capture_stream(device: str):
    """Run a block on the capture stream (after the current stream's work): forwards whose backward alone is
    timed must be recorded there. A no-op on CPU."""
    if not device.startswith("cuda"):
        yield
        return
    stream = capture_stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        torch.cuda.current_stream().wait_stream(stream)


def _estimate_ms(fn, probe_ms: float) -> float:
    calls = 5 if probe_ms < 10 else 1
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return max(start.elapsed_time(end) / calls, 1e-3)


def _schedule(estimate_ms: float, cfg: TimingConfig) -> tuple[int, int]:
    """(calls per replay, replays): replays of ~rep_ms / 10 each, 10 of them; a call longer than that is
    replayed alone, rep_ms / its time times (3 to 10)."""
    calls = int(min(cfg.max_repeats, max(1, round(cfg.rep_ms / 10 / estimate_ms))))
    replays = 10 if calls > 1 else int(min(10, max(3, cfg.rep_ms / estimate_ms)))
    return calls, replays


def _median_of_replays(run, calls: int, replays: int) -> float:
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def _warm_up(fn, estimate_ms: float, cfg: TimingConfig) -> None:
    for _ in range(int(cfg.warmup_ms / estimate_ms)):
        fn()


def _time_graph(fn, cfg: TimingConfig, probe_ms: float) -> float:
    with on_capture_stream("cuda"):
        estimate = _estimate_ms(fn, probe_ms)  # also the warm-up on this stream that capture requires
        _warm_up(fn, estimate, cfg)
        calls, replays = _schedule(estimate, cfg)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=capture_stream()):
            for _ in range(calls):
                fn()
        try:
            return _median_of_replays(graph.replay, calls, replays)
        finally:
            del graph  # its memory pool goes back to the allocator


def _time_back_to_back(fn, cfg: TimingConfig, probe_ms: float) -> float:
    estimate = _estimate_ms(fn, probe_ms)
    _warm_up(fn, estimate, cfg)
    calls, replays = _schedule(estimate, cfg)

    def run():
        for _ in range(calls):
            fn()

    return _median_of_replays(run, calls, replays)


def host_overhead_ms(fn, calls: int = 20) -> float:
    """Host milliseconds to issue one call without waiting for the GPU: the median of 5 batches of `calls`
    calls (few enough that the launch queue never fills and blocks the host)."""
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def cuda_input_sets(bytes_per_call: int, device: str, most: int = 8) -> int:
    """Input sets to rotate among so that, replayed back to back, no call finds its inputs in L2: enough
    that the calls in between move three times the L2 size, at least 2."""
    l2 = getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", 64 << 20)
    return int(min(most, max(2, -(-3 * l2 // max(bytes_per_call, 1)))))


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
