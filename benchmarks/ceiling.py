"""The memory-bandwidth ceiling that every % of speed-of-light is taken against.

SoL time = the bytes an op must move (sol.py) / the ceiling. A ceiling must be one no provider beats, so it
is the best of several probes over the same buffer size, each counted in the bytes it must move (reads plus
writes, as sol.py counts an op's):

  copy         torch's copy_: reads n, writes n. On a CPU a cached store of a new line first reads it
               (read-for-ownership), so a copy moves 3n while being credited 2n: alone it is no ceiling.
  read         torch's sum: reads n, writes nothing.
  triad        a = b + 2c (torch.add with out=): reads 2n, writes n.
  stream copy  CPU only: a copy with non-temporal stores (no read-for-ownership), compiled here from C with
               the system compiler; left out, and said so, where there is none.

The report says which probe won and every probe's figure; a row that still comes out above 100% is flagged
instead of printed.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import os
import platform
import shutil
import subprocess
import tempfile

import torch

from .timing import TimingConfig, time_ms

_STREAM_COPY_C = r"""
#include <immintrin.h>
/* dst[0:n] = src[0:n] with non-temporal stores; n a multiple of 16, dst 64-byte aligned. */
void stream_copy(float* dst, const float* src, long n) {
  for (long i = 0; i < n; i += 16) {
#if defined(__AVX512F__)
    _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#elif defined(__AVX__)
    _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
    _mm256_stream_ps(dst + i + 8, _mm256_loadu_ps(src + i + 8));
#else
    for (int k = 0; k < 16; k += 4) _mm_stream_ps(dst + i + k, _mm_loadu_ps(src + i + k));
#endif
  }
  _mm_sfence();
}
"""
_stream_copy_lib = None


def _stream_copy():
    """The compiled stream_copy, or a string saying why there is none."""
    global _stream_copy_lib
    if _stream_copy_lib is None:
        compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if platform.machine().lower() not in ("x86_64", "amd64"):
            _stream_copy_lib = "not x86-64"
        elif compiler is None:
            _stream_copy_lib = "no C compiler"
        else:
            folder = tempfile.mkdtemp(prefix="torch_vjp_ceiling_")
            source, library = os.path.join(folder, "stream_copy.c"), os.path.join(folder, "stream_copy.so")
            with open(source, "w") as f:
                f.write(_STREAM_COPY_C)
            build = subprocess.run([compiler, "-O2", "-march=native", "-shared", "-fPIC", source, "-o", library],
                                   capture_output=True, text=True)
            if build.returncode != 0:
                _stream_copy_lib = f"compile failed: {build.stderr.strip()[:80]}"
            else:
                lib = ctypes.CDLL(library)
                lib.stream_copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
                _stream_copy_lib = lib
    return _stream_copy_lib


def _threaded_stream_copy(lib, dst: torch.Tensor, src: torch.Tensor):
    """stream_copy split over torch's thread count (ctypes releases the GIL during each call)."""
    threads = torch.get_num_threads()
    per = (src.numel() // threads) // 16 * 16
    slices = [(i * per, per if i < threads - 1 else src.numel() - i * per) for i in range(threads)]
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    itemsize = src.element_size()

    def run():
        list(pool.map(lambda s: lib.stream_copy(dst.data_ptr() + s[0] * itemsize, src.data_ptr() + s[0] * itemsize, s[1]),
                      slices))

    return run


def memory_ceiling(device: str, nbytes: int, cfg: TimingConfig = TimingConfig()) -> dict:
    """{"bps": the ceiling in bytes/s, "probe": the winning probe, "probes": {name: GB/s or why not run}}."""
    n = nbytes // 4 // 64 * 64
    a, b, c = (torch.randn(n, device=device) for _ in range(3))
    probes = {
        "copy": (lambda: a.copy_(b), 2 * n * 4),
        "read": (lambda: b.sum(), n * 4),
        "triad": (lambda: torch.add(b, c, alpha=2.0, out=a), 3 * n * 4),
    }
    results = {}
    if not device.startswith("cuda"):
        lib = _stream_copy()
        if isinstance(lib, str):
            results["stream copy"] = f"not run ({lib})"
        else:
            probes["stream copy"] = (_threaded_stream_copy(lib, a, b), 2 * n * 4)
    best = ("", 0.0)
    for name, (fn, moved) in probes.items():
        fn()
        ms = min(time_ms(fn, device, cfg) for _ in range(3))  # the best of three: a ceiling
        bps = moved / (ms * 1e-3)
        results[name] = round(bps / 1e9, 1)
        if bps > best[1]:
            best = (name, bps)
    return {"bps": best[1], "probe": best[0], "probes": results}


def describe(ceiling: dict, nbytes: int) -> str:
    probes = ", ".join(f"{name} {value}" + (" GB/s" if not isinstance(value, str) else "")
                       for name, value in ceiling["probes"].items())
    return (f"memory ceiling: **{ceiling['bps'] / 1e9:.1f} GB/s**, the best of {len(ceiling['probes'])} probes over "
            f"{nbytes >> 20} MiB, each credited only the bytes it must move ({probes}; see benchmarks/ceiling.py)")
