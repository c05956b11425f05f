"""The embedded sizes: one preset per hardware, plus a quick one. Each size says why it is what it is."""
from __future__ import annotations

from dataclasses import dataclass, field

from .timing import TimingConfig


@dataclass(frozen=True)
class Preset:
    name: str
    shapes: tuple  # (rows, n) every op runs at
    row_sweep: tuple  # extra (rows, n) for the ops that reduce along a row (not elementwise)
    dtypes: tuple  # names of torch dtypes; the row sweep uses the first only
    copy_bytes: int  # buffer size for the copy-bandwidth ceiling
    timing: TimingConfig
    jac_batch: int  # rows in the Jacobian sweep (fixed, n varies)
    jac_ns: tuple  # row lengths of the Jacobian sweep
    jac_budget_bytes: int | None  # estimated peak above which a case is skipped; None: device memory
    jac_timing: TimingConfig = field(default_factory=TimingConfig)
    jac_max_call_s: float = 5.0  # a point whose call is predicted (from the last n) to take longer is skipped
    fused_shapes: tuple = ()  # (tokens, hidden, vocab) of the fused loss section (benchmarks/fused_loss.py)
    fused_dtype: str = "float32"


PRESETS = {
    # The reference sizes of the issue and of shared/anchors/: 16384 × 4096 is 128 MiB a tensor in bf16,
    # so forward + backward moves ~640 MiB, far beyond L2 (50-60 MB) and long enough (~0.2 ms) that launch
    # overhead is noise. The row sweep keeps rows × n = 2^26 (the same bytes) while n crosses the kernels'
    # regimes: 1024 (many short rows), 8192, 32768 (a row larger than one block's registers).
    # The Jacobian sweep uses 64 rows: the whole-batch Jacobian (64n)² reaches 16 GiB at n = 1024,
    # per-row Jacobians 64 n² reach 16 GiB at n = 8192; larger points are recorded as skipped or OOM.
    "cuda": Preset(
        name="cuda",
        shapes=((16384, 4096),),
        row_sweep=((65536, 1024), (8192, 8192), (2048, 32768)),
        dtypes=("bfloat16", "float32"),
        copy_bytes=1 << 30,
        timing=TimingConfig(warmup_ms=25, rep_ms=100),
        jac_batch=64,
        jac_ns=(64, 128, 256, 512, 1024, 2048, 4096, 8192),
        jac_budget_bytes=None,
        jac_timing=TimingConfig(warmup_ms=10, rep_ms=50),
        jac_max_call_s=4.0,
        # The anchors' reference (shared/anchors/): 8192 tokens × 4096 hidden × vocab 128256 in bf16, where the
        # three products alone take 37.6 ms on an H200 and eager holds 6-12 GiB; Llama-2's vocab 32000 at the
        # same tokens; and 2048 tokens, where a chunk is a larger share of the rows.
        fused_shapes=((8192, 4096, 128256), (8192, 4096, 32000), (2048, 4096, 128256)),
        fused_dtype="bfloat16",
    ),
    "cuda-quick": Preset(
        name="cuda-quick",
        shapes=((4096, 4096),),
        row_sweep=(),
        dtypes=("bfloat16",),
        copy_bytes=1 << 29,
        timing=TimingConfig(warmup_ms=10, rep_ms=40),
        jac_batch=64,
        jac_ns=(64, 256, 1024, 4096),
        jac_budget_bytes=None,
        jac_timing=TimingConfig(warmup_ms=5, rep_ms=20),
        jac_max_call_s=2.0,
        fused_shapes=((4096, 4096, 128256),),
        fused_dtype="bfloat16",
    ),
    # 2 cores, ~2 minutes for everything. 32 MiB a tensor (fp32 4096 × 2048): x, y, dy and dx together
    # (128 MiB) are 4× a 32 MiB L3, and the timing rotates among 4 input sets, so the numbers are about
    # memory, not cache. (timing.keep_freed_memory keeps glibc from page-faulting such blocks anew on every
    # call.) The row sweep keeps rows × n = 2^23 with rows of 256 and 32768. The Jacobian sweep runs 8
    # rows: the whole-batch Jacobian is (8n)² floats (1 GiB at n = 2048), the per-row Jacobians 8n²
    # (512 MiB at n = 4096); the 2 GiB budget skips what would swap the machine. The fused loss: the two
    # vocabularies of the CUDA preset at 256 and 1024 tokens of hidden size 128 (each product 1-4 GFLOP: about
    # a second per forward + backward at vocab 128256 on 2 cores; eager's logits 130-500 MiB).
    "cpu": Preset(
        name="cpu",
        shapes=((4096, 2048),),
        row_sweep=((32768, 256), (256, 32768)),
        dtypes=("float32",),
        copy_bytes=256 << 20,
        timing=TimingConfig(min_run_time=0.2),
        jac_batch=8,
        jac_ns=(64, 128, 256, 512, 1024, 2048, 4096),
        jac_budget_bytes=2 << 30,
        jac_timing=TimingConfig(min_run_time=0.1),
        jac_max_call_s=2.0,
        fused_shapes=((256, 128, 32000), (1024, 128, 32000), (256, 128, 128256)),
    ),
    # Half the bytes of "cpu" (16 MiB a tensor: the 4 rotated input sets are still 6× the L3), no row
    # sweep, a shorter Jacobian sweep and shorter timing: about a minute.
    "cpu-quick": Preset(
        name="cpu-quick",
        shapes=((2048, 2048),),
        row_sweep=(),
        dtypes=("float32",),
        copy_bytes=128 << 20,
        timing=TimingConfig(min_run_time=0.15),
        jac_batch=8,
        jac_ns=(64, 256, 1024, 2048),
        jac_budget_bytes=1 << 30,
        jac_timing=TimingConfig(min_run_time=0.05),
        jac_max_call_s=1.0,
        fused_shapes=((256, 128, 32000),),
    ),
}


def preset_for(device: str, quick: bool) -> Preset:
    base = "cuda" if device.startswith("cuda") else "cpu"
    return PRESETS[base + ("-quick" if quick else "")]
