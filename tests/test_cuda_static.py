"""Static evidence about the CUDA kernels, on a machine without a GPU: the register and spill report of every
kernel instance of the built library against the occupancy its plan assumes (benchmarks/kernel_resources.py,
which .ci/run's CUDA step runs on its clean FORCE_CUDA=1 build). The library checks skip in a CPU-only build
or where no cuobjdump is at hand; the register arithmetic they rest on is checked everywhere. And the launch
plans of the benchmark shapes on an A100, H100 and H200, from the engine's planning code compiled for the host
(benchmarks/plans.py; skipped without a C++ compiler).
"""
import os
import re

import pytest

from benchmarks import kernel_resources as kr


@pytest.mark.parametrize("threads,blocks,budget", [
    (1024, 1, 64),   # the widest row blocks: 64 registers a thread
    (768, 1, 80),    # 24 warps: 2730 a warp, 85 a thread, allocated 8 at a time
    (512, 1, 128),
    (512, 2, 64),
    (256, 8, 32),    # 2048 threads: the most an SM holds
    (256, 4, 64),
    (256, 3, 80),
    (256, 9, 0),     # more threads than an SM holds: no budget at all
])
def test_register_budget(threads, blocks, budget):
    assert kr.register_budget(threads, blocks, "sm_90") == budget


def test_shuffle_instances_keep_enough_loads_in_flight():
    """A Shuffle instance's block count an SM times its bytes a block reaches the in-flight target, within the
    2048 threads an SM holds."""
    for op, inputs in kr.ROW_OP_INPUTS.items():
        for V in (1, 2, 4):
            blocks = kr.shuffle_blocks(op, V)
            assert 1 <= blocks <= kr.SHUFFLE_MAX_MIN_BLOCKS
            assert (blocks * kr.SUB_WARP_THREADS * V * inputs * 16 >= kr.ROW_BYTES_IN_FLIGHT
                    or blocks == kr.SHUFFLE_MAX_MIN_BLOCKS)


def test_check_flags_spills_registers_and_unknown_kernels():
    """The checker's verdicts on made-up instances: a spill, registers above the budget, a kernel no rule covers."""
    name = ("void torch_vjp::cuda::row_kernel<torch_vjp::cuda::SoftmaxForward<(torch_vjp::math::SoftmaxKind)0, "
            "c10::BFloat16>, 1, (torch_vjp::cuda::RowKind)0>(torch_vjp::cuda::EngineArgs<...>)")
    good = kr.Instance("sm_90", "m", name, regs=40, stack=0, local=0, max_threads=256)
    failures, _ = kr.check([good, kr.Instance("sm_80", "m", name, 30, 0, 0, 256)])
    assert failures == []
    for bad, why in [(kr.Instance("sm_90", "m", name, 32, 8, 0, 256), "spills"),
                     (kr.Instance("sm_90", "m", name, 48, 0, 0, 256), "registers"),
                     (kr.Instance("sm_90", "m", name, 32, 0, 0, 1024), "launch bound"),
                     (kr.Instance("sm_90", "m", "void mystery_kernel(int)", 8, 0, 0, 128), "no OCCUPANCY rule")]:
        failures, _ = kr.check([bad, kr.Instance("sm_80", "m", name, 30, 0, 0, 256)])
        assert len(failures) == 1 and why in failures[0], (why, failures)


def _built_library():
    torch_vjp = pytest.importorskip("torch_vjp")
    if torch_vjp.backends()["cuda"] is None:
        pytest.skip("a CPU-only build: no CUDA kernels to inspect (FORCE_CUDA=1 builds them without a GPU)")
    cuobjdump = kr.find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit, or torch's triton package)")
    from torch_vjp import _C
    return _C.__file__, cuobjdump


def test_built_kernels_fit_their_plans():
    """Every kernel instance of this build: no spill outside the named exceptions, registers within the
    occupancy its plan assumes, every instance covered by a rule (the same check as CI's CUDA step)."""
    library, cuobjdump = _built_library()
    instances = kr.read_instances([library], cuobjdump)
    archs = sorted({i.arch for i in instances} & set(kr.ARCHS))  # a local build may target one of them
    if not archs:
        pytest.skip(f"{library} holds no {' or '.join(kr.ARCHS)} machine code")
    failures, rows = kr.check(instances, archs)
    assert rows, f"no kernel instances found in {library}"
    assert not failures, "\n".join(failures)


