"""The row engine's launch plans for the benchmark shapes on an A100, H100 and H200, computed without a GPU.

plan_rows / plan_columns (csrc/cuda/plan_rows.h) are host code with no CUDA dependency: this module compiles
them with the host compiler (benchmarks/plan_host.cpp) and asks them for the plan of every row-engine op at
the CUDA preset's shapes (benchmarks/config.py), on each card. Beside each plan, what the launch bounds
guarantee (row_engine.cuh's row_kernel instances: RowKind and its bound; the register figures behind them are
benchmarks/kernel_resources.py's): resident blocks an SM, bytes of loads in flight an SM against what the
card needs to reach its bandwidth (Little's law: bandwidth × latency / SMs), waves, and reads of each row.

    python -m benchmarks.plans            # the tables in benchmarks/README.md ("Launch plans", "Fused loss")

The op constants below mirror the epilogues (csrc/cuda/*_epilogues.cuh: kIn, kParamSums, kMaxThreads,
kClusterThreads, kReduces); tests/test_cuda.py checks the mirror against torch.ops.torch_vjp_cuda.row_plan on
a GPU, and tests/test_cuda_static.py checks the plans below on any machine with a C++ compiler.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENCY_S = 0.8e-6  # DRAM load latency under load, about: what the loads in flight must cover


@dataclass(frozen=True)
class Gpu:
    sms: int
    clusters: bool  # sm_90: thread-block clusters
    bandwidth: float  # bytes/s, the datasheet's

    @property
    def need(self) -> float:
        """Bytes of loads an SM must have in flight to keep its share of the bandwidth busy."""
        return self.bandwidth * LATENCY_S / self.sms


GPUS = {"A100": Gpu(108, False, 2.04e12), "H100": Gpu(132, True, 3.35e12), "H200": Gpu(132, True, 4.8e12)}


@dataclass(frozen=True)
class EngineOp:
    inputs: int           # element inputs a thread loads (kIn)
    max_threads: int      # kMaxThreads (fp64 cross_entropy: 512)
    cluster_threads: int  # kClusterThreads
    reduces: bool = True  # kReduces: a row reduction (else a long row is cut into independent chunks)
    param_sums: bool = False  # the norm backwards' fused weight and bias gradients (kRowPacks = 2)
    block_threads: int = 512  # kBlockThreads: the Block instance's bound
    cluster_bound: int = 0    # kClusterBound: the Cluster instance's bound when above cluster_threads


# The ops of the engine as torch.ops.torch_vjp names them (a norm's backward: the kernel that writes dx with the
# parameter gradients, as row_plan reports it).
ENGINE_OPS = {
    "softmax": EngineOp(1, 1024, 512), "softmax_backward": EngineOp(2, 1024, 512),
    "log_softmax": EngineOp(1, 1024, 512), "log_softmax_backward": EngineOp(2, 1024, 512),
    "logsumexp": EngineOp(1, 1024, 512), "logsumexp_backward": EngineOp(1, 512, 512, reduces=False),
    "layer_norm": EngineOp(1, 768, 512, block_threads=768),
    "layer_norm_backward": EngineOp(2, 768, 512, param_sums=True),
    "rms_norm": EngineOp(1, 1024, 512, cluster_bound=768),
    "rms_norm_backward": EngineOp(2, 768, 512, param_sums=True),
    # add_layer_norm, add_rms_norm: the norm of s = input + residual, both loaded and added in the kernel that
    # writes s and y (AddNormForward: 2 loads in flight, so 4 packs a thread; Block instance bound at 512, the
    # half types' at 256 with blocks of at most 640 threads: block_threads, max_threads); the backward with
    # grad_sum (AddNormBackward: dy and s held, grad_sum read as dx is written; the half types' at most 640)
    "add_layer_norm": EngineOp(2, 768, 512), "add_layer_norm_backward": EngineOp(2, 768, 512, param_sums=True),
    "add_rms_norm": EngineOp(2, 1024, 512, cluster_bound=768),
    "add_rms_norm_backward": EngineOp(2, 768, 512, param_sums=True),
    "normalize": EngineOp(1, 1024, 512), "normalize_backward": EngineOp(2, 1024, 512),
    "cross_entropy": EngineOp(1, 1024, 512), "cross_entropy_backward": EngineOp(1, 512, 512, reduces=False),
    # fused_linear_cross_entropy's chunk of logits with the gradient: loss, statistics and dlogits in place from
    # one read (CrossEntropyForwardGrad, without label smoothing: the forward's plan)
    "fused_linear_cross_entropy": EngineOp(1, 1024, 512),
    # layer_norm's backward with dx alone (no parameters, or no parameter gradient wanted): the Jacobian sweep's
    # parameterless layer_norm (benchmarks/jacobian.py); not in the plan table below
    "layer_norm_backward_dx": EngineOp(2, 768, 512, block_threads=768, cluster_bound=768),
}
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}
SUB_WARP_THREADS, BYTES_IN_FLIGHT = 256, 32 * 1024  # row_engine.cuh's


def row_packs(op: EngineOp, dtype: str) -> int:
    """kRowPacks: 2 with parameter sums; 8 for one float input; else 4."""
    return 2 if op.param_sums else 8 if (op.inputs == 1 and ITEMSIZE[dtype] == 4) else 4


def block_threads(name: str, dtype: str) -> int:
    """kBlockThreads: float softmax and log_softmax forward bind their one Block instance at 1024 threads, the
    float fused loss at 768, the half types' dx-only norm backward at 640, their add-norm forward at 256."""
    if name in ("softmax", "log_softmax") and ITEMSIZE[dtype] == 4:
        return 1024
    if name == "fused_linear_cross_entropy" and ITEMSIZE[dtype] == 4:  # CrossEntropyForwardGrad<float, false>
        return 768
    if name == "layer_norm_backward_dx" and ITEMSIZE[dtype] == 2:  # NormBackward<true, half type, false>
        return 640
    if name in ("add_layer_norm", "add_rms_norm") and ITEMSIZE[dtype] == 2:  # AddNormForward<*, half type>
        return 256
    return ENGINE_OPS[name].block_threads


