"""Static evidence that the CUDA kernels run as planned, from the built library alone (no GPU needed).

For every kernel instance in every cubin of the library (sm_80 and sm_90), `cuobjdump -res-usage` gives its
registers and stack frame, and the cubin's .nv.info its launch bound (EIATTR_MAX_THREADS). This checks:

  1. no spill: the stack frame (spilled registers and local arrays) is 0 bytes, except where SPILLS below
     names the instance and says why;
  2. occupancy: the registers fit the block count an SM the instance's plan assumes (OCCUPANCY below) at its
     launch bound: registers × threads × blocks <= the SM's 64 Ki registers, counted as the hardware
     allocates them (per warp, in units of 256 registers, i.e. 8 a thread);
  3. every instance is covered by a rule (a new kernel must say what it assumes).

Run by .ci/run's CUDA step after the FORCE_CUDA=1 build (exit status 1 on a regression), and by
tests/test_cuda_static.py where a CUDA build and cuobjdump are at hand:

    python -m benchmarks.kernel_resources torch_vjp/_C*.so [--table]

Figures of the build this was written against (CUDA 13.0) are in benchmarks/README.md ("Static evidence").
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

REGISTERS_PER_SM = 65536  # sm_80, sm_90 (and sm_100, sm_120)
THREADS_PER_SM = {"sm_80": 2048, "sm_90": 2048}
ARCHS = ("sm_80", "sm_90")

# The row engine's loads in flight an SM that a shuffle-path block count must reach (row_engine.cuh's
# kRowBytesInFlight): about an H200's need (4.8 TB/s × ~0.8 µs / 132 SMs ≈ 30 KB; an H100's is 20-25 KB).
ROW_BYTES_IN_FLIGHT = 32 * 1024
SUB_WARP_THREADS = 256  # row_engine.cuh's kSubWarpThreads: the shuffle paths' largest block
SHUFFLE_MAX_MIN_BLOCKS = 6  # row_engine.cuh's kShuffleMaxMinBlocks (40 registers)

# Element inputs each row-engine op loads per element (its kIn): the bytes a thread has in flight are
# V packs × 16 bytes × this.
ROW_OP_INPUTS = {
    "SoftmaxForward": 1, "SoftmaxBackward": 2, "LogSumExpBackward": 1,
    "NormForward": 1, "NormBackward": 2, "NormalizeForward": 1, "NormalizeBackward": 2,
    # add_*_norm: input and residual in flight together (kAddsInput); the backward's grad_sum is read only as dx
    # is written (kOutAddend), so dy and s
    "AddNormForward": 2, "AddNormBackward": 2,
    "CrossEntropyForward": 1, "CrossEntropyGrad": 1, "CrossEntropyForwardGrad": 1, "SlotSum": 1,
    # class weights with label smoothing: the logits as above, plus w_j a class (scalar loads of a (C,) vector
    # every row shares, from L1/L2)
    "WeightedCrossEntropyForward": 1, "WeightedCrossEntropyGrad": 1, "WeightedCrossEntropyForwardGrad": 1,
}


def shuffle_blocks(op: str, V: int) -> int:
    """row_engine.cuh's kRowMinBlocks for a Shuffle instance: 256-thread blocks that hold the loads wanted."""
    per_block = SUB_WARP_THREADS * V * ROW_OP_INPUTS[op] * 16
    return max(1, min(ROW_BYTES_IN_FLIGHT // per_block, SHUFFLE_MAX_MIN_BLOCKS))


@dataclass(frozen=True)
class Rule:
    pattern: str   # regular expression searched in the demangled name
    threads: int | None  # the launch bound the plan launches up to; None: the instance's own bound (checked >= 32)
    blocks: object  # resident blocks an SM the plan assumes: an int, or a function of the regex match
    why: str


# What each kernel's plan assumes, first match wins. Registers must fit `blocks` blocks of `threads` threads.
OCCUPANCY = [
    Rule(r"row_kernel<torch_vjp::cuda::(\w+)<.*, (\d+), \(torch_vjp::cuda::RowKind\)0>\(", SUB_WARP_THREADS,
         lambda m: shuffle_blocks(m.group(1), int(m.group(2))),
         "Shuffle instance (V < kRowPacks, and V = kRowPacks for the warp path of ops whose Block instance takes "
         "two blocks: kWholeBlockRows): rows of at most 32 lanes, blocks of 256 threads; enough of them an SM for "
         "ROW_BYTES_IN_FLIGHT of loads"),
    Rule(r"row_kernel<torch_vjp::cuda::(?:(?:Add)?NormBackward<(?:true|false), float, true>|"
         r"NormBackward<false, c10::(?:BFloat16|Half), true>), 2, \(torch_vjp::cuda::RowKind\)1>\(", None, 2,
         "Block instance of the norm backwards with parameter sums whose kBlockMinBlocks is 2 (float; the half "
         "types' rms_norm): two blocks of 512 threads an SM, 64 registers, so that one loads while the other "
         "reduces; their row group is the whole block (kWholeBlockRows), the warp path a Shuffle instance"),
    Rule(r"row_kernel<.*\(torch_vjp::cuda::RowKind\)1>\(", None, 1,
         "Block instance (V = kRowPacks): one block of up to the op's kBlockThreads (512; 640, 768 or 1024 where "
         "ptxas spills at 128 registers and not at 96, 80 or 64) an SM holds kRowPacks packs a thread: 32-128 KB"),
    Rule(r"row_kernel<.*\(torch_vjp::cuda::RowKind\)2>\(", None, 1,
         "WideBlock instance: one block of up to the op's kMaxThreads, blocks above its kBlockThreads where no "
         "cluster runs (sm_80, or clusters off)"),
    Rule(r"row_kernel<.*\(torch_vjp::cuda::RowKind\)3>\(", None, 1,
         "Cluster instance (sm_90): blocks of the op's kClusterThreads (512 unless smaller)"),
    Rule(r"column_kernel<.*, true>\(", 256, 2,
         "vectorised column tiles (P statistics a thread) of up to 256 threads (kColumnVecMaxThreads), two blocks an "
         "SM (kColumnMinBlocks: one loads its tile while the other reduces)"),
    Rule(r"column_kernel<", 512, 2,
         "column tiles of up to 512 threads (kColumnMaxThreads), two blocks an SM (kColumnMinBlocks: one loads its "
         "tile while the other reduces; each holds V packs of kIn inputs a thread)"),
    Rule(r"param_sums_kernel<", 256, 1,
         "parameter sums of rows at different grid offsets, one element a thread: latency covered by many blocks "
         "only where registers allow; rare path (n % P != 0)"),
    Rule(r"rope_kernel<", 256, 4,
         "rope (csrc/cuda/rope.cu): 4 blocks of kRopeThreads = 256 an SM (its launch bound), 6 loads of a pack in "
         "flight a thread (x's two halves, cos's, sin's): 96 KB an SM"),
    Rule(r"map_kernel<.*, ([123]), \d+, [\w:]+>\(", 256, lambda m: {1: 4, 2: 3, 3: 2}[int(m.group(1))],
         "elementwise map: 4, 3 or 2 blocks of 256 an SM for 1, 2 or 3 inputs (kMapMinBlocks), 48-64 KB in flight"),
]

# Instances allowed a stack frame: (pattern, archs, most bytes, why); a spill anywhere else fails. fp64, and two
# instances of the class-weighted fused loss that no benchmark shape launches.
# An entry added here must name only instances no benchmark shape launches: tests/test_cuda_static.py checks every
# entry but fp64's against the plans of benchmarks/plans.py (the A100 for sm_80, the H100 and H200 for sm_90).
SPILLS = [
    (r"[<, ]double[>,]", ("sm_80", "sm_90"), 256,
     "fp64 instances (2-4 packs of 2 doubles a thread): fp64 is no benchmark dtype; up to 256 B allowed until a "
     "GPU shows whether they cost anything against torch's own fp64 kernels"),
    (r"row_kernel<torch_vjp::cuda::WeightedCrossEntropyForwardGrad<[\w:]+>, 1, \(torch_vjp::cuda::RowKind\)0>",
     ("sm_80", "sm_90"), 32,
     "the fused loss with class weights and label smoothing at V = 1 (vocabularies of at most 32 packs, no "
     "language-model head): 16 B on sm_80, 24 B (bf16, fp16) and 32 B "
     "(fp32) on sm_90, at 40 registers (6 blocks of 256 an SM; ptxas -v of cross_entropy.cu alone, CUDA 13.0)"),
    (r"row_kernel<torch_vjp::cuda::WeightedCrossEntropyForwardGrad<float>, 8, \(torch_vjp::cuda::RowKind\)3>",
     ("sm_90",), 8,
     "the fused loss with class weights and label smoothing in fp32 (not the fused benchmark's dtype), Cluster "
     "instance (long rows, sm_90): 8 B at 128 registers, 8 packs of logits held across the row's reduction "
     "beside the weighted statistic, and the bounds test of the class weight read in map (padding slots must not "
     "read past the (C,) weights). The engine's parameter vector in place of that read spilled 8-56 B across the "
     "fp32/bf16/fp16 instances (ptxas -v of cross_entropy.cu alone, CUDA 13.0)"),
]


def register_budget(threads: int, blocks: int, arch: str) -> int:
    """Most registers a thread such that `blocks` blocks of `threads` threads are resident at once."""
    warps = -(-threads // 32)
    if blocks * threads > THREADS_PER_SM.get(arch, 2048):
        return 0
    per_warp = REGISTERS_PER_SM // (blocks * warps)  # registers a warp may take
    return min(255, (per_warp // 32) // 8 * 8)       # allocated 8 a thread (256 a warp) at a time


def find_cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit on PATH, else the one torch's triton dependency ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


@dataclass
class Instance:
    arch: str
    mangled: str
    name: str  # demangled
    regs: int
    stack: int
    local: int
    max_threads: int | None = None
    maxreg: int | None = None


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not names:
        return names
    if not tool:
        raise SystemExit("kernel_resources: c++filt (binutils) is needed to read the kernels' names")
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def read_instances(paths: list[str], cuobjdump: str) -> list[Instance]:
    """Every kernel instance of every cubin in `paths` (a library or objects), one entry per architecture."""
    found: list[Instance] = []
    for path in paths:
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        arch = None
        pending = None
        for line in usage.splitlines():
            line = line.strip()
            if line.startswith("arch = "):
                arch = line.split("=", 1)[1].strip()
            elif line.startswith("Function "):
                pending = line[len("Function "):].rstrip(":")
            elif pending and line.startswith("REG:"):
                fields = dict(f.split(":", 1) for f in line.split() if ":" in f)
                found.append(Instance(arch, pending, pending, int(fields["REG"]), int(fields.get("STACK", 0)),
                                      int(fields.get("LOCAL", 0))))
                pending = None
        # Launch bounds from the .nv.info.<function> sections, by (architecture, function).
        # Streamed: the dump holds every section of every cubin (hundreds of MB for the whole library).
        elf = subprocess.Popen([cuobjdump, "-elf", path], stdout=subprocess.PIPE, text=True)
        bounds: dict[tuple[str, str], dict[str, int]] = {}
        arch = None
        section = None
        attribute = None
        for line in elf.stdout:
            s = line.strip()
            m = re.match(r"arch = (sm_\d+)", s)
            if m:
                arch = m.group(1)
                continue
            if line.startswith("."):  # a section's dump begins: ".nv.info.<function>" holds its attributes
                section = line[len(".nv.info."):].strip() if line.startswith(".nv.info.") else None
                attribute = None
                continue
            if s.startswith("Attribute:"):
                attribute = s.split()[-1]
            elif s.startswith("Value:") and section and attribute in ("EIATTR_MAX_THREADS", "EIATTR_MAXREG_COUNT"):
                value = int(s.split()[1], 16)
                bounds.setdefault((arch, section), {})[attribute] = value
                attribute = None
        if elf.wait() != 0:
            raise subprocess.CalledProcessError(elf.returncode, [cuobjdump, "-elf", path])
        for inst in found:
            b = bounds.get((inst.arch, inst.mangled), {})
            if inst.max_threads is None:
                inst.max_threads = b.get("EIATTR_MAX_THREADS")
                inst.maxreg = b.get("EIATTR_MAXREG_COUNT")
    for inst, name in zip(found, _demangle([i.mangled for i in found])):
        inst.name = name
    return found


def check(instances: list[Instance], archs=ARCHS) -> tuple[list[str], list[tuple]]:
    """(failures, table rows: arch, name, regs, budget, threads, blocks, stack, verdict)."""
    failures, rows = [], []
    for arch in archs:
        if not any(i.arch == arch for i in instances):
            failures.append(f"no {arch} machine code in the library")
    for inst in instances:
        if inst.arch not in archs:
            continue
        rule = next((r for r in OCCUPANCY if re.search(r.pattern, inst.name)), None)
        if rule is None:
            failures.append(f"{inst.arch} {inst.name}: no OCCUPANCY rule in benchmarks/kernel_resources.py says what "
                            "its launch assumes")
            continue
        match = re.search(rule.pattern, inst.name)
        blocks = rule.blocks(match) if callable(rule.blocks) else rule.blocks
        threads = rule.threads if rule.threads is not None else (inst.max_threads or 1024)
        verdict = "ok"
        if rule.threads is not None and inst.max_threads is not None and inst.max_threads != rule.threads:
            verdict = "bound"
            failures.append(f"{inst.arch} {inst.name}: launch bound {inst.max_threads} threads, the plan launches up "
                            f"to {rule.threads}")
        budget = register_budget(threads, blocks, inst.arch)
        if inst.regs > budget:
            verdict = "registers"
            failures.append(f"{inst.arch} {inst.name}: {inst.regs} registers; {blocks} block(s) of {threads} "
                            f"threads an SM ({rule.why}) allow {budget}")
        spill = inst.stack + inst.local
        if spill:
            allowed = next((most for pattern, on, most, _ in SPILLS
                            if inst.arch in on and re.search(pattern, inst.name)), None)
            if allowed is None or spill > allowed:
                verdict = "spill"
                failures.append(f"{inst.arch} {inst.name}: {inst.stack} bytes stack, {inst.local} local (spills); "
                                + ("no exception in SPILLS" if allowed is None else f"SPILLS allows {allowed}"))
            elif verdict == "ok":
                verdict = "spill (allowed)"
        rows.append((inst.arch, inst.name, inst.regs, budget, threads, blocks, spill, verdict))
    return failures, rows


def short_name(name: str) -> str:
    """A demangled instance name without namespaces and the argument list."""
    name = name.split(">(", 1)[0] + ">" if ">(" in name else name
    kinds = ("Shuffle", "Block", "WideBlock", "Cluster")
    name = re.sub(r"\(torch_vjp::cuda::RowKind\)([0-3])", lambda m: kinds[int(m.group(1))], name)
    name = re.sub(r"\(torch_vjp::math::\w+\)", "", name)
    return re.sub(r"\b(void |torch_vjp::(cuda::|math::)?|c10::|\(anonymous namespace\)::)", "", name)


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    paths = [p for a in args for p in (glob.glob(a) or [a])]
    if not paths:
        print("usage: python -m benchmarks.kernel_resources LIBRARY_OR_OBJECTS... [--table]", file=sys.stderr)
        return 2
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        print("kernel_resources: no cuobjdump (CUDA toolkit or triton)", file=sys.stderr)
        return 2
    failures, rows = check(read_instances(paths, cuobjdump))
    if "--table" in argv:
        print("| arch | instance | registers | budget | threads × blocks | stack B | verdict |")
        print("|---|---|---|---|---|---|---|")
        for arch, name, regs, budget, threads, blocks, spill, verdict in sorted(rows, key=lambda r: (r[1], r[0])):
            print(f"| {arch} | `{short_name(name)}` | {regs} | {budget} | {threads} × {blocks} | {spill} "
                  f"| {verdict} |")
    spilled = sum(1 for r in rows if r[6])
    print(f"kernel_resources: {len(rows)} kernel instances ({', '.join(ARCHS)}), {spilled} with a stack frame, "
          f"{len(failures)} failure(s)")
    for f in failures:
        print("  FAIL " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