def _benchmark_instances():
    """(arch, demangled name, plan row) of every row_kernel instance a benchmark shape launches: the CUDA preset's
    shapes, its fused loss's chunks and the Jacobian sweep, on the A100 (sm_80), H100 and H200 (sm_90)."""
    from benchmarks import plans
    try:
        plans.plan_host()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return [(plans.ARCH[r["gpu"]], plans.kernel_name(r), r) for r in plans.benchmark_table() + plans.jacobian_table()]


def test_no_spill_exception_covers_a_benchmark_instance():
    """Issue 16: no spill in any instance the benchmark shapes use, fp64 aside. Every SPILLS entry but fp64's must
    name only instances no benchmark plan launches (the instance is read off the plan: op, dtype, V and the
    RowKind with_row_kernel picks), so a spill there still fails the library check."""
    fp64 = [e for e in kr.SPILLS if "double" in e[0]]
    assert len(fp64) == 1
    hits = sorted({(arch, name, pattern) for arch, name, _ in _benchmark_instances()
                   for pattern, on, _, _ in kr.SPILLS if pattern != fp64[0][0] and arch in on
                   and re.search(pattern, name)})
    assert not hits, hits


def test_benchmark_instances_are_built_without_spills():
    """In this build: every instance a benchmark plan launches exists and has no stack frame (fp64 aside)."""
    library, cuobjdump = _built_library()
    built = {(i.arch, i.name): i for i in kr.read_instances([library], cuobjdump)}
    archs = {arch for arch, _ in built}
    for arch, name, r in _benchmark_instances():
        if arch not in archs:
            continue  # a local build of one architecture
        inst = built.get((arch, name))
        where = (arch, r["op"], r["dtype"], r["rows"], r["n"], r["gpu"], r["kind"], r["V"])
        assert inst is not None, ("no such instance in the library", where, name)
        assert r["dtype"] == "float64" or inst.stack + inst.local == 0, (where, inst.stack, inst.local)


# --- Launch plans (csrc/cuda/plan_rows.h compiled for the host: benchmarks/plans.py) --------------------------

def _plan_table():
    from benchmarks import plans
    try:
        plans.plan_host()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return plans, plans.benchmark_table()


def test_row_plans_give_each_instance_its_row_groups():
    """row_kernel finds its row groups without dividing by a run-time G, from what plan_rows promises (and
    with_row_kernel asserts): a Shuffle plan (V < kRowPacks) has a power of two lanes, at most 32, in blocks of at
    most 256 threads, with no cluster or split; a V = kRowPacks plan groups by warps (32 lanes) or by the whole
    block (lanes = threads > 32), and by the whole block wherever it takes a Cluster or WideBlock instance."""
    plans, _ = _plan_table()
    ops = [(8, 4, 1024, 512, 512), (4, 8, 1024, 512, 1024), (8, 2, 768, 512, 512), (4, 4, 768, 512, 768),
           (2, 4, 512, 512, 512), (2, 8, 1024, 512, 512), (8, 4, 768, 512, 640), (4, 8, 1024, 512, 768)]
    # P, kRowPacks, kMaxThreads, kClusterThreads, kBlockThreads
    cases, lines = [], []
    for rows in (1, 3, 33, 100, 4096, 65536):
        for n in [*range(1, 300, 7), 511, 513, 1024, 4096, 8191, 12288, 16385, 32768, 50257, 65537, 128256, 1 << 20]:
            for P, vmax, most, cluster_threads, block in ops:
                for sms, clusters in ((108, 0), (132, 1)):
                    for off in (0, P - 1):
                        cases.append((rows, n, vmax, block))
                        lines.append(f"rows {rows} {n} {P} {vmax} {most} {cluster_threads} {sms} {clusters} {off}")
    for (rows, n, vmax, block), r in zip(cases, plans.query(lines)):
        where = (rows, n, vmax, r)
        whole = r["lanes"] == r["threads"] and r["lanes"] > 32
        if r["V"] < vmax:
            assert r["lanes"] in (1, 2, 4, 8, 16, 32) and r["threads"] <= 256, where
            assert r["cluster"] == 1 and r["chunks"] == 1, where
        else:
            assert whole or r["lanes"] == 32, where
            if r["cluster"] > 1 or r["threads"] > block:
                assert whole, where