# The norm backwards with parameter sums whose Block instance asks for two blocks an SM (their kBlockMinBlocks:
# 2 × 512 threads, 64 registers), and takes whole-block row groups alone (kWholeBlockRows: their warp path runs
# the Shuffle instance at V = kRowPacks): float, and the half types' rms_norm_backward.
TWO_BLOCK_OPS = {("layer_norm_backward", "float32"), ("rms_norm_backward", "float32"),
                 ("add_layer_norm_backward", "float32"), ("add_rms_norm_backward", "float32"),
                 ("rms_norm_backward", "bfloat16"), ("rms_norm_backward", "float16")}


def block_min_blocks(name: str, dtype: str) -> int:
    """kBlockMinBlocks: blocks an SM the Block instance's launch bound asks for."""
    return 2 if (name, dtype) in TWO_BLOCK_OPS else 1


def max_threads(name: str, dtype: str) -> int:
    op = ENGINE_OPS[name]
    if name.startswith("add_") and ITEMSIZE[dtype] == 2:  # AddNormForward, AddNormBackward<*, half type, true>
        return 640
    return 512 if name in ("cross_entropy", "fused_linear_cross_entropy") and dtype == "float64" else op.max_threads


def host_program(name: str, *flags: str) -> str:
    """benchmarks/<name>.cpp compiled for the host, csrc/ on its include path, into a temporary folder: the
    program's path. (The CUDA code's host-compilable parts: the planner, GELU's half-type formula.)"""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise FileNotFoundError(f"no C++ compiler (g++, c++ or clang++) to build benchmarks/{name}.cpp")
    out = os.path.join(tempfile.mkdtemp(prefix=f"torch_vjp_{name}_"), name)
    subprocess.run([cxx, "-std=c++17", *flags, "-Wall", "-Wextra", "-Werror", "-I", os.path.join(ROOT, "csrc"),
                    os.path.join(ROOT, "benchmarks", f"{name}.cpp"), "-o", out], check=True, capture_output=True)
    return out