def test_two_block_norm_backwards_agree_across_the_mirrors():
    """Issue 16 item 5: the norm backwards with parameter sums whose Block instance asks for two blocks of 512 an
    SM (the epilogues' kBlockMinBlocks = 2, mirrored by plans.TWO_BLOCK_OPS) are those kernel_resources holds to
    64 registers; their Block plans count two blocks of 512 an SM, and their warp path (32 lanes a row, V = 2)
    runs the Shuffle instance; the other ops' Block keeps one block and the warp path."""
    plans, _ = _plan_table()
    rule = next(r for r in kr.OCCUPANCY if r.blocks == 2 and "RowKind\\)1" in r.pattern)
    ops = ("layer_norm_backward", "rms_norm_backward", "add_layer_norm_backward", "add_rms_norm_backward")
    # fp32 n = 256 and the half types' n = 512: 64 packs, the warp path at V = 2; n = 4096 (fp32) and 8192 (the
    # half types): 512-thread blocks
    shapes = ((64, 256), (64, 512), (4096, 4096), (4096, 8192))
    table = plans.row_table(shapes, ("bfloat16", "float16", "float32"), names=ops, gpus={"A100": plans.GPUS["A100"]})
    seen = set()
    for r in table:
        two = (r["op"], r["dtype"]) in plans.TWO_BLOCK_OPS
        where = (r["op"], r["dtype"], r["rows"], r["n"], r["path"], r["kind"], r["threads"])
        if r["path"] == "warp" and r["V"] == 2:  # (V = 1: a shorter row, Shuffle for every op)
            assert r["kind"] == ("Shuffle" if two else "Block"), where
            seen.add(("warp", two))
        if r["kind"] == "Block":
            assert bool(re.search(rule.pattern, plans.kernel_name(r))) == two, where
            if r["threads"] == 512:
                assert r["resident"] == (2 if two else 1) and r["in_flight"] == (64 if two else 32) * 1024, where
                seen.add((512, two))
    assert seen == {("warp", True), ("warp", False), (512, True), (512, False)}, seen


def test_benchmark_plans_keep_enough_loads_in_flight():
    """Every benchmark shape, on the A100, H100 and H200: the blocks the launch bounds guarantee an SM hold at
    least the bytes of loads the card needs in flight (bandwidth × latency / SMs)."""
    _, table = _plan_table()
    short = [r for r in table if r["in_flight"] < r["need"]]
    assert not short, [(r["op"], r["dtype"], r["rows"], r["n"], r["gpu"], r["in_flight"], int(r["need"]))
                       for r in short]


def test_benchmark_plans_read_each_row_once_where_possible():
    """A row is read twice (a split with a reduction) only where no kernel can hold it: no clusters on the card
    and more packs than one block's kMaxThreads × kRowPacks. Passes without a reduction never take a cluster, and
    every launch fits its instance's bound."""
    plans, table = _plan_table()
    for r in table:
        op = plans.ENGINE_OPS[r["op"]]
        where = (r["op"], r["dtype"], r["rows"], r["n"], r["gpu"], r["path"])
        if r["reads"] > 1:
            P = 16 // plans.ITEMSIZE[r["dtype"]]
            one_block = plans.max_threads(r["op"], r["dtype"]) * plans.row_packs(op, r["dtype"]) * P
            assert not plans.GPUS[r["gpu"]].clusters and r["n"] > one_block, where
        if not op.reduces:
            assert r["cluster"] == 1, where
        assert r["threads"] <= r["bound"], where


def test_plans_table_in_the_readme_is_current():
    """benchmarks/README.md's plan table is what `python -m benchmarks.plans` prints now."""
    plans, table = _plan_table()
    readme = open(os.path.join(plans.ROOT, "benchmarks", "README.md")).read()
    assert plans.markdown(table) in readme, "regenerate it: python -m benchmarks.plans"


# --- Exact GELU in the half types (csrc/math/gelu_fast.h compiled for the host: benchmarks/gelu_accuracy.py) --

def test_half_type_gelu_formula_accuracy():
    """The CUDA half types' exact GELU (one ex2.approx, one rcp.approx), emulated on the host with those two
    functions off by the hardware's error bound in each direction, for every finite bf16 and fp16 input:
    f and f' rounded to the dtype within 0.75 ulp of float64 (0.5 is correct rounding), never further than
    torch's own float formula x/2 (1 + erf(x/√2)) lands, and no more results off the correctly rounded one."""
    from benchmarks import gelu_accuracy
    try:
        gelu_accuracy.gelu_host()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    rows = gelu_accuracy.summary()
    torch_row = {r["dtype"]: r for r in rows if r["variant"] == "exact"}
    for r in rows:
        t = torch_row[r["dtype"]]
        for key in ("f", "df"):
            where = (r["dtype"], r["variant"], key, r[f"{key}_ulps"], r[f"{key}_off"])
            assert r[f"{key}_ulps"] <= 0.75, where
            assert r[f"{key}_ulps"] <= t[f"torch_{key}_ulps"], where
            assert r[f"{key}_off"] <= t[f"torch_{key}_off"], where


def test_fused_loss_reads_each_chunk_once_where_a_kernel_holds_its_rows():
    """fused_linear_cross_entropy with the gradient: its row kernels pass over each chunk of logits one pass
    fewer than the forward-then-gradient kernels did, and exactly the minimum (read once, write once) wherever
    the plan does not split the rows; the table in benchmarks/README.md is current."""
    plans, table = _plan_table()
    from benchmarks import sol
    passes = plans.fused_loss_passes(table)
    assert passes
    plan = {(r["op"], r["rows"], r["n"], r["gpu"]): r for r in table}
    for p in passes:
        where = (p["rows"], p["n"], p["gpu"])
        assert p["now"] == p["before"] - 1, where
        if plan[("fused_linear_cross_entropy", p["rows"], p["n"], p["gpu"])]["path"] != "split":
            assert p["now"] == sol.FUSED_LOSS_ROW_PASSES["loss+grad"], where
    readme = open(os.path.join(plans.ROOT, "benchmarks", "README.md")).read()
    assert plans.fused_markdown(passes) in readme, "regenerate it: python -m benchmarks.plans"


def test_add_norm_plans_reach_every_row_path():
    """Issue 15: add_layer_norm and add_rms_norm run the row engine's row kernel with two extra operands (the
    residual added on load and s stored beside y; grad_sum added as dx is written), handled by row_kernel itself,
    so on every path it plans: several rows a warp, a warp, a block, an sm_90 cluster and split rows. Norms are
    rows-only, so the column paths never serve them. Here: the host planner, with the add ops' own constants
    (two loads in flight: 4 packs a thread), reaches each row path in every dtype, within its instance's bound."""
    plans, _ = _plan_table()
    shapes = ((64, 7), (64, 100), (64, 200), (64, 400), (64, 1000), (64, 4000), (256, 16384), (256, 65536), (4, 300007))
    ops = ("add_layer_norm", "add_layer_norm_backward", "add_rms_norm", "add_rms_norm_backward")
    table = plans.row_table(shapes, ("bfloat16", "float32", "float64"), names=ops,
                            gpus={"A100": plans.GPUS["A100"], "H100": plans.GPUS["H100"]})
    for op in ops:
        for dtype in ("bfloat16", "float32", "float64"):
            for card in ("A100", "H100"):
                rows = [r for r in table if (r["op"], r["dtype"], r["gpu"]) == (op, dtype, card)]
                paths = {r["path"] for r in rows}
                want = {"rows_per_warp", "warp", "block", "split"} | ({"cluster"} if card == "H100" else set())
                assert paths == want, (op, dtype, card, sorted(paths))
                for r in rows:
                    assert r["threads"] <= r["bound"], r
                    assert plans.kernel_name(r).startswith("void torch_vjp::cuda::row_kernel<torch_vjp::cuda::AddNorm"), r