@functools.lru_cache(maxsize=1)
def plan_host() -> str:
    """The compiled planner (benchmarks/plan_host.cpp), built once per process."""
    return host_program("plan_host", "-O1")


def query(lines: list[str]) -> list[dict]:
    result = subprocess.run([plan_host()], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
    keys = ("path", "V", "threads", "lanes", "cluster", "chunks", "chunk_len", "blocks")
    return [dict(zip(keys, [f[0], *map(int, f[1:])])) for f in (line.split() for line in result.stdout.splitlines())]


def register_budget(threads: int, blocks: int) -> int:
    warps = -(-threads // 32)
    return min(255, (65536 // (blocks * warps) // 32) // 8 * 8)


def instance(name: str, dtype: str, plan: dict) -> tuple[str, int, int]:
    """(RowKind, launch bound, blocks an SM the bound asks for) of the row_kernel instance a plan launches."""
    op = ENGINE_OPS[name]
    vmax = row_packs(op, dtype)
    # kWholeBlockRows ops' warp path (32 lanes, V = kRowPacks) runs the Shuffle instance too
    warp_path = plan["lanes"] == 32 and plan["cluster"] == 1 and plan["chunks"] == 1
    if plan["V"] < vmax or (block_min_blocks(name, dtype) > 1 and warp_path):
        per_block = SUB_WARP_THREADS * plan["V"] * op.inputs * 16
        return "Shuffle", SUB_WARP_THREADS, max(1, min(BYTES_IN_FLIGHT // per_block, 6))  # kShuffleMaxMinBlocks
    if plan["cluster"] > 1:
        return "Cluster", max(op.cluster_threads, op.cluster_bound), 1
    top = max_threads(name, dtype)
    if plan["threads"] <= min(block_threads(name, dtype), top):
        return "Block", min(block_threads(name, dtype), top), block_min_blocks(name, dtype)
    return "WideBlock", top, 1


# The row_kernel instance each op launches (csrc/cuda/*_epilogues.cuh), as c++filt spells it in the library, so
# that the plans can be matched against benchmarks/kernel_resources.py's SPILLS.
KERNEL_OPS = {
    "softmax": "SoftmaxForward<(torch_vjp::math::SoftmaxKind)0, {T}>",
    "log_softmax": "SoftmaxForward<(torch_vjp::math::SoftmaxKind)1, {T}>",
    "logsumexp": "SoftmaxForward<(torch_vjp::math::SoftmaxKind)2, {T}>",
    "softmax_backward": "SoftmaxBackward<(torch_vjp::math::SoftmaxKind)0, {T}>",
    "log_softmax_backward": "SoftmaxBackward<(torch_vjp::math::SoftmaxKind)1, {T}>",
    "logsumexp_backward": "LogSumExpBackward<{T}>",
    "layer_norm": "NormForward<true, {T}>", "rms_norm": "NormForward<false, {T}>",
    "layer_norm_backward": "NormBackward<true, {T}, true>", "rms_norm_backward": "NormBackward<false, {T}, true>",
    "layer_norm_backward_dx": "NormBackward<true, {T}, false>",
    "add_layer_norm": "AddNormForward<true, {T}>", "add_rms_norm": "AddNormForward<false, {T}>",
    "add_layer_norm_backward": "AddNormBackward<true, {T}, true>", "add_rms_norm_backward": "AddNormBackward<false, {T}, true>",
    "normalize": "NormalizeForward<{T}>", "normalize_backward": "NormalizeBackward<{T}>",
    "cross_entropy": "CrossEntropyForward<{T}, false>", "cross_entropy_backward": "CrossEntropyGrad<{T}>",
    "fused_linear_cross_entropy": "CrossEntropyForwardGrad<{T}, false>",
}
CXX_TYPES = {"bfloat16": "c10::BFloat16", "float16": "c10::Half", "float32": "float", "float64": "double"}
ROW_KINDS = ("Shuffle", "Block", "WideBlock", "Cluster")  # row_engine.cuh's RowKind
ARCH = {"A100": "sm_80", "H100": "sm_90", "H200": "sm_90"}


def kernel_name(r: dict) -> str:
    """The demangled name of the row_kernel instance a plan row (row_table's) launches."""
    op = "torch_vjp::cuda::" + KERNEL_OPS[r["op"]].format(T=CXX_TYPES[r["dtype"]])
    return (f"void torch_vjp::cuda::row_kernel<{op}, {r['V']}, (torch_vjp::cuda::RowKind){ROW_KINDS.index(r['kind'])}>"
            f"(torch_vjp::cuda::EngineArgs<{op} >)")


def row_table(shapes, dtypes, names=tuple(ENGINE_OPS), gpus=GPUS) -> list[dict]:
    """One row per op × dtype × shape × card: the plan and what it guarantees."""
    cases = [(name, dtype, rows, n, card) for name in names for dtype in dtypes for rows, n in shapes for card in gpus]
    lines = []
    for name, dtype, rows, n, card in cases:
        op, gpu = ENGINE_OPS[name], gpus[card]
        clusters = gpu.clusters and op.reduces
        P = 16 // ITEMSIZE[dtype]
        max_off = 0 if n % P == 0 else P - 1  # rows start at every offset (plan_row_kernel, aligned tensors)
        lines.append(f"rows {rows} {n} {P} {row_packs(op, dtype)} {max_threads(name, dtype)} "
                     f"{op.cluster_threads} {gpu.sms} {int(clusters)} {max_off}")
    table = []
    for (name, dtype, rows, n, card), plan in zip(cases, query(lines)):
        op, gpu = ENGINE_OPS[name], gpus[card]
        kind, bound, min_blocks = instance(name, dtype, plan)
        cap = register_budget(bound, min_blocks)  # registers a thread at most: what the bound guarantees
        warps = -(-plan["threads"] // 32)
        resident = max(1, min(2048 // (warps * 32), 32, 65536 // (warps * 32 * cap)))
        slots = plan["blocks"] * max(1, min(plan["chunks"], 65535))  # blocks of the grid
        per_sm = min(resident, -(-slots // gpu.sms))
        in_flight = per_sm * plan["threads"] * plan["V"] * op.inputs * 16
        few = rows * plan["cluster"] < gpu.sms // 2  # the split of few rows re-reads from L2
        reads = 2 if plan["path"] == "split" and op.reduces and not few else 1
        table.append(dict(op=name, dtype=dtype, rows=rows, n=n, gpu=card, kind=kind, bound=bound, resident=per_sm,
                          in_flight=in_flight, need=gpu.need, waves=slots / (resident * gpu.sms), reads=reads, **plan))
    return table


def cell(r: dict) -> str:
    """One card's plan: path, threads × cluster (× chunks), V, the instance, KB in flight / need, reads."""
    shape = f"{r['threads']}×{r['cluster']}" + (f"×{r['chunks']}" if r["chunks"] > 1 else "")
    return (f"{r['path']} {shape} V{r['V']} {r['kind']} · {r['resident']}/SM · {r['in_flight'] / 1024:.0f}/"
            f"{r['need'] / 1024:.0f} KB · {r['waves']:.0f} waves" + (" · **2 reads**" if r["reads"] > 1 else ""))


def markdown(table: list[dict]) -> str:
    """One line per op × dtype × shape, one column per card."""
    cards = list(dict.fromkeys(r["gpu"] for r in table))
    out = ["| op | dtype | rows × n | " + " | ".join(cards) + " |", "|---|---|---|" + "---|" * len(cards)]
    lines: dict[tuple, dict] = {}
    for r in table:
        lines.setdefault((r["op"], r["dtype"], r["rows"], r["n"]), {})[r["gpu"]] = cell(r)
    for (op, dtype, rows, n), cells in lines.items():
        out.append(f"| {op} | {dtype} | {rows} × {n} | " + " | ".join(cells.get(c, "") for c in cards) + " |")
    return "\n".join(out)


def benchmark_table() -> list[dict]:
    from benchmarks.config import PRESETS

    preset = PRESETS["cuda"]
    shapes = tuple(preset.shapes) + tuple(preset.row_sweep)
    table = row_table(shapes, preset.dtypes,
                      names=tuple(n for n in ENGINE_OPS if n not in ("fused_linear_cross_entropy", "layer_norm_backward_dx")))
    vocab = tuple((tokens, vocab) for tokens, _, vocab in preset.fused_shapes)
    table += row_table(vocab, (preset.fused_dtype,), names=("cross_entropy", "cross_entropy_backward"))
    table += row_table(fused_chunks(preset), (preset.fused_dtype,),
                       names=("cross_entropy", "cross_entropy_backward", "fused_linear_cross_entropy"))
    return table


def jacobian_table() -> list[dict]:
    """The plans of the Jacobian sweep (benchmarks/jacobian.py: softmax and parameterless layer_norm, forward and
    backward, at the CUDA preset's batch and row lengths, in its dtype)."""
    import re

    from benchmarks.config import PRESETS

    preset = PRESETS["cuda"]
    shapes = tuple((preset.jac_batch, n) for n in preset.jac_ns)
    # jacobian.py's DTYPE, read from its source (importing it imports the built library)
    source = open(os.path.join(ROOT, "benchmarks", "jacobian.py")).read()
    dtype = re.search(r"^DTYPE = torch\.(\w+)", source, re.M).group(1)
    return row_table(shapes, (dtype,), names=("softmax", "softmax_backward", "layer_norm", "layer_norm_backward_dx"))


CHUNK_BYTES = 112 << 20  # csrc/cuda/cross_entropy.cu's kChunkBytes


def chunk_rows(rows: int, vocab: int, itemsize: int) -> int:
    """csrc/ops/cross_entropy.h's chunk_rows: the rows of one chunk of fused_linear_cross_entropy's logits."""
    return min(max(CHUNK_BYTES // max(1, vocab * itemsize) // 8 * 8, 8), max(rows, 8))


def fused_chunks(preset) -> tuple:
    """(rows, vocab) of the chunks of logits the fused loss's row kernels run on at the preset's shapes."""
    size = ITEMSIZE[preset.fused_dtype]
    return tuple(dict.fromkeys((chunk_rows(tokens, vocab, size), vocab) for tokens, _, vocab in preset.fused_shapes))


def fused_loss_passes(table: list[dict]) -> list[dict]:
    """Passes over each chunk of the fused loss's logits by its row kernels where the gradient is wanted (the
    matrix products aside; benchmarks/sol.py's FUSED_LOSS_ROW_PASSES): before, the forward kernel's reads, then
    the gradient kernel's read and write; now, the one kernel's reads and its write."""
    plans = {(r["op"], r["rows"], r["n"], r["gpu"]): r for r in table}
    out = []
    for (op, rows, n, gpu), r in plans.items():
        if op != "fused_linear_cross_entropy":
            continue
        before = plans[("cross_entropy", rows, n, gpu)]["reads"] + 2
        out.append(dict(rows=rows, n=n, gpu=gpu, dtype=r["dtype"], before=before, now=r["reads"] + 1))
    return out


def fused_markdown(passes: list[dict]) -> str:
    cards = list(dict.fromkeys(p["gpu"] for p in passes))
    out = ["| chunk (rows × vocab) | dtype | " + " | ".join(f"{c}: before → now" for c in cards) + " |",
           "|---|---|" + "---|" * len(cards)]
    lines: dict[tuple, dict] = {}
    for p in passes:
        lines.setdefault((p["rows"], p["n"], p["dtype"]), {})[p["gpu"]] = f"{p['before']} → {p['now']}"
    for (rows, n, dtype), cells in lines.items():
        out.append(f"| {rows} × {n} | {dtype} | " + " | ".join(cells.get(c, "") for c in cards) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    _table = benchmark_table()
    print(markdown(_table))
    print()
    print(fused_markdown(fused_loss_passes(_table)))
    sys.exit(0)
